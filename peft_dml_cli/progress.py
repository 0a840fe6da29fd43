"""The one progress display: rich bars on a terminal, plain lines when output is piped.

It renders the engine's events (``bench.events``); the plain lines are ``events.describe``'s,
the same text a SLURM job writes to its log.
"""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Column

from bench.events import Event, describe

COLOURS = {"done": "green", "failed": "red", "running elsewhere": "cyan"}


class ProgressView:
    """A context manager and an event listener: ``with ProgressView(console) as on_event: ...``."""

    def __init__(self, console: Console, transient: bool = False):
        self.console = console
        self.bars = console.is_terminal
        self.transient = transient
        self.progress: Progress | None = None
        self.overall: TaskID | None = None
        self.cell: TaskID | None = None
        self.cell_name = "cell"
        self.epochs = self.start_epoch = 0
        self.recall = ""
        self.wait: TaskID | None = None

    def __enter__(self) -> "ProgressView":
        if self.bars:
            # at 80 columns the name and the loss give way (cut with "…"), never the step count,
            # the elapsed time or the ETA
            flexible = dict(no_wrap=True, overflow="ellipsis")
            self.progress = Progress(
                TextColumn("{task.description}", table_column=Column(ratio=3, min_width=8, **flexible)),
                BarColumn(bar_width=10), MofNCompleteColumn(table_column=Column(no_wrap=True, min_width=7)),
                TextColumn("{task.fields[info]}", table_column=Column(ratio=2, min_width=4, **flexible)),
                TimeElapsedColumn(table_column=Column(no_wrap=True, min_width=7)),
                TimeRemainingColumn(table_column=Column(no_wrap=True, min_width=7)),
                console=self.console, transient=self.transient, expand=True)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def __call__(self, event: Event) -> None:
        if event.get("event") == "cell_end":
            return  # the command prints the cell's outcome itself
        if not self.bars:
            line = describe(event)
            if line is not None:
                self.console.print(line, highlight=False, markup=False)
            return
        self._bar(event)

    def _bar(self, event: Event) -> None:
        progress = self.progress
        assert progress is not None
        kind = event["event"]
        if kind == "suite_start":
            self.overall = progress.add_task("cells", total=event["total"], info="")
        elif kind == "cell_begin":
            self.cell_name = escape(str(event["name"]))  # a label is data, not rich markup
            self.cell = progress.add_task(self.cell_name, total=None, info="")
            self.recall = ""
        elif kind == "cell_start":
            if self.cell is None:
                self.cell = progress.add_task(self.cell_name, total=None, info="")
            self.epochs, self.start_epoch = event["total_epochs"], event["start_epoch"]
            progress.update(self.cell, total=max(self.epochs * event["steps"], 1),
                            completed=self.start_epoch * event["steps"])
        elif kind == "step" and self.cell is not None:
            progress.update(self.cell, advance=1, description=f"{self.cell_name} epoch {event['epoch']}/{self.epochs}",
                            info=f"loss {event['loss']:.4f}{self.recall}")
        elif kind == "epoch_end" and event.get("test"):
            self.recall = f" R@1 {100 * event['test']['recall@1']:.1f}"
        elif kind == "cell_done":
            if self.cell is not None:
                progress.remove_task(self.cell)
                self.cell = None
            if self.overall is not None:
                progress.advance(self.overall)
            colour = COLOURS.get(event["status"], "yellow")
            detail = f" {event['detail']}" if event.get("detail") else ""
            progress.console.print(f"[{colour}]{event['status']}[/] {escape(str(event['name']))}{escape(str(detail))}", highlight=False)
        elif kind == "waiting":
            if self.wait is None:
                self.wait = progress.add_task("waiting for SLURM", total=event["total"], info="")
            progress.update(self.wait, completed=event["done"])
        elif kind == "preparing":
            progress.console.print(describe(event) or "", highlight=False)
