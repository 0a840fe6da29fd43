#!/usr/bin/env python3
"""Command line of the suite (the same as the ``peft-dml`` console script); see ``peft_dml_cli/``."""
import sys

from peft_dml_cli import main

if __name__ == "__main__":
    sys.exit(main())
