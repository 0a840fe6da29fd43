"""The cell folder's file format: every file of ``results/<suite>/<cell_id>/``, named once.

As submitit's ``JobPaths`` names every file of a job folder, ``CellFiles(cell_dir)`` names every
file of a cell folder, for the engine that writes them and the reporter that reads them (torch-
free: the reporter runs on a laptop). ``FILES`` says what each one holds, who writes it and
whether it stays once the cell has finished; ``tests/test_house.py`` checks that a cell writes no
other file and that no other module spells a file name of its own.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.errors import UserError


@dataclass(frozen=True)
class CellFile:
    name: str  # the file (or folder) name in the cell folder; "{}" marks a part that varies
    written_by: str  # the module that writes it
    holds: str
    kept: bool = True  # still there once the cell has finished (False: removed with the checkpoint)


FILES: dict[str, CellFile] = {
    "result": CellFile("result.json", "bench.runner", "status, configuration, metrics per epoch, measurements"),
    "weights": CellFile("trainable.safetensors", "bench.runner", "what trained, with the cell's identity"),
    "per_query": CellFile("per_query.npz", "bench.train", "the reported epoch's test queries: each metric's "
                                                          "per-query record (bench.metrics)"),
    "val_per_query": CellFile("val_per_query.npz", "bench.train", "the same for the validation split"),
    "retrieval": CellFile("retrieval.npz", "bench.artifacts", "32 fixed queries' neighbours"),
    "attention": CellFile("attention.npz", "bench.artifacts", "CLS attention of 8 fixed test images"),
    "proxies": CellFile("proxies.npz", "bench.artifacts", "the learned proxies, class means and prompts"),
    "test_embeddings": CellFile("test_embeddings.npy", "bench.artifacts", "test embeddings (float16)"),
    "test_labels": CellFile("test_labels.npy", "bench.artifacts", "their labels"),
    "gallery_embeddings": CellFile("test_gallery_embeddings.npy", "bench.artifacts", "In-Shop gallery embeddings"),
    "gallery_labels": CellFile("test_gallery_labels.npy", "bench.artifacts", "their labels"),
    "metrics_log": CellFile("metrics.jsonl", "bench.loggers", "one line per epoch"),
    "metrics_csv": CellFile("metrics.csv", "bench.loggers", "the same as a table (logger: [csv])"),
    "tensorboard": CellFile("tensorboard", "bench.loggers", "event files (logger: [tensorboard])"),
    "wandb": CellFile("wandb", "bench.loggers", "wandb's offline run (logger: [wandb])"),
    "checkpoint": CellFile("checkpoint.pt", "bench.checkpoint", "the resumable state", kept=False),
    "checkpoint_tables": CellFile("checkpoint.tables.{}.safetensors", "bench.checkpoint",
                                  "the checkpoint's big tensors, named by their hash", kept=False),
    "checkpoint_partial": CellFile(".checkpoint.tables.{}.partial", "bench.checkpoint",
                                   "a tables file being written", kept=False),
    "best": CellFile("best.safetensors", "bench.train", "the best validation epoch's weights, while training",
                     kept=False),
    "lock": CellFile(".lock", "bench.runner", "held by the process that runs the cell"),
    "runs_log": CellFile("runs.log", "bench.runner", "one line per start and end of the cell"),
    "error_log": CellFile("error.log", "bench.runner", "the traceback of an unexpected exception"),
    "job": CellFile("job.json", "bench.dispatch", "the SLURM job of the cell's last submission"),
}
MOVED_ASIDE = "{name}.{why}-{time}"  # a file put out of the way (bench.results.move_aside), never deleted


class CellFiles:
    """The paths of one cell folder's files: ``CellFiles(cell_dir).result``, ``.per_query``, ..."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _path(self, key: str) -> Path:
        return self.folder / FILES[key].name

    result = property(lambda self: self._path("result"))
    weights = property(lambda self: self._path("weights"))
    per_query = property(lambda self: self._path("per_query"))
    val_per_query = property(lambda self: self._path("val_per_query"))
    retrieval = property(lambda self: self._path("retrieval"))
    attention = property(lambda self: self._path("attention"))
    proxies = property(lambda self: self._path("proxies"))
    test_embeddings = property(lambda self: self._path("test_embeddings"))
    test_labels = property(lambda self: self._path("test_labels"))
    gallery_embeddings = property(lambda self: self._path("gallery_embeddings"))
    gallery_labels = property(lambda self: self._path("gallery_labels"))
    metrics_log = property(lambda self: self._path("metrics_log"))
    metrics_csv = property(lambda self: self._path("metrics_csv"))
    tensorboard = property(lambda self: self._path("tensorboard"))
    wandb = property(lambda self: self._path("wandb"))
    checkpoint = property(lambda self: self._path("checkpoint"))
    best = property(lambda self: self._path("best"))
    lock = property(lambda self: self._path("lock"))
    runs_log = property(lambda self: self._path("runs_log"))
    error_log = property(lambda self: self._path("error_log"))
    job = property(lambda self: self._path("job"))

    def checkpoint_tables(self, digest: str) -> Path:
        return self.folder / FILES["checkpoint_tables"].name.format(digest)

    def checkpoint_partial(self, tag: str) -> Path:
        return self.folder / FILES["checkpoint_partial"].name.format(tag)

    def all_checkpoint_tables(self) -> list[Path]:
        return sorted(self.folder.glob(FILES["checkpoint_tables"].name.format("*")))

    def read_arrays(self, key: str) -> dict[str, np.ndarray] | None:
        """Every array of one of the folder's ``.npz`` files, never unpickled; None when the file
        does not exist, ``UnreadableFile`` (naming the file and the error) when it cannot be read."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return {name: np.asarray(data[name]) for name in data.files}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise UnreadableFile(f"{path.name} cannot be read ({type(e).__name__})") from None

    def read_array(self, key: str) -> np.ndarray | None:
        """One of the folder's ``.npy`` files, never unpickled; None when it does not exist."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise UnreadableFile(f"{path.name} cannot be read ({type(e).__name__})") from None


class UnreadableFile(UserError):
    """A cell file that exists but cannot be read (cut short, not the format its name says)."""


def known(name: str) -> bool:
    """Whether a file name found in a cell folder is one of FILES (or a moved-aside copy of one)."""
    import fnmatch

    patterns = [f.name.replace("{}", "*") for f in FILES.values()]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*-*") for p in patterns)
