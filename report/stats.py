"""Paired comparisons of two methods over seeds: the paired t-test, its interval, two one-sided
tests for equivalence (TOST), Holm's correction, power and the seeds a difference needs.
Torch-free (NumPy and SciPy); checked against closed forms and by simulation under the null
(tests/test_statistics.py, tests/test_calibration.py).

The unit of replication is the *seed*: a method's score on a seed is the mean of its per-query
records (R@1 hits, AP at R) on the test split, and two methods are paired by seed number. The
per-seed difference already holds every source of run-to-run noise (initialisation, batch
order, the per-query flips they cause), so ``t = mean / (sd / sqrt(n))`` with ``n - 1`` degrees
of freedom is exact for normal differences and needs no model of where the noise comes from.
The interval is the t interval of the same statistic, so it excludes 0 exactly when p < 0.05.

Why not a bootstrap over seeds and queries (round 2): with 3 seeds there are only 27 equally
likely seed tuples and the resampled distribution has normal tails where t with 2 df needs
4.3 standard errors, and the per-query flips are counted twice (once inside the seed means,
once again by resampling queries). Simulated equal methods were called different in up to
23.5 % of experiments at alpha 0.05.

What the test is about: the test split is fixed. A difference is a statement about these test
classes; ``class_variance`` adds the variance of a resample of test classes (``--population
classes``) for a statement about classes drawn like them.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

ALPHA = 0.05
POWER = 0.80
DEFAULT_MARGIN = 1.0  # equivalence margin, in points (%)

TEST_SEEDS = "paired t over seeds (test split fixed)"
TEST_CLASSES = "paired t over seeds + test classes"
TEST_WELCH = "Welch t over seeds (unpaired: fewer than 2 shared seeds)"
NOT_TESTABLE = "not testable"

BETTER, WORSE, EQUIVALENT, NOT_RESOLVED = "better", "worse", "equivalent", "not resolved"


@dataclass
class Paired:
    """One comparison, ``a`` minus ``b``, in the units of the inputs (fractions for the report)."""
    diff: float  # mean over shared seeds of (a - b)
    ci_low: float  # 95 % t interval of diff (nan when not testable)
    ci_high: float
    p: float  # two-sided, H0: diff = 0
    p_equiv: float  # TOST, H0: |diff| >= margin (nan when not testable)
    n: int  # shared seeds
    sd: float  # sample SD of the per-seed differences (nan below 2)
    se: float  # standard error of diff (seeds, plus the class term with population="classes")
    df: float  # degrees of freedom of the t reference
    test: str

    @property
    def testable(self) -> bool:
        return not self.test.startswith(NOT_TESTABLE)


def paired_t(diffs, margin: float, class_term: tuple[float, int] | None = None,
             alpha: float = ALPHA) -> Paired:
    """The paired t-test of per-seed differences ``diffs`` (a minus b, one per shared seed), its
    95 % interval and the TOST p-value for equivalence within ``±margin``.

    ``class_term``: ``(variance, classes)`` from ``class_variance``: added to the squared standard
    error, with Welch-Satterthwaite degrees of freedom (``classes - 1`` for that term)."""
    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        return Paired(mean, math.nan, math.nan, math.nan, math.nan, n, math.nan, math.nan, math.nan,
                      f"{NOT_TESTABLE}: n = {n}")
    sd = float(d.std(ddof=1))
    seed_var = sd ** 2 / n
    df = float(n - 1)
    test = TEST_SEEDS
    var = seed_var
    if class_term is not None:
        class_var, classes = class_term
        var = seed_var + class_var
        parts = seed_var ** 2 / (n - 1) + (class_var ** 2 / (classes - 1) if classes > 1 else 0.0)
        df = var ** 2 / parts if parts > 0 else float(n - 1)
        test = TEST_CLASSES
    se = math.sqrt(var)
    # float sums of equal per-seed differences leave an SD of ~1e-17, not 0: treat as zero
    if se <= 1e-9 * float(np.abs(d).max(initial=0.0)) or se == 0.0:
        # the same difference on every seed (hit counts are discrete: with 2 seeds it happens
        # often): no spread to test against. A p of 0 here made 10 equal rows at 2 seeds claim a
        # difference in 22 % of simulated reports; the honest answer is no test.
        return Paired(mean, math.nan, math.nan, math.nan, math.nan, n, sd, se, df,
                      f"{NOT_TESTABLE}: the same difference on all {n} seeds")
    # scipy.special's t distribution functions (stats.t's, without its per-call overhead:
    # the calibration tests run this a hundred thousand times)
    q = float(special.stdtrit(df, 1 - alpha / 2))
    p = float(2 * special.stdtr(df, -abs(mean) / se))
    # TOST: both one-sided nulls (diff <= -margin, diff >= +margin) rejected at alpha
    p_equiv = float(max(special.stdtr(df, -(mean + margin) / se), special.stdtr(df, -(margin - mean) / se)))
    return Paired(mean, mean - q * se, mean + q * se, p, p_equiv, n, sd, se, df, test)


def welch_t(a, b, margin: float, alpha: float = ALPHA) -> Paired:
    """Two rows without (enough) shared seeds, e.g. an A/A control run on disjoint seed sets:
    Welch's unpaired t-test of their per-seed scores, its interval and the TOST p-value."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = min(len(a), len(b))
    mean = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    if len(a) < 2 or len(b) < 2:
        return Paired(mean, math.nan, math.nan, math.nan, math.nan, n, math.nan, math.nan, math.nan,
                      f"{NOT_TESTABLE}: n = {n}")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se <= 1e-9 * float(max(np.abs(a).max(), np.abs(b).max())) or se == 0.0:
        return Paired(mean, math.nan, math.nan, math.nan, math.nan, n, 0.0, 0.0, math.nan,
                      f"{NOT_TESTABLE}: the same score on every seed")
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    q = float(special.stdtrit(df, 1 - alpha / 2))
    p = float(2 * special.stdtr(df, -abs(mean) / se))
    p_equiv = float(max(special.stdtr(df, -(mean + margin) / se), special.stdtr(df, -(margin - mean) / se)))
    # sd: of a difference of one seed of each, the power formulas' input (sqrt(2) * pooled SD)
    sd = math.sqrt(a.var(ddof=1) + b.var(ddof=1))
    return Paired(mean, mean - q * se, mean + q * se, p, p_equiv, n, sd, se, df, TEST_WELCH)


