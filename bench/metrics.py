"""The retrieval metrics, named once: what each is called, how each query scores, what is compared.

Every part of the suite reads this registry (it imports neither torch nor the engines):

* the evaluation engines (``bench.evaluate``, ``bench.evaluate_symmetric``) compute two base
  quantities per scored query, the 0-based rank of its best positive (``first_hit``) and its
  average precision at R (``ap_at_r``); each metric turns them into its own per-query record,
  and a metric's value is the mean of its record;
* ``per_query.npz`` stores each metric's record under the metric's ``record`` name;
* the reporter finds metric keys (``is_metric_key``), their display names, the columns of its
  tables (``table_keys``) and the keys its paired significance tests compare
  (``compared_keys``) here, and reads a key's per-query values with ``query_values``.

As pytorch-metric-learning's ``AccuracyCalculator`` has one ``calculate_<name>`` per metric,
a metric here is one ``register(Metric(...))`` line: ``tests/test_house.py`` adds a metric in
that one place and follows it from a cell's ``result.json`` to the report's table, CSV and
significance rows.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from bench.errors import UserError

# What every engine gives per scored query: ``first_hit``, the 0-based rank of its best positive
# (exact below the deepest K; at or beyond it an engine may report any rank >= that K, a miss
# for every K), and ``ap_at_r``, its average precision at R.
BASE_QUANTITIES = ("first_hit", "ap_at_r")


class MetricError(UserError):
    """A metric name that is not registered; the message lists those that are."""


@dataclass(frozen=True)
class Metric:
    """One metric. ``key`` is its name in ``result.json``; with ``{k}`` in it, the metric has one
    value per K of the cell's ``recall_ks`` (``recall@{k}``). ``per_query(base, ks)`` gives each
    query's value (a column per K for a per-K metric) from the engines' base quantities.

    The contract the reporter relies on: a per-query value is a fraction in [0, 1] (a per-K
    metric's is a hit, 0 or 1), higher is better, and the metric is its mean over the queries."""
    key: str
    display: str  # "R@{k}", "MAP@R"
    record: str  # the array of per_query.npz holding the per-query values
    per_query: Callable[[dict[str, np.ndarray], tuple[int, ...]], np.ndarray]
    table_keys: tuple[str, ...]  # the keys shown in every report table beside the paper's columns
    compared: bool = True  # its table keys are tested in the reporter's paired significance
    title: str = ""  # a longer name for help texts

    @property
    def per_k(self) -> bool:
        return "{k}" in self.key

    def keys(self, ks: Sequence[int]) -> list[str]:
        return [self.key.format(k=int(k)) for k in ks] if self.per_k else [self.key]

    def match(self, key: str) -> int | None | bool:
        """K for a per-K metric's key, True for this fixed key, False when the key is not ours."""
        if not self.per_k:
            return key == self.key
        pattern = re.escape(self.key).replace(re.escape("{k}"), r"(\d+)")
        found = re.fullmatch(pattern, key)
        return int(found.group(1)) if found else False


METRICS: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    if metric.record in {m.record for m in METRICS.values() if m.key != metric.key} or metric.record in (
            "query_index", "label", "ks"):
        raise ValueError(f"per-query record name {metric.record!r} is taken")
    METRICS[metric.key] = metric
    return metric


def average_precision_at_r(same_class: np.ndarray, r: np.ndarray) -> np.ndarray:
    """MAP@R's per-query term (Musgrave et al. 2020): (1/R) * sum_{i<=R} P(i) rel(i), with R per
    row (all R >= 1); ``same_class`` holds each query's ranked neighbours' class matches."""
    width = int(r.max())
    ranks = np.arange(1, width + 1)
    relevant = same_class[:, :width] & (ranks <= r[:, None])
    hits_so_far = np.cumsum(relevant, axis=1, dtype=np.int64)
    return (hits_so_far * relevant / ranks).sum(axis=1) / r


register(Metric(
    key="recall@{k}", display="R@{k}", record="hit_at_k", table_keys=("recall@1",), title="Recall@K",
    # a hit at K: the best positive ranks among the K nearest (bool [Q, len(K)])
    per_query=lambda base, ks: base["first_hit"][:, None] < np.asarray(ks)[None, :]))
register(Metric(
    key="map@r", display="MAP@R", record="ap_at_r", table_keys=("map@r",), title="MAP@R",
    per_query=lambda base, ks: base["ap_at_r"]))


# --- lookups -----------------------------------------------------------------------------------

def find(key: str) -> tuple[Metric, int | None]:
    """The metric a result key belongs to, and its K (None for a fixed key)."""
    for metric in METRICS.values():
        found = metric.match(key)
        if found is not False:
            return metric, (None if found is True else found)
    raise MetricError(f"unknown metric {key!r}; the metrics are {', '.join(m.key for m in METRICS.values())} "
                      "(bench/metrics.py)")


def is_metric_key(key: str) -> bool:
    try:
        find(key)
    except MetricError:
        return False
    return True


def display(key: str) -> str:
    """'recall@4' -> 'R@4', 'map@r' -> 'MAP@R'."""
    metric, k = find(key)
    return metric.display.format(k=k) if k is not None else metric.display


def result_keys(ks: Sequence[int]) -> list[str]:
    """Every key a cell's metrics dict holds for these Ks, in registry order."""
    return [key for metric in METRICS.values() for key in metric.keys(ks)]


def table_keys() -> list[str]:
    """The metric columns of every report table (``R@1, MAP@R`` and any registered later)."""
    return [key for metric in METRICS.values() for key in metric.table_keys]


def compared_keys() -> list[str]:
    """The keys the reporter's paired significance tests compare."""
    return [key for metric in METRICS.values() if metric.compared for key in metric.table_keys]


# --- per-query records -------------------------------------------------------------------------

def records(base: dict[str, np.ndarray], ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Each metric's per-query record from the engines' base quantities (one row per query)."""
    missing = [name for name in BASE_QUANTITIES if name not in base]
    if missing:
        raise ValueError(f"base quantities missing: {missing}")
    ks = tuple(int(k) for k in ks)
    return {metric.record: np.asarray(metric.per_query(base, ks)) for metric in METRICS.values()}


def means(per_query: dict[str, np.ndarray], ks: Sequence[int]) -> dict[str, float]:
    """Each metric key's value: the mean of its per-query record (one place, so that a
    per_query.npz's means are a result's metrics exactly)."""
    out: dict[str, float] = {}
    for metric in METRICS.values():
        values = per_query[metric.record]
        if metric.per_k:
            out.update({key: float(values[:, j].mean()) for j, key in enumerate(metric.keys(ks))})
        else:
            out[metric.key] = float(values.mean())
    return out


def query_values(per_query: dict[str, np.ndarray], key: str) -> np.ndarray | None:
    """One key's per-query values (float64) from a per_query.npz's arrays; None when the file
    does not hold that key (another K list, or a metric registered after it was written)."""
    metric, k = find(key)
    values = per_query.get(metric.record)
    if values is None:
        return None
    if k is None:
        return np.asarray(values, dtype=np.float64)
    ks = [int(v) for v in np.asarray(per_query["ks"]).tolist()]
    return np.asarray(values[:, ks.index(k)], dtype=np.float64) if k in ks else None
