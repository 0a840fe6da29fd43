"""Result files: one folder per cell, ``results/<suite>/<cell_id>/result.json``.

The reporter reads these files only (it must run on a laptop without torch), so this module
imports nothing heavy. Every write goes through ``atomic_write_bytes``: a temporary file in the
same folder, fsync, then ``os.replace``, with the mode the umask gives (colleagues on a shared
project folder can read the results); a reader never sees a half-written file, and a full disk
is one message naming the file and the free space.

Schema (``schema`` = 2; version 1 files are read and migrated)::

    {
      "schema": 2,
      "suite": "table1",                      # suite name ("adhoc" for `run_suite.py cell`)
      "cell_id": "cub200-vit_s16-vpt_deep-s0-3f2a9c1e",   # the folder's name
      "identity_hash": "3f2a9c1e...",         # hash of the config fields that decide the result
      "status": "ok" | "failed",
      "reason": null | "non-finite loss (nan) at epoch 3, step 17",
      "key": {"dataset": ..., "backbone": ..., "method": ..., "seed": ..., "label": ...,
              ...any other grid axis of the suite},
      "config": {...},                        # the fully resolved CellConfig as a dict
      "data": {"dataset": ..., "root": ..., "splits": {"train": {"classes", "images",
               "first_class", "last_class"}, "test": {...}}, "lone_queries": ..., "skipped_images": ...},
      "model": {"backbone": "vit_small_patch16_224.augreg_in21k", "weights": ..., "image_size": ...,
                "mean": [...], "std": [...], "embedding_size": ...},
      "epochs": [                             # one entry per finished epoch, in order (epoch 0: zero-shot)
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
        "params_shared": ..., "params_per_class": ...,   # trained, independent of / per class count
        "peak_memory_bytes": ..., "memory_kind": "cuda_max_allocated" | "counted_training",
        "counted_memory_bytes": ...,         # params + grads + optimiser state + saved activations
        "process_peak_rss_bytes": ...,       # the whole process's peak (local runs share one)
        "step_latency_ms_median": ..., "throughput_img_s": ...,
        "eval_time_s": ..., "wall_time_s": ..., "device": "cpu" | "NVIDIA H100 ...",
        "knn_engine": "blas-sym" | "faiss-cpu" | ..., "faiss_package": "faiss-cpu 1.15.1" | null
      },
      "skipped_images": 0,
      "slurm": {"job_id": "123_4"} | null,
      "provenance": {"git_commit": ..., "git_dirty": ..., "host": ..., "python": ...,
                     "packages": {"torch": ..., "timm": ...}, "started": iso, "finished": iso}
    }

Metric keys are ``recall@K`` and ``map@r`` as fractions in [0, 1].
"""
from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench.cell_files import FILES
from bench.errors import UserError

SCHEMA_VERSION = 2
RESULT_FILE = FILES["result"].name  # the one name readers print; paths: CellFiles
MAX_RESULT_BYTES = 64 * 2**20  # a result.json is a few hundred kB at most
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ResultError(UserError, ValueError):
    """A result file or name that cannot be used; the message names the file or value."""


class DiskFullError(UserError, OSError):
    """A write that found no space: the message names the file and the free space left."""


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
    """Readable prefix from the grid key plus a hash of everything that affects the run. The
    display label is left out, as it is of the hash: renaming a row never reruns its cells."""
    parts = [str(key.get(k)) for k in ("dataset", "backbone", "method") if key.get(k)]
    parts.append(f"s{key.get('seed', 0)}")
    if key.get("trial") is not None:  # a tuning trial (bench.tune)
        parts.append(f"t{key['trial']}")
    prefix = "-".join(parts)
    prefix = re.sub(r"[^A-Za-z0-9._-]+", "_", prefix)[:90].strip("._-") or "cell"
    return check_name(f"{prefix}-{config_hash(config)}", "cell id")


