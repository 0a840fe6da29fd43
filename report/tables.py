"""Tables in the paper's shapes, built from the tidy cell frame (rendering is in render.py).

A table is a list of rows (ours, then the paper's reference rows) by a list of columns; each
value is a ``Stat`` (mean, sample std, number of seeds). Rows group the cells that differ only
in their seed; failed and missing cells keep their row (shown as "-") and are listed in the
notes.

Table kinds and the key fields they use:
- ``table1``: a section per (dataset, backbone); rows = method; columns = tunable parameters,
  peak memory, R@1, MAP@R (paper Table 1).
- ``table2``: rows = method x backbone/embedding; columns = datasets x (R@K triple, MAP@R).
- ``generic``: rows = method x backbone; columns = datasets x (R@1, MAP@R).
- ``ablation_accumulator`` / ``ablation_alpha`` / ``ablation_prompts`` / ``ablation_depth`` /
  ``ablation``: rows = values of the swept grid axes (``accumulator``, ``proxy_bias_ratio``,
  ``num_prompts``, ``prompt_depth``, or whatever grid axis varies); columns = datasets x
  (R@1, MAP@R).
- ``latency``: rows = method; columns = step latency (ms) per ``batch_size``.
Grid axes that vary but are not part of the shape are appended to the method name.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import pandas as pd

from bench import metrics as metric_registry
from report import names, published
from report.aggregate import seed_stats
from report.load import ReportError, SuiteResults

KINDS = ("table1", "table2", "generic", "latency", "ablation", "ablation_accumulator",
         "ablation_alpha", "ablation_prompts", "ablation_depth", "ablation_datasize", "ablation_pretraining",
         "ablation_vpt")
# The axis each named ablation sweeps (canonical names from names.AXES).
ABLATION_AXES = {
    "ablation_accumulator": ("accumulator",),
    "ablation_alpha": ("proxy_bias_ratio",),
    "ablation_prompts": ("num_prompts", "prompt_depth"),
    "ablation_depth": ("prompt_depth",),
    "ablation_datasize": ("train_fraction", "train_classes_fraction"),
    "ablation_pretraining": ("backbone",),
    "ablation_vpt": ("prompt_location", "output", "num_prompts", "prompt_depth"),
}
# "\n": a line break in LaTeX headers (a space elsewhere)
ORACLE_TITLE = "R@1 oracle\n(best test epoch,\noptimistic)"
DELTA_TITLE = "Δ R@1\nvs paper"
MAX_LISTED_CELLS = 12
PROTOCOLS = {"last": "last epoch", "val": "validation-selected (best val R@1)"}


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


# --- formatting shared by the renderers ---------------------------------------------------

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


# --- choosing a kind ----------------------------------------------------------------------

def default_kind(suite: str, cells: pd.DataFrame) -> str:
    """The table shape a suite's name asks for; single-dataset suites look like Table 1."""
    s = suite.lower()
    if "latency" in s or s.startswith("table10"):
        return "latency"
    if s.startswith("table1"):
        return "table1"
    if s.startswith(("table2", "table3")):
        return "table2"
    if s.startswith("ablation"):
        return s if s in KINDS else "ablation"
    datasets = cells["dataset"].dropna().unique() if "dataset" in cells else []
    return "table1" if len(datasets) <= 1 else "generic"


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ReportError(f"unknown table kind {kind!r}{names.closest(kind, KINDS)}; "
                          f"choose one of {', '.join(KINDS)}")
    return kind


# --- row plans: which cells make up which row ---------------------------------------------

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


def _text(value: Any) -> str:
    return "" if names.is_missing(value) else str(value)


def _varying(records: list[dict[str, Any]], column: str) -> bool:
    """Rows must differ on it (an absent value counts as a value of its own)."""
    return len({_text(r.get(column)) for r in records}) > 1


def _swept(records: list[dict[str, Any]], column: str) -> bool:
    """Takes at least two actual values."""
    return len({_text(r.get(column)) for r in records} - {""}) > 1


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


# --- aggregation ---------------------------------------------------------------------------

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
            if cell["status"] != "ok" or any(_text(cell.get(k)) != _text(v) for k, v in self.where.items()):
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


# --- the builder ---------------------------------------------------------------------------

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


