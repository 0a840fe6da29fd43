"""The report kinds, named once: what each shows, looked up rather than compared as strings.

A kind is the shape of a suite's report: its table layout (``report.tables.LAYOUTS``), the grid
axes an ablation sweeps, and which parts of the report it has (accuracy columns with their
significance, figures and pictures; Table 1's percentages of full fine-tuning; paper rows per
dataset section). ``default_kind`` picks one from a suite's name. Adding a kind is one
``ReportKind`` line here (and a layout function when it needs a new shape).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from report import names
from report.load import ReportError


@dataclass(frozen=True)
class ReportKind:
    name: str
    layout: str  # report.tables.LAYOUTS key
    about: str  # rows and columns, for help texts
    axes: tuple[str, ...] = ()  # an ablation's swept axes, canonical names (names.AXES), first = the figure's
    accuracy: bool = True  # test accuracy in the table, significance, accuracy figures and pictures
    full_ft_percentages: bool = False  # params and memory as % of full fine-tuning (Table 1)
    sections: bool = False  # a table section per (dataset, backbone); paper rows matched per section
    backbone_figure: bool = False  # the pretraining-source ablation's figure
    family: str = ""  # published.py rows marked for the family ("ablation") belong to every member


_ABLATION = "rows = values of the swept grid axes; columns = datasets x (R@1, MAP@R)"
REPORT_KINDS: dict[str, ReportKind] = {kind.name: kind for kind in (
    ReportKind("table1", "table1", "a section per (dataset, backbone); rows = method; columns = tunable parameters, "
               "peak memory, R@1, MAP@R (paper Table 1)", full_ft_percentages=True, sections=True),
    ReportKind("table2", "table2", "rows = method x backbone/embedding; columns = datasets x (R@K triple, MAP@R)"),
    ReportKind("generic", "generic", "rows = method x backbone; columns = datasets x (R@1, MAP@R)"),
    ReportKind("latency", "latency", "rows = method; columns = step latency (ms) per batch_size", accuracy=False),
    ReportKind("ablation", "ablation", _ABLATION + " (whatever grid axis varies)", family="ablation"),
    ReportKind("ablation_accumulator", "ablation", _ABLATION, ("accumulator",), family="ablation"),
    ReportKind("ablation_alpha", "ablation", _ABLATION, ("proxy_bias_ratio",), family="ablation"),
    ReportKind("ablation_prompts", "ablation", _ABLATION, ("num_prompts", "prompt_depth"), family="ablation"),
    ReportKind("ablation_depth", "ablation", _ABLATION, ("prompt_depth",), family="ablation"),
    ReportKind("ablation_datasize", "ablation", _ABLATION, ("train_fraction", "train_classes_fraction"),
               family="ablation"),
    ReportKind("ablation_pretraining", "ablation", _ABLATION, ("backbone",), backbone_figure=True,
               family="ablation"),
    ReportKind("ablation_vpt", "ablation", _ABLATION, ("prompt_location", "output", "num_prompts", "prompt_depth"),
               family="ablation"),
)}
KINDS = tuple(REPORT_KINDS)


def kind(name: str) -> ReportKind:
    """The kind of that name; ReportError listing the kinds otherwise."""
    if name not in REPORT_KINDS:
        raise ReportError(f"unknown table kind {name!r}{names.closest(name, KINDS)}; "
                          f"choose one of {', '.join(KINDS)}")
    return REPORT_KINDS[name]


def check_kind(name: str) -> str:
    return kind(name).name


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
        return s if s in REPORT_KINDS else "ablation"
    datasets = cells["dataset"].dropna().unique() if "dataset" in cells else []
    return "table1" if len(datasets) <= 1 else "generic"


def family(name: Any) -> str:
    """A kind's family for published rows: a registered kind's own, else the name (an ablation
    figure asks for ``ablation_<axis>``, which belongs to the ablation family)."""
    text = str(name)
    if text in REPORT_KINDS:
        return REPORT_KINDS[text].family or text
    return "ablation" if text.startswith("ablation") else text
