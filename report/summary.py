"""The summary page (``index.md``) linking every output, and the short terminal summary."""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

import pandas as pd
from bench.results import atomic_write_text
from report import names
from report.aggregate import aggregate_seeds
from report.load import SuiteResults
from report.render import md
from report.captions import protocol_text, seeds_text
from report.table_model import Table

TOP_PER_DATASET = 3
FIGURE_TITLES = {
    "significance": "Differences to the best row and to the references, with 95% t intervals and the equivalence margin",
    "acc_vs_params": "R@1 vs trainable parameters (Pareto front marked)",
    "acc_vs_memory": "R@1 vs peak memory (Pareto front marked)",
    "latency": "Training step latency by method and batch size",
}


def figure_title(stem: str) -> str:
    if stem in FIGURE_TITLES:
        return FIGURE_TITLES[stem]
    if stem.startswith("curves_"):
        return f"Learning curves: training loss and test R@1 per epoch, {names.dataset_display(stem[len('curves_'):])}"
    if stem == "ablation_backbone":
        return "Ablation: R@1 and MAP@R by pretraining source, a bar per method"
    if stem.startswith("ablation_"):
        return f"Ablation: R@1 and MAP@R vs {names.axis_display(stem[len('ablation_'):])}"
    return stem


def _link(path: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(path, out_dir)).as_posix()


def status_counts(cells: pd.DataFrame) -> dict[str, int]:
    counts = cells["status"].value_counts() if "status" in cells else pd.Series(dtype=int)
    return {status: int(counts.get(status, 0)) for status in ("ok", "failed", "corrupt", "foreign", "missing")}


PICTURE_SECTIONS = (  # stem prefix -> subsection of "What the methods learned"
    ("retrieval_", "Retrievals", "The same fixed test queries for every method (its lowest seed), their five "
     "nearest neighbours framed green (same class) or red."),
    ("disagreement_", "Retrievals", ""),
    ("attention_", "Attention", "The CLS token's attention to the patches on the same test images, one row "
     "per method: attention rollout over all blocks, then the last block alone. Prompt tokens are left out."),
    ("proxies_", "Semantic proxies", "Whether each class's proxy points at its class: the cosine of the proxy "
     "to the class-mean train embedding of the final model, and the test embeddings in 2-D with the proxies."),
)


def picture_section(stem: str) -> str | None:
    for prefix, section, _ in PICTURE_SECTIONS:
        if stem.startswith(prefix):
            return section
    return None


def _figure_lines(stem: str, paths: list[Path], out_dir: Path, title: str) -> list[str]:
    png = next(p for p in paths if p.suffix == ".png")
    links = " · ".join(f"[{p.suffix[1:].upper()}]({_link(p, out_dir)})" for p in paths)
    return [f"![{md(title)}]({_link(png, out_dir)})", "", links, ""]


