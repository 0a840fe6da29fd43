"""What a table adds from the paper: params and memory as % of full fine-tuning (Table 1), the
paper's own rows ("paper: ...") and a Δ R@1 column where a row of ours has a counterpart."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from report import kinds, names, published
from report.load import SuiteResults
from report.table_model import Column, Layout, Row, RowPlan, Spec, Stat, cell_text, delta_column, is_swept

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
    if not kinds.kind(kind).full_ft_percentages:
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
        swept = [axis for axis, column in columns.items() if is_swept(records, column)]
        fixed = {}
        for axis, column in columns.items():
            values = [r.get(column) for r in records if not names.is_missing(r.get(column))]
            if values:
                fixed[axis] = pd.Series([cell_text(v) for v in values]).mode().iloc[0]
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
    if not kinds.kind(kind).sections:
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
