"""Paired comparisons of methods: a hierarchical paired bootstrap over seeds and test queries,
and Holm's correction. Torch-free (NumPy only); checked against the paired t-test and McNemar's
test where those closed forms apply (tests/test_statistics.py).

Data: for each method, per seed, one value per test query (R@1 hit 0/1, or AP at R), the queries
in one order for every method and seed (they share the test split). A method's score on a seed
is the mean over queries; its score is the mean over seeds.

The bootstrap (``compare``): each replicate draws the seeds with replacement (from the seeds
both methods have) and the queries with replacement, the *same* query draw for both methods and
every seed, then takes the difference of the two methods' means. The interval is the 2.5-97.5
percentile of the replicates; the two-sided p-value is that of the centred replicates,
``(1 + #{|d* - d| >= |d|}) / (B + 1)``, so the smallest reachable p is ``1 / (B + 1)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
CHUNK = 250  # replicates whose query draws are held at once (queries x CHUNK float32)


@dataclass
class Comparison:
    a: str
    b: str
    diff: float  # mean(a) - mean(b), over the seeds both have
    ci_low: float
    ci_high: float
    p: float
    n_seeds: int
    n_queries: int
    p_holm: float = float("nan")


def query_replicates(values: dict[tuple[str, int], np.ndarray], resamples: int, seed: int) -> dict:
    """Every (method, seed)'s mean over ``resamples`` query resamples, one draw shared by all."""
    keys = list(values)
    matrix = np.stack([values[k] for k in keys]).astype(np.float32)  # [M*S, Q]
    queries = matrix.shape[1]
    rng = np.random.default_rng([seed, 0])
    out = np.empty((len(keys), resamples), dtype=np.float64)
    for start in range(0, resamples, CHUNK):
        count = min(CHUNK, resamples - start)
        draws = rng.integers(0, queries, size=(count, queries))
        offsets = (np.arange(count)[:, None] * queries + draws).ravel()
        weights = np.bincount(offsets, minlength=count * queries).reshape(count, queries).astype(np.float32)
        out[:, start:start + count] = (matrix @ weights.T) / queries
    return {k: out[i] for i, k in enumerate(keys)}


def compare(values: dict[str, dict[int, np.ndarray]], resamples: int = RESAMPLES, seed: int = 0,
            pairs: list[tuple[str, str]] | None = None) -> list[Comparison]:
    """Every pair (or ``pairs``) of methods: difference of means, bootstrap interval and p."""
    methods = list(values)
    if pairs is None:
        pairs = [(a, b) for i, a in enumerate(methods) for b in methods[i + 1:]]
    flat = {(m, s): v for m, by_seed in values.items() for s, v in by_seed.items()}
    lengths = {len(v) for v in flat.values()}
    if len(lengths) != 1:
        raise ValueError(f"methods were scored on different numbers of queries: {sorted(lengths)}")
    replicates = query_replicates(flat, resamples, seed)
    results = []
    for index, (a, b) in enumerate(pairs):
        seeds = sorted(set(values[a]) & set(values[b]))
        if not seeds:
            continue
        observed = float(np.mean([values[a][s].mean() - values[b][s].mean() for s in seeds]))
        per_seed = np.stack([replicates[(a, s)] - replicates[(b, s)] for s in seeds])  # [S, B]
        rng = np.random.default_rng([seed, 1, index])
        draws = rng.integers(0, len(seeds), size=(resamples, len(seeds)))
        boot = per_seed[draws, np.arange(resamples)[:, None]].mean(axis=1)
        low, high = np.percentile(boot, [2.5, 97.5])
        extreme = np.count_nonzero(np.abs(boot - observed) >= abs(observed) - 1e-12)
        p = (1 + extreme) / (resamples + 1)
        results.append(Comparison(a, b, observed, float(low), float(high), float(min(p, 1.0)), len(seeds),
                                  len(values[a][seeds[0]])))
    return results


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment (controls the family-wise error), in the input order."""
    order = np.argsort(pvalues, kind="stable")
    m = len(pvalues)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted.tolist()
