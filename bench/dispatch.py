"""`run_suite.py run SUITE` and `run_suite.py status SUITE`: a suite's cells to SLURM or this process.

Executors:
- ``slurm``: one submitit job array per submission, one cell per array task. The command returns
  once the jobs are queued (``--wait`` waits). Each task runs ``CellJob``, a submitit
  ``Checkpointable``: at the time limit or on preemption submitit requeues the same call and
  ``run_cell`` resumes from the cell's last epoch checkpoint.
- ``local``: the cells one after another in this process, with progress bars.
- ``debug``: submitit's DebugExecutor (in this process, a debugger on a crash).

State lives in files only, so ``status`` works from any shell: ``result.json`` (done/failed,
written by the runner), ``job.json`` (the SLURM job of the cell's last submission) and the cell
lock (held while a process runs the cell). ``squeue`` (or ``sacct`` when the cluster has
accounting) says whether a submitted job is still queued or running.
"""
from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import submitit
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from bench.errors import UserError
from bench.results import RESULT_FILE, atomic_write_json, read_result
from bench.suite import Cell, Suite, load_suite

JOB_FILE = "job.json"
CELLS_FILE = "cells.json"
SUBMITIT_DIR = ".submitit"
# SLURM states of a job that may still run the cell. COMPLETING counts: squeue also shows it for
# a job that submitit has just requeued, while its old processes are being killed.
ACTIVE_SLURM_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                       "REQUEUE_FED", "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "PREEMPTED"}
# suite `resources` key -> submitit AutoExecutor parameter
EXECUTOR_PARAMETERS = {
    "partition": "slurm_partition", "gpus_per_node": "gpus_per_node", "cpus_per_task": "cpus_per_task",
    "mem_gb": "mem_gb", "timeout_min": "timeout_min", "array_parallelism": "slurm_array_parallelism",
    "signal_delay_s": "slurm_signal_delay_s", "additional_parameters": "slurm_additional_parameters",
    "setup": "slurm_setup",
}
WAIT_POLL_S = 5.0
STEP_LOG_EVERY = 200  # a log line every this many steps inside an epoch (SOP epochs are long)


@dataclass
class CellState:
    state: str  # done | failed | running | queued | pending
    detail: str = ""


# ---------------------------------------------------------------------------------------------
# commands


def cmd_run(args) -> int:
    console = _console()
    suite = load_suite(args.suite)
    suite_dir = Path(args.out).resolve() / suite.name
    data_root = str(Path(args.data_root).resolve()) if args.data_root else None
    every_cell = suite.cells(data_root=data_root)
    cells = suite.select(every_cell, args.only) if args.only else every_cell
    states = collect_states(cells, suite_dir)

    if args.dry_run:
        console.print(grid_table(suite, cells, states, hyperparameters=True))
        console.print(totals_line(states))
        return 0

    write_cells_file(suite_dir, every_cell)
    todo, skipped = select_cells(cells, states, rerun_failed=args.rerun_failed, fresh=args.fresh)
    if args.max_cells is not None:
        todo = todo[: max(args.max_cells, 0)]
    for reason, count in skipped.items():
        console.print(f"{count} cells {reason}")
    if not todo:
        console.print(f"{suite.name}: nothing to run ({totals_line(states)})")
        if (args.executor or "local") == "local" and not args.no_report:
            print_suite_summary(suite_dir, console)
        return 0

    prepare_data(suite, todo, console)
    executor = args.executor or ("slurm" if shutil.which("sbatch") else "local")
    if executor == "local":
        failed = run_local(todo, suite_dir, fresh=args.fresh, console=console)
        if not args.no_report:
            build_report_if_available(suite_dir, suite.report.get("table"), console)
        return 1 if failed else 0
    jobs = submit(suite, todo, suite_dir, executor, fresh=args.fresh)
    if executor == "debug":
        for job in jobs:  # the debug executor runs a job when its result is asked for
            job.result()
        states = collect_states(todo, suite_dir)
        console.print(totals_line(states))
        return 0 if all(s.state == "done" for s in states.values()) else 1
    console.print(f"{suite.name}: submitted {len(jobs)} cells as SLURM job {jobs[0].job_id.split('_')[0]} "
                  f"(logs in {suite_dir / SUBMITIT_DIR}); follow with: python run_suite.py status {args.suite}"
                  + (f" --out {args.out}" if args.out != "results" else ""))
    if args.wait:
        return wait_for_jobs(todo, suite_dir, console)
    return 0


