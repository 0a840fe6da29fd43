"""The ablation figure: one panel per metric along a swept axis (lines for numeric sweeps,
bars otherwise), the paper's sweep beside ours, crossings marked, and a cost panel."""
from __future__ import annotations

from typing import Iterable

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from report import names, published
from report.figure_style import MARKERS, STYLE, _figure, _legend, _ok, _palette, _text, row_labels, summarize
from report.load import SuiteResults

def _is_numeric(values: pd.Series) -> bool:
    return pd.to_numeric(values, errors="coerce").notna().all()


def fig_ablation(results: SuiteResults, axis: str, xlabel: str | None = None,
                 paper_axis: str | None = None, others: Iterable[str] = ()) -> Figure | None:
    """R@1 and MAP@R against a swept grid axis: lines for numbers, bars for categories.

    The paper's values for the same sweep (Fig. 3, Table 7) are drawn dashed / as markers on
    the bars, for orientation. ``axis`` may be ``method_name`` (method entries as categories,
    e.g. one labelled entry per accumulator); ``paper_axis`` then names what they vary.
    ``others``: further swept axes, held at their most common value, so that a union of
    one-axis sweeps (N at L=12 and L at N=10) plots each sweep on its own.
    """
    ok = _hold_fixed(_ok(results), axis, others)
    if axis not in ok or ok[axis].map(_text).nunique() < 2:
        return None
    if axis == "method_name":  # the categories are the methods: a series per dataset
        ok = ok.assign(series=ok["dataset_name"] + ", " + ok["backbone_name"])
    else:
        ok = ok.assign(series=row_labels(ok, results.grid_axes, skip=(axis,)))
        if ok["dataset_name"].nunique() > 1:
            ok["series"] = ok["dataset_name"] + (", " + ok["series"] if ok["series"].nunique() > 1 else "")
    ok = ok.sort_values("dataset", key=lambda c: c.map(names.dataset_rank), kind="stable")
    cost_columns = {"params": ("params_shared" if "params_shared" in ok and ok["params_shared"].notna().any()
                               else "params_trainable", 1e-6), "ms": ("step_latency_ms_median", 1.0)}
    stats = summarize(ok, ["series", "dataset", axis], {"r1": ("recall@1", 100.0), "map": ("map@r", 100.0),
                                                       **{k: v for k, v in cost_columns.items() if v[0] in ok}})
    for metric in ("r1", "map"):  # error bars: the 95 % t interval's half width (0 below 2 seeds)
        stats[f"{metric}_std"] = ((stats[f"{metric}_ci_high"] - stats[f"{metric}_ci_low"]) / 2).fillna(0.0)
    numeric = axis != "method_name" and _is_numeric(stats[axis])
    series = list(dict.fromkeys(ok["series"]))
    colors = _palette(series)
    dataset_colors = {d: colors[s] for s, d in zip(stats["series"], stats["dataset"])}
    paper = _paper_sweep_records(results, paper_axis or axis)
    xlabel = xlabel or names.axis_display(axis)
    if axis == "method_name":  # the table's order: paper order of methods, then name
        ranked = ok.assign(rank=ok["method"].map(names.method_rank)).sort_values(["rank", "method_name"])
        values = list(dict.fromkeys(ranked["method_name"]))
    else:
        values = sorted(stats[axis].unique(), key=names.value_sort_key)
    has_cost = "ms_mean" in stats and stats["ms_mean"].notna().any()
    with mpl.rc_context(STYLE):
        fig, axes = _figure(3 if has_cost else 2)
        for ax, (metric, paper_metric, ylabel) in zip(axes, (("r1", "recall@1", "R@1 (%)"),
                                                            ("map", "map@r", "MAP@R (%)"))):
            if numeric:
                _ablation_lines(ax, stats, axis, metric, series, colors)
                _mark_crossings(ax, stats, axis, metric, series)
                _paper_lines(ax, paper, paper_metric, dataset_colors)
            else:
                _ablation_bars(ax, stats, axis, metric, series, colors, values)
                _paper_marks(ax, paper, paper_metric, values)
            ax.set_xlabel(xlabel[0].upper() + xlabel[1:])
            ax.set_ylabel(ylabel)
            ax.set_title(ylabel.split(" ")[0])
        if has_cost:
            _cost_panel(axes[2], stats, axis, series, colors, values, numeric, xlabel)
        fig.suptitle(f"Ablation: {xlabel} (mean and 95% interval over seeds)")
        _legend(fig, axes)
    return fig


def _mark_crossings(ax, stats, axis, metric, series) -> None:
    """Where two series swap order between adjacent x values: an x at the interpolated crossing.
    With a full fine-tuning series, only its crossings (when does a PEFT method overtake it?)."""
    lines = {}
    for name in series:
        part = stats[stats["series"] == name].assign(x=lambda f: pd.to_numeric(f[axis])).sort_values("x")
        lines[name] = (part["x"].to_numpy(float), part[f"{metric}_mean"].to_numpy(float))
    reference = [s for s in series if "full fine-tuning" in s.lower()]
    def prefix(name: str) -> str:  # "CUB-200, " when the series carry their dataset
        return name[: name.lower().index("full fine-tuning")]

    pairs = [(r, s) for r in reference for s in series if s != r and s.startswith(prefix(r))] if reference else \
        [(a, b) for i, a in enumerate(series) for b in series[i + 1:]]
    label = "crosses full fine-tuning" if reference else "curves cross"
    first = True
    for a, b in pairs:
        (xa, ya), (xb, yb) = lines[a], lines[b]
        if len(xa) != len(xb) or not np.array_equal(xa, xb):
            continue
        d = ya - yb
        for j in range(len(d) - 1):
            if d[j] * d[j + 1] < 0:
                t = d[j] / (d[j] - d[j + 1])
                x = xa[j] + t * (xa[j + 1] - xa[j])
                y = ya[j] + t * (ya[j + 1] - ya[j])
                ax.scatter([x], [y], marker="X", s=90, color="black", zorder=5,
                           label=label if first else None)
                first = False


