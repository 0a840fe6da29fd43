"""Progress events and the one function that turns them into a line of text.

The engine reports progress as plain dicts (``{"event": "epoch_end", "epoch": 3, ...}``) to a
callback and never prints. Kinds and their fields:

- ``suite_start``: ``total`` (cells to run here)
- ``cell_begin``: ``name``
- ``cell_start``: ``total_epochs``, ``start_epoch`` (epochs already done: a resumed cell), ``steps``
- ``step``: ``epoch``, ``step``, ``steps``, ``loss``
- ``epoch_end``: ``epoch``, ``train_loss``, ``test`` and ``val`` metrics (or None)
- ``cell_end``: ``status``, ``reason``
- ``cell_done``: ``name``, ``status``, ``detail`` (R@1, or the failure's reason)
- ``waiting``: ``done``, ``total`` (SLURM jobs that ended)
- ``preparing``: ``data_root``, ``hook`` (a suite's prepare hook runs)
- ``data``: ``summary`` (the splits a cell reads: ``DatasetSplits.record()``)
- ``note``: ``text`` (something the user should know, e.g. a corrupt file moved aside)

``describe`` is the text form every display shares: the CLI's plain (piped) output and the
log of a SLURM job (through ``logging``, so sites can route it).
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Callable

Event = dict[str, Any]
Listener = Callable[[Event], None]
STEP_LOG_EVERY = 200  # a line every this many steps inside an epoch (SOP epochs are long)

logger = logging.getLogger("bench")


def describe(event: Event) -> str | None:
    """One line for an event, or None for events that only move a progress bar."""
    kind = event.get("event")
    if kind == "suite_start":
        return f"running {event['total']} cells"
    if kind == "cell_begin":
        return f"cell {event['name']}"
    if kind == "cell_start":
        resumed = f" (resumed after epoch {event['start_epoch']})" if event.get("start_epoch") else ""
        return f"cell_start epoch {event['start_epoch'] + 1} of {event['total_epochs']}{resumed}"
    if kind == "step":
        if event["step"] % STEP_LOG_EVERY:
            return None
        return f"step epoch {event['epoch']} step {event['step']}/{event['steps']} loss {event['loss']:.4f}"
    if kind == "epoch_end":
        test = event.get("test") or {}
        recall = f" R@1 {100 * test['recall@1']:.2f}" if "recall@1" in test else ""
        return f"epoch_end {event['epoch']} train_loss {event['train_loss']:.4f}{recall}"
    if kind == "cell_end":
        return f"cell_end {event['status']}" + (f": {event['reason']}" if event.get("reason") else "")
    if kind == "cell_done":
        detail = f" {event['detail']}" if event.get("detail") else ""
        return f"{event['status']} {event['name']}{detail}"
    if kind == "data":
        return data_line(event["summary"])
    if kind == "note":
        return f"note: {event['text']}"
    if kind == "preparing":
        return f"preparing {event['data_root']} ({event['hook']})"
    if kind == "waiting":
        return f"waiting for SLURM: {event['done']}/{event['total']} cells ended"
    return None


def log_event(event: Event) -> None:
    """A listener that writes ``describe``'s lines to the ``bench`` logger (SLURM job logs)."""
    line = describe(event)
    if line is not None:
        logger.info(line)


def ignore(event: Event) -> None:
    """The listener when nobody listens."""


def data_line(summary: dict[str, Any]) -> str:
    """'data cub200 (/data/cub200): train 100 classes / 5864 images (001.A .. 100.B); ...'."""
    parts = [f"{name} {split['classes']} classes / {split['images']} images "
             f"({split['first_class']} .. {split['last_class']})" for name, split in summary["splits"].items()]
    lone = f"; {summary['lone_queries']} lone queries (left out of the metrics)" if summary.get("lone_queries") else ""
    skipped = f"; {summary['skipped_images']} unreadable images skipped" if summary.get("skipped_images") else ""
    return f"data {summary['dataset']} ({summary['root']}): " + "; ".join(parts) + lone + skipped


def log_to_stdout() -> None:
    """The ``bench`` logger's lines into stdout: a SLURM job's log (``.submitit/<job>_log.out``),
    where ``status`` points users; other libraries' loggers are left as they are."""
    logger = logging.getLogger("bench")
    if not any(getattr(h, "bench_job_log", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S"))
        handler.bench_job_log = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
