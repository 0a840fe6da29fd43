"""What a report table is made of: values (``Stat``), columns, rows and the table; the row plans
that group cells into rows; the specs that aggregate a column's values; the ``Layout`` a kind
builds (``report.tables``); and the formatting every renderer shares (``report.render``).

A table is a list of rows (ours, then the paper's reference rows) by a list of columns; each
value is a ``Stat`` (mean, sample std, number of seeds). Rows group the cells that differ only
in their seed; failed and missing cells keep their row (shown as "-") and are listed in the
notes.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from report import names
from report.aggregate import seed_stats

ORACLE_TITLE = "R@1 oracle\n(best test epoch,\noptimistic)"


DELTA_TITLE = "Δ R@1\nvs paper"


@dataclass
class Stat:
    mean: float
    std: float = math.nan
    n: int = 1
    pct: float | None = None  # share of a reference (full fine-tuning), in %
    ci_low: float = math.nan  # 95 % t interval over seeds (nan below 2 seeds)
    ci_high: float = math.nan

    @property
    def empty(self) -> bool:
        return self.n == 0 or self.mean is None or math.isnan(self.mean)


@dataclass
class Column:
    key: str  # unique; prefixes the CSV columns
    title: str
    group: str = ""  # spanning header (a dataset, "Step latency (ms)")
    fmt: str = "metric"  # metric | params | memory | latency | delta
    better: str | None = "high"  # which value gets bold: "high", "low" or None


@dataclass
class Row:
    stub: list[str]
    values: dict[str, Stat]
    source: str = "ours"  # or "paper"
    section: str = ""


@dataclass
class Table:
    kind: str
    suite: str
    caption: str
    stub_titles: list[str]
    columns: list[Column]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    seeds: int = 1  # the most seeds of any row; rows with fewer show "(n=k)"
    # "" (best of our rows), "val": a sweep's rows bolded where validation R@1 is best (the
    # honest choice of a setting), "test": a sweep without validation, bolded on test (an oracle)
    bold_by: str = ""
    marked: set[tuple[int, str]] = field(default_factory=set)  # (row, column): not worse than the best

    @property
    def label(self) -> str:
        return f"tab:{slug(self.suite)}-{slug(self.kind)}"

    @property
    def sections(self) -> list[str]:
        out: list[str] = []
        for row in self.rows:
            if row.section not in out:
                out.append(row.section)
        return out

    def best(self, column: Column) -> set[int]:
        """Indices of our rows with the best displayed value of a column, per section; in a sweep
        with a validation split, the rows whose setting validation R@1 selects."""
        if column.better is None:
            return set()
        if self.bold_by == "val":
            return self._selected_by_validation(column)
        winners: set[int] = set()
        for section in self.sections:
            candidates = [(i, r.values.get(column.key)) for i, r in enumerate(self.rows)
                          if r.source == "ours" and r.section == section]
            candidates = [(i, round(s.mean, decimals(column))) for i, s in candidates if s and not s.empty]
            if not candidates:
                continue
            pick = max if column.better == "high" else min
            target = pick(v for _, v in candidates)
            winners.update(i for i, v in candidates if v == target)
        return winners


    def _selected_by_validation(self, column: Column) -> set[int]:
        key = validation_key(column.key.split("/")[0] if "/" in column.key else None)
        winners: set[int] = set()
        for section in self.sections:
            candidates = [(i, r.values.get(key)) for i, r in enumerate(self.rows)
                          if r.source == "ours" and r.section == section]
            candidates = [(i, round(s.mean, 1)) for i, s in candidates if s is not None and not s.empty]
            if candidates:
                target = max(v for _, v in candidates)
                winners.update(i for i, v in candidates if v == target)
        return winners


def validation_key(dataset: Any) -> str:
    return f"{dataset}/val/recall@1[%]" if dataset is not None else "val/recall@1[%]"


def validation_specs(layout: "Layout") -> list["Spec"]:
    """Hidden columns: validation R@1 per dataset group, what a sweep's bold row is chosen by."""
    datasets = layout.datasets or [None]
    return [Spec(Column(validation_key(d), "val R@1"), "val/recall@1", where={} if d is None else {"dataset": d})
            for d in datasets]


def slug(text: str) -> str:
    """A file-name-safe stem; long names (a 300-character label) are cut and keep a hash, so that
    two long names never share a file and no name exceeds the file system's limit."""
    stem = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"
    if len(stem) > 60:
        import hashlib

        stem = stem[:50].rstrip("-") + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return stem


def decimals(column: Column) -> int:
    return 2 if column.fmt == "params" else 1


