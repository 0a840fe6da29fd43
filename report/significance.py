"""Which differences between a suite's methods are real: paired t-tests over seeds
(report.stats) in declared families, with Holm's correction within each family, an
equivalence verdict (TOST) and the power the seeds give.

A *unit* is what a table row shows: the cells that differ only in their seed. Within a group
(a dataset and backbone) and metric (R@1, MAP@R) a unit's score on a seed is the mean of its
``per_query.npz`` records over the queries every unit scored; units are paired by seed number.

Families (the question a comparison answers; a comparison appears in the CSV once per family):
- ``best``: every unit against the group's best;
- ``vs <reference>``: every unit against the zero-shot row and the full fine-tuning row, when the
  group has them (does training help? can full fine-tuning be dropped?);
- ``contrast``: the pairs a suite declares (``report: {contrasts: [[A, B], ...]}``): planned
  comparisons, Holm-corrected among themselves;
- ``other pairs``: the rest (exploratory).

Every claim but the declared contrasts shares one Holm correction over all ``K (K - 1) / 2``
pairs of the group (``family_size``). Two reasons, both measured on simulated suites of 10 equal
methods (tests/test_calibration.py): the best row is picked from the data, so Holm over its
``K - 1`` comparisons alone calls some equal method different in 9-11 % of suites; and the report
states the best, the zero-shot and the full fine-tuning families at once, whose separate
corrections together do so in 10-13 %. With one correction over all pairs: 3-6 %.

Each comparison gets one verdict (``a`` against ``b``): better / worse / equivalent within the
margin / not resolved, or "not testable: n = 1".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench import metrics as metric_registry
from bench.cell_files import CellFiles, UnreadableFile
from report import names, stats
from report.stats import ALPHA, BETTER, EQUIVALENT, NOT_RESOLVED, WORSE

# Rows every method is read against, when a group has them: does training beat the pretrained
# features, and can full fine-tuning be dropped?
REFERENCE_METHODS = ("zero_shot", "full_ft")
POPULATIONS = ("split", "classes")
COLUMNS = ["table", "metric", "method_a", "method_b", "diff", "ci_low", "ci_high", "p", "p_holm", "n_seeds",
           "n_queries", "test", "family", "verdict", "p_equiv", "p_equiv_holm", "margin", "family_size",
           "seed_sd", "detectable", "detectable_holm"]
BEST, OTHER, CONTRAST = "best", "other pairs", "contrast"


@dataclass
class Control:
    """A comparison whose answer the suite's design fixes: ``negative`` (an A/A pair: must not be
    called different) or ``positive`` (``a`` must be found better than ``b``)."""
    kind: str
    a: str
    b: str
    dataset: str | None = None  # the dataset key it is about; None: every group with both rows


@dataclass
class Settings:
    """The report's statistical choices (a suite's ``report:`` block, or ``report`` options)."""
    margin: float = stats.DEFAULT_MARGIN  # points
    contrasts: list[tuple[str, str]] = field(default_factory=list)
    population: str = "split"
    alpha: float = ALPHA
    controls: list[Control] = field(default_factory=list)
    about: str = ""  # the suite's own words on its design (report.about), printed with the controls

    @classmethod
    def from_block(cls, block: dict[str, Any] | None) -> "Settings":
        block = block or {}
        margin = block.get("equivalence_margin", stats.DEFAULT_MARGIN)
        contrasts = [tuple(str(x) for x in pair) for pair in block.get("contrasts") or []]
        controls = [Control(str(c["kind"]), str(c["a"]), str(c["b"]), c.get("dataset"))
                    for c in block.get("controls") or []]
        return cls(float(margin), contrasts, str(block.get("population") or "split"), controls=controls,
                   about=str(block.get("about") or ""))

    def contrasts_for(self, dataset: str | None) -> list[tuple[str, str]]:
        """The planned comparisons of a group: declared contrasts and the controls about it."""
        pairs = list(self.contrasts)
        pairs += [(c.a, c.b) for c in self.controls if c.dataset in (None, dataset)]
        return list(dict.fromkeys(pairs))


@dataclass
class GroupPower:
    """What one group's seeds can resolve (points)."""
    n: int  # seeds of the comparisons with the best (the most common count)
    seed_sd: float  # pooled SD of a per-seed difference, over the comparisons with the best
    detectable: float  # smallest difference found with 80 % power at alpha
    detectable_holm: float  # the same at alpha / m (m: the best family's size)
    family_size: int
    spread: float  # best minus worst row