def build_table(results: SuiteResults, kind: str, oracle: bool = False, significance=None) -> Table:
    """One table of a suite in the given shape; ``significance`` (report.significance) marks the
    R@1 and MAP@R of rows not significantly worse than their group's best."""
    check_kind(kind)
    records = [r for r in results.cells.to_dict("records") if not names.is_missing(r.get("method"))]
    layout = LAYOUTS[kind.split("_")[0] if kind.startswith("ablation") else kind](results, records, kind, oracle)
    plans = plan_rows(records, layout.key_fn, layout.section_fn, layout.stub_fn, layout.sort_fn)

    hidden = validation_specs(layout) if layout.selects_settings else []
    rows = [Row(p.stub, {s.column.key: s.stat(p.cells) for s in layout.specs + hidden}, "ours", p.section)
            for p in plans]
    columns = [s.column for s in layout.specs]
    if kind == "table1":
        add_full_ft_percentages(rows, plans)
    settings = SettingAxes.of(results, records)
    records_ref = published.records_for(
        kind, [r.get("dataset") for r in records], [r.get("backbone") for r in records], settings.swept)
    columns = add_deltas(layout, columns, rows, plans, records_ref, settings)
    paper_rows, paper_notes = reference_rows(layout, records_ref, plans)

    table = Table(kind, results.suite, "", layout.stub_titles, columns,
                  interleave(rows, paper_rows), seeds=max([_seed_count(p) for p in plans] or [1]))
    if hidden and all(not r.values[s.column.key].empty for r in rows for s in hidden):
        table.bold_by = "val"
    elif layout.selects_settings:
        table.bold_by = "test"
    table.notes = cell_notes(results, records) + paper_notes + percentage_notes(kind, rows, plans)
    if significance is not None and not significance.empty:
        mark_not_worse(table, plans, layout, significance)
    table.caption = caption(layout, results, table, bool(paper_rows), oracle, significance)
    return table


MARK = "†"


def mark_not_worse(table: Table, plans: list[RowPlan], layout: Layout, significance) -> None:
    for index, (row, plan) in enumerate(zip(table.rows, plans)):
        for spec in layout.specs:
            if spec.value not in metric_registry.compared_keys():
                continue
            cells = [c["cell_id"] for c in plan.cells
                     if c["status"] == "ok" and all(_text(c.get(k)) == _text(v) for k, v in spec.where.items())]
            if cells and significance.marked(cells, spec.value):
                table.marked.add((index, spec.column.key))


def _seed_count(plan: RowPlan) -> int:
    return len({_text(c.get("seed")) for c in plan.cells})


def interleave(ours: list[Row], paper: list[Row]) -> list[Row]:
    """Paper rows go right after our rows of the same section."""
    out: list[Row] = []
    sections = list(dict.fromkeys([r.section for r in ours] + [r.section for r in paper]))
    for section in sections:
        out.extend(r for r in ours if r.section == section)
        out.extend(r for r in paper if r.section == section)
    return out


# --- per-kind layouts ----------------------------------------------------------------------

def _method_identity(r: dict) -> tuple:
    return (_text(r.get("method")), _text(r.get("label")))


def _method_sort(r: dict) -> tuple:
    return (names.method_rank(r.get("method")), _text(r.get("method_name")))


def _extra_axes(results: SuiteResults, records: list[dict], used: Iterable[str]) -> list[str]:
    used = set(used)
    return [a for a in results.grid_axes if a not in used and _varying(records, a)]


def _with_extras(name: str, r: dict, extras: list[str]) -> str:
    if not extras:
        return name
    return f"{name} ({', '.join(f'{a}={names.value_display(a, r.get(a))}' for a in extras)})"


def _extras_sort(r: dict, extras: list[str]) -> tuple:
    return tuple(names.value_sort_key(r.get(a)) for a in extras)


def _section_name(r: dict) -> str:
    return f"{r.get('dataset_name')}, {r.get('backbone_name')}"


def _datasets(records: list[dict]) -> list[Any]:
    found = {r.get("dataset") for r in records if not names.is_missing(r.get("dataset"))}
    return sorted(found, key=names.dataset_rank)


