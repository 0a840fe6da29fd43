"""Running a suite's cells: on SLURM through submitit, or one after another in this process.

Executors:
- ``slurm``: one submitit job array per submission, one cell per array task. The command returns
  once the jobs are queued (``--wait`` waits). Each task runs ``CellJob``, a submitit
  ``Checkpointable``: at the time limit or on preemption submitit requeues the same call and
  ``run_cell`` resumes from the cell's last epoch checkpoint.
- ``local``: the cells on this machine, one after another or ``--jobs N`` at once
  (``bench.local_run.run_local``).
- ``debug``: submitit's DebugExecutor (in this process, a debugger on a crash).

State lives in files only, so ``status`` works from any shell: ``result.json`` (done/failed,
written by the runner), ``job.json`` (the SLURM job of the cell's last submission) and the cell
lock (held while a process runs the cell). ``squeue`` (or ``sacct`` when the cluster has
accounting) says whether a submitted job is still queued or running.

This module returns data and reports progress as events (``bench.events``); the CLI
(``peft_dml_cli/``) renders them and prints the tables.
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

from bench.cell_files import CellFiles
from bench.errors import UserError
from bench.events import Listener, ignore, log_event, log_to_stdout
from bench.results import atomic_write_json, config_hash, foreign_reason, read_result
from bench.suite import Cell, Suite, cell_ranks

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
WAIT_POLL_S = 30.0


@dataclass
class CellState:
    # done | failed | running | queued | pending, or corrupt / foreign: a result.json that is not
    # readable or not this cell's (run again: the runner moves it aside, never deletes it)
    state: str
    detail: str = ""


STATES = ("done", "running", "queued", "failed", "corrupt", "foreign", "pending")


def prepare_data(suite: Suite, cells: list[Cell], on_event: Listener = ignore) -> None:
    """The suite's ``prepare`` hook, once per data root (before submitting: on the login node)."""
    if not suite.prepare:
        return
    from bench.catalog import PREPARE_HOOKS, prepare_hook

    module_name, function_name = PREPARE_HOOKS[prepare_hook(suite.prepare)].split(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"{suite.path}: prepare: cannot import {suite.prepare!r}: {e}") from None
    for data_root in sorted({c.config.data_root for c in cells}):
        on_event({"event": "preparing", "data_root": data_root, "hook": suite.prepare})
        function(data_root, lambda text: on_event({"event": "note", "text": text}))


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
        elif cell_dir.is_symlink():
            states[cell.cell_id] = CellState("foreign", f"{cell_dir} is a symlink (to {os.readlink(cell_dir)}); "
                                                        "a cell needs a folder of its own")
        elif CellFiles(cell_dir).result.exists():
            states[cell.cell_id] = result_state(CellFiles(cell_dir).result, cell)
        elif job:
            ended = f" ({slurm_state.lower()})" if slurm_state else ""
            states[cell.cell_id] = CellState("pending", f"job {job['job_id']} ended{ended} without a result; "
                                                        f"log: {job.get('log')}")
        else:
            states[cell.cell_id] = CellState("pending")
    return states


def result_state(path: Path, cell: Cell | None = None) -> CellState:
    try:
        result = read_result(path)
    except UserError as e:
        return CellState("corrupt", f"{e} (moved aside when the cell runs again)")
    if cell is not None:
        reason = foreign_reason(result, path.parent, cell.suite, config_hash(cell.config.identity()))
        if reason is not None:
            return CellState("foreign", f"{path}: not this cell's result: {reason} (moved aside when the cell runs)")
    if result["status"] == "failed":
        return CellState("failed", str(result.get("reason")))
    final = result.get("final") or {}
    test, val = final.get("test") or {}, final.get("val") or {}
    if "recall@1" in test:
        return CellState("done", f"R@1 {100 * test['recall@1']:.1f}")
    return CellState("done", f"val R@1 {100 * val['recall@1']:.1f}" if "recall@1" in val else "")


