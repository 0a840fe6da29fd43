"""Result files: one folder per cell, ``results/<suite>/<cell_id>/result.json``.

The reporter reads these files only (it must run on a laptop without torch), so this module
imports nothing heavy. Every write is atomic: a temporary file in the same folder, fsync, then
``os.replace``; a reader can never observe a half-written ``result.json``.

Schema (``schema`` = 1)::

    {
      "schema": 1,
      "suite": "table1",                      # suite name ("adhoc" for `run_suite.py cell`)
      "cell_id": "cub200-vit_small-vpt_deep-s0-3f2a9c1e",
      "status": "ok" | "failed",
      "reason": null | "NaN loss at epoch 3, step 17",
      "key": {"dataset": ..., "backbone": ..., "method": ..., "seed": ..., "label": ...,
              ...any other grid axis of the suite},
      "config": {...},                        # the fully resolved CellConfig as a dict
      "epochs": [                             # one entry per finished epoch, in order
        {"epoch": 1, "train_loss": 1.23, "lr": 0.005, "time_s": 12.3,
         "val": {"recall@1": ...} | null, "test": {"recall@1": ..., "map@r": ...} | null}
      ],
      "final": {"epoch": 15, "selection": "last" | "val",
                "test": {"recall@1": ..., "recall@2": ..., "map@r": ...,
                         "num_queries": ..., "num_lone_queries": ...},
                "val": {...} | null},
      "oracle": {"epoch": 12, "test": {...}},  # best test R@1 over epochs: optimistic, label as such
      "measurements": {
        "params_total": ..., "params_backbone": ...,
        "params_trainable": ...,             # everything trained, head and proxies included
        "params_trainable_no_head": ...,     # trained, without head and proxies
        "peak_memory_bytes": ..., "memory_kind": "cuda_max_allocated" | "cpu_peak_rss",
        "step_latency_ms_median": ..., "throughput_img_s": ...,
        "eval_time_s": ..., "wall_time_s": ..., "device": "cpu" | "NVIDIA H100 ..."
      },
      "slurm": {"job_id": "123_4"} | null,
      "provenance": {"git_commit": ..., "git_dirty": ..., "host": ..., "python": ...,
                     "packages": {"torch": ..., "timm": ...}, "started": iso, "finished": iso}
    }
Metric keys are ``recall@K`` and ``map@r`` as fractions in [0, 1].
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from bench.errors import UserError

SCHEMA_VERSION = 1
RESULT_FILE = "result.json"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ResultError(UserError, ValueError):
    """A result file or name that cannot be used; the message names the file or value."""


def check_name(name: str, what: str) -> str:
    """Suite and cell names become folder names: refuse anything that could leave ``results/``."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise ResultError(
            f"invalid {what} {name!r}: use letters, digits, '.', '_' or '-' "
            "(at most 128 characters, no path separators, no '..')"
        )
    return name


def config_hash(config: dict[str, Any], length: int = 8) -> str:
    """Stable hash of a resolved config: key order and float formatting do not matter."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def make_cell_id(key: dict[str, Any], config: dict[str, Any]) -> str:
    """Readable prefix from the grid key plus a hash of everything that affects the run."""
    parts = [str(key.get(k)) for k in ("dataset", "backbone", "label", "method") if key.get(k)]
    if key.get("label"):
        parts = [p for p in parts if p != str(key.get("method"))]
    parts.append(f"s{key.get('seed', 0)}")
    prefix = "-".join(parts)
    prefix = re.sub(r"[^A-Za-z0-9._-]+", "_", prefix)[:90].strip("._-") or "cell"
    return check_name(f"{prefix}-{config_hash(config)}", "cell id")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    # numpy scalars and paths end up in configs and metrics
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_result(path: str | os.PathLike) -> dict[str, Any]:
    """Parse one result file (JSON only); a broken file raises ResultError naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ResultError(f"{path}: cannot read result file: {e}") from e
    if not isinstance(data, dict) or data.get("status") not in ("ok", "failed"):
        raise ResultError(f"{path}: not a result file (missing or unknown 'status')")
    return data