def layout_table1(results: SuiteResults, records: list[dict], kind: str, oracle: bool) -> Layout:
    extras = _extra_axes(results, records, ())
    specs = [
        Spec(Column("params_trainable[M]", "Tunable\nparams", fmt="params", better=None),
             "params_trainable", scale=1e-6, paper_metric="params_trainable_m", paper_pct="params_pct"),
        Spec(Column("params_shared[M]", "of which\nshared", fmt="params", better=None), "params_shared", scale=1e-6),
        Spec(Column("params_per_class[M]", "of which\nper class", fmt="params", better=None), "params_per_class",
             scale=1e-6),
        Spec(Column("peak_memory[GiB]", "Peak\nmemory", fmt="memory", better=None),
             "peak_memory_bytes", scale=1 / 2**30, paper_metric="peak_memory_gib", paper_pct="memory_pct"),
        *(metric_spec(key) for key in metric_registry.table_keys()),
    ]
    if oracle:
        specs.append(oracle_spec())
    sections = sorted({_section_name(r) for r in records})
    lead = f"PEFT comparison on {sections[0]}" if len(sections) == 1 else "PEFT comparison"
    return Layout(
        kind, ["Method"],
        key_fn=lambda r: (*_method_identity(r), *(_text(r.get(a)) for a in extras)),
        section_fn=_section_name,
        stub_fn=lambda r: [_with_extras(r["method_name"], r, extras)],
        sort_fn=lambda r: (names.dataset_rank(r.get("dataset")), names.backbone_rank(r.get("backbone")),
                           _method_sort(r), _extras_sort(r, extras)),
        specs=specs, datasets=[None], lead=lead,
    )


def _recall_metrics(records: list[dict], dataset: Any, results: SuiteResults) -> list[str]:
    ks = names.RECALL_KS.get(str(dataset))
    if ks is None:
        present = {names.recall_k(c) for c in results.cells.columns if names.recall_k(c)}
        ks = tuple(sorted(present)[:3]) or (1,)
    return [f"recall@{k}" for k in ks]


def _dataset_specs(results: SuiteResults, records: list[dict], oracle: bool,
                   metrics_of: Callable[[Any], list[str]]) -> tuple[list[Spec], list[Any]]:
    specs: list[Spec] = []
    datasets = _datasets(records)
    for dataset in datasets:
        group = names.dataset_display(dataset)
        specs.extend(metric_spec(m, dataset, group) for m in metrics_of(dataset))
        if oracle:
            specs.append(oracle_spec(dataset, group))
    return specs, datasets


def layout_table2(results: SuiteResults, records: list[dict], kind: str, oracle: bool) -> Layout:
    extras = _extra_axes(results, records, ("embedding_size",))
    specs, datasets = _dataset_specs(
        results, records, oracle, lambda d: _recall_metrics(records, d, results) + [
            key for key in metric_registry.table_keys() if names.recall_k(key) is None])

    def arch(r: dict) -> str:
        emb = r.get("embedding_size")
        return r["backbone_name"] + ("" if names.is_missing(emb) else f"/{int(float(emb))}")

    return Layout(
        kind, ["Method", "Arch/Dim"],
        key_fn=lambda r: (*_method_identity(r), _text(r.get("backbone")), _text(r.get("embedding_size")),
                          *(_text(r.get(a)) for a in extras)),
        section_fn=lambda r: "",
        stub_fn=lambda r: [_with_extras(r["method_name"], r, extras), arch(r)],
        sort_fn=lambda r: (names.backbone_rank(r.get("backbone")), names.value_sort_key(r.get("embedding_size")),
                           _method_sort(r), _extras_sort(r, extras)),
        specs=specs, datasets=datasets, lead="Comparison across datasets",
    )


def layout_generic(results: SuiteResults, records: list[dict], kind: str, oracle: bool) -> Layout:
    extras = _extra_axes(results, records, ())
    specs, datasets = _dataset_specs(results, records, oracle, lambda d: metric_registry.table_keys())
    return Layout(
        kind, ["Method", "Backbone"],
        key_fn=lambda r: (*_method_identity(r), _text(r.get("backbone")), *(_text(r.get(a)) for a in extras)),
        section_fn=lambda r: "",
        stub_fn=lambda r: [_with_extras(r["method_name"], r, extras), r["backbone_name"]],
        sort_fn=lambda r: (_method_sort(r), names.backbone_rank(r.get("backbone")), _extras_sort(r, extras)),
        specs=specs, datasets=datasets, lead=f"Results of suite {results.suite}",
    )


