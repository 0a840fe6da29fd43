"""Tables in the paper's shapes, built from the tidy cell frame (rendering is in render.py).

``build_table(results, kind)`` plans the rows, aggregates each column over seeds, adds what the
paper gives (``report.paper_rows``) and writes the notes and caption (``report.captions``).
The kinds (``report.kinds.REPORT_KINDS``) pick one of the layouts below:
- ``table1``: a section per (dataset, backbone); rows = method; columns = tunable parameters,
  peak memory, R@1, MAP@R (paper Table 1).
- ``table2``: rows = method x backbone/embedding; columns = datasets x (R@K triple, MAP@R).
- ``generic``: rows = method x backbone; columns = datasets x (R@1, MAP@R).
- ``ablation`` (and its named variants): rows = values of the swept grid axes; columns =
  datasets x (R@1, MAP@R).
- ``latency``: rows = method; columns = step latency (ms) per ``batch_size``.
Every metric of ``bench.metrics.table_keys()`` is a column beside the paper's. Grid axes that
vary but are not part of the shape are appended to the method name.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from bench import metrics as metric_registry
from report import kinds, names, published
from report.captions import caption, cell_notes
from report.load import SuiteResults
from report.paper_rows import SettingAxes, add_deltas, add_full_ft_percentages, percentage_notes, reference_rows
from report.table_model import (Column, Layout, Row, RowPlan, Spec, Table, cell_text, is_varying, metric_spec,
                                oracle_spec, plan_rows, validation_specs)


def build_table(results: SuiteResults, kind: str, oracle: bool = False, significance=None) -> Table:
    """One table of a suite in the given shape; ``significance`` (report.significance) marks the
    R@1 and MAP@R of rows not significantly worse than their group's best."""
    shape = kinds.kind(kind)
    records = [r for r in results.cells.to_dict("records") if not names.is_missing(r.get("method"))]
    layout = LAYOUTS[shape.layout](results, records, kind, oracle)
    plans = plan_rows(records, layout.key_fn, layout.section_fn, layout.stub_fn, layout.sort_fn)

    hidden = validation_specs(layout) if layout.selects_settings else []
    rows = [Row(p.stub, {s.column.key: s.stat(p.cells) for s in layout.specs + hidden}, "ours", p.section)
            for p in plans]
    columns = [s.column for s in layout.specs]
    if shape.full_ft_percentages:
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


def mark_not_worse(table: Table, plans: list[RowPlan], layout: Layout, significance) -> None:
    for index, (row, plan) in enumerate(zip(table.rows, plans)):
        for spec in layout.specs:
            if spec.value not in metric_registry.compared_keys():
                continue
            cells = [c["cell_id"] for c in plan.cells
                     if c["status"] == "ok" and all(cell_text(c.get(k)) == cell_text(v) for k, v in spec.where.items())]
            if cells and significance.marked(cells, spec.value):
                table.marked.add((index, spec.column.key))


def _seed_count(plan: RowPlan) -> int:
    return len({cell_text(c.get("seed")) for c in plan.cells})


def interleave(ours: list[Row], paper: list[Row]) -> list[Row]:
    """Paper rows go right after our rows of the same section."""
    out: list[Row] = []
    sections = list(dict.fromkeys([r.section for r in ours] + [r.section for r in paper]))
    for section in sections:
        out.extend(r for r in ours if r.section == section)
        out.extend(r for r in paper if r.section == section)
    return out


def _method_identity(r: dict) -> tuple:
    return (cell_text(r.get("method")), cell_text(r.get("label")))


def _method_sort(r: dict) -> tuple:
    return (names.method_rank(r.get("method")), cell_text(r.get("method_name")))


def _extra_axes(results: SuiteResults, records: list[dict], used: Iterable[str]) -> list[str]:
    used = set(used)
    return [a for a in results.grid_axes if a not in used and is_varying(records, a)]


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
        key_fn=lambda r: (*_method_identity(r), *(cell_text(r.get(a)) for a in extras)),
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
        key_fn=lambda r: (*_method_identity(r), cell_text(r.get("backbone")), cell_text(r.get("embedding_size")),
                          *(cell_text(r.get(a)) for a in extras)),
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
        key_fn=lambda r: (*_method_identity(r), cell_text(r.get("backbone")), *(cell_text(r.get(a)) for a in extras)),
        section_fn=lambda r: "",
        stub_fn=lambda r: [_with_extras(r["method_name"], r, extras), r["backbone_name"]],
        sort_fn=lambda r: (_method_sort(r), names.backbone_rank(r.get("backbone")), _extras_sort(r, extras)),
        specs=specs, datasets=datasets, lead=f"Results of suite {results.suite}",
    )


def swept_axes(results: SuiteResults, records: list[dict], kind: str) -> list[str]:
    """The grid axes an ablation sweeps: its named axis first, then any other varying one."""
    preferred = [names.find_axis(results.grid_axes, a) for a in kinds.kind(kind).axes]
    swept = [a for a in preferred if a and is_varying(records, a)]
    return swept + [a for a in _extra_axes(results, records, swept)]


def layout_ablation(results: SuiteResults, records: list[dict], kind: str, oracle: bool) -> Layout:
    swept = swept_axes(results, records, kind)
    several_methods = len({_method_identity(r) for r in records}) > 1
    several_backbones = is_varying(records, "backbone")
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
    named = kinds.kind(kind).axes
    row_title = names.axis_display(named[0]) if named and not swept else "Method"
    titles = [names.axis_display(a) for a in swept]
    titles += [row_title[0].upper() + row_title[1:]] if several_methods or not swept else []
    titles += ["Backbone"] if several_backbones else []
    what = ", ".join(names.axis_display(a) for a in swept) or row_title.lower()
    return Layout(
        kind, titles,
        key_fn=lambda r: (*_method_identity(r), cell_text(r.get("backbone")), *(cell_text(r.get(a)) for a in swept)),
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
    several_backbones = is_varying(records, "backbone")
    several_datasets = is_varying(records, "dataset")
    return Layout(
        kind, ["Method"] + (["Backbone"] if several_backbones else []),
        key_fn=lambda r: (*_method_identity(r), cell_text(r.get("backbone")), *(cell_text(r.get(a)) for a in extras)),
        section_fn=(lambda r: r["dataset_name"]) if several_datasets else (lambda r: ""),
        stub_fn=lambda r: [_with_extras(r["method_name"], r, extras)] + ([r["backbone_name"]] if several_backbones else []),
        sort_fn=lambda r: (names.dataset_rank(r.get("dataset")), _method_sort(r), names.backbone_rank(r.get("backbone")),
                           _extras_sort(r, extras)),
        specs=specs, lead="Training step latency (forward + backward, median)",
    )


LAYOUTS = {"table1": layout_table1, "table2": layout_table2, "generic": layout_generic,
           "ablation": layout_ablation, "latency": layout_latency}
