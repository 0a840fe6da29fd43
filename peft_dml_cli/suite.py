"""`run_suite.py run SUITE` and `run_suite.py status SUITE`: the grid, its states, the run."""
from __future__ import annotations

import shutil
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from bench import dispatch
from bench.dispatch import CellState, cell_name, text, totals_line
from bench.config import parse_assignments
from bench.suite import Cell, Suite, load_suite
from peft_dml_cli.console import make_console, print_table
from peft_dml_cli.progress import ProgressView

STATE_COLOURS = {"done": "green", "failed": "red", "running": "cyan", "queued": "blue", "pending": "yellow",
                 "corrupt": "magenta", "foreign": "magenta"}


def cmd_run(args) -> int:
    """Run what can run; with tuning, the final cells of a method become runnable once its trials
    have ended: locally (and with --wait on SLURM) the loop goes straight on to them."""
    console = make_console()
    suite = load_suite(args.suite, overrides=parse_assignments(getattr(args, "set", []) or [], "--set"))
    suite_dir = Path(args.out).resolve() / suite.name
    data_root = str(Path(args.data_root).resolve()) if args.data_root else None
    executor = args.executor or ("slurm" if shutil.which("sbatch") else "local")
    done_before: set[str] = set()
    said: set[str] = set()  # tuning failures already printed
    code, prepared, ran_any = 0, False, False
    while True:
        plan = suite.plan(data_root=data_root, results_dir=suite_dir)
        cells = suite.select(plan.cells, args.only) if args.only else plan.cells
        states = dispatch.collect_states(cells, suite_dir)
        if args.dry_run:
            dispatch.check_suite_folder(suite_dir, suite)  # the real run would refuse a name another file owns
            print_table(console, grid_table(suite, cells, states, hyperparameters=True))
            console.print(totals_line(states) + waiting_text(plan))
            if not args.no_data_check and not suite.prepare:  # a prepare hook makes the data when it runs
                dispatch.check_data(cells)
            return 0
        dispatch.write_cells_file(suite_dir, suite, plan.cells)
        if suite.tune is not None:
            dispatch.write_tuning_file(suite_dir, suite, plan)
        reuse = [] if args.fresh or done_before else dispatch.check_reuse(cells, states, suite_dir,
                                                                         content=not args.no_data_check)
        todo, skipped = dispatch.select_cells(cells, states, rerun_failed=args.rerun_failed, fresh=args.fresh)
        todo = [c for c in todo if c.cell_id not in done_before]  # a stage runs its cells once per call
        if args.max_cells is not None:  # in total over the stages of this call, not per stage
            todo = todo[: max(args.max_cells - len(done_before), 0)]
        if not done_before:
            for reason, count in skipped.items():
                console.print(f"{count} cells {reason}")
            for line in reuse:
                console.print(line, highlight=False, markup=False)
        for message in plan.failed:
            if message not in said:
                said.add(message)
                console.print(f"[red]tuning failed[/] {escape(message)}", highlight=False)
        if plan.failed:
            code = max(code, 1)
        if not todo:
            if not ran_any:
                console.print(f"{suite.name}: nothing to run ({totals_line(states)}{waiting_text(plan)})")
            break
        ran_any = True
        done_before.update(c.cell_id for c in todo)
        with ProgressView(console) as on_event:
            if not prepared:
                dispatch.prepare_data(suite, todo, on_event)
                prepared = True
            if not args.no_data_check:
                dispatch.check_data(todo)
            if executor == "local":
                failed = dispatch.run_local(todo, suite_dir, fresh=args.fresh, on_event=on_event,
                                            jobs=getattr(args, "jobs", 1) or 1)
                code = max(code, 1 if failed else 0)
                continue
        result = _submit(console, suite, todo, suite_dir, executor, args)
        code = max(code, result)
        if executor == "slurm" and not args.wait:
            if plan.waiting:
                console.print(f"{len(plan.waiting)} final cells wait for their tuning trials: rerun this command "
                              "once the trials have ended (or pass --wait)", highlight=False)
            return code
    if executor == "local" and not args.no_report:
        from peft_dml_cli.report import print_suite_summary, report_after_run

        if ran_any:
            report_after_run(suite_dir, suite.report.get("table"), console)
        else:
            print_suite_summary(suite_dir, console)
    return code


def waiting_text(plan) -> str:
    return f"; {len(plan.waiting)} final cells wait for their tuning trials" if plan.waiting else ""