@dataclass
class Significance:
    frame: pd.DataFrame  # one row per comparison and family (COLUMNS), differences in points (%)
    settings: Settings = field(default_factory=Settings)
    best: dict[tuple[str, str], str] = field(default_factory=dict)  # (group, metric) -> unit
    means: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)  # points
    seeds: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)  # seeds per unit
    unit_of_cell: dict[str, tuple[str, str]] = field(default_factory=dict)  # cell id -> (group, unit)
    # (group, metric) -> {reference method: its unit}
    references: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    power: dict[tuple[str, str], GroupPower] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    group_dataset: dict[str, Any] = field(default_factory=dict)  # group -> its dataset key

    def verdict_against_best(self, group: str, metric: str, unit: str) -> str | None:
        if self.best.get((group, metric)) == unit:
            return "best"
        part = self.family(group, metric, BEST)
        row = part[part["method_b"] == unit]
        return None if row.empty else str(row.iloc[0]["verdict"])

    def marked(self, cell_ids, metric: str) -> bool:
        """Whether the row holding these cells is the best of its group or could not be shown
        worse than it (equivalent, or not resolved); no mark where nothing was testable."""
        for cell_id in cell_ids:
            if cell_id in self.unit_of_cell:
                group, unit = self.unit_of_cell[cell_id]
                part = self.family(group, metric, BEST)
                if part.empty or not part["verdict"].isin([BETTER, WORSE, EQUIVALENT, NOT_RESOLVED]).any():
                    return False
                return self.verdict_against_best(group, metric, unit) in ("best", EQUIVALENT, NOT_RESOLVED)
        return False

    def family(self, group: str, metric: str, family: str) -> pd.DataFrame:
        f = self.frame
        return f[(f["table"] == group) & (f["metric"] == names.metric_display(metric)) & (f["family"] == family)]

    @property
    def empty(self) -> bool:
        return self.frame.empty


def unit_name(record: dict[str, Any], varying: list[str]) -> str:
    name = str(record.get("method_name"))
    extras = [f"{a}={names.value_display(a, record.get(a))}" for a in varying]
    return f"{name} ({', '.join(extras)})" if extras else name


# --- per-query records -------------------------------------------------------------------------

def load_per_query(cell_dir: Path, record: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray] | None, str]:
    """A cell's per-query records, checked against its result (``record``: its row of the
    report's cells frame): the query count, finite values in range, and the means of every
    registered metric's key (R@K, AP@R, ...) equal to the reported metrics. Returns (records, "") or
    (None, why not)."""
    try:
        data = CellFiles(cell_dir).read_arrays("per_query")
    except UnreadableFile as e:
        return None, str(e)
    if data is None:
        return None, "no per_query.npz (a result of an older version)"
    if "query_index" not in data or "ks" not in data:
        return None, "per_query.npz lacks query_index or ks"
    # every registered metric's record the file holds (a metric registered after it was written
    # is simply absent, and not compared for this cell)
    out = {k: data[k] for k in ("query_index", "ks")}
    out.update({m.record: data[m.record] for m in metric_registry.METRICS.values() if m.record in data})
    out["label"] = data.get("label")
    problem = _check_records(out, record or {})
    return (None, problem) if problem else (out, "")