def swept_axes(results: SuiteResults, records: list[dict], kind: str) -> list[str]:
    """The grid axes an ablation sweeps: its named axis first, then any other varying one."""
    preferred = [names.find_axis(results.grid_axes, a) for a in ABLATION_AXES.get(kind, ())]
    swept = [a for a in preferred if a and _varying(records, a)]
    return swept + [a for a in _extra_axes(results, records, swept)]


def layout_ablation(results: SuiteResults, records: list[dict], kind: str, oracle: bool) -> Layout:
    swept = swept_axes(results, records, kind)
    several_methods = len({_method_identity(r) for r in records}) > 1
    several_backbones = _varying(records, "backbone")
    specs, datasets = _dataset_specs(results, records, oracle, lambda d: metric_registry.table_keys())

    def stub(r: dict) -> list[str]:
        out = [names.value_display(a, r.get(a)) for a in swept]
        if several_methods or not swept:
            out.append(r["method_name"])
        if several_backbones:
            out.append(r["backbone_name"])
        return out

    # without a swept grid axis the rows are method entries, labelled by what they vary
    # (suites/ablation_accumulator.yaml: one labelled entry per accumulator)
    named = ABLATION_AXES.get(kind, ())
    row_title = names.axis_display(named[0]) if named and not swept else "Method"
    titles = [names.axis_display(a) for a in swept]
    titles += [row_title[0].upper() + row_title[1:]] if several_methods or not swept else []
    titles += ["Backbone"] if several_backbones else []
    what = ", ".join(names.axis_display(a) for a in swept) or row_title.lower()
    return Layout(
        kind, titles,
        key_fn=lambda r: (*_method_identity(r), _text(r.get("backbone")), *(_text(r.get(a)) for a in swept)),
        section_fn=lambda r: "",
        stub_fn=stub,
        sort_fn=lambda r: (_method_sort(r), names.backbone_rank(r.get("backbone")), _extras_sort(r, swept)),
        specs=specs, datasets=datasets, lead=f"Ablation over {what}", selects_settings=bool(swept),
    )


def layout_latency(results: SuiteResults, records: list[dict], kind: str, oracle: bool) -> Layout:
    extras = _extra_axes(results, records, ("batch_size",))
    sizes = sorted({r.get("batch_size") for r in records if not names.is_missing(r.get("batch_size"))},
                   key=names.value_sort_key)
    specs = []
    for size in sizes:
        b = names.value_display("batch_size", size)
        specs.append(Spec(Column(f"latency_ms/B={b}", f"B={b}", "Step latency (ms)", fmt="latency", better="low"),
                          "step_latency_ms_median", scale=1.0, where={"batch_size": size},
                          paper_metric=f"latency_ms@{b}"))
    several_backbones = _varying(records, "backbone")
    several_datasets = _varying(records, "dataset")
    return Layout(
        kind, ["Method"] + (["Backbone"] if several_backbones else []),
        key_fn=lambda r: (*_method_identity(r), _text(r.get("backbone")), *(_text(r.get(a)) for a in extras)),
        section_fn=(lambda r: r["dataset_name"]) if several_datasets else (lambda r: ""),
        stub_fn=lambda r: [_with_extras(r["method_name"], r, extras)] + ([r["backbone_name"]] if several_backbones else []),
        sort_fn=lambda r: (names.dataset_rank(r.get("dataset")), _method_sort(r), names.backbone_rank(r.get("backbone")),
                           _extras_sort(r, extras)),
        specs=specs, lead="Training step latency (forward + backward, median)",
    )


LAYOUTS = {"table1": layout_table1, "table2": layout_table2, "generic": layout_generic,
           "ablation": layout_ablation, "latency": layout_latency}


# --- derived values: % of full fine-tuning, deltas to the paper ----------------------------

def add_full_ft_percentages(rows: list[Row], plans: list[RowPlan]) -> None:
    """Params and memory as % of the full fine-tuning row of the same dataset and backbone;
    without one, params relative to the backbone's parameter count."""
    for section in {p.section for p in plans}:
        pairs = [(r, p) for r, p in zip(rows, plans) if p.section == section]
        full = next((r for r, p in pairs if names.canonical_method(p.sample.get("method")) == {"full_ft"}
                     and not r.values["params_trainable[M]"].empty), None)
        for row, plan in pairs:
            params, memory = row.values["params_trainable[M]"], row.values["peak_memory[GiB]"]
            shared = row.values.get("params_shared[M]")
            if shared is not None:  # the paper's PEFT figure: shared parameters as % of the backbone
                shared.pct = _share(shared, Spec(Column("", ""), "params_backbone", scale=1e-6).stat(plan.cells))
            if full is not None:
                params.pct = _share(params, full.values["params_trainable[M]"])
                memory.pct = _share(memory, full.values["peak_memory[GiB]"])
            else:
                backbone = Spec(Column("", ""), "params_backbone", scale=1e-6).stat(plan.cells)
                params.pct = _share(params, backbone)