def write_index(out_dir: Path, results: SuiteResults, table: Table, written: dict[str, Path],
                figures: dict[str, list[Path]], significance=None, titles: dict[str, str] | None = None) -> Path:
    """``index.md``: protocol, counts, the table inline, links to every file, failed cells; and
    ``index.html``, the same page for a browser with the figures inline."""
    titles = titles or {}

    def title_of(stem: str) -> str:
        return " ".join((titles.get(stem) or figure_title(stem)).split())

    counts = status_counts(results.cells)
    lines = [
        f"# Report: suite `{results.suite}`",
        "",
        f"Results read from `{results.suite_dir}`: {len(results.cells)} cells, {counts['ok']} ok, "
        f"{counts['failed']} failed, {counts['missing']} missing"
        + "".join(f", {counts[s]} {s} (not counted)" for s in ("corrupt", "foreign") if counts[s]) + ".",
        "",
        f"- Protocol: test split, {protocol_text(results.ok)}; {seeds_text(table.seeds)}.",
        "- In a browser: [index.html](index.html), this page with every figure inline.",
        f"- Table shape: `{table.kind}` (choose another with `--table`).",
        "",
        "## Tables",
        "",
        f"`{table.kind}`: [Markdown]({_link(written['table.md'], out_dir)}) · "
        f"[LaTeX]({_link(written['table.tex'], out_dir)}) (`\\input` it; needs `\\usepackage{{booktabs}}`) · "
        f"[CSV]({_link(written['table.csv'], out_dir)}) (mean, std, 95% interval, n per column)",
        "",
        written["table.md"].read_text().rstrip(),
        "",
    ]
    lines += significance_section(significance, written, out_dir)
    lines += tuning_section(results, written, out_dir)
    charts = {stem: paths for stem, paths in figures.items() if picture_section(stem) is None}
    lines += ["## Figures", ""]
    if not charts:
        lines += ["The data supports no figure (no finished cells with the needed measurements).", ""]
    for stem, paths in charts.items():
        lines += [f"### {md(title_of(stem))}", ""] + _figure_lines(stem, paths, out_dir, title_of(stem))
    pictures = {stem: paths for stem, paths in figures.items() if picture_section(stem) is not None}
    if pictures:
        lines += ["## What the methods learned", ""]
        for section in dict.fromkeys(s for _, s, _ in PICTURE_SECTIONS):
            stems = [stem for stem in pictures if picture_section(stem) == section]
            if not stems:
                continue
            intro = next(text for _, name, text in PICTURE_SECTIONS if name == section and text)
            lines += [f"### {section}", "", intro, ""]
            for stem in stems:
                lines += _figure_lines(stem, pictures[stem], out_dir, title_of(stem))
    lines += ["## Data", ""]
    lines += data_roots(results)
    lines += [f"- [cells.csv]({_link(written['cells.csv'], out_dir)}): one row per cell (key, status, "
              "final and oracle metrics, measurements)",
              f"- [epochs.csv]({_link(written['epochs.csv'], out_dir)}): one row per cell and epoch", ""]
    lines += problem_cells(results.cells)
    lines += tie_notes(results.ok)
    if results.stale:
        lines += ["## Left out: not in cells.json", "",
                  "Result folders from an earlier version of the suite (their configuration changed), "
                  "not counted anywhere:", ""]
        lines += [f"- `{name}`" for name in results.stale] + [""]
    lines += provenance_section(results)
    text = "\n".join(lines) + "\n"
    path = out_dir / "index.md"
    atomic_write_text(path, text)
    from report.html import write_html

    written["index.html"] = write_html(out_dir, text, f"Report: suite {results.suite}",
                                       f"Written by peft-dml-bench {_own_version()} on "
                                       f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC from {results.suite_dir}")
    return path


def _own_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("peft-dml-bench")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def provenance_section(results: SuiteResults) -> list[str]:
    """Where the finished cells' numbers come from: commits, packages, hosts and dates, from
    their ``result.json`` records (``provenance``, kept by ``report.load``)."""
    commits: dict[str, int] = {}
    packages: dict[str, set[str]] = {}
    pythons, hosts, dirty, dates = set(), set(), 0, []
    for cell_id in results.ok["cell_id"] if not results.ok.empty else []:
        record = results.provenance.get(str(cell_id)) or {}
        commit = record.get("git_commit") or "unknown"
        commits[commit] = commits.get(commit, 0) + 1
        dirty += bool(record.get("git_dirty"))
        for name, version in (record.get("packages") or {}).items():
            packages.setdefault(name, set()).add(str(version))
        pythons.add(str(record.get("python")))
        hosts.add(str(record.get("host")))
        if record.get("finished"):
            dates.append(str(record["finished"])[:10])
    if not commits:
        return []
    lines = ["## Provenance", ""]
    lines.append("- Commits: " + ", ".join(f"`{c[:12]}` ({n} cells)" for c, n in sorted(commits.items()))
                 + (f"; {dirty} cells ran with uncommitted changes" if dirty else ""))
    lines.append("- Packages: " + (", ".join(f"{name} {' / '.join(sorted(v))}" for name, v in sorted(packages.items()))
                                   or "not recorded"))
    lines.append(f"- Python {', '.join(sorted(pythons))}; {len(hosts)} host(s); finished "
                 f"{min(dates)} to {max(dates)}" if dates else f"- Python {', '.join(sorted(pythons))}")
    return lines + [""]


def significance_section(sig, written: dict[str, Path], out_dir: Path) -> list[str]:
    if sig is None:
        return []
    from report import verdicts

    margin = sig.settings.margin
    population = ("over seeds and test classes (`--population classes`: a statement about new classes drawn "
                  "like these)" if sig.settings.population == "classes" else
                  "over seeds, test split fixed (a statement about these test classes; `--population classes` "
                  "adds the variance of a resample of test classes)")
    lines = []
    if sig.settings.controls:
        lines += ["## Controls: what the design puts in, and what the test finds", ""]
        if sig.settings.about:
            lines += [md(" ".join(sig.settings.about.split())), ""]
        lines += ["Each control is a planned comparison (family `contrast`) under the same calibrated test as "
                  "every other row:", ""]
        lines += [f"- {s}" for s in verdicts.control_lines(sig, escape=md)] + [""]
        limits = [f"{md(group)}, {names.metric_display(metric)}: below {p.detectable:.1f} points "
                  f"({p.detectable_holm:.1f} after Holm over {p.family_size}), with n = {p.n}"
                  for (group, metric), p in sig.power.items() if p.n >= 2 and p.detectable == p.detectable]
        if limits:
            lines += ["What these seeds cannot resolve (differences found with less than 80 % power): "
                      + "; ".join(limits) + ".", ""]
    lines += ["## What the differences mean", ""]
    lines += ["Paired comparisons on R@1 and MAP@R: per seed, the difference of two rows' means over the test "
              "queries, paired by seed number; a paired t-test on those differences (n - 1 degrees of freedom) "
              f"with its 95% t interval, {population}. The comparisons are read in families (against the best row, "
              "against the zero-shot and the full fine-tuning rows, the rest) that share one Holm correction "
              "over all pairs of the group: the best is picked from the data, and the families are read together. "
              "A suite's declared contrasts are planned comparisons with a Holm correction of their own. "
              f"Equivalence: both one-sided tests against ±{margin:g} points (TOST at 0.05). A verdict is better, "
              "worse, equivalent or not resolved; with one seed there is no test.", ""]
    lines += [f"- {s}" for s in verdicts.sentences(sig, escape=md)] + [""]
    lines += [f"- {md(n)}" for n in sig.notes]
    if sig.notes:
        lines.append("")
    if "significance.csv" in written:
        lines += [f"Every comparison with its family and verdict: "
                  f"[significance.csv]({_link(written['significance.csv'], out_dir)}).", ""]
    across = verdicts.across_groups(sig)
    if not across.empty:
        lines += ["### Across datasets (descriptive)", "", verdicts.across_text(across), ""]
        lines += ["| " + " | ".join(map(md, across.columns)) + " |", "|" + "|".join(["---"] * len(across.columns)) + "|"]
        for row in across.itertuples(index=False):
            lines.append("| " + " | ".join(md(f"{v:.2f}" if isinstance(v, float) else str(v)) for v in row) + " |")
        lines.append("")
    planned = verdicts.plan_groups(sig, difference=margin)
    if not planned.empty:
        lines += ["### Seeds needed", "", f"Seeds that find a difference of {margin:g} points with 80 % power, "
                  "from the seed SD of a difference with the best row, pooled per group and measured here "
                  "(`run_suite.py plan SUITE --difference D --pairs` for another difference and per comparison):", ""]
        lines += [f"- {md(s)}" for s in verdicts.plan_lines(planned)] + [""]
    return lines


def data_roots(results: SuiteResults) -> list[str]:
    """Which data folder each group's results were computed on (result.json's data.root)."""
    ok = results.ok
    if ok.empty or "data_root" not in ok:
        return []
    lines = []
    for (dataset, backbone), part in ok.groupby(["dataset_name", "backbone_name"], sort=True):
        roots = sorted({str(r) for r in part["data_root"] if not names.is_missing(r)})
        if roots:
            lines.append(f"- {md(dataset)}, {md(backbone)}: data in " + ", ".join(md(r) for r in roots))
    return lines


def tuning_section(results: SuiteResults, written: dict[str, Path], out_dir: Path) -> list[str]:
    from report import tuning

    frame = tuning.summary_frame(results.tuning)
    if frame.empty:
        return []
    lines = ["## Tuning", "", md(tuning.plan_text(results.tuning)), ""]
    lines += ["| " + " | ".join(map(md, frame.columns)) + " |", "|" + "|".join(["---"] * len(frame.columns)) + "|"]
    lines += ["| " + " | ".join(md(str(v)) for v in row) + " |" for row in frame.itertuples(index=False)]
    lines.append("")
    if "tuning.csv" in written:
        lines += [f"Every trial: [tuning.csv]({_link(written['tuning.csv'], out_dir)}).", ""]
    waiting = (results.tuning or {}).get("waiting")
    if waiting:
        lines += [f"{waiting} final cells still wait for their trials.", ""]
    return lines


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


TIE_NOTE_FRACTION = 0.01  # a cell is named when the tie rule decided R@1 for 1 % of its queries


def tie_notes(ok: pd.DataFrame) -> list[str]:
    """Cells whose test R@1 the lower-index tie rule decided for many queries (result.json's
    ``ties_top1`` of ``ties_checked``): their embeddings tie often, and R@K then reflects the
    order of the images as much as the model."""
    if ok.empty or "ties_top1" not in ok:
        return []
    counts = ok[["cell_id", "ties_top1", "ties_checked"]].dropna()
    counts = counts[counts["ties_checked"] > 0]
    flagged = counts[counts["ties_top1"] / counts["ties_checked"] >= TIE_NOTE_FRACTION]
    if flagged.empty:
        return []
    lines = ["## Ties that decided R@1", "",
             "In these cells a query's nearest similarity was shared exactly by an image of its class and one "
             "of another class often: the lower gallery index, not the model, made those queries hits or "
             "misses. Near-constant embeddings do this; read their R@K with care.", ""]
    lines += [f"- `{row.cell_id}`: {int(row.ties_top1)} of {int(row.ties_checked)} test queries checked "
              f"({100 * row.ties_top1 / row.ties_checked:.1f} %)" for row in flagged.itertuples()]
    return lines + [""]


def _plain(value: Any) -> str:
    return "" if names.is_missing(value) else str(value)


def summary_rows(results: SuiteResults, top: int | None = TOP_PER_DATASET) -> pd.DataFrame:
    """Per dataset, the rows with the best mean R@1 (every row: ``top=None``): one row per cell
    key without its seed (a swept value is a row of its own), with ``r1``, ``map_r`` and ``n``."""
    ok = results.ok
    if ok.empty or "recall@1" not in ok:
        return pd.DataFrame()
    key = [a for a in results.axes if a != "seed" and a in ok]
    key += [c for c in ("dataset_name", "method_name", "backbone_name") if c not in key]
    stats = aggregate_seeds(ok, key, {"r1": ("recall@1", 1.0), "map_r": ("map@r", 1.0)})
    stats = stats.rename(columns={"r1_mean": "r1", "map_r_mean": "map_r", "r1_n": "n"})
    extras = [a for a in results.grid_axes if a in stats and stats[a].nunique() > 1]
    if extras:  # a sweep: the swept values belong in the method column
        stats["method_name"] = stats["method_name"] + " (" + stats[extras].apply(
            lambda r: ", ".join(f"{a}={names.value_display(a, r[a])}" for a in extras), axis=1) + ")"
    parts = []
    for _, part in stats.groupby("dataset_name", sort=True):
        part = part.sort_values("r1", ascending=False)
        parts.append(part.head(top) if top else part)
    return pd.concat(parts, ignore_index=True)[["dataset_name", "method_name", "backbone_name", "r1", "map_r", "n"]]
