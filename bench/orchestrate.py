"""A suite run to completion: stage after stage until nothing is left to run in this call.

With equal-budget tuning a suite runs in stages: the trials first, then each method's final cells
once its trials have ended. ``run_suite`` is that loop, in the engine, so that any caller (the
CLI, a notebook, a test) runs a suite the same way; it reports what happens as events and never
prints. Each stage's cells run locally (``local_run.run_local``) or go to SLURM through submitit
(``dispatch.submit``); on SLURM without ``wait`` the call returns after the first submission.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bench import dispatch, local_run
from bench.events import Listener, ignore
from bench.suite import Suite


@dataclass
class RunOptions:
    executor: str = "local"  # local | slurm | debug
    only: list[str] | None = None  # cell selectors (Suite.select)
    fresh: bool = False
    rerun_failed: bool = False
    max_cells: int | None = None  # in total over the stages of this call
    jobs: int = 1  # local cells at once
    check_data: bool = True
    wait: bool = False  # SLURM: wait for the jobs (and go on to the next stage)


@dataclass
class SuiteRun:
    code: int = 0  # 0 every cell ended well, 1 some failed (or a tuning failed)
    ran: list[str] = field(default_factory=list)  # cells this call ran or submitted, in order
    jobs: list[Any] = field(default_factory=list)  # the submitit jobs of the last submission
    waiting: int = 0  # final cells still waiting for their trials when the call returned


def run_suite(suite: Suite, suite_dir: Path, *, data_root: str | None = None, options: RunOptions | None = None,
              on_event: Listener = ignore,
              stage_view: Callable[[], AbstractContextManager[Listener]] | None = None) -> SuiteRun:
    """Runs what can run, stage by stage. ``on_event`` gets what a user should read (cells
    skipped, results reused, tuning failures, submissions); ``stage_view()`` gives the listener
    for the cells' own progress while a stage runs (a progress display), ``on_event`` when None."""
    options = options or RunOptions()
    view = stage_view or (lambda: nullcontext(on_event))
    run = SuiteRun()
    said: set[str] = set()  # tuning failures already reported
    prepared = False
    while True:
        plan = suite.plan(data_root=data_root, results_dir=suite_dir)
        todo, states = _next_stage(suite, suite_dir, plan, options, run, on_event)
        for message in plan.failed:
            if message not in said:
                said.add(message)
                on_event({"event": "tuning_failed", "message": message})
        if plan.failed:
            run.code = max(run.code, 1)
        if not todo:
            if not run.ran:
                on_event({"event": "nothing_to_run", "suite": suite.name, "totals": dispatch.totals_line(states),
                          "waiting": len(plan.waiting)})
            break
        run.ran += [c.cell_id for c in todo]
        with view() as listener:
            if not prepared:
                dispatch.prepare_data(suite, todo, listener)
                prepared = True
            if options.check_data:
                dispatch.check_data(todo)
            if options.executor == "local":
                failed = local_run.run_local(todo, suite_dir, fresh=options.fresh, on_event=listener,
                                            jobs=options.jobs)
                run.code = max(run.code, 1 if failed else 0)
                continue
        run.code = max(run.code, _submit(suite, todo, suite_dir, options, run, on_event, view))
        if options.executor == "slurm" and not options.wait:
            run.waiting = len(plan.waiting)
            break
    return run


def _next_stage(suite: Suite, suite_dir: Path, plan, options: RunOptions, run: SuiteRun, on_event):
    """(the cells this stage runs, the states of the selected cells): each cell once per call,
    ``max_cells`` in total, after writing the suite's cells and tuning files; on the first stage,
    what is skipped and reused is said."""
    cells = suite.select(plan.cells, options.only) if options.only else plan.cells
    states = dispatch.collect_states(cells, suite_dir)
    dispatch.write_cells_file(suite_dir, suite, plan.cells)
    if suite.tune is not None:
        dispatch.write_tuning_file(suite_dir, suite, plan)
    first = not run.ran
    reuse = dispatch.check_reuse(cells, states, suite_dir, content=options.check_data) \
        if first and not options.fresh else []
    todo, skipped = dispatch.select_cells(cells, states, rerun_failed=options.rerun_failed, fresh=options.fresh)
    todo = [c for c in todo if c.cell_id not in run.ran]
    if options.max_cells is not None:
        todo = todo[: max(options.max_cells - len(run.ran), 0)]
    if first:
        for reason, count in skipped.items():
            on_event({"event": "skipped", "reason": reason, "count": count})
        for line in reuse:
            on_event({"event": "reused", "text": line})
    return todo, states


def _submit(suite: Suite, todo: list, suite_dir: Path, options: RunOptions, run: SuiteRun, on_event, view) -> int:
    """One stage on SLURM (or submitit's debug executor, which runs each job when asked for its
    result); with ``wait``, until every job has ended. Returns the stage's exit code."""
    run.jobs = dispatch.submit(suite, todo, suite_dir, options.executor, fresh=options.fresh)
    if options.executor == "debug":
        for job in run.jobs:
            job.result()
        states = dispatch.collect_states(todo, suite_dir)
        on_event({"event": "totals", "text": dispatch.totals_line(states)})
        return 0 if all(s.state == "done" for s in states.values()) else 1
    arrays = ", ".join(dict.fromkeys(j.job_id.split("_")[0] for j in run.jobs))
    on_event({"event": "submitted", "suite": suite.name, "cells": len(run.jobs), "arrays": arrays,
              "logs": str(suite_dir / dispatch.SUBMITIT_DIR)})
    if not options.wait:
        return 0
    with view() as listener:
        states = dispatch.wait_for_jobs(todo, suite_dir, listener)
    for cell in todo:
        state = states[cell.cell_id]
        if state.state != "done":
            on_event({"event": "cell_not_done", "state": state.state, "name": dispatch.cell_name(cell),
                      "detail": state.detail})
    on_event({"event": "totals", "text": dispatch.totals_line(states)})
    return 0 if all(s.state == "done" for s in states.values()) else 1
