"""Watching a cell while it runs: ``metrics.jsonl`` always, trackers when asked (``logger:``).

Every cell appends one JSON line per finished epoch to ``<cell>/metrics.jsonl`` as soon as the
epoch ends: epoch, train loss, learning rate, epoch time, the median step time so far, memory,
and the validation and test metrics when the epoch was evaluated. ``tail -f`` it, or read it
with pandas (``pd.read_json(path, lines=True)``). A resumed cell first drops the lines of
epochs past its checkpoint, so every epoch appears once.

Trackers (cell field ``logger``, a list): ``tensorboard`` (event files in ``<cell>/tensorboard``
through torch's SummaryWriter), ``wandb`` (offline unless ``WANDB_MODE`` says otherwise; the
package is imported only when asked) and ``csv`` (``<cell>/metrics.csv``).
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any

from bench.cell_files import CellFiles
from bench.errors import UserError
from bench.metrics import is_metric_key
from bench.results import atomic_write_text

log = logging.getLogger("bench")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """'train/loss', 'lr', 'val/recall@1', 'test/map@r', ... of one epoch line."""
    out: dict[str, float] = {}
    for name in ("train_loss", "lr", "time_s", "step_ms_median", "memory_bytes"):
        if isinstance(record.get(name), (int, float)):
            out[{"train_loss": "train/loss"}.get(name, name)] = float(record[name])
    for split in ("val", "test"):
        for metric, value in (record.get(split) or {}).items():
            if is_metric_key(metric) and isinstance(value, (int, float)):
                out[f"{split}/{metric}"] = float(value)
    return out


class EpochLog:
    """``metrics.jsonl`` plus the configured trackers, for one cell (``write=False``: a rank other
    than the main one, which writes nothing)."""

    def __init__(self, cell_dir: Path, sinks: list[str], *, resume_after: int, run_name: str, project: str,
                 config: dict[str, Any], write: bool = True):
        self.path = CellFiles(cell_dir).metrics_log
        self.write = write
        if write:
            self._drop_lines_after(resume_after)
        self.sinks = []
        for sink in sinks:
            self.sinks.append(_make_sink(sink, Path(cell_dir), run_name, project, config))

    def _drop_lines_after(self, epoch: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("epoch", 0) <= epoch:
                    kept.append(line)
            except ValueError:
                continue  # a line cut by a kill
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def epoch(self, record: dict[str, Any]) -> None:
        if not self.write:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, default=_plain) + "\n")
            handle.flush()
        values = scalars(record)
        for sink in self.sinks:
            sink.log(values, int(record["epoch"]))

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def _make_sink(name: str, cell_dir: Path, run_name: str, project: str, config: dict[str, Any]):
    if name == "tensorboard":
        return TensorBoardSink(CellFiles(cell_dir).tensorboard)
    if name == "csv":
        return CsvSink(CellFiles(cell_dir).metrics_csv)
    if name == "wandb":
        return WandbSink(cell_dir, run_name, project, config)
    raise UserError(f"logger: unknown tracker {name!r}; choose tensorboard, wandb or csv")


class TensorBoardSink:
    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise UserError("logger: tensorboard needs the tensorboard package: pip install tensorboard "
                            f"(or install peft-dml-bench[trackers]); {e}") from None
        self.writer = SummaryWriter(log_dir=str(folder))

    def log(self, values: dict[str, float], epoch: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class CsvSink:
    def __init__(self, path: Path):
        self.path = path

    def log(self, values: dict[str, float], epoch: int) -> None:
        """One row per epoch. Epochs differ in what they hold (an epoch without evaluation has no
        R@K): when a row brings a new column, the file is rewritten with the wider header, so
        that every reader (pandas included) sees one header and rows of its width."""
        row = {"epoch": epoch, **values}
        rows: list[dict[str, Any]] = []
        columns: list[str] = []
        if self.path.exists():
            with open(self.path, newline="") as handle:
                reader = csv.DictReader(handle)
                columns = list(reader.fieldnames or [])
                rows = list(reader)
        if set(row) <= set(columns):
            with open(self.path, "a", newline="") as handle:
                csv.DictWriter(handle, fieldnames=columns).writerow(row)
            return
        columns += [c for c in row if c not in columns]
        from io import StringIO

        buffer = StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows + [row])
        atomic_write_text(self.path, buffer.getvalue())

    def close(self) -> None:
        pass


class WandbSink:
    def __init__(self, cell_dir: Path, run_name: str, project: str, config: dict[str, Any]):
        os.environ.setdefault("WANDB_MODE", "offline")  # no account or network needed unless asked
        try:
            import wandb
        except ImportError as e:
            raise UserError(f"logger: wandb needs the wandb package: pip install wandb; {e}") from None
        self.run = wandb.init(project=project, name=run_name, id=run_name, dir=str(cell_dir), config=config,
                              resume="allow")

    def log(self, values: dict[str, float], epoch: int) -> None:
        self.run.log({**values, "epoch": epoch}, step=epoch)

    def close(self) -> None:
        self.run.finish()
