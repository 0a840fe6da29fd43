"""One cell from config to ``result.json``: the unit that every executor runs.

``run_cell`` never raises for a cell's own failure (bad data, unknown method argument, NaN
loss, a bug in a method): the result is written with ``status: failed`` and the reason, so one
broken cell never stops a grid. It holds an exclusive lock on the cell folder while running, so
two drivers pointed at the same suite never run a cell twice at once.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import os
import platform
import socket
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.config import CellConfig
from bench.errors import CellFailure, UserError
from bench.results import (RESULT_FILE, SCHEMA_VERSION, atomic_write_json, check_name, config_hash,
                           make_cell_id, read_result)

LOCK_FILE = ".lock"
RUNS_LOG = "runs.log"  # one line per start and end of this cell: requeues and retries stay visible
WEIGHTS_FILE = "trainable.safetensors"
PACKAGES = ("torch", "torchvision", "timm", "faiss-cpu", "numpy", "submitit")


@contextmanager
def cell_lock(cell_dir: Path):
    """Yields True when this process holds the cell, False when another process does."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    with open(cell_dir / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{socket.gethostname()} {os.getpid()}\n")
            handle.flush()
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_locked(cell_dir: Path) -> bool:
    """True while some process runs this cell (on this host or a shared filesystem with locks)."""
    path = Path(cell_dir) / LOCK_FILE
    if not path.exists():
        return False
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def run_cell(config: CellConfig, cell_dir: Path, *, key: dict[str, Any], fresh: bool = False,
             progress=None) -> dict[str, Any] | None:
    cell_dir = Path(cell_dir)
    with cell_lock(cell_dir) as held:
        if not held:
            return None
        result_path = cell_dir / RESULT_FILE
        if fresh:
            for name in (RESULT_FILE, "checkpoint.pt", WEIGHTS_FILE):
                (cell_dir / name).unlink(missing_ok=True)
        elif result_path.exists():
            try:
                existing = read_result(result_path)
                if existing["status"] == "ok":
                    return existing
            except UserError:
                pass  # unreadable: run again
        log_run(cell_dir, "start")
        result = _run_locked(config, cell_dir, key, progress)
        log_run(cell_dir, f"end {result['status']}")
        return result


def log_run(cell_dir: Path, what: str) -> None:
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    job = os.environ.get("SLURM_JOB_ID", "-")
    with open(cell_dir / RUNS_LOG, "a") as log:
        log.write(f"{stamp} {socket.gethostname()} pid={os.getpid()} slurm_job={job} {what}\n")


def _run_locked(config: CellConfig, cell_dir: Path, key: dict[str, Any], progress) -> dict[str, Any]:
    started = dt.datetime.now(dt.timezone.utc)
    wall_start = time.perf_counter()
    result: dict[str, Any] = {
        "schema": SCHEMA_VERSION, "suite": config.suite, "cell_id": cell_dir.name, "status": "failed",
        "reason": None, "key": key, "config": config.to_dict(), "epochs": [], "final": None, "oracle": None,
        "measurements": None, "slurm": slurm_ids(), "provenance": None,
    }
    emit = progress or (lambda event: None)
    try:
        from bench.train import train_cell

        outcome = train_cell(config, cell_dir, config_hash(config.identity()), progress)
        result.update(status="ok", epochs=outcome.epochs, final=outcome.final, oracle=outcome.oracle,
                      measurements=outcome.measurements, skipped_images=outcome.num_skipped_images,
                      model=outcome.model)
        _save_weights(outcome.learner, cell_dir / WEIGHTS_FILE)
        (cell_dir / "checkpoint.pt").unlink(missing_ok=True)
    except CellFailure as failure:  # the cell's own reason (NaN loss): the finished epochs stay
        result["epochs"] = failure.history
        result["reason"] = str(failure)
    except UserError as e:  # bad input, named by the message
        result["reason"] = str(e)
    except Exception as e:  # a bug: it must never stop the grid, and its traceback goes beside it
        result["reason"] = f"{type(e).__name__}: {e} (traceback in {cell_dir / 'error.log'})"
        (cell_dir / "error.log").write_text(traceback.format_exc())
    finished = dt.datetime.now(dt.timezone.utc)
    if result["measurements"] is not None:
        result["measurements"]["wall_time_s"] = time.perf_counter() - wall_start
    result["provenance"] = provenance(started, finished)
    atomic_write_json(cell_dir / RESULT_FILE, result)
    emit({"event": "cell_end", "status": result["status"], "reason": result["reason"]})
    return result


def _save_weights(learner, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in learner.trainable_state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)


def slurm_ids() -> dict[str, str] | None:
    ids = {k.lower(): os.environ[k] for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID",
                                               "SLURM_RESTART_COUNT") if k in os.environ}
    return ids or None


def git_state() -> tuple[str | None, bool | None]:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return commit, dirty if commit else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def provenance(started: dt.datetime, finished: dt.datetime) -> dict[str, Any]:
    commit, dirty = git_state()
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"git_commit": commit, "git_dirty": dirty, "host": socket.gethostname(),
            "python": platform.python_version(), "platform": platform.platform(), "packages": versions,
            "argv": sys.argv, "started": started.isoformat(), "finished": finished.isoformat()}
