"""One cell from config to ``result.json``: the unit that every executor runs.

``run_cell`` never raises for a cell's own failure (bad data, unknown method argument, NaN
loss, a bug in a method): the result is written with ``status: failed`` and the reason, so one
broken cell never stops a grid. It holds an exclusive lock on the cell folder while running, so
two drivers pointed at the same suite never run a cell twice at once.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import json
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

from bench.cell_files import CellFiles
from bench.config import CellConfig
from bench.errors import CellFailure, UserError
from bench.ranks import ONE, Ranks
from bench.results import (SCHEMA_VERSION, atomic_write_bytes, atomic_write_json, config_hash,
                           foreign_reason, move_aside, read_result)

PACKAGES = ("torch", "torchvision", "timm", "faiss-cpu", "faiss-gpu-cu12", "numpy", "submitit", "safetensors")


@contextmanager
def cell_lock(cell_dir: Path):
    """Yields True when this process holds the cell, False when another process does."""
    try:
        cell_dir.mkdir(parents=True, exist_ok=True)
        handle = open(CellFiles(cell_dir).lock, "a+")
    except OSError as e:  # a read-only results folder, a file where the folder should be
        raise UserError(f"{cell_dir}: cannot write in the cell folder ({e.strerror or e}); make the results folder "
                        "writable, or write results elsewhere with --out") from None
    with handle:
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
    """True while some process runs this cell (on this host or a shared filesystem with locks).
    Opens the lock file read-only and never creates it: ``status`` works on read-only results
    (copied from a cluster) and writes nothing."""
    path = CellFiles(cell_dir).lock
    try:
        handle = open(path, "rb")
    except OSError:  # no lock file (never ran here), or unreadable: nobody holds it
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def run_cell(config: CellConfig, cell_dir: Path, *, key: dict[str, Any], fresh: bool = False,
             progress=None, ranks: Ranks = ONE) -> dict[str, Any] | None:
    """Run one cell unless it is done; None when another process holds it. A finished result is
    reused only when it is this cell's (its cell id, suite and configuration hash); a corrupt,
    foreign or misplaced one is moved aside (``result.json.<why>-<time>``), never deleted.

    On several ranks (the process group joined, ``bench.launch``) every rank calls this: the
    main rank decides as above and tells the others whether to run; only it writes, and only it
    returns the result (the others return None)."""
    cell_dir = Path(cell_dir)
    if ranks.several:
        from bench import distributed

        if not ranks.main:
            if distributed.from_main(None, "run or not"):
                _run_locked(config, cell_dir, key, config_hash(config.identity()), None, ranks)
            return None
        told = False
        try:
            result = _decide_and_run(config, cell_dir, key, fresh, progress, ranks,
                                     lambda run: distributed.from_main(run, "run or not"))
            told = True
            return result
        finally:
            if not told:  # refused or failed before deciding: the other ranks stop too
                distributed.from_main(False, "run or not")
    return _decide_and_run(config, cell_dir, key, fresh, progress, ranks, lambda run: None)


def _decide_and_run(config: CellConfig, cell_dir: Path, key: dict[str, Any], fresh: bool, progress,
                    ranks: Ranks, tell) -> dict[str, Any] | None:
    if cell_dir.is_symlink():
        raise UserError(f"{cell_dir}: a cell folder must not be a symlink (it would count one run twice); "
                        "replace it with a folder of its own")
    identity_hash = config_hash(config.identity())
    emit = progress or (lambda event: None)
    with cell_lock(cell_dir) as held:
        if not held:
            tell(False)
            return None
        files = CellFiles(cell_dir)
        result_path = files.result
        if fresh:
            for path in (files.result, files.checkpoint, files.weights):
                if path.is_dir() and not path.is_symlink():
                    move_aside(path, "in-the-way")
                path.unlink(missing_ok=True)
        elif result_path.exists() or result_path.is_symlink():
            existing, why = _existing_result(result_path, cell_dir, config.suite, identity_hash)
            if existing is not None:
                from bench.data_match import data_mismatch, reuse_text

                mismatch = data_mismatch(existing, config)
                if mismatch is not None:
                    raise DataMismatch(f"{result_path}: a finished result of this cell exists, but {mismatch}; "
                                       "it is not reused for other data. Rerun with --fresh to replace it, or "
                                       "write these results elsewhere (--out, or another suite name)")
                emit({"event": "note", "text": f"{cell_dir.name}: {reuse_text(existing)}"})
                tell(False)
                return existing
            moved = move_aside(result_path, why)
            emit({"event": "note", "text": f"{result_path} moved aside to {moved.name}: {why}; running the cell"})
        log_run(cell_dir, "start" if not ranks.several else f"start on {ranks.world_size} ranks")
        tell(True)
        result = _run_locked(config, cell_dir, key, identity_hash, progress, ranks)
        log_run(cell_dir, f"end {result['status']}")
        return result


class DataMismatch(UserError):
    """A finished result exists for this cell, computed on other data: refused, never overwritten."""


def _existing_result(path: Path, cell_dir: Path, suite: str, identity_hash: str):
    """(the result to reuse, None) or (None, why it is moved aside); failed results are rerun."""
    try:
        existing = read_result(path)
    except UserError:
        return None, "corrupt"
    reason = foreign_reason(existing, cell_dir, suite, identity_hash)
    if reason is not None:
        return None, "foreign"
    if existing["status"] == "ok":
        return existing, ""
    return None, "failed"


def log_run(cell_dir: Path, what: str) -> None:
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    job = os.environ.get("SLURM_JOB_ID", "-")
    with open(CellFiles(cell_dir).runs_log, "a") as log:  # requeues and retries stay visible
        log.write(f"{stamp} {socket.gethostname()} pid={os.getpid()} slurm_job={job} {what}\n")


def _run_locked(config: CellConfig, cell_dir: Path, key: dict[str, Any], identity_hash: str,
                progress, ranks: Ranks = ONE) -> dict[str, Any]:
    started = dt.datetime.now(dt.timezone.utc)
    wall_start = time.perf_counter()
    result = _new_result(config, cell_dir, key, identity_hash)
    emit = progress or (lambda event: None)
    outcome = None
    try:
        from bench.train import load_splits, train_cell

        splits = load_splits(config)
        result["data"] = splits.record()  # as soon as it is read: a later failure still shows the split
        emit({"event": "data", "summary": result["data"]})
        outcome = train_cell(config, cell_dir, identity_hash, splits, progress, ranks)
        result.update(status="ok", epochs=outcome.epochs, final=outcome.final, oracle=outcome.oracle,
                      measurements=outcome.measurements, skipped_images=outcome.num_skipped_images,
                      model=outcome.model)
        if ranks.main:
            _save_weights(outcome.learner, CellFiles(cell_dir).weights, result)
    except CellFailure as failure:  # the cell's own reason (NaN loss): the finished epochs stay
        result["epochs"] = failure.history
        result["reason"] = str(failure)
    except UserError as e:  # bad input or a full disk, named by the message
        result["reason"] = str(e)
    except Exception as e:  # a bug: it must never stop the grid, and its traceback goes beside it
        log = CellFiles(cell_dir).error_log
        if ranks.several:
            log = log.with_name(f"{log.stem}.rank{ranks.rank}{log.suffix}")
        result["reason"] = f"{type(e).__name__}: {e} (traceback in {log})"
        log.write_text(traceback.format_exc())
    if not ranks.main:  # the main rank writes; this rank's own failure is in its log and its exit code
        if result["reason"]:
            raise CellFailure(f"rank {ranks.rank} of {ranks.world_size}: {result['reason']}")
        return result
    if result["status"] != "ok":
        result.update(status="failed", final=None, oracle=None)
    finished = dt.datetime.now(dt.timezone.utc)
    if result["measurements"] is not None:
        result["measurements"]["wall_time_s"] = time.perf_counter() - wall_start
    result["provenance"] = provenance(started, finished)
    # The result first (fsync'd), then the checkpoint goes: a kill in between keeps the training.
    atomic_write_json(CellFiles(cell_dir).result, result)
    if result["status"] == "ok":
        from bench.checkpointer import remove_checkpoint

        remove_checkpoint(cell_dir)
    emit({"event": "cell_end", "status": result["status"], "reason": result["reason"]})
    return result


def _new_result(config: CellConfig, cell_dir: Path, key: dict[str, Any], identity_hash: str) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION, "suite": config.suite, "cell_id": cell_dir.name, "identity_hash": identity_hash,
        "status": "failed", "reason": None, "key": key, "config": config.to_dict(), "data": None, "model": None,
        "epochs": [], "final": None, "oracle": None, "measurements": None, "slurm": slurm_ids(),
        "provenance": None,
    }


def failed_result(config: CellConfig, cell_dir: Path, key: dict[str, Any], reason: str) -> dict[str, Any]:
    """A failed result for a run that could not write its own (every rank of it died)."""
    result = _new_result(config, cell_dir, key, config_hash(config.identity()))
    now = dt.datetime.now(dt.timezone.utc)
    result.update(reason=reason, provenance=provenance(now, now))
    return result


def _save_weights(learner, path: Path, result: dict[str, Any]) -> None:
    """``trainable.safetensors``: what trained (``bench.load_cell`` puts it back on the backbone),
    with the cell's identity in the file's metadata."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in learner.trainable_state_dict().items()}
    config = result["config"]
    metadata = {"cell_id": result["cell_id"], "suite": result["suite"], "method": str(config["method"]),
                "backbone": str((result.get("model") or {}).get("backbone") or config["backbone"]),
                "identity_hash": result["identity_hash"], "config": json.dumps(config, sort_keys=True, default=str),
                "versions": json.dumps(package_versions(), sort_keys=True)}
    atomic_write_bytes(path, save(state, metadata=metadata))


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


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def provenance(started: dt.datetime, finished: dt.datetime) -> dict[str, Any]:
    commit, dirty = git_state()
    versions = package_versions()
    return {"git_commit": commit, "git_dirty": dirty, "host": socket.gethostname(),
            "python": platform.python_version(), "platform": platform.platform(), "packages": versions,
            "argv": sys.argv, "started": started.isoformat(), "finished": finished.isoformat()}
