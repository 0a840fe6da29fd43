"""Averaging over seeds: the one place the reporter turns per-seed values into a mean, a sample
std and a 95 % confidence interval from the t distribution (tables, figures and the terminal
summary all call it, so they agree)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pandas as pd

from report import names

CONFIDENCE = 0.95


@dataclass
class SeedStats:
    mean: float
    std: float  # sample std (ddof 1); nan below 2 seeds
    n: int
    ci_low: float  # t interval; nan below 2 seeds: no interval from one run
    ci_high: float

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2


def t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided t quantile for ``n`` values (``n - 1`` degrees of freedom)."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, n - 1))


def seed_stats(values: Iterable[float], confidence: float = CONFIDENCE) -> SeedStats:
    clean = np.array([float(v) for v in values if not names.is_missing(v)], dtype=float)
    n = len(clean)
    if n == 0:
        return SeedStats(math.nan, math.nan, 0, math.nan, math.nan)
    mean = float(clean.mean())
    if n < 2:
        return SeedStats(mean, math.nan, 1, math.nan, math.nan)
    std = float(clean.std(ddof=1))
    half = t_quantile(n, confidence) * std / math.sqrt(n)
    return SeedStats(mean, std, n, mean - half, mean + half)


def _text(value: Any) -> str:
    return "" if names.is_missing(value) else str(value)


def aggregate_seeds(frame: pd.DataFrame, by: list[str], values: dict[str, tuple[str, float]]) -> pd.DataFrame:
    """One row per group of ``by`` (compared as text, so a missing value is a group of its own)
    with ``<name>_mean``, ``_std``, ``_n``, ``_ci_low`` and ``_ci_high`` for each output name;
    ``values`` maps output name -> (frame column, scale)."""
    grouped = frame.copy()
    for column in by:
        grouped[column] = grouped[column].map(_text) if column in grouped else ""
    rows = []
    for key, group in grouped.groupby(by, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        record: dict[str, Any] = dict(zip(by, key))
        for name, (column, scale) in values.items():
            series = pd.to_numeric(group[column], errors="coerce").dropna() * scale if column in group \
                else pd.Series(dtype=float)
            stats = seed_stats(series)
            record.update({f"{name}_mean": stats.mean, f"{name}_std": stats.std, f"{name}_n": stats.n,
                           f"{name}_ci_low": stats.ci_low, f"{name}_ci_high": stats.ci_high})
        rows.append(record)
    return pd.DataFrame(rows)
