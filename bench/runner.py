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

from bench.config import CellConfig, ConfigError
from bench.errors import UserError
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
        from bench.train import CellFailure, train_cell

        try:
            outcome = train_cell(config, cell_dir, config_hash(config.identity()), progress)
        except CellFailure as failure:
            result["epochs"] = failure.history
            raise
        result.update(status="ok", epochs=outcome.epochs, final=outcome.final, oracle=outcome.oracle,
                      measurements=outcome.measurements, skipped_images=outcome.num_skipped_images)
        _save_weights(outcome.learner, cell_dir / WEIGHTS_FILE)
        (cell_dir / "checkpoint.pt").unlink(missing_ok=True)
    except (UserError, ValueError) as e:
        result["reason"] = str(e)
    except Exception as e:  # a failing cell must never stop the grid; the traceback goes beside it
        if type(e).__name__ == "CellFailure":
            result["reason"] = str(e)
        else:
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


def parse_assignments(items: list[str], what: str) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values parse as YAML scalars (``1e-4``, ``true``, ``10``)."""
    import yaml

    parsed: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{what}: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        value = yaml.safe_load(v) if v else ""
        if isinstance(value, str) and _looks_numeric(value):
            value = float(value)  # YAML 1.1 reads '1e-4' as a string
        parsed[k.strip()] = value
    return parsed


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def cmd_cell(args) -> int:
    from rich.console import Console

    console = Console()
    fields = parse_assignments(args.set, "--set")
    fields.update(dataset=args.dataset, data_root=os.path.abspath(args.data_root), backbone=args.backbone, method=args.method,
                  seed=args.seed, method_args=parse_assignments(args.method_arg, "--method-arg"))
    if args.weights is not None:
        fields["weights"] = args.weights
    if args.epochs is not None:
        fields["epochs"] = args.epochs
    config = CellConfig.from_dict(fields, where="cell")
    suite_dir = Path(args.out) / check_name(config.suite, "suite name")
    key = {"dataset": config.dataset, "backbone": config.backbone, "method": config.method, "seed": config.seed}
    cell_dir = suite_dir / make_cell_id(key, config.identity())
    with _progress_bar(console) as on_event:
        result = run_cell(config, cell_dir, key=key, fresh=args.fresh, progress=on_event)
    if result is None:
        console.print(f"[yellow]{cell_dir} is running in another process; nothing done[/]")
        return 1
    print_result(console, result, cell_dir)
    return 0 if result["status"] == "ok" else 1


@contextmanager
def _progress_bar(console):
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("cell", total=None, info="")
        last = {"r1": ""}

        def on_event(event: dict[str, Any]) -> None:
            kind = event["event"]
            if kind == "cell_start":
                bar.update(task, total=event["total_epochs"] * event["steps"],
                           completed=event["start_epoch"] * event["steps"])
            elif kind == "step":
                bar.update(task, advance=1, description=f"epoch {event['epoch']}",
                           info=f"loss {event['loss']:.3f}{last['r1']}")
            elif kind == "epoch_end" and event.get("test"):
                last["r1"] = f"  R@1 {100 * event['test']['recall@1']:.1f}"

        yield on_event


def print_result(console, result: dict[str, Any], cell_dir: Path) -> None:
    console.soft_wrap = True  # paths and reasons must stay copyable, never folded mid-word
    if result["status"] != "ok":
        console.print(f"[red]failed[/]: {result['reason']}")
        console.print(f"result: {cell_dir / RESULT_FILE}")
        return
    test = result["final"]["test"]
    metrics = "  ".join(f"{k} {100 * v:.2f}" for k, v in test.items() if k.startswith(("recall@", "map@")))
    m = result["measurements"]
    console.print(f"[green]ok[/] epoch {result['final']['epoch']} ({result['final']['selection']}): {metrics}")
    console.print(f"trainable {m['params_trainable']:,} params ({m['params_trainable_no_head']:,} without head "
                  f"and proxies); step {m['step_latency_ms_median'] or float('nan'):.1f} ms; "
                  f"peak memory {m['peak_memory_bytes'] / 2 ** 30:.2f} GiB ({m['memory_kind']})")
    console.print(f"result: {cell_dir / RESULT_FILE}")
