#!/usr/bin/env python3
"""Command line of the suite (the same as the ``peft-dml`` console script); see ``cli/``."""
import sys

from cli import main

if __name__ == "__main__":
    sys.exit(main())
