"""Which differences between a suite's methods are real: paired bootstrap comparisons (report.stats)
from each cell's ``per_query.npz``, per table group (a dataset and backbone), per metric.

A *unit* is what a table row shows: the cells that differ only in their seed. Within a group
every pair of units is compared on R@1 and MAP@R, with Holm's correction over the pairs of
that group and metric; a unit is *not significantly worse than the best* when it is the best
or its comparison with the best has ``p_holm >= 0.05``. Units whose cells lack
``per_query.npz`` (results of an older version) are left out, and the notes say so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from report import names
from report.stats import RESAMPLES, compare, holm

PER_QUERY_FILE = "per_query.npz"  # bench.train.PER_QUERY_FILE
ALPHA = 0.05
METRICS = {"recall@1": "R@1", "map@r": "MAP@R"}
# Every method is also read against this one: does training beat the pretrained features?
REFERENCE_METHOD = "zero_shot"
COLUMNS = ["table", "metric", "method_a", "method_b", "diff", "ci_low", "ci_high", "p", "p_holm", "n_seeds",
           "n_queries"]


@dataclass
class Significance:
    frame: pd.DataFrame  # one row per compared pair and metric (COLUMNS), diff in points (%)
    not_worse: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (group, metric) -> units
    best: dict[tuple[str, str], str] = field(default_factory=dict)
    unit_of_cell: dict[str, tuple[str, str]] = field(default_factory=dict)  # cell id -> (group, unit)
    # (group, metric) -> the zero-shot unit (the backbone as it is; the best one if several)
    reference: dict[tuple[str, str], str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def marked(self, cell_ids, metric: str) -> bool:
        """Whether the row holding these cells is not significantly worse than its group's best."""
        for cell_id in cell_ids:
            if cell_id in self.unit_of_cell:
                group, unit = self.unit_of_cell[cell_id]
                return unit in self.not_worse.get((group, metric), set())
        return False

    @property
    def empty(self) -> bool:
        return self.frame.empty


def unit_name(record: dict[str, Any], varying: list[str]) -> str:
    name = str(record.get("method_name"))
    extras = [f"{a}={names.value_display(a, record.get(a))}" for a in varying]
    return f"{name} ({', '.join(extras)})" if extras else name


def load_per_query(cell_dir: Path) -> dict[str, np.ndarray] | None:
    path = cell_dir / PER_QUERY_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in ("query_index", "ks", "hit_at_k", "ap_at_r")}
    except (OSError, ValueError, KeyError):
        return None


def significance(results, resamples: int = RESAMPLES, seed: int = 0) -> Significance:
    """Every pairwise comparison of the suite's finished units, grouped by dataset and backbone."""
    ok = results.ok
    out = Significance(pd.DataFrame(columns=COLUMNS))
    if ok.empty:
        return out
    records = ok.to_dict("records")
    varying = [a for a in results.grid_axes if a in ok and ok[a].map(_text).nunique() > 1]
    rows: list[dict[str, Any]] = []
    missing: list[str] = []
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        group = f"{record.get('dataset_name')}, {record.get('backbone_name')}"
        groups.setdefault(group, []).append(record)
    for group, members in sorted(groups.items()):
        units: dict[str, dict[int, dict[str, np.ndarray]]] = {}
        zero_shot: set[str] = set()
        for record in members:
            data = load_per_query(results.suite_dir / str(record["cell_id"]))
            if data is None:
                missing.append(str(record["cell_id"]))
                continue
            unit = unit_name(record, varying)
            out.unit_of_cell[str(record["cell_id"])] = (group, unit)
            if record.get("method") == REFERENCE_METHOD:
                zero_shot.add(unit)
            units.setdefault(unit, {})[int(record.get("seed") or 0)] = data
        if len(units) < 2:
            continue
        common = _common_queries(units)
        for metric, title in METRICS.items():
            values = {u: {s: _metric_values(d, metric, common) for s, d in by_seed.items()}
                      for u, by_seed in units.items()}
            values = {u: v for u, v in values.items() if all(x is not None for x in v.values())}
            if len(values) < 2:
                continue
            means = {u: np.mean([x.mean() for x in v.values()]) for u, v in values.items()}
            best = max(means, key=lambda u: (means[u], u))
            comparisons = compare(values, resamples=resamples, seed=seed)
            adjusted = holm([c.p for c in comparisons])
            out.best[(group, metric)] = best
            out.not_worse[(group, metric)] = {best}
            if zero_shot & set(means):
                out.reference[(group, metric)] = max(zero_shot & set(means), key=lambda u: (means[u], u))
            for c, p_holm in zip(comparisons, adjusted):
                a, b, diff, low, high = c.a, c.b, c.diff, c.ci_low, c.ci_high
                if means[b] > means[a]:  # report each pair as better minus worse
                    a, b, diff, low, high = b, a, -diff, -high, -low
                rows.append({"table": group, "metric": title, "method_a": a, "method_b": b, "diff": 100 * diff,
                             "ci_low": 100 * low, "ci_high": 100 * high, "p": c.p, "p_holm": p_holm,
                             "n_seeds": c.n_seeds, "n_queries": c.n_queries})
                if best in (a, b) and p_holm >= ALPHA:
                    out.not_worse[(group, metric)].add(b if a == best else a)
    out.frame = pd.DataFrame(rows, columns=COLUMNS)
    if missing:
        out.notes.append(f"{len(missing)} cells have no per_query.npz (results of an older version) and are left "
                         "out of the significance tests.")
    return out


