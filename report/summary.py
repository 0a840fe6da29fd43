"""The summary page (``index.md``) linking every output, and the short terminal summary."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table as RichTable

from bench.results import atomic_write_text
from report import names
from report.load import SuiteResults
from report.render import md
from report.tables import Table, protocol_text, seeds_text

TOP_PER_DATASET = 3
FIGURE_TITLES = {
    "acc_vs_params": "R@1 vs trainable parameters (Pareto front marked)",
    "acc_vs_memory": "R@1 vs peak memory (Pareto front marked)",
    "latency": "Training step latency by method and batch size",
}


def figure_title(stem: str) -> str:
    if stem in FIGURE_TITLES:
        return FIGURE_TITLES[stem]
    if stem.startswith("curves_"):
        return f"Test R@1 and MAP@R per epoch, {names.dataset_display(stem[len('curves_'):])}"
    if stem.startswith("ablation_"):
        return f"Ablation: R@1 and MAP@R vs {names.axis_display(stem[len('ablation_'):])}"
    return stem


def _link(path: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(path, out_dir)).as_posix()


def status_counts(cells: pd.DataFrame) -> dict[str, int]:
    counts = cells["status"].value_counts() if "status" in cells else pd.Series(dtype=int)
    return {status: int(counts.get(status, 0)) for status in ("ok", "failed", "missing")}


def write_index(out_dir: Path, results: SuiteResults, table: Table, written: dict[str, Path],
                figures: dict[str, list[Path]]) -> Path:
    """``index.md``: protocol, counts, the table inline, links to every file, failed cells."""
    counts = status_counts(results.cells)
    lines = [
        f"# Report: suite `{results.suite}`",
        "",
        f"Results read from `{results.suite_dir}`: {len(results.cells)} cells, {counts['ok']} ok, "
        f"{counts['failed']} failed, {counts['missing']} missing.",
        "",
        f"- Protocol: test split, {protocol_text(results.ok)}; {seeds_text(table.seeds)}.",
        f"- Table shape: `{table.kind}` (choose another with `--table`).",
        "",
        "## Tables",
        "",
        f"`{table.kind}`: [Markdown]({_link(written['table.md'], out_dir)}) · "
        f"[LaTeX]({_link(written['table.tex'], out_dir)}) (`\\input` it; needs `\\usepackage{{booktabs}}`) · "
        f"[CSV]({_link(written['table.csv'], out_dir)}) (mean, std, n per column)",
        "",
        written["table.md"].read_text().rstrip(),
        "",
        "## Figures",
        "",
    ]
    if not figures:
        lines += ["The data supports no figure (no finished cells with the needed measurements).", ""]
    for stem, paths in figures.items():
        png = next(p for p in paths if p.suffix == ".png")
        pdf = next(p for p in paths if p.suffix == ".pdf")
        lines += [f"### {figure_title(stem)}", "",
                  f"![{figure_title(stem)}]({_link(png, out_dir)})", "",
                  f"[PNG]({_link(png, out_dir)}) · [PDF]({_link(pdf, out_dir)})", ""]
    lines += ["## Data", "",
              f"- [cells.csv]({_link(written['cells.csv'], out_dir)}): one row per cell (key, status, "
              "final and oracle metrics, measurements)",
              f"- [epochs.csv]({_link(written['epochs.csv'], out_dir)}): one row per cell and epoch", ""]
    lines += problem_cells(results.cells)
    if results.stale:
        lines += ["## Left out: not in cells.json", "",
                  "Result folders from an earlier version of the suite (their configuration changed), "
                  "not counted anywhere:", ""]
        lines += [f"- `{name}`" for name in results.stale] + [""]
    path = out_dir / "index.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def problem_cells(cells: pd.DataFrame) -> list[str]:
    bad = cells[cells["status"] != "ok"]
    lines = ["## Failed and missing cells", ""]
    if bad.empty:
        return lines + ["None: every cell finished.", ""]
    lines += ["| cell | status | method | dataset | seed | reason |", "|:---|:---|:---|:---|:---|:---|"]
    for row in bad.itertuples():
        seed = names.value_display("seed", row.seed)
        lines.append(f"| `{row.cell_id}` | {row.status} | {md(row.method_name)} | {md(row.dataset_name)} | "
                     f"{seed} | {md(_plain(row.reason))} |")
    return lines + [""]


def _plain(value: Any) -> str:
    return "" if names.is_missing(value) else str(value)


def print_summary(frame: pd.DataFrame, console: Console | None = None, top: int | None = TOP_PER_DATASET) -> None:
    """Cells ok/failed/missing, and the best rows by R@1 on each dataset (every row: top=None)."""
    console = console or Console()
    counts = status_counts(frame)
    console.print(f"[bold]{len(frame)} cells[/]: [green]{counts['ok']} ok[/], "
                  f"[red]{counts['failed']} failed[/], [yellow]{counts['missing']} missing[/]")
    ok = frame[frame["status"] == "ok"] if "status" in frame else frame
    if ok.empty or "recall@1" not in ok:
        return
    ok = ok.assign(
        method_name=[names.method_display(m, lab) for m, lab in zip(ok.get("method"), ok.get("label", [None] * len(ok)))],
        backbone_name=[names.backbone_display(b) for b in ok.get("backbone")],
        dataset_name=[names.dataset_display(d) for d in ok.get("dataset")],
    )
    title = "Methods by R@1 (mean over seeds)" if top is None else "Top methods by R@1 (mean over seeds)"
    table = RichTable(title=title, title_justify="left")
    for title, justify in (("dataset", "left"), ("method", "left"), ("backbone", "left"),
                           ("R@1 %", "right"), ("MAP@R %", "right"), ("seeds", "right")):
        table.add_column(title, justify=justify)
    grouped = (ok.groupby(["dataset_name", "method_name", "backbone_name"], dropna=False)
                 .agg(r1=("recall@1", "mean"), mapr=("map@r", "mean") if "map@r" in ok else ("recall@1", "size"),
                      n=("recall@1", "count"))
                 .reset_index())
    for dataset, part in grouped.groupby("dataset_name", sort=True):
        for row in part.sort_values("r1", ascending=False).head(top or len(part)).itertuples():
            mapr = f"{100 * row.mapr:.1f}" if "map@r" in ok and pd.notna(row.mapr) else "-"
            table.add_row(dataset, row.method_name, row.backbone_name, f"{100 * row.r1:.1f}", mapr, str(row.n))
    console.print(table)
