"""`run_suite.py report SUITE`, and the summary printed after a local run."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from rich.table import Table

from rich.markup import escape
from bench.errors import UserError
from peft_dml_cli.console import make_console, print_table


def cmd_report(args) -> int:
    # headless by default (a cluster login node has no display); an explicit MPLBACKEND wins
    os.environ.setdefault("MPLBACKEND", "Agg")
    from report.cli import DEFAULT_OUT, report_settings, resolve_suite_dir, skip_for, write_report
    from report.load import load_suite

    suite_dir = resolve_suite_dir(args.suite, args.results)
    out_dir = Path(args.out) if args.out else suite_dir / DEFAULT_OUT
    results = load_suite(suite_dir, skip=skip_for(suite_dir, out_dir))
    settings = report_settings(results, population=args.population, margin=args.margin)
    written = write_report(results, out_dir, table=args.table, oracle=args.oracle, settings=settings)
    console = make_console()
    print_summary(results, console)
    console.print(f"report: {written['index.md']} ({len(written)} files)", highlight=False)
    return 0


def cmd_plan(args) -> int:
    """How many seeds each comparison needs, from the seed SDs of finished cells (or a pilot)."""
    from report import verdicts
    from report.cli import DEFAULT_OUT, report_settings, resolve_suite_dir, skip_for
    from report.load import load_suite
    from report.significance import significance

    if not args.difference > 0 or not 0 < args.power < 1:
        raise UserError(f"--difference must be > 0 points and --power in (0, 1), got {args.difference} and {args.power}")
    suite_dir = resolve_suite_dir(args.suite, args.results)
    results = load_suite(suite_dir, skip=skip_for(suite_dir, suite_dir / DEFAULT_OUT))
    sig = significance(results, report_settings(results))
    console = make_console()
    if sig.empty:
        console.print(f"{suite_dir}: no two rows of a group have per-query records yet; run a pilot of at least "
                      "2 seeds per row first", highlight=False, markup=False)
        return 1
    frame = verdicts.plan(sig, args.difference, args.power) if args.pairs else \
        verdicts.plan_groups(sig, args.difference, args.power)
    unit = "point" if args.difference == 1 else "points"
    console.print(f"Seeds for a difference of {args.difference:g} {unit} at {args.power:.0%} power (paired t-test "
                  "over seeds, alpha 0.05; seed SDs measured in " + str(suite_dir) + "):", highlight=False,
                  markup=False)
    for line in verdicts.plan_lines(frame, args.power):
        console.print(f"- {line}", highlight=False, markup=False)
    return 0


def report_after_run(suite_dir: Path, table: str | None, console) -> None:
    """The report of a suite that just ran here; a report problem never fails the run."""
    try:
        from report.cli import build_report
    except ImportError:
        return  # the reporter's dependencies are optional for running cells
    try:
        written = build_report(suite_dir, table=table)
    except UserError as e:
        console.print(f"[yellow]report not written[/]: {escape(str(e))}", highlight=False)
        return
    console.print(f"report: {suite_dir / 'report'} ({len(written)} files; open index.md)", highlight=False)
    print_suite_summary(suite_dir, console)


def print_suite_summary(suite_dir: Path, console) -> None:
    """Every method's mean R@1 / MAP@R, in the terminal (the tables are in the report)."""
    try:
        from report.load import load_suite
    except ImportError:
        return
    print_summary(load_suite(suite_dir), console, top=None)


def print_summary(results, console=None, top: int | None = 3) -> None:
    """Cells ok/failed/missing, and the best rows by R@1 on each dataset (every row: top=None)."""
    from report.summary import status_counts, summary_rows

    console = console or make_console()
    counts = status_counts(results.cells)
    console.print(f"[bold]{len(results.cells)} cells[/]: [green]{counts['ok']} ok[/], "
                  f"[red]{counts['failed']} failed[/], [yellow]{counts['missing']} missing[/]"
                  + "".join(f", [magenta]{counts[s]} {s}[/] (not counted)" for s in ("corrupt", "foreign") if counts[s]))
    rows = summary_rows(results, top)
    if rows.empty:
        return
    title = "Methods by R@1 (mean over seeds)" if top is None else "Top methods by R@1 (mean over seeds)"
    table = Table(title=title, title_justify="left")
    for name, justify in (("dataset", "left"), ("method", "left"), ("backbone", "left"), ("R@1 %", "right"),
                          ("MAP@R %", "right"), ("seeds", "right")):
        table.add_column(name, justify=justify)
    for row in rows.itertuples():
        mapr = "-" if pd.isna(row.map_r) else f"{100 * row.map_r:.1f}"
        table.add_row(row.dataset_name, row.method_name, row.backbone_name, f"{100 * row.r1:.1f}", mapr, str(row.n))
    print_table(console, table)