def _share(part: Stat, whole: Stat) -> float | None:
    if part.empty or whole.empty or not whole.mean:
        return None
    return 100.0 * part.mean / whole.mean


def percentage_notes(kind: str, rows: list[Row], plans: list[RowPlan]) -> list[str]:
    if kind != "table1":
        return []
    notes = []
    for section in dict.fromkeys(p.section for p in plans):
        has_full = any(names.canonical_method(p.sample.get("method")) == {"full_ft"} and
                       not r.values["params_trainable[M]"].empty
                       for r, p in zip(rows, plans) if p.section == section)
        if not has_full:
            notes.append(f"{section}: no full fine-tuning result, so parameter % are relative to the "
                         "backbone's parameter count and memory has no %.")
    return notes


@dataclass
class SettingAxes:
    """Where a row's settings (α, accumulator, ...) come from, for matching the paper's rows:
    grid axes and method arguments, by canonical axis name."""
    columns: dict[str, str]  # canonical axis -> frame column (a grid axis wins over an argument)
    swept: list[str]  # canonical axes taking two or more values in the table
    fixed: dict[str, Any]  # canonical axis -> its most common value

    @classmethod
    def of(cls, results: SuiteResults, records: list[dict]) -> "SettingAxes":
        arguments = [c for c in results.cells.columns if c.startswith("method_args.")]
        columns: dict[str, str] = {}
        for column in arguments + results.grid_axes:
            columns[names.axis_canonical(column)] = column
        swept = [axis for axis, column in columns.items() if _swept(records, column)]
        fixed = {}
        for axis, column in columns.items():
            values = [r.get(column) for r in records if not names.is_missing(r.get(column))]
            if values:
                fixed[axis] = pd.Series([_text(v) for v in values]).mode().iloc[0]
        return cls(columns, swept, fixed)

    def of_row(self, plan: RowPlan) -> dict[str, Any]:
        sample = plan.sample
        settings = {axis: sample.get(column) for axis, column in self.columns.items()}
        if names.is_missing(settings.get("accumulator")):
            settings["accumulator"] = names.default_accumulator(sample.get("method"))
        return settings


def _match(records_ref, plan: RowPlan, dataset: Any, settings: SettingAxes) -> published.PaperResult | None:
    sample = plan.sample
    return published.find_match(records_ref, dataset if dataset is not None else sample.get("dataset"),
                                sample.get("backbone"), sample.get("method"), settings.of_row(plan),
                                settings.fixed)


def add_deltas(layout: Layout, columns: list[Column], rows: list[Row], plans: list[RowPlan],
               records_ref: list[published.PaperResult], settings: SettingAxes) -> list[Column]:
    """A Δ R@1 column per dataset where some row of ours has a paper counterpart."""
    out = list(columns)
    for dataset in layout.datasets:
        r1_key = f"{dataset}/recall@1[%]" if dataset is not None else "recall@1[%]"
        column = delta_column(dataset, names.dataset_display(dataset) if dataset is not None else "")
        found = False
        for row, plan in zip(rows, plans):
            match = _match(records_ref, plan, dataset, settings)
            if match is None or "recall@1" not in match.metrics:
                continue
            found = True
            ours = row.values.get(r1_key)
            if ours is not None and not ours.empty:
                row.values[column.key] = Stat(ours.mean - match.metrics["recall@1"], n=ours.n)
        if found:
            # after the dataset's last column, so the delta sits beside its R@1 group
            last = max(i for i, c in enumerate(out) if c.group == column.group) if column.group else len(out) - 1
            out.insert(last + 1, column)
    return out