def _common_queries(units) -> np.ndarray:
    sets = [set(d["query_index"].tolist()) for by_seed in units.values() for d in by_seed.values()]
    return np.array(sorted(set.intersection(*sets)), dtype=np.int64)


def _metric_values(data: dict[str, np.ndarray], metric: str, common: np.ndarray) -> np.ndarray | None:
    position = {int(q): i for i, q in enumerate(data["query_index"].tolist())}
    rows = np.array([position[int(q)] for q in common], dtype=np.int64)
    if metric == "map@r":
        return data["ap_at_r"][rows].astype(np.float64)
    k = int(metric.split("@")[1])
    ks = data["ks"].tolist()
    if k not in ks:
        return None
    return data["hit_at_k"][rows, ks.index(k)].astype(np.float64)


def _text(value: Any) -> str:
    return "" if names.is_missing(value) else str(value)


def sentences(sig: Significance) -> list[str]:
    """index.md's paragraph: in words, which differences are significant."""
    if sig.empty:
        return ["No significance tests: fewer than two methods with per-query records in a group."]
    lines = []
    for (group, metric), best in sig.best.items():
        title = METRICS[metric]
        part = sig.frame[(sig.frame["table"] == group) & (sig.frame["metric"] == title)]
        significant = part[part["p_holm"] < ALPHA].sort_values("diff", ascending=False)
        tied = sorted(sig.not_worse[(group, metric)] - {best})
        text = f"**{group}, {title}:** the best is {best}"
        text += (f"; not significantly worse than it: {', '.join(tied)}." if tied
                 else "; every other method is significantly worse.")
        if significant.empty:
            text += " No difference between two methods is significant after Holm's correction."
        else:
            shown = [f"{r.method_a} over {r.method_b} by {r.diff:.1f} points (95% CI {r.ci_low:.1f} to "
                     f"{r.ci_high:.1f}, p_holm {r.p_holm:.3g})" for r in significant.head(4).itertuples()]
            more = len(significant) - len(shown)
            text += (f" {len(significant)} of {len(part)} pairwise differences are significant "
                     f"(p_holm < {ALPHA}), the largest: " + "; ".join(shown) + (f"; and {more} more." if more > 0 else "."))
        reference = sig.reference.get((group, metric))
        if reference is not None:
            text += " " + _against_reference(part, reference)
        lines.append(text)
    return lines


def against(part: pd.DataFrame, unit: str) -> list[tuple[str, float, float, float, float]]:
    """The rows of ``part`` (one group and metric) that involve ``unit``, each read as ``(other,
    other minus unit, interval low, interval high, p_holm)``, in points."""
    rows = []
    for r in part[(part["method_a"] == unit) | (part["method_b"] == unit)].itertuples():
        if r.method_a == unit:
            rows.append((r.method_b, -r.diff, -r.ci_high, -r.ci_low, r.p_holm))
        else:
            rows.append((r.method_a, r.diff, r.ci_low, r.ci_high, r.p_holm))
    return rows


def _against_reference(part: pd.DataFrame, reference: str) -> str:
    """Which units differ significantly from the zero-shot row, in which direction, by how much."""
    better, worse, same = [], [], []
    for other, diff, _, _, p_holm in against(part, reference):
        if p_holm >= ALPHA:
            same.append(other)
        else:
            (better if diff > 0 else worse).append(f"{other} ({diff:+.1f})")
    text = f"Against {reference} (the backbone as it is, no training; differences in points): "
    parts = []
    if better:
        parts.append("significantly better: " + ", ".join(sorted(better)))
    if worse:
        parts.append("significantly worse: " + ", ".join(sorted(worse)))
    if same:
        parts.append("no significant difference: " + ", ".join(sorted(same)))
    return text + "; ".join(parts) + "."