def _check_records(data: dict[str, np.ndarray], record: dict[str, Any]) -> str:
    index, ks = data["query_index"], data["ks"]
    if index.ndim != 1 or ks.ndim != 1:
        return "per_query.npz: arrays of inconsistent shapes"
    for metric in metric_registry.METRICS.values():
        values = data.get(metric.record)
        if values is None:
            continue
        if values.shape != ((len(index), len(ks)) if metric.per_k else (len(index),)):
            return "per_query.npz: arrays of inconsistent shapes"
        # every metric's per-query value is a fraction; a per-K metric's is a hit, 0 or 1
        values = values.astype(np.float64)
        if not np.isfinite(values).all():
            return "per_query.npz holds non-finite values"
        if values.min(initial=0) < 0 or values.max(initial=0) > 1 or (
                metric.per_k and not np.isin(values, (0.0, 1.0)).all()):
            return f"per_query.npz: {metric.record} holds values outside [0, 1] (or hits that are not 0/1)"
    if data["label"] is not None and data["label"].shape != index.shape:
        return "per_query.npz: labels of another length than the queries"
    if len(np.unique(index)) != len(index):
        return "per_query.npz: a query index appears twice"
    expected_count = record.get("num_queries")
    if not names.is_missing(expected_count) and int(expected_count) != len(index):
        return f"per_query.npz has {len(index)} queries, result.json {int(expected_count)}"
    for metric in metric_registry.METRICS.values():
        if metric.record not in data:
            continue
        for key in metric.keys(ks.tolist()):
            reported = record.get(key)
            if names.is_missing(reported):
                continue
            values = metric_registry.query_values(data, key)
            mean = values.mean() if len(index) else math.nan
            if not abs(float(mean) - float(reported)) <= 1e-6:
                return f"per_query.npz's mean {key} {mean:.6f} is not result.json's {float(reported):.6f}"
    return ""


def metric_values(data: dict[str, np.ndarray], metric: str, common: np.ndarray) -> np.ndarray | None:
    position = {int(q): i for i, q in enumerate(data["query_index"].tolist())}
    rows = np.array([position[int(q)] for q in common], dtype=np.int64)
    values = metric_registry.query_values(data, metric)
    return None if values is None else values[rows]


# --- the decision function (what the calibration tests simulate) ------------------------------

def decide(values: dict[str, dict[int, np.ndarray]], *, references: dict[str, str] | None = None,
           contrasts: list[tuple[str, str]] | None = None, margin: float = stats.DEFAULT_MARGIN / 100,
           labels: np.ndarray | None = None, alpha: float = ALPHA) -> tuple[list[dict[str, Any]], str]:
    """Every comparison of one group and metric. ``values``: unit -> seed -> per-query values
    (fractions), the same queries in the same order everywhere; ``references``: family name
    (e.g. "vs Zero-shot") -> unit; ``margin`` in the values' units; ``labels``: the queries'
    classes, for the class-resampling variance term (``--population classes``).

    Returns the rows (differences in the values' units) and the best unit."""
    units = list(values)
    means = {u: float(np.mean([v.mean() for v in values[u].values()])) for u in units}
    best = max(units, key=lambda u: (means[u], u))
    seed_means = {u: {s: float(v.mean()) for s, v in values[u].items()} for u in units}
    cache: dict[tuple[str, str], stats.Paired] = {}

    def paired(a: str, b: str) -> stats.Paired:
        if (a, b) not in cache:
            shared = sorted(set(values[a]) & set(values[b]))
            if len(shared) < 2 and len(values[a]) >= 2 and len(values[b]) >= 2:
                # disjoint seed sets (an A/A control): nothing to pair by
                cache[(a, b)] = stats.welch_t(list(seed_means[a].values()), list(seed_means[b].values()),
                                              margin, alpha)
                return cache[(a, b)]
            diffs = [seed_means[a][s] - seed_means[b][s] for s in shared]
            term = None
            if labels is not None and len(shared) >= 2:
                per_query = np.mean([values[a][s] - values[b][s] for s in shared], axis=0)
                term = stats.class_variance(per_query, labels)
            cache[(a, b)] = stats.paired_t(diffs, margin, term, alpha)
        return cache[(a, b)]

    all_pairs = [(a, b) for i, a in enumerate(units) for b in units[i + 1:]]
    ordered = {}
    for a, b in all_pairs:  # better minus worse, ties by name
        ordered[frozenset((a, b))] = (a, b) if (means[a], a) >= (means[b], b) else (b, a)
    families: list[tuple[str, list[tuple[str, str]], str]] = []  # name, pairs, holm pool
    families.append((BEST, [(best, u) for u in units if u != best], "all"))
    for family_name, reference in (references or {}).items():
        if reference in values:
            families.append((family_name, [(u, reference) for u in units if u != reference], "all"))
    declared = [(a, b) for a, b in (contrasts or []) if a in values and b in values and a != b]
    if declared:
        families.append((CONTRAST, declared, CONTRAST))
    with_best = {frozenset(p) for p in families[0][1]}
    families.append((OTHER, [ordered[frozenset(p)] for p in all_pairs if frozenset(p) not in with_best], "all"))

    # Holm pools: "all" (every pair of the group) for every claim but the declared contrasts
    pools: dict[str, dict[frozenset, tuple[float, float]]] = {}
    pool_size: dict[str, int] = {}

    def adjust(pool: str, pairs: list[tuple[str, str]]) -> None:
        results = [paired(a, b) for a, b in pairs]
        p = stats.holm([r.p for r in results])
        q = stats.holm([r.p_equiv for r in results])
        pools[pool] = {frozenset(pair): (p[i], q[i]) for i, pair in enumerate(pairs)}
        pool_size[pool] = sum(r.testable for r in results)

    adjust("all", [ordered[frozenset(p)] for p in all_pairs])
    rows = []
    for family_name, pairs, pool in families:
        if pool != "all":
            adjust(pool, pairs)
        for a, b in pairs:
            r = paired(a, b)
            p_holm, q_holm = pools[pool][frozenset((a, b))]
            m = max(pool_size[pool], 1)
            rows.append({
                "method_a": a, "method_b": b, "diff": r.diff, "ci_low": r.ci_low, "ci_high": r.ci_high, "p": r.p,
                "p_holm": p_holm, "n_seeds": r.n, "n_queries": len(next(iter(values[a].values()))),
                "test": r.test, "family": family_name, "verdict": stats.verdict(r, p_holm, q_holm, alpha),
                "p_equiv": r.p_equiv, "p_equiv_holm": q_holm, "margin": margin, "family_size": m,
                "seed_sd": r.sd, "detectable": stats.detectable(r.sd, r.n, alpha),
                "detectable_holm": stats.detectable(r.sd, r.n, alpha / m)})
    return rows, best