def _submit(console, suite: Suite, todo: list[Cell], suite_dir: Path, executor: str, args) -> int:
    jobs = dispatch.submit(suite, todo, suite_dir, executor, fresh=args.fresh)
    if executor == "debug":
        for job in jobs:  # the debug executor runs a job when its result is asked for
            job.result()
        states = dispatch.collect_states(todo, suite_dir)
        console.print(totals_line(states))
        return 0 if all(s.state == "done" for s in states.values()) else 1
    # in a checkout the script beside it; an installed package has the console script
    program = "python run_suite.py" if Path("run_suite.py").is_file() else "peft-dml"
    follow = f"{program} status {args.suite}" + (f" --out {args.out}" if args.out != "results" else "")
    arrays = ", ".join(dict.fromkeys(j.job_id.split("_")[0] for j in jobs))
    console.print(f"{suite.name}: submitted {len(jobs)} cells as SLURM job array {arrays} "
                  f"(logs in {suite_dir / dispatch.SUBMITIT_DIR}); follow with: {follow}", highlight=False)
    if not args.wait:
        return 0
    with ProgressView(console) as on_event:
        states = dispatch.wait_for_jobs(todo, suite_dir, on_event)
    for cell in todo:
        state = states[cell.cell_id]
        if state.state != "done":
            console.print(f"[red]{state.state}[/] {cell_name(cell)}: {state.detail}", highlight=False)
    console.print(totals_line(states))
    return 0 if all(s.state == "done" for s in states.values()) else 1


def cmd_status(args) -> int:
    console = make_console()
    suite = load_suite(args.suite, check_methods=False)  # no torch: status runs anywhere
    suite_dir = Path(args.out).resolve() / suite.name
    if not suite_dir.is_dir():
        console.print(f"{suite.name}: no results yet ({suite_dir} does not exist); start it with "
                      f"`run {args.suite}`", highlight=False, markup=False)
    plan = suite.plan(results_dir=suite_dir)
    states = dispatch.collect_states(plan.cells, suite_dir)
    print_table(console, grid_table(suite, plan.cells, states, hyperparameters=False))
    console.print(totals_line(states) + waiting_text(plan))
    if suite.tune is not None and plan.tuning and not plan.waiting:
        finals = [c for c in plan.cells if c.key.get("stage") == "final"]
        if finals and any(states[c.cell_id].state == "pending" for c in finals):
            console.print("trials done: rerun `run` to start the final cells", highlight=False, markup=False)
    return 0


def grid_table(suite: Suite, cells: list[Cell], states: dict[str, CellState], *, hyperparameters: bool) -> Table:
    key_names = list(dict.fromkeys(k for c in cells for k in c.key))
    table = Table(title=escape(f"{suite.name}: {suite.description}".rstrip(": ")), show_lines=False)
    table.add_column("#", justify="right")
    for name in key_names:
        table.add_column(name)
    if hyperparameters:
        for name in ("optimizer", "lr", "proxy lr", "epochs", "batch", "init", "positive avg", "method args",
                     "resources"):
            table.add_column(name)
    table.add_column("state")
    table.add_column("detail")
    for i, cell in enumerate(cells, 1):
        # labels, values and failure reasons are data: rich must not read "[red]" in them as markup
        row = [str(i)] + [escape(text(cell.key.get(name, ""))) for name in key_names]
        if hyperparameters:
            c = cell.config
            row += [c.optimizer, text(c.lr), text(c.proxy_lr), str(c.epochs), f"{c.batch_size}/{c.samples_per_class}",
                    c.init, c.loss_positive_average,
                    escape(" ".join(f"{k}={text(v)}" for k, v in c.method_args.items())),
                    resources_text(cell.resources or suite.resources)]
        state = states[cell.cell_id]
        row.append(f"[{STATE_COLOURS[state.state]}]{state.state}[/]")
        row.append(escape(state.detail))
        table.add_row(*row)
    return table


def resources_text(resources: dict) -> str:
    """'1 GPU, 8 CPU, 64 GB, 24 h' from a cell's SLURM request."""
    parts = []
    if resources.get("gpus_per_node"):
        parts.append(f"{resources['gpus_per_node']} GPU")
    if resources.get("cpus_per_task"):
        parts.append(f"{resources['cpus_per_task']} CPU")
    if resources.get("mem_gb"):
        parts.append(f"{resources['mem_gb']:g} GB")
    if resources.get("timeout_min"):
        minutes = resources["timeout_min"]
        parts.append(f"{minutes / 60:g} h" if minutes >= 60 else f"{minutes} min")
    if resources.get("max_num_timeout"):
        parts.append(f"requeue x{resources['max_num_timeout']}")
    return ", ".join(parts) or "-"
