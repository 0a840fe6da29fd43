"""Consoles for what users read: rich on a terminal, and nothing cut when piped to a file."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.measure import Measurement

PIPED_MIN_WIDTH = 100


def make_console(stderr: bool = False) -> Console:
    """A console whose long lines (paths, reasons) wrap at spaces, never inside a word."""
    console = Console(stderr=stderr, soft_wrap=not (sys.stderr if stderr else sys.stdout).isatty())
    return console


def print_table(console: Console, table) -> None:
    """A rich table on a terminal as rich lays it out; piped, as wide as its widest row, so no
    cell (a method name, a path, a number) is ever truncated or folded."""
    if console.is_terminal:
        console.print(table)
        return
    natural = Measurement.get(console, console.options.update(width=10_000), table).maximum
    width = console.width
    console.width = max(natural, PIPED_MIN_WIDTH)
    try:
        console.print(table, crop=False, soft_wrap=False)
    finally:
        console.width = width