# --- the report's significance -----------------------------------------------------------------

def significance(results, settings: Settings | None = None) -> Significance:
    """Every comparison of the suite's finished units, grouped by dataset and backbone."""
    settings = settings or Settings()
    ok = results.ok
    out = Significance(pd.DataFrame(columns=COLUMNS), settings=settings)
    if ok.empty:
        return out
    records = ok.to_dict("records")
    varying = [a for a in results.grid_axes if a in ok and ok[a].map(_text).nunique() > 1]
    rows: list[dict[str, Any]] = []
    left_out: list[tuple[str, str]] = []
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        group = f"{record.get('dataset_name')}, {record.get('backbone_name')}"
        groups.setdefault(group, []).append(record)
    unknown_contrasts: set[tuple[str, str]] = set(settings.contrasts)
    out.group_dataset = {group: members[0].get("dataset") for group, members in groups.items()}
    for group, members in sorted(groups.items()):
        units: dict[str, dict[int, dict[str, np.ndarray]]] = {}
        reference_units: dict[str, dict[str, float]] = {}
        for record in members:
            data, why = load_per_query(results.suite_dir / str(record["cell_id"]), record)
            if data is None:
                left_out.append((str(record["cell_id"]), why))
                continue
            unit = unit_name(record, varying)
            out.unit_of_cell[str(record["cell_id"])] = (group, unit)
            if record.get("method") in REFERENCE_METHODS:
                reference_units.setdefault(str(record["method"]), {})[unit] = 0.0
            units.setdefault(unit, {})[int(record.get("seed") or 0)] = data
        if len(units) < 2:
            continue
        common = _common_queries(units)
        labels = _common_labels(units, common) if settings.population == "classes" else None
        if settings.population == "classes" and labels is None:
            out.notes.append(f"{group}: the per-query records carry no class labels; tested with the test split "
                             "fixed instead of over test classes.")
        unknown_contrasts -= {c for c in settings.contrasts if c[0] in units and c[1] in units}
        for metric in metric_registry.compared_keys():
            title = names.metric_display(metric)
            values = {u: {s: metric_values(d, metric, common) for s, d in by_seed.items()}
                      for u, by_seed in units.items()}
            values = {u: v for u, v in values.items() if all(x is not None for x in v.values())}
            if len(values) < 2:
                continue
            means = {u: float(np.mean([x.mean() for x in v.values()])) for u, v in values.items()}
            references = {}
            for method in REFERENCE_METHODS:
                candidates = set(reference_units.get(method, {})) & set(values)
                if candidates:  # the best of several (an ablation sweeping another axis)
                    references[method] = max(candidates, key=lambda u: (means[u], u))
            out.references[(group, metric)] = references
            family_names = {f"vs {unit}": unit for unit in references.values()}
            found, best = decide(values, references=family_names,
                                 contrasts=settings.contrasts_for(out.group_dataset.get(group)),
                                 margin=settings.margin / 100, labels=labels, alpha=settings.alpha)
            out.best[(group, metric)] = best
            out.means[(group, metric)] = {u: 100 * m for u, m in means.items()}
            out.seeds[(group, metric)] = {u: len(v) for u, v in values.items()}
            for row in found:
                row = {"table": group, "metric": title, **row}
                for column in ("diff", "ci_low", "ci_high", "margin", "seed_sd", "detectable", "detectable_holm"):
                    row[column] = 100 * row[column]
                rows.append(row)
            out.power[(group, metric)] = _group_power(found, means)
    out.frame = pd.DataFrame(rows, columns=COLUMNS)
    if left_out:
        reasons: dict[str, list[str]] = {}
        for cell_id, why in left_out:
            reasons.setdefault(why, []).append(cell_id)
        for why, cells in reasons.items():
            shown = ", ".join(cells[:3]) + (f" and {len(cells) - 3} more" if len(cells) > 3 else "")
            out.notes.append(f"Left out of the comparisons, {why}: {shown}.")
    for a, b in sorted(unknown_contrasts):
        out.notes.append(f"Declared contrast {a} vs {b}: no group has both rows; not tested.")
    return out


