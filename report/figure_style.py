"""What every figure of the report shares: the paper style, the palette and markers, panel
sizes, one legend per figure, the tables' row order and the row labels (``report.plots`` and
``report.ablation_plots`` draw with them; ``report.pictures`` too)."""
from __future__ import annotations

import math
from typing import Any, Iterable

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from report import names
from report.aggregate import aggregate_seeds
from report.load import SuiteResults

# seaborn's paper look without touching global rcParams (rc_context around building/saving)
STYLE = {
    **sns.axes_style("whitegrid"),
    **sns.plotting_context("paper", font_scale=1.35),
    "axes.titleweight": "bold",
    "legend.frameon": True,
    "legend.framealpha": 0.9,
    "pdf.fonttype": 42,  # TrueType in PDFs: editable text, accepted by publishers
    "ps.fonttype": 42,
    "savefig.dpi": 200,
}
PALETTE = "colorblind"
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "<", ">", "h", "*", "p")
PANEL = (5.2, 3.9)  # inches per panel
MAX_CURVES = 10  # more lines per panel are unreadable (and the palette repeats)
LABEL_WRAP = 36  # characters per line of a long tick label (an ablation unit names every swept value)


def _text(value: Any) -> str:
    return "" if names.is_missing(value) else str(value)


def row_labels(frame: pd.DataFrame, grid_axes: Iterable[str], skip: Iterable[str] = ()) -> pd.Series:
    """Legend names: method, plus backbone and grid-axis values where they vary."""
    skip = set(skip)
    parts = [frame["method_name"].astype(str)]
    if "backbone_name" in frame and frame["backbone_name"].nunique() > 1 and "backbone" not in skip:
        parts.append(frame["backbone_name"].astype(str))
    label = parts[0] + ((", " + parts[1]) if len(parts) > 1 else "")
    extras = [a for a in grid_axes if a in frame and a not in skip and frame[a].map(_text).nunique() > 1]
    for axis in extras:
        label = label + f", {names.axis_canonical(axis)}=" + frame[axis].map(lambda v, a=axis: names.value_display(a, v))
    return label


def summarize(ok: pd.DataFrame, by: list[str], values: dict[str, tuple[str, float]]) -> pd.DataFrame:
    """Mean, std (0 below 2 seeds, for error bars), n and 95 % interval per group."""
    stats = aggregate_seeds(ok, by, values)
    for name in values:
        stats[f"{name}_std"] = stats[f"{name}_std"].fillna(0.0)
    return stats


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of points no other point beats (lower x and higher y), ordered by x."""
    order = sorted(range(len(x)), key=lambda i: (x[i], -y[i]))
    front, best = [], -math.inf
    for i in order:
        if y[i] > best:
            front.append(i)
            best = y[i]
    return np.array(front, dtype=int)


def _palette(labels: list[str]) -> dict[str, Any]:
    colors = sns.color_palette(PALETTE, n_colors=max(len(labels), 1))
    return dict(zip(labels, colors))


def _figure(panels: int, rows: int = 1) -> tuple[Figure, list[Any]]:
    cols = math.ceil(panels / rows)
    fig = Figure(figsize=(PANEL[0] * cols, PANEL[1] * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for extra in axes[panels:]:
        extra.set_visible(False)
    return fig, axes[:panels]


def _legend(fig: Figure, axes: list[Any], title: str | None = None) -> None:
    """One legend for the figure, below the panels (clear of the titles), no duplicates."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    # our series first, references (paper values, Pareto front) after them
    order = sorted(handles, key=lambda label: label.startswith(("paper", "Pareto", "reported epoch")))
    if not order:
        return
    columns = _legend_columns(fig, order)
    rows = -(-len(order) // columns)
    if rows > 4:  # a tall legend below would squeeze the panels to nothing: put it beside them
        size = mpl.font_manager.FontProperties(size=mpl.rcParams["legend.fontsize"]).get_size_in_points()
        extra = (max(len(label) for label in order) * 0.6 + 5) * size / 72
        fig.set_size_inches(fig.get_figwidth() + extra, max(fig.get_figheight(), 0.32 * len(order) + 1))
        fig.legend([handles[k] for k in order], order, loc="outside right upper", ncols=1, title=title)
        return
    fig.legend([handles[k] for k in order], order, loc="outside lower center", ncols=columns, title=title)


def _legend_columns(fig: Figure, labels: list[str]) -> int:
    """As many columns as fit the figure's width for the longest label (none cut off)."""
    size = mpl.font_manager.FontProperties(size=mpl.rcParams["legend.fontsize"]).get_size_in_points()
    entry = (max(len(label) for label in labels) * 0.6 + 4) * size  # text + handle, in points
    return max(1, min(len(labels), int(fig.get_figwidth() * 72 // entry)))


def _in_table_order(frame: pd.DataFrame, grid_axes: list[str]) -> pd.DataFrame:
    """The tables' row order (paper order of methods, sweeps numerically): colours follow it."""
    frame = frame.copy()
    frame["_rank"] = [
        (names.method_rank(r["method"]), names.backbone_rank(r["backbone"]), str(r["method_name"]),
         *(names.value_sort_key(r.get(a)) for a in grid_axes))
        for r in frame.to_dict("records")
    ]
    return frame.sort_values("_rank", kind="stable").drop(columns="_rank")


def _ok(results: SuiteResults) -> pd.DataFrame:
    ok = _in_table_order(results.ok, results.grid_axes)
    ok["row_label"] = row_labels(ok, results.grid_axes)
    return ok