def class_variance(per_query_diffs: np.ndarray, classes: np.ndarray) -> tuple[float, int]:
    """The variance of the mean difference over a resample of test *classes* (queries of one
    class are not independent): the cluster-robust (sandwich) variance of the mean of
    ``per_query_diffs`` (each query's difference averaged over seeds) with classes as clusters.
    It also holds the seeds' own per-query noise, which the seed term counts too: with this
    term the test is conservative, never liberal."""
    x = np.asarray(per_query_diffs, dtype=np.float64)
    codes = np.unique(np.asarray(classes), return_inverse=True)[1]
    count = int(codes.max()) + 1 if len(codes) else 0
    if count < 2:
        return 0.0, count
    totals = np.bincount(codes, weights=x, minlength=count)
    sizes = np.bincount(codes, minlength=count).astype(np.float64)
    mean = x.mean()
    residual = totals - sizes * mean
    return float(count / (count - 1) * np.sum(residual ** 2) / len(x) ** 2), count


def holm(pvalues) -> list[float]:
    """Holm's step-down adjustment (controls the family-wise error), in the input order; NaN
    (not testable) stays NaN and does not count towards the family's size."""
    p = np.asarray(pvalues, dtype=np.float64)
    adjusted = np.full(len(p), np.nan)
    valid = np.flatnonzero(np.isfinite(p))
    m = len(valid)
    running = 0.0
    for rank, i in enumerate(valid[np.argsort(p[valid], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def verdict(result: Paired, p_holm: float, p_equiv_holm: float, alpha: float = ALPHA) -> str:
    """``a`` against ``b`` in one word: better / worse (the difference test, Holm-adjusted),
    equivalent (TOST within the margin, Holm-adjusted), else not resolved; below 2 seeds
    "not testable: n = 1"."""
    if not result.testable:
        return result.test
    if p_holm < alpha:
        return BETTER if result.diff > 0 else WORSE
    if p_equiv_holm < alpha:
        return EQUIVALENT
    return NOT_RESOLVED


# --- power -----------------------------------------------------------------------------------

def power(delta: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test with ``n`` seeds to find a true difference ``delta``
    when the per-seed differences have SD ``sd`` (noncentral t, exact for normal differences)."""
    if n < 2 or not sd > 0:
        return math.nan
    df = n - 1
    q = stats.t.ppf(1 - alpha / 2, df)
    nc = abs(delta) * math.sqrt(n) / sd
    far_side = float(stats.nct.cdf(-q, df, nc))  # tiny; SciPy returns NaN for some large nc
    return float(stats.nct.sf(q, df, nc)) + (far_side if math.isfinite(far_side) else 0.0)


def detectable(sd: float, n: int, alpha: float = ALPHA, target: float = POWER) -> float:
    """The smallest true difference found with probability ``target`` by the paired t-test with
    ``n`` seeds (per-seed SD ``sd``); nan when not testable. It scales with ``sd``."""
    if n < 2 or not (sd > 0 and math.isfinite(sd)):
        return math.nan
    return sd * _detectable_per_sd(n, alpha, target)


@functools.lru_cache(maxsize=4096)
def _detectable_per_sd(n: int, alpha: float, target: float) -> float:
    high = 1.0
    while power(high, 1.0, n, alpha) < target:
        high *= 2
    return float(optimize.brentq(lambda d: power(d, 1.0, n, alpha) - target, 0.0, high, xtol=1e-10))


def seeds_needed(sd: float, delta: float, alpha: float = ALPHA, target: float = POWER,
                 limit: int = 1000) -> int | None:
    """The fewest seeds whose paired t-test finds ``delta`` with probability ``target``; None
    when even ``limit`` seeds do not (or the SD is unknown)."""
    if not (sd > 0 and math.isfinite(sd)) or not delta > 0:
        return None
    for n in range(2, limit + 1):
        if power(delta, sd, n, alpha) >= target:
            return n
    return None