def reference_rows(layout: Layout, records_ref: list[published.PaperResult],
                   plans: list[RowPlan]) -> tuple[list[Row], list[str]]:
    """One "paper: ..." row per paper row, in every section it belongs to."""
    groups: dict[tuple, list[published.PaperResult]] = {}
    for record in records_ref:
        groups.setdefault(record.group(), []).append(record)
    sections = list(dict.fromkeys(p.section for p in plans))
    section_of = {p.section: p.sample for p in plans}
    rows: list[Row] = []
    notes: list[str] = []
    for group in groups.values():
        for section in sections:
            members = [r for r in group if _record_in_section(r, section_of[section], layout.kind)]
            values = _paper_values(layout, members)
            if not values:
                continue
            sources = ", ".join(dict.fromkeys(r.source for r in members))
            stub = [f"paper: {members[0].name} ({sources})"] + [""] * (len(layout.stub_titles) - 1)
            for i, title in enumerate(layout.stub_titles):
                if title == "Arch/Dim":
                    stub[i] = f"{names.family_display(members[0].backbone)}/{members[0].embedding_size}"
                elif title == "Backbone":
                    stub[i] = names.family_display(members[0].backbone)
            rows.append(Row(stub, values, "paper", section))
            notes.extend(r.note for r in members if r.note)
    return rows, [n if n.endswith(".") else n + "." for n in dict.fromkeys(notes)]


def _record_in_section(record: published.PaperResult, sample: dict, kind: str) -> bool:
    if kind != "table1":
        return True  # one section (or latency's dataset sections: not dataset specific)
    return record.dataset == sample.get("dataset") and record.backbone == names.backbone_family(sample.get("backbone"))


def _paper_values(layout: Layout, members: list[published.PaperResult]) -> dict[str, Stat]:
    values: dict[str, Stat] = {}
    for spec in layout.specs:
        if spec.paper_metric is None:
            continue
        dataset = spec.where.get("dataset")
        for record in members:
            if dataset is not None and record.dataset != dataset:
                continue
            if spec.paper_metric in record.metrics:
                pct = record.metrics.get(spec.paper_pct) if spec.paper_pct else None
                values[spec.column.key] = Stat(record.metrics[spec.paper_metric], n=1, pct=pct)
    return values


# --- notes and caption ---------------------------------------------------------------------

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
        items = [f"{r.cell_id} ({r.reason})" if _text(r.reason) else str(r.cell_id)
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
    kinds = ok["memory_kind"].dropna().unique().tolist() if "memory_kind" in ok else []
    if not kinds:
        return "memory kind not recorded"
    return " and ".join(names.MEMORY_KINDS.get(k, k) for k in kinds) + (" (mixed: not comparable)" if len(kinds) > 1 else "")


def devices_text(ok: pd.DataFrame) -> str:
    devices = ok["device"].dropna().unique().tolist() if "device" in ok else []
    return ", ".join(map(str, devices)) or "device not recorded"


def caption(layout: Layout, results: SuiteResults, table: Table, with_paper: bool, oracle: bool,
            significance=None) -> str:
    # no quotation marks: straight quotes typeset badly in LaTeX
    ok = results.ok
    parts = [f"{layout.lead} (suite {results.suite})."]
    if layout.kind == "latency":
        parts.append(f"Median training step latency in ms on {devices_text(ok)}; {seeds_text(table.seeds)}. "
                     "Bold: fastest of our rows.")
    else:
        bold = {"val": "Bold: the setting that validation R@1 selects (class-disjoint validation classes).",
                "test": "Bold: best test value of our rows; picking a setting by it is a choice made on the test "
                        "set (an oracle, optimistic).",
                "": "Bold: best of our rows."}[table.bold_by]
        parts.append(f"Test-split R@K and MAP@R in %, {protocol_text(ok)}; {seeds_text(table.seeds)}. {bold}")
    if layout.kind == "table1":
        parts.append("Tunable parameters in millions (% of full fine-tuning), of which shared (independent of "
                     "the class count; % of the backbone, the paper's PEFT figure) and per class (proxies and "
                     f"class prompts, one set per training class); peak memory in GiB (G; below 1 GiB in MiB, "
                     f"M) ({memory_text(ok)}), with % of full fine-tuning.")
    if oracle:
        parts.append("The oracle column takes each run's best test epoch: it selects on the test set and is "
                     "optimistic.")
    if with_paper and layout.kind == "latency":
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
    if not ok.empty and layout.kind != "latency":
        parts.append("Intervals are 95% t intervals over seeds and hold for this test split.")
    parts.append("A dash: no finished run (failed and missing cells are listed below).")
    return " ".join(parts)