def _cost_panel(ax, stats, axis, series, colors, values, numeric, xlabel) -> None:
    """What each setting costs: step latency (left axis, lines) and trained parameters (right
    axis, dashed), per series."""
    twin = ax.twinx()
    for i, name in enumerate(series):
        part = stats[stats["series"] == name]
        if numeric:
            part = part.assign(x=pd.to_numeric(part[axis])).sort_values("x")
            x = part["x"]
        else:
            part = part.set_index(axis).reindex(values).reset_index()
            x = np.arange(len(values))
        style = {} if numeric else {"ls": "none", "markersize": 9}  # categories: no line between them
        ax.plot(x, part["ms_mean"], marker=MARKERS[i % len(MARKERS)], color=colors[name], lw=1.5, **style)
        if "params_mean" in part:
            twin.plot(x, part["params_mean"], marker=MARKERS[i % len(MARKERS)], markerfacecolor="white",
                      color=colors[name], lw=1.0, alpha=0.8, **({"ls": "--"} if numeric else style))
    if not numeric:
        ax.set_xticks(np.arange(len(values)), [names.value_display(axis, v) for v in values], rotation=30, ha="right")
    ax.set_xlabel(xlabel[0].upper() + xlabel[1:])
    ax.set_ylabel("Step (ms), solid")
    twin.set_ylabel("Shared params (M), dashed")
    twin.grid(False)
    ax.set_title("What it costs")


def _hold_fixed(ok: pd.DataFrame, axis: str, others: Iterable[str]) -> pd.DataFrame:
    for other in others:
        if other == axis or other not in ok:
            continue
        texts = ok[other].map(_text)
        held = ok[texts == texts[texts != ""].mode().iloc[0]] if (texts != "").any() else ok
        if held[axis].map(_text).nunique() >= 2:  # only when the sweep survives it
            ok = held
    return ok


def _ablation_lines(ax, stats, axis, metric, series, colors) -> None:
    for i, name in enumerate(series):
        part = stats[stats["series"] == name].copy()
        part["x"] = pd.to_numeric(part[axis])
        part = part.sort_values("x")
        ax.errorbar(part["x"], part[f"{metric}_mean"], yerr=part[f"{metric}_std"], marker=MARKERS[i % len(MARKERS)],
                    capsize=3, color=colors[name], label=name, zorder=3)


def _ablation_bars(ax, stats, axis, metric, series, colors, values) -> None:
    x = np.arange(len(values))
    width = 0.8 / len(series)
    for j, name in enumerate(series):
        part = stats[stats["series"] == name].set_index(axis).reindex(values)
        ax.bar(x + (j - (len(series) - 1) / 2) * width, part[f"{metric}_mean"], width,
               yerr=part[f"{metric}_std"], capsize=3, color=colors[name], edgecolor="black", linewidth=0.5,
               label=name)
    ax.set_xticks(x, [names.value_display(axis, v) for v in values], rotation=30, ha="right")
    # close accuracies: start the axis near the data, not at 0 (the bars are labelled with values' scale)
    low, high = stats[f"{metric}_mean"].min(), stats[f"{metric}_mean"].max()
    pad = max(1.0, (high - low) * 0.5, 2 * stats[f"{metric}_std"].max())
    ax.set_ylim(max(0.0, low - pad), high + pad)


def _paper_sweep_records(results: SuiteResults, axis: str) -> list[published.PaperResult]:
    """The paper's values for the same sweep (matching datasets and backbone)."""
    canonical = names.axis_canonical(axis)
    ok = results.ok
    records = published.records_for(f"ablation_{canonical}", ok["dataset"], ok["backbone"], [canonical])
    return [r for r in records if r.setting and r.setting[0][0] == canonical]


def _paper_lines(ax, records, metric, dataset_colors) -> None:
    for dataset in sorted({r.dataset for r in records}, key=names.dataset_rank):
        points = sorted((float(r.setting[0][1]), r.metrics[metric]) for r in records
                        if r.dataset == dataset and metric in r.metrics)
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, ls="--", lw=1.2, color=dataset_colors.get(dataset, "0.5"), alpha=0.75, marker="o",
                markersize=4, markerfacecolor="white", zorder=2,
                label=f"paper, {names.dataset_display(dataset)} ({records[0].source})")


def _paper_marks(ax, records, metric, values) -> None:
    positions = {names.canonical_accumulator(v): i for i, v in enumerate(values)}
    for j, dataset in enumerate(sorted({r.dataset for r in records}, key=names.dataset_rank)):
        points = [(positions[r.setting[0][1]], r.metrics[metric]) for r in records
                  if r.dataset == dataset and metric in r.metrics and r.setting[0][1] in positions]
        if not points:
            continue
        xs, ys = zip(*points)
        # white with a black edge: visible on top of any bar colour
        ax.scatter(xs, ys, marker=("D", "s", "^", "o")[j % 4], s=45, facecolors="white", edgecolors="black",
                   linewidths=1.2, zorder=4, label=f"paper, {names.dataset_display(dataset)} ({records[0].source})")


# --- pretraining source ---------------------------------------------------------------------
