"""A table's notes and caption: failed and missing cells, the evaluation protocol, the seeds and
their intervals, memory and devices, and what bold, daggers and paper rows mean."""
from __future__ import annotations

import pandas as pd

from report import kinds, names, published
from report.load import SuiteResults
from report.table_model import Layout, Table, cell_text

MARK = "†"  # a row not significantly worse than the best of its group (report.verdicts says so)

MAX_LISTED_CELLS = 12


PROTOCOLS = {"last": "last epoch", "val": "validation-selected (best val R@1)"}


def cell_notes(results: SuiteResults, records: list[dict]) -> list[str]:
    """Failed and missing cells, with their reasons (those without a key included)."""
    cells = results.cells
    notes = []
    for status, title in (("failed", "Failed cells"), ("corrupt", "Corrupt result files (not counted)"),
                          ("foreign", "Results that are not their folder's cell (not counted)"),
                          ("missing", "Missing cells")):
        chosen = cells[cells["status"] == status]
        if chosen.empty:
            continue
        items = [f"{r.cell_id} ({r.reason})" if cell_text(r.reason) else str(r.cell_id)
                 for r in chosen.itertuples()]
        more = len(items) - MAX_LISTED_CELLS
        text = "; ".join(items[:MAX_LISTED_CELLS]) + (f"; and {more} more (see index.md)" if more > 0 else "")
        notes.append(f"{title} ({len(items)}): {text}.")
    if results.stale:
        listed = "; ".join(results.stale[:MAX_LISTED_CELLS])
        more = len(results.stale) - MAX_LISTED_CELLS
        notes.append(f"Left out {len(results.stale)} result folders that cells.json does not list (an earlier "
                     f"version of the suite): {listed}" + (f"; and {more} more." if more > 0 else "."))
    return notes


def protocol_text(ok: pd.DataFrame) -> str:
    rules = ok["selection"].dropna().tolist() if "selection" in ok else []
    if not rules:
        return "epoch selection unknown"
    counts = pd.Series(rules).value_counts()
    if len(counts) == 1:
        return PROTOCOLS.get(counts.index[0], str(counts.index[0]))
    parts = [f"{n} cells {PROTOCOLS.get(rule, rule)}" for rule, n in counts.items()]
    return "mixed epoch selection: " + ", ".join(parts)


def seeds_text(seeds: int) -> str:
    if seeds > 1:
        return (f"mean ± half width of the 95% confidence interval over n = {seeds} seeds (t distribution, "
                f"n - 1 = {seeds - 1} degrees of freedom)")
    return "single seed: no interval"


def memory_text(ok: pd.DataFrame) -> str:
    found = ok["memory_kind"].dropna().unique().tolist() if "memory_kind" in ok else []
    if not found:
        return "memory kind not recorded"
    return " and ".join(names.MEMORY_KINDS.get(k, k) for k in found) + (" (mixed: not comparable)" if len(found) > 1 else "")


def devices_text(ok: pd.DataFrame) -> str:
    devices = ok["device"].dropna().unique().tolist() if "device" in ok else []
    return ", ".join(map(str, devices)) or "device not recorded"


def caption(layout: Layout, results: SuiteResults, table: Table, with_paper: bool, oracle: bool,
            significance=None) -> str:
    # no quotation marks: straight quotes typeset badly in LaTeX
    ok = results.ok
    shape = kinds.kind(layout.kind)
    parts = [f"{layout.lead} (suite {results.suite})."]
    if not shape.accuracy:
        parts.append(f"Median training step latency in ms on {devices_text(ok)}; {seeds_text(table.seeds)}. "
                     "Bold: fastest of our rows.")
    else:
        bold = {"val": "Bold: the setting that validation R@1 selects (class-disjoint validation classes).",
                "test": "Bold: best test value of our rows; picking a setting by it is a choice made on the test "
                        "set (an oracle, optimistic).",
                "": "Bold: best of our rows."}[table.bold_by]
        parts.append(f"Test-split R@K and MAP@R in %, {protocol_text(ok)}; {seeds_text(table.seeds)}. {bold}")
    if shape.full_ft_percentages:
        parts.append("Tunable parameters in millions (% of full fine-tuning), of which shared (independent of "
                     "the class count; % of the backbone, the paper's PEFT figure) and per class (proxies and "
                     f"class prompts, one set per training class); peak memory in GiB (G; below 1 GiB in MiB, "
                     f"M) ({memory_text(ok)}), with % of full fine-tuning.")
    if oracle:
        parts.append("The oracle column takes each run's best test epoch: it selects on the test set and is "
                     "optimistic.")
    if with_paper and not shape.accuracy:
        parts.append(f"Rows prefixed paper: are published numbers ({published.CITATION}, Table 10), "
                     "measured on other hardware.")
    elif with_paper:
        has_delta = any(c.fmt == "delta" for c in table.columns)
        parts.append(f"Rows prefixed paper: are published numbers ({published.CITATION}); the paper reports "
                     "single runs and likely the best test epoch."
                     + (" Δ R@1: ours minus paper." if has_delta else ""))
    if table.marked:
        from report.verdicts import marks_caption  # the words live beside the statistics

        parts.append(f"{MARK}: {marks_caption(significance)}.")
    if not ok.empty and shape.accuracy:
        parts.append("Intervals are 95% t intervals over seeds and hold for this test split.")
    parts.append("A dash: no finished run (failed and missing cells are listed below).")
    return " ".join(parts)