def prepare_data(suite: Suite, cells: list[Cell], console: Console) -> None:
    """The suite's ``prepare`` hook, once per data root (before submitting: on the login node)."""
    if not suite.prepare:
        return
    module_name, function_name = suite.prepare.split(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"{suite.path}: prepare: cannot import {suite.prepare!r}: {e}") from None
    for data_root in sorted({c.config.data_root for c in cells}):
        console.print(f"preparing {data_root} ({suite.prepare})")
        function(data_root)


def cmd_status(args) -> int:
    console = _console()
    suite = load_suite(args.suite, check_methods=False)  # no torch: status runs anywhere
    cells = suite.cells()
    states = collect_states(cells, Path(args.out).resolve() / suite.name)
    console.print(grid_table(suite, cells, states, hyperparameters=False))
    console.print(totals_line(states))
    return 0


def _console() -> Console:
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 240)  # logs and pipes: fewer wrapped rows
    return console


# ---------------------------------------------------------------------------------------------
# cell states


def collect_states(cells: list[Cell], suite_dir: Path) -> dict[str, CellState]:
    from bench.runner import is_locked  # light: the runner imports torch only inside run_cell

    jobs = {c.cell_id: read_job_file(suite_dir / c.cell_id) for c in cells}
    slurm = slurm_job_states([j["job_id"] for j in jobs.values() if j]) or {}
    states = {}
    for cell in cells:
        cell_dir = suite_dir / cell.cell_id
        job = jobs[cell.cell_id]
        slurm_state = slurm.get(job["job_id"]) if job else None
        if slurm_state in ACTIVE_SLURM_STATES:
            state = "running" if slurm_state in ("RUNNING", "COMPLETING") else "queued"
            states[cell.cell_id] = CellState(state, f"job {job['job_id']} {slurm_state.lower()}")
        elif is_locked(cell_dir):
            states[cell.cell_id] = CellState("running", "held by a process (cell lock)")
        elif (cell_dir / RESULT_FILE).exists():
            states[cell.cell_id] = _result_state(cell_dir / RESULT_FILE)
        elif job:
            ended = f" ({slurm_state.lower()})" if slurm_state else ""
            states[cell.cell_id] = CellState("pending", f"job {job['job_id']} ended{ended} without a result; "
                                                        f"log: {job.get('log')}")
        else:
            states[cell.cell_id] = CellState("pending")
    return states


def _result_state(path: Path) -> CellState:
    try:
        result = read_result(path)
    except UserError as e:
        return CellState("pending", str(e))
    if result["status"] == "failed":
        return CellState("failed", str(result.get("reason")))
    test = ((result.get("final") or {}).get("test") or {})
    return CellState("done", f"R@1 {100 * test['recall@1']:.1f}" if "recall@1" in test else "")