def current_umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read it the old way (not thread-safe, fine here)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """0666 minus the process's umask: the mode ``open()`` would give a new file."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """0777 minus the umask: the mode ``mkdir`` would give a new folder."""
    return 0o777 & ~current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Temporary file beside ``path``, fsync, umask's mode, ``os.replace``: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes 0600: nobody else could read the results
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(path, e) from None
        raise


def disk_full(path: Path, error: OSError) -> DiskFullError:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(f"{path}: no space left on the device ({free}; {error.strerror}); free some space "
                         "and rerun: finished results and the last checkpoint are kept")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


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
    """Parse and check one result file (JSON only, schema 1 or 2); a file that is not one raises
    ResultError naming the file and what is wrong with it."""
    path = Path(path)
    try:
        if path.is_dir():
            raise ResultError(f"{path}: is a folder, not a result file")
        if path.stat().st_size > MAX_RESULT_BYTES:
            raise ResultError(f"{path}: {path.stat().st_size / 2**20:.0f} MiB is too large for a result file")
        data = json.loads(path.read_text())
    except ResultError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ResultError(f"{path}: cannot read result file: {e}") from None
    check_schema(data, path)
    return migrate(data)


# top-level field -> the types it may have
_FIELDS: dict[str, tuple[type, ...]] = {
    "suite": (str,), "cell_id": (str,), "reason": (str, type(None)), "key": (dict,), "config": (dict,),
    "epochs": (list,), "final": (dict, type(None)), "oracle": (dict, type(None)),
    "measurements": (dict, type(None)), "data": (dict, type(None)), "model": (dict, type(None)),
    "provenance": (dict, type(None)), "identity_hash": (str,),
}


def check_schema(data: Any, path: Path) -> None:
    if not isinstance(data, dict) or data.get("status") not in ("ok", "failed"):
        raise ResultError(f"{path}: not a result file (missing or unknown 'status')")
    if data.get("schema", 1) not in (1, SCHEMA_VERSION):
        raise ResultError(f"{path}: schema {data.get('schema')!r} is newer than this version reads ({SCHEMA_VERSION})")
    for name, types in _FIELDS.items():
        if name in data and not isinstance(data[name], types):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ResultError(f"{path}: field {name!r} must be {expected}, got {type(data[name]).__name__}")
    if data["status"] == "ok":
        final = data.get("final")
        tested = (data.get("config") or {}).get("evaluate_test", True)
        if not isinstance(final, dict) or not isinstance(final.get("test"), dict if tested else (dict, type(None))):
            raise ResultError(f"{path}: an ok result needs 'final' with its 'test' metrics")
        bad = [k for k, v in (final["test"] or {}).items() if not isinstance(v, (int, float)) or isinstance(v, bool)]
        if bad:
            raise ResultError(f"{path}: final.test.{bad[0]} must be a number")
        if not all(isinstance(e, dict) for e in data.get("epochs") or []):
            raise ResultError(f"{path}: every entry of 'epochs' must be a mapping")


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """A version 1 result as version 2: the fields it lacks, empty."""
    if data.get("schema", 1) == 1:
        data = {**data, "schema": SCHEMA_VERSION}
        for name in ("data", "model"):
            data.setdefault(name, None)
    return data


def foreign_reason(result: dict[str, Any], cell_dir: Path, suite: str | None, identity_hash: str | None
                   ) -> str | None:
    """Why a result in ``cell_dir`` is not this cell's (copied from another suite or cell, or an
    older config), or None when it is. ``suite``/``identity_hash`` None: not checked (the
    reporter reads results whose folder may have been renamed)."""
    if result.get("cell_id") != cell_dir.name:
        return f"it is the result of cell {result.get('cell_id')!r}"
    if suite is not None and result.get("suite") != suite:
        return f"it belongs to suite {result.get('suite')!r}"
    recorded = result.get("identity_hash")
    if identity_hash is not None and recorded is not None and recorded != identity_hash:
        return "it was computed with another configuration"
    return None


def move_aside(path: Path, why: str) -> Path:
    """Keep a file out of the way, never delete it: ``<name>.<why>-<UTC time>``."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    target = path.with_name(f"{path.name}.{why}-{stamp}")
    os.replace(path, target)
    return target