def _group_power(found: list[dict[str, Any]], means: dict[str, float]) -> GroupPower:
    with_best = [r for r in found if r["family"] == BEST and math.isfinite(r["seed_sd"])]
    spread = 100 * (max(means.values()) - min(means.values()))
    if not with_best:
        n = max((r["n_seeds"] for r in found if r["family"] == BEST), default=0)
        return GroupPower(n, math.nan, math.nan, math.nan, 0, spread)
    counts = [r["n_seeds"] for r in with_best]
    n = max(set(counts), key=lambda c: (counts.count(c), c))
    sd = math.sqrt(float(np.mean([r["seed_sd"] ** 2 for r in with_best])))
    m = with_best[0]["family_size"]
    return GroupPower(n, 100 * sd, 100 * stats.detectable(sd, n), 100 * stats.detectable(sd, n, ALPHA / m), m,
                      spread)


def _common_queries(units) -> np.ndarray:
    sets = [set(d["query_index"].tolist()) for by_seed in units.values() for d in by_seed.values()]
    return np.array(sorted(set.intersection(*sets)), dtype=np.int64)


def _common_labels(units, common: np.ndarray) -> np.ndarray | None:
    for by_seed in units.values():
        for data in by_seed.values():
            if data.get("label") is None:
                return None
            position = {int(q): i for i, q in enumerate(data["query_index"].tolist())}
            return data["label"][[position[int(q)] for q in common]]
    return None


def _text(value: Any) -> str:
    return "" if names.is_missing(value) else str(value)


def against(part: pd.DataFrame, unit: str) -> list[tuple[str, float, float, float, float, str]]:
    """The rows of ``part`` (one group, metric and family) that involve ``unit``, each read as
    ``(other, other minus unit, interval low, interval high, p_holm, verdict of other)``, in points."""
    flip = {BETTER: WORSE, WORSE: BETTER}
    rows = []
    for r in part[(part["method_a"] == unit) | (part["method_b"] == unit)].itertuples():
        if r.method_a == unit:
            rows.append((r.method_b, -r.diff, -r.ci_high, -r.ci_low, r.p_holm, flip.get(r.verdict, r.verdict)))
        else:
            rows.append((r.method_a, r.diff, r.ci_low, r.ci_high, r.p_holm, r.verdict))
    return rows