def read_job_file(cell_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((cell_dir / JOB_FILE).read_text())
    except (OSError, ValueError):
        return None


def slurm_job_states(job_ids: Iterable[str]) -> dict[str, str] | None:
    """SLURM state of each job id ("123" or array task "123_4"); None when squeue did not answer.

    squeue knows jobs until MinJobAge after they end; sacct (when the cluster keeps accounting)
    knows them for longer. A job neither knows is simply absent from the answer.
    """
    job_ids = set(job_ids)
    if not job_ids or not shutil.which("squeue"):
        return {}
    arrays = ",".join(sorted({j.split("_")[0] for j in job_ids}))
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", arrays, "-o", "%i|%T"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode and "Invalid job id" not in out.stderr:  # all of them forgotten: not an error
        return None
    states = _parse_states(out.stdout)
    if not job_ids <= states.keys() and shutil.which("sacct"):
        try:
            acct = subprocess.run(["sacct", "-n", "-P", "-X", "-j", arrays, "-o", "JobID,State"],
                                  capture_output=True, text=True, timeout=30)
            states = {**_parse_states(acct.stdout if acct.returncode == 0 else ""), **states}
        except (OSError, subprocess.TimeoutExpired):
            pass  # no accounting on this cluster
    return {j: states[j] for j in job_ids if j in states}


def _parse_states(text: str) -> dict[str, str]:
    states = {}
    for line in text.splitlines():
        job_id, _, state = line.strip().partition("|")
        if job_id and state:
            states[job_id] = state.split()[0]  # sacct: "CANCELLED by 0"
    return states


def select_cells(cells: list[Cell], states: dict[str, CellState], *, rerun_failed: bool,
                 fresh: bool) -> tuple[list[Cell], dict[str, int]]:
    """Cells to run now, and how many were skipped for which reason."""
    todo, skipped = [], {}
    for cell in cells:
        state = states[cell.cell_id].state
        if state in ("running", "queued"):
            reason = "already running or queued: skipped"
        elif state == "done" and not fresh:
            reason = "done: skipped (--fresh reruns them)"
        elif state == "failed" and not (rerun_failed or fresh):
            reason = "failed: skipped (--rerun-failed reruns them)"
        else:
            todo.append(cell)
            continue
        skipped[reason] = skipped.get(reason, 0) + 1
    return todo, skipped


def write_cells_file(suite_dir: Path, cells: list[Cell]) -> None:
    """Every cell the suite expects, so that the report can show the missing ones."""
    atomic_write_json(suite_dir / CELLS_FILE, [{"cell_id": c.cell_id, "key": c.key} for c in cells])


# ---------------------------------------------------------------------------------------------
# tables


def grid_table(suite: Suite, cells: list[Cell], states: dict[str, CellState], *,
               hyperparameters: bool) -> Table:
    key_names = list(dict.fromkeys(k for c in cells for k in c.key))
    table = Table(title=f"{suite.name}: {suite.description}".rstrip(": "), show_lines=False)
    table.add_column("#", justify="right")
    for name in key_names:
        table.add_column(name)
    if hyperparameters:
        for name in ("optimizer", "lr", "proxy lr", "epochs", "batch", "method args"):
            table.add_column(name)
    table.add_column("state")
    table.add_column("detail")
    colours = {"done": "green", "failed": "red", "running": "cyan", "queued": "blue", "pending": "yellow"}
    for i, cell in enumerate(cells, 1):
        row = [str(i)] + [_text(cell.key.get(name, "")) for name in key_names]
        if hyperparameters:
            c = cell.config
            row += [c.optimizer, _text(c.lr), _text(c.proxy_lr), str(c.epochs),
                    f"{c.batch_size}/{c.samples_per_class}",
                    " ".join(f"{k}={_text(v)}" for k, v in c.method_args.items())]
        state = states[cell.cell_id]
        row.append(f"[{colours[state.state]}]{state.state}[/]")
        row.append(state.detail)
        table.add_row(*row)
    return table


def totals_line(states: dict[str, CellState]) -> str:
    counts = {}
    for s in states.values():
        counts[s.state] = counts.get(s.state, 0) + 1
    parts = [f"{counts[k]} {k}" for k in ("done", "running", "queued", "failed", "pending") if k in counts]
    return f"{len(states)} cells: " + ", ".join(parts)


def _text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _cell_name(cell: Cell) -> str:
    return "/".join(_text(v) for k, v in cell.key.items() if k != "method" or "label" not in cell.key)


# ---------------------------------------------------------------------------------------------
# local executor


def run_local(cells: list[Cell], suite_dir: Path, *, fresh: bool, console: Console) -> int:
    """Run the cells here one after another; returns the number of failed cells."""
    from bench.runner import run_cell

    failed = 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        overall = progress.add_task("cells", total=len(cells), info="")
        for cell in cells:
            task = progress.add_task(_cell_name(cell), total=None, info="")
            result = run_cell(cell.config, suite_dir / cell.cell_id, key=cell.key, fresh=fresh,
                              progress=_StepBar(progress, task, _cell_name(cell)))
            progress.remove_task(task)
            progress.advance(overall)
            name = _cell_name(cell)
            if result is None:
                progress.console.print(f"[cyan]running elsewhere[/] {name}")
            elif result["status"] == "ok":
                progress.console.print(f"[green]done[/] {name} {_result_state(suite_dir / cell.cell_id / RESULT_FILE).detail}")
            else:
                failed += 1
                progress.console.print(f"[red]failed[/] {name}: {result['reason']}")
    return failed


class _StepBar:
    """Progress events of one cell -> its bar: steps over all epochs, epoch, loss, last R@1."""

    def __init__(self, progress: Progress, task, name: str) -> None:
        self.progress, self.task, self.name = progress, task, name
        self.epochs = self.start_epoch = 0
        self.has_total = False
        self.recall = ""

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "cell_start":
            self.epochs, self.start_epoch = event["total_epochs"], event["start_epoch"]
            if event.get("steps"):
                self._set_total(event["steps"])
        elif kind == "step":
            if not self.has_total:
                self._set_total(event["steps"])
            self.progress.update(self.task, advance=1,
                                 description=f"{self.name} epoch {event['epoch']}/{self.epochs}",
                                 info=f"loss {event['loss']:.4f}{self.recall}")
        elif kind == "epoch_end" and event.get("test"):
            self.recall = f" R@1 {100 * event['test']['recall@1']:.1f}"

    def _set_total(self, steps: int) -> None:
        self.progress.update(self.task, total=self.epochs * steps, completed=self.start_epoch * steps)
        self.has_total = True


def build_report_if_available(suite_dir: Path, table: str | None, console: Console) -> None:
    try:
        from report.cli import build_report
    except ImportError:
        return  # the reporter is optional for running cells
    try:
        written = build_report(suite_dir, table=table)
    except UserError as e:  # the cells ran: a report problem must not turn the run into an error
        console.print(f"[yellow]report not written[/]: {e}")
        return
    console.print(f"report: {suite_dir / 'report'} ({len(written)} files; open index.md)")
    print_suite_summary(suite_dir, console)


def print_suite_summary(suite_dir: Path, console: Console) -> None:
    """Every method's mean R@1 / MAP@R, in the terminal (the tables are in the report)."""
    try:
        from report import load_suite as load_results
        from report.summary import print_summary
    except ImportError:
        return
    print_summary(load_results(suite_dir).cells, console, top=None)


# ---------------------------------------------------------------------------------------------
# SLURM (and debug) through submitit


class CellJob(submitit.helpers.Checkpointable):
    """What one array task runs. On timeout or preemption submitit calls ``checkpoint()``, whose
    inherited implementation resubmits this same call; ``run_cell`` then resumes from the
    cell's last epoch checkpoint. A job requeued by SLURM itself (``scontrol requeue``, node
    failure) reruns the same call too."""

    def __call__(self, config, cell_dir: str, key: dict[str, Any], fresh: bool = False) -> dict[str, Any]:
        from bench.runner import run_cell

        # only the first start may discard old results: a requeued task must resume
        restarted = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
        result = run_cell(config, Path(cell_dir), key=key, fresh=fresh and not restarted, progress=log_event)
        if result is None:
            return {"status": "skipped", "reason": "the cell is running in another process"}
        return {"status": result["status"], "reason": result["reason"]}


def log_event(event: dict[str, Any]) -> None:
    """Progress events -> lines in the job's log (one per epoch, and every few hundred steps)."""
    kind = event["event"]
    if kind == "cell_start":
        line = f"cell_start epoch {event['start_epoch'] + 1} of {event['total_epochs']}" + (
            f" (resumed after epoch {event['start_epoch']})" if event["start_epoch"] else "")
    elif kind == "step":
        if event["step"] % STEP_LOG_EVERY:
            return
        line = f"step epoch {event['epoch']} step {event['step']}/{event['steps']} loss {event['loss']:.4f}"
    elif kind == "epoch_end":
        test = event.get("test") or {}
        recall = f" R@1 {100 * test['recall@1']:.2f}" if "recall@1" in test else ""
        line = f"epoch_end {event['epoch']} train_loss {event['train_loss']:.4f}{recall}"
    elif kind == "cell_end":
        line = f"cell_end {event['status']}" + (f": {event['reason']}" if event.get("reason") else "")
    else:
        return
    print(f"[{dt.datetime.now():%H:%M:%S}] {line}", flush=True)


def make_executor(kind: str, folder: Path, suite: Suite) -> submitit.Executor:
    if kind == "debug":
        return submitit.AutoExecutor(folder=folder, cluster="debug")
    if not shutil.which("sbatch"):
        raise UserError("--executor slurm: sbatch is not on PATH; use --executor local, or bring up a "
                        "one-node cluster here with: bash scripts/slurm-local.sh up")
    resources = suite.resources
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                     slurm_max_num_timeout=resources.get("max_num_timeout", 3))
    parameters = {EXECUTOR_PARAMETERS[k]: v for k, v in resources.items() if k in EXECUTOR_PARAMETERS}
    if not parameters.get("gpus_per_node"):
        parameters.pop("gpus_per_node", None)  # 0 GPUs: ask for none rather than --gpus-per-node=0
    executor.update_parameters(name=suite.name, **parameters)
    return executor