def read_job_file(cell_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads(CellFiles(cell_dir).job.read_text())
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


def check_reuse(cells: list[Cell], states: dict[str, CellState], suite_dir: Path, *, content: bool = True) -> list[str]:
    """The finished cells that this run would reuse, checked against the data it reads now
    (bench.data_match): one line per data root saying what is reused; a result computed on other
    data refuses the run (UserError naming both roots and --fresh), before anything runs."""
    from bench.data_match import data_mismatch

    reused: dict[str, list[str]] = {}
    refused: list[str] = []
    for cell in cells:
        if states[cell.cell_id].state != "done":
            continue
        try:
            result = read_result(CellFiles(suite_dir / cell.cell_id).result)
        except UserError:
            continue
        mismatch = data_mismatch(result, cell.config, content=content)
        if mismatch is not None:
            refused.append(f"{cell.cell_id}: {mismatch}")
            continue
        root = (result.get("data") or {}).get("root") or "?"
        reused.setdefault(root, []).append(((result.get("provenance") or {}).get("finished") or "")[:16])
    if refused:
        shown = "; ".join(refused[:3]) + (f"; and {len(refused) - 3} more" if len(refused) > 3 else "")
        raise UserError(f"{suite_dir}: {len(refused)} finished results were computed on other data than this run "
                        f"reads, and are not reused for it: {shown}. Rerun with --fresh to replace them, or write "
                        "these results elsewhere (--out, or another suite name)")
    lines = []
    for root, dates in reused.items():
        dates = sorted(d.replace("T", " ") for d in dates if d)
        when = f" of {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else "") + " UTC" if dates else ""
        lines.append(f"reused {len(dates) if dates else 'the'} finished results{when} (data {root})")
    return lines


def select_cells(cells: list[Cell], states: dict[str, CellState], *, rerun_failed: bool,
                 fresh: bool) -> tuple[list[Cell], dict[str, int]]:
    """Cells to run now, and how many were skipped for which reason."""
    todo, skipped = [], {}
    for cell in cells:
        state = states[cell.cell_id].state  # corrupt / foreign results run again (moved aside)
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


def write_cells_file(suite_dir: Path, suite: Suite, cells: list[Cell]) -> None:
    """Every cell the suite expects, so that the report can show the missing ones, and which
    suite file they come from: two files with the same ``name:`` must not share a folder."""
    check_suite_folder(suite_dir, suite)
    atomic_write_json(suite_dir / CELLS_FILE, {"suite_file": str(suite.path.resolve()), "report": suite.report,
                                               "cells": [{"cell_id": c.cell_id, "key": c.key,
                                                          "identity_hash": config_hash(c.config.identity())}
                                                         for c in cells]})


def check_suite_folder(suite_dir: Path, suite: Suite) -> None:
    """Refuse a results folder that another existing suite file (of the same ``name:``) owns."""
    try:
        data = json.loads((suite_dir / CELLS_FILE).read_text())
    except (OSError, ValueError):
        return
    owner = data.get("suite_file") if isinstance(data, dict) else None
    mine = str(suite.path.resolve())
    if owner and owner != mine and Path(owner).is_file():
        raise UserError(f"{suite.path}: suite name {suite.name!r} is also the name of {owner}, whose results are "
                        f"in {suite_dir}; give one of them another `name:` (results go to results/<name>/)")


def totals_line(states: dict[str, CellState]) -> str:
    counts: dict[str, int] = {}
    for s in states.values():
        counts[s.state] = counts.get(s.state, 0) + 1
    parts = [f"{counts[k]} {k}" for k in STATES if k in counts]
    return f"{len(states)} cells: " + ", ".join(parts)


def text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def cell_name(cell: Cell) -> str:
    """'cub200/vit_s16/VPT (B)/0': the key's values, the label in place of the method."""
    return "/".join(text(v) for k, v in cell.key.items() if k != "method" or "label" not in cell.key)


def write_tuning_file(suite_dir: Path, suite: Suite, plan) -> None:
    """``tuning.json``: the search plan, every method's trials with their scores, the winners."""
    from bench.tune import TUNING_FILE

    atomic_write_json(suite_dir / TUNING_FILE, {"plan": suite.tune.to_dict(), "methods": plan.tuning,
                                                "waiting": len(plan.waiting)})


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
        log_to_stdout()
        if job_tasks() > 1:  # one cell on several ranks: this task is one of them
            from bench.launch import rank_main

            # every GPU of the node stays visible: each rank takes its own by LOCAL_RANK (bench.train)
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            result = rank_main(config.to_dict(), cell_dir, key, fresh and not restarted, progress=log_event)
            if result is None:
                return {"status": "rank", "reason": None}  # a rank other than the main one
        else:
            result = run_cell(config, Path(cell_dir), key=key, fresh=fresh and not restarted, progress=log_event)
        if result is None:
            return {"status": "skipped", "reason": "the cell is running in another process"}
        return {"status": result["status"], "reason": result["reason"]}


def job_tasks() -> int:
    """The tasks of this submitit job (one per rank of the cell); 1 outside a submitit job."""
    try:
        return submitit.JobEnvironment().num_tasks
    except RuntimeError:  # called by hand or by a test, not by submitit
        return 1


def check_data(cells: list[Cell]) -> None:
    """Every cell's dataset is where its data root says, in its layout, with disjoint splits:
    checked on the submitting machine before anything is queued (a wrong path must not become
    33 failed GPU jobs). Reads folder listings and index files, not images."""
    from bench.data import check_dataset

    problems: dict[str, list[Cell]] = {}
    for dataset, data_root in sorted({(c.config.dataset, c.config.data_root) for c in cells}):
        try:
            check_dataset(dataset, data_root)
        except UserError as e:
            problems[str(e)] = [c for c in cells if (c.config.dataset, c.config.data_root) == (dataset, data_root)]
    if problems:
        lines = [f"{len(group)} cells cannot read their data ({', '.join(cell_name(c) for c in group[:3])}"
                 f"{', ...' if len(group) > 3 else ''}): {message}" for message, group in problems.items()]
        raise UserError("; ".join(lines) + "; nothing was run (pass --no-data-check where this machine cannot "
                                           "see the data but the compute nodes can)")


def check_slurm_reachable() -> None:
    """sbatch on the PATH is not a cluster: ask the controller once before submitting."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"SLURM is not reachable (`sinfo -h -o %P` failed: {e}); use --executor local to "
                        "run the cells here") from None
    if out.returncode != 0:
        first = (out.stderr.strip().splitlines() or ["no output"])[0]
        raise UserError(f"SLURM is not reachable (`sinfo -h -o %P` exited {out.returncode}: {first}); use "
                        "--executor local to run the cells here")


def make_executor(kind: str, folder: Path, suite: Suite, resources: dict[str, Any] | None = None) -> submitit.Executor:
    if kind == "debug":
        return submitit.AutoExecutor(folder=folder, cluster="debug")
    if not shutil.which("sbatch"):
        raise UserError("--executor slurm: sbatch is not on PATH; use --executor local, or bring up a "
                        "one-node cluster here with: bash scripts/slurm-local.sh up")
    check_slurm_reachable()
    resources = suite.resources if resources is None else resources
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                     slurm_max_num_timeout=resources.get("max_num_timeout", 3))
    parameters = {EXECUTOR_PARAMETERS[k]: v for k, v in resources.items() if k in EXECUTOR_PARAMETERS}
    if not parameters.get("gpus_per_node"):
        parameters.pop("gpus_per_node", None)  # 0 GPUs: ask for none rather than --gpus-per-node=0
    nodes, per_node = cell_ranks(resources)
    if nodes * per_node > 1:  # one cell on several ranks: one task per rank (bench.launch)
        parameters.update(nodes=nodes, tasks_per_node=per_node)
    executor.update_parameters(name=suite.name, **parameters)
    return executor


def submit(suite: Suite, cells: list[Cell], suite_dir: Path, kind: str, *, fresh: bool) -> list[submitit.Job]:
    """One job array per distinct resource request (cells sized by overrides), one cell per
    task; each cell's job id goes to its job.json. Returns the jobs in the order of ``cells``."""
    groups: dict[str, list[int]] = {}
    for index, cell in enumerate(cells):
        groups.setdefault(json.dumps(cell.resources or suite.resources, sort_keys=True), []).append(index)
    jobs: list[Any] = [None] * len(cells)
    cell_dirs = [str(suite_dir / c.cell_id) for c in cells]
    for request, indexes in groups.items():
        executor = make_executor(kind, suite_dir / SUBMITIT_DIR, suite, json.loads(request))
        try:
            submitted_jobs = executor.map_array(CellJob(), [cells[i].config for i in indexes],
                                                [cell_dirs[i] for i in indexes], [cells[i].key for i in indexes],
                                                [fresh] * len(indexes))
        except submitit.core.utils.FailedJobError as e:
            raise UserError(f"sbatch refused the job array (`sbatch` of {suite_dir / SUBMITIT_DIR}): {e}; if SLURM "
                            "is not reachable from here, use --executor local") from None
        for i, job in zip(indexes, submitted_jobs):
            jobs[i] = job
    if kind == "slurm":
        submitted = dt.datetime.now(dt.timezone.utc).isoformat()
        for cell_dir, job in zip(cell_dirs, jobs):
            atomic_write_json(CellFiles(cell_dir).job, {
                "executor": "slurm", "job_id": job.job_id, "submitted": submitted,
                "log": str(job.paths.stdout), "error_log": str(job.paths.stderr),
            })
    return jobs


def wait_for_jobs(cells: list[Cell], suite_dir: Path, on_event: Listener = ignore,
                  poll_s: float | None = None) -> dict[str, CellState]:
    """--wait: until no submitted job is queued or running; then every cell's state."""
    poll_s = poll_s if poll_s is not None else poll_interval()
    while True:
        jobs = [read_job_file(suite_dir / c.cell_id) for c in cells]
        slurm = slurm_job_states(j["job_id"] for j in jobs if j)
        if slurm is not None:  # None: squeue did not answer this time
            active = sum(1 for j in jobs if j and slurm.get(j["job_id"]) in ACTIVE_SLURM_STATES)
            on_event({"event": "waiting", "done": len(cells) - active, "total": len(cells)})
            if not active:
                break
        time.sleep(poll_s)
    return collect_states(cells, suite_dir)


def poll_interval() -> float:
    """Seconds between squeue calls while waiting: submitit's own floor (30 s) on real clusters,
    so that a waiting driver never loads a shared controller; ``BENCH_SLURM_POLL_S`` lowers it
    for the one-node test cluster."""
    override = os.environ.get("BENCH_SLURM_POLL_S")
    return float(override) if override else WAIT_POLL_S
