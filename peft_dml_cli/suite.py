"""`run_suite.py run SUITE` and `run_suite.py status SUITE`: the grid, its states, the run."""
from __future__ import annotations

import shutil
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from bench import dispatch
from bench.dispatch import CellState, text, totals_line
from bench.config import ConfigError, parse_assignments
from bench.orchestrate import RunOptions, run_suite
from bench.suite import Cell, Suite, cell_ranks, load_suite
from peft_dml_cli.console import make_console, print_table
from peft_dml_cli.progress import ProgressView

STATE_COLOURS = {"done": "green", "failed": "red", "running": "cyan", "queued": "blue", "pending": "yellow",
                 "corrupt": "magenta", "foreign": "magenta"}


def cmd_run(args) -> int:
    """Runs the suite through the engine (``bench.orchestrate.run_suite``) and renders what it
    says; with tuning, locally (and with --wait on SLURM) the final cells follow their trials."""
    console = make_console()
    suite = load_suite(args.suite, overrides=parse_assignments(getattr(args, "set", []) or [], "--set"))
    suite_dir = Path(args.out).resolve() / suite.name
    data_root = str(Path(args.data_root).resolve()) if args.data_root else None
    if getattr(args, "ranks", None) is not None:  # every cell as N processes on one node, here or on SLURM
        if args.ranks < 1:
            raise ConfigError(f"--ranks {args.ranks}: give at least 1")
        suite.resources = {**suite.resources, "ranks_per_node": args.ranks, "nodes": 1}
        for override in suite.overrides:
            override.resources.pop("ranks_per_node", None)
            override.resources.pop("nodes", None)
    if args.dry_run:
        return dry_run(console, suite, suite_dir, data_root, args)
    options = RunOptions(executor=args.executor or ("slurm" if shutil.which("sbatch") else "local"),
                         only=args.only, fresh=args.fresh, rerun_failed=args.rerun_failed, max_cells=args.max_cells,
                         jobs=getattr(args, "jobs", 1) or 1, check_data=not args.no_data_check, wait=args.wait)
    run = run_suite(suite, suite_dir, data_root=data_root, options=options,
                    on_event=lambda event: say(console, event, args), stage_view=lambda: ProgressView(console))
    if options.executor == "slurm" and not options.wait and run.waiting:
        console.print(f"{run.waiting} final cells wait for their tuning trials: rerun this command once the trials "
                      "have ended (or pass --wait)", highlight=False)
    if options.executor == "local" and not args.no_report:
        from peft_dml_cli.report import print_suite_summary, report_after_run

        if run.ran:
            report_after_run(suite_dir, suite.report.get("table"), console)
        else:
            print_suite_summary(suite_dir, console)
    return run.code


def dry_run(console, suite: Suite, suite_dir: Path, data_root: str | None, args) -> int:
    """The resolved grid with its hyperparameters and states; nothing is written or run."""
    plan = suite.plan(data_root=data_root, results_dir=suite_dir)
    cells = suite.select(plan.cells, args.only) if args.only else plan.cells
    states = dispatch.collect_states(cells, suite_dir)
    dispatch.check_suite_folder(suite_dir, suite)  # the real run would refuse a name another file owns
    print_table(console, grid_table(suite, cells, states, hyperparameters=True))
    console.print(totals_line(states) + waiting_text(plan))
    if not args.no_data_check and not suite.prepare:  # a prepare hook makes the data when it runs
        dispatch.check_data(cells)
    return 0


def say(console, event: dict, args) -> None:
    """One line for each thing the engine's suite run says (bench.orchestrate)."""
    kind = event["event"]
    if kind == "skipped":
        console.print(f"{event['count']} cells {event['reason']}")
    elif kind == "reused":
        console.print(event["text"], highlight=False, markup=False)
    elif kind == "tuning_failed":
        console.print(f"[red]tuning failed[/] {escape(event['message'])}", highlight=False)
    elif kind == "nothing_to_run":
        waiting = f"; {event['waiting']} final cells wait for their tuning trials" if event["waiting"] else ""
        console.print(f"{escape(event['suite'])}: nothing to run ({event['totals']}{waiting})")
    elif kind == "submitted":
        # in a checkout the script beside it; an installed package has the console script
        program = "python run_suite.py" if Path("run_suite.py").is_file() else "peft-dml"
        follow = f"{program} status {args.suite}" + (f" --out {args.out}" if args.out != "results" else "")
        console.print(f"{event['suite']}: submitted {event['cells']} cells as SLURM job array {event['arrays']} "
                      f"(logs in {event['logs']}); follow with: {follow}", highlight=False, markup=False)
    elif kind == "cell_not_done":
        console.print(f"[red]{event['state']}[/] {escape(event['name'])}: {escape(event['detail'])}", highlight=False)
    elif kind == "totals":
        console.print(event["text"])


def waiting_text(plan) -> str:
    return f"; {len(plan.waiting)} final cells wait for their tuning trials" if plan.waiting else ""


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
    """'1 GPU, 8 CPU, 64 GB, 24 h' from a cell's SLURM request; '2 x 4 ranks, ...' for a cell on
    several ranks (nodes x ranks per node; GPUs and CPUs are per node and per rank)."""
    parts = []
    nodes, per_node = cell_ranks(resources)
    if nodes * per_node > 1:
        parts.append(f"{nodes} x {per_node} ranks" if nodes > 1 else f"{per_node} ranks")
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