def submit(suite: Suite, cells: list[Cell], suite_dir: Path, kind: str, *, fresh: bool) -> list[submitit.Job]:
    """One job array, one cell per task; each cell's job id goes to its job.json."""
    executor = make_executor(kind, suite_dir / SUBMITIT_DIR, suite)
    cell_dirs = [str(suite_dir / c.cell_id) for c in cells]
    try:
        jobs = executor.map_array(CellJob(), [c.config for c in cells], cell_dirs, [c.key for c in cells],
                                  [fresh] * len(cells))
    except submitit.core.utils.FailedJobError as e:
        raise UserError(f"sbatch refused the job array: {e}") from None
    if kind == "slurm":
        submitted = dt.datetime.now(dt.timezone.utc).isoformat()
        for cell_dir, job in zip(cell_dirs, jobs):
            atomic_write_json(Path(cell_dir) / JOB_FILE, {
                "executor": "slurm", "job_id": job.job_id, "submitted": submitted,
                "log": str(job.paths.stdout), "error_log": str(job.paths.stderr),
            })
    return jobs


def wait_for_jobs(cells: list[Cell], suite_dir: Path, console: Console) -> int:
    """--wait: until no submitted job is queued or running; 1 when a cell did not end ok."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("waiting for SLURM", total=len(cells))
        while True:
            jobs = [read_job_file(suite_dir / c.cell_id) for c in cells]
            slurm = slurm_job_states(j["job_id"] for j in jobs if j)
            if slurm is not None:  # None: squeue did not answer this time
                active = sum(1 for j in jobs if j and slurm.get(j["job_id"]) in ACTIVE_SLURM_STATES)
                progress.update(task, completed=len(cells) - active)
                if not active:
                    break
            time.sleep(WAIT_POLL_S)
    states = collect_states(cells, suite_dir)
    for cell in cells:
        state = states[cell.cell_id]
        if state.state != "done":
            console.print(f"[red]{state.state}[/] {_cell_name(cell)}: {state.detail}")
    console.print(totals_line(states))
    return 0 if all(s.state == "done" for s in states.values()) else 1