def format_parts(column: Column, stat: Stat | None, source: str, seeds: int) -> tuple[str, str, str]:
    """(value, std, suffix) as plain text; renderers add ± and bold in their own syntax."""
    if stat is None or stat.empty:
        return ("-" if source == "ours" and column.fmt != "delta" else "", "", "")
    # the half width of the 95 % t interval over seeds (none from a single seed)
    half = (stat.ci_high - stat.ci_low) / 2
    std = "" if stat.n <= 1 or math.isnan(half) else f"{half:.{decimals(column)}f}"
    # parameters and memory do not depend on the seed: fewer seeds there is no caveat
    seed_caveat = source == "ours" and column.fmt in ("metric", "latency") and 0 < stat.n < seeds
    suffix = f" (n={stat.n})" if seed_caveat else ""
    if column.fmt == "params":
        value = f"{_params_text(stat.mean)}M" + (f" ({_pct_text(stat.pct)}%)" if stat.pct is not None else "")
        return value, "", suffix
    if column.fmt == "memory":
        amount = f"{stat.mean:.1f}G" if stat.mean >= 1 else f"{stat.mean * 1024:.0f}M"  # small models: MiB
        value = amount + (f" ({stat.pct:.1f}%)" if stat.pct is not None else "")
        return value, "", suffix
    if column.fmt == "delta":
        return f"{stat.mean:+.1f}", "", ""
    return f"{stat.mean:.1f}", std, suffix


def _params_text(millions: float) -> str:
    # as the paper prints them (30.2M, 0.19M); tiny test models keep three significant digits
    if millions >= 10:
        return f"{millions:.1f}"
    return f"{millions:.2f}" if millions >= 0.1 else f"{millions:.3g}"


def _pct_text(pct: float) -> str:
    return f"{pct:.1f}" if pct >= 10 else f"{pct:.2f}"


@dataclass
class RowPlan:
    section: str
    stub: list[str]
    sort: tuple
    cells: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sample(self) -> dict[str, Any]:
        ok = [c for c in self.cells if c["status"] == "ok"]
        return (ok or self.cells)[0]


def cell_text(value: Any) -> str:
    return "" if names.is_missing(value) else str(value)


def is_varying(records: list[dict[str, Any]], column: str) -> bool:
    """Rows must differ on it (an absent value counts as a value of its own)."""
    return len({cell_text(r.get(column)) for r in records}) > 1


def is_swept(records: list[dict[str, Any]], column: str) -> bool:
    """Takes at least two actual values."""
    return len({cell_text(r.get(column)) for r in records} - {""}) > 1


def plan_rows(records: list[dict[str, Any]], key_fn: Callable[[dict], tuple],
              section_fn: Callable[[dict], str], stub_fn: Callable[[dict], list[str]],
              sort_fn: Callable[[dict], tuple]) -> list[RowPlan]:
    plans: dict[tuple, RowPlan] = {}
    for record in records:
        section = section_fn(record)
        key = (section, *key_fn(record))
        if key not in plans:
            plans[key] = RowPlan(section, stub_fn(record), sort_fn(record))
        plans[key].cells.append(record)
    return sorted(plans.values(), key=lambda p: p.sort)


@dataclass
class Spec:
    """How a column's values come out of the cells (and out of the paper's records)."""
    column: Column
    value: str  # frame column averaged over seeds
    scale: float = 100.0
    where: dict[str, Any] = field(default_factory=dict)  # frame column -> required value
    paper_metric: str | None = None  # key in PaperResult.metrics
    paper_pct: str | None = None

    def stat(self, cells: Iterable[dict[str, Any]]) -> Stat:
        values = []
        for cell in cells:
            if cell["status"] != "ok" or any(cell_text(cell.get(k)) != cell_text(v) for k, v in self.where.items()):
                continue
            value = cell.get(self.value)
            if not names.is_missing(value):
                values.append(float(value) * self.scale)
        stats = seed_stats(values)
        if stats.n == 0:
            return Stat(math.nan, n=0)
        return Stat(stats.mean, stats.std, stats.n, ci_low=stats.ci_low, ci_high=stats.ci_high)


def metric_spec(metric: str, dataset: Any = None, group: str = "") -> Spec:
    where = {} if dataset is None else {"dataset": dataset}
    key = f"{dataset}/{metric}[%]" if dataset is not None else f"{metric}[%]"
    return Spec(Column(key, names.metric_display(metric), group), metric, where=where,
                paper_metric=metric)


def oracle_spec(dataset: Any = None, group: str = "") -> Spec:
    where = {} if dataset is None else {"dataset": dataset}
    key = f"{dataset}/oracle_recall@1[%]" if dataset is not None else "oracle_recall@1[%]"
    return Spec(Column(key, ORACLE_TITLE, group), "oracle/recall@1", where=where)


def delta_column(dataset: Any = None, group: str = "") -> Column:
    key = f"{dataset}/delta_recall@1[pp]" if dataset is not None else "delta_recall@1[pp]"
    return Column(key, DELTA_TITLE, group, fmt="delta", better=None)


@dataclass
class Layout:
    """What differs between the kinds: rows, sections, stubs, columns and the caption's lead."""
    kind: str
    stub_titles: list[str]
    key_fn: Callable[[dict], tuple]
    section_fn: Callable[[dict], str]
    stub_fn: Callable[[dict], list[str]]
    sort_fn: Callable[[dict], tuple]
    specs: list[Spec]
    lead: str
    datasets: list[Any] = field(default_factory=list)  # column groups with a delta column
    selects_settings: bool = False  # rows are settings of a sweep: bold is a choice of setting
