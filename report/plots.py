"""Figures from the tidy frames: each function returns a matplotlib Figure (saved separately).

Figures are built with ``matplotlib.figure.Figure`` directly, not pyplot, so nothing needs a
display and nothing accumulates in pyplot's global figure list. Error bars and bands are the
sample std over seeds. Functions return None when the data does not support the figure.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from report import names
from report.ablation_plots import fig_ablation
from report.figure_style import (LABEL_WRAP, MARKERS, MAX_CURVES, PALETTE, PANEL, STYLE, _figure, _in_table_order, _legend,
                                 _ok, _palette, _text, pareto_front, row_labels, summarize)
from report.load import SuiteResults


# --- accuracy vs cost ----------------------------------------------------------------------

COSTS = {
    "params": ("params_trainable", 1e-6, "Trainable parameters (M, log scale)", True, "trainable parameters"),
    "memory": ("peak_memory_bytes", 1 / 2**30, "Peak memory (GiB)", False, "peak memory"),
}


MEMORY_SHORT = {"cuda_max_allocated": "Peak CUDA memory allocated", "cpu_peak_rss": "Peak CPU memory (RSS)",
                "counted_training": "Training memory, counted"}


def fig_accuracy_vs_cost(results: SuiteResults, cost: str) -> Figure | None:
    """R@1 against trainable parameters or peak memory, a panel per dataset, Pareto front marked."""
    column, scale, xlabel, log, what = COSTS[cost]
    ok = _ok(results)
    if cost == "memory" and "memory_kind" in ok and set(ok["memory_kind"].dropna()) == {"counted_training"}:
        what = "training memory (counted)"
    if cost == "memory" and "memory_kind" in ok and ok["memory_kind"].nunique() == 1:
        xlabel = f"{MEMORY_SHORT.get(ok['memory_kind'].iloc[0], 'Peak memory')} (GiB)"
    if cost == "memory" and column in ok and pd.to_numeric(ok[column], errors="coerce").max() < 2**30:
        scale, xlabel = 1 / 2**20, xlabel.replace("(GiB)", "(MiB)")  # small models: MiB reads better
    if column not in ok or ok[column].isna().all() or ok["method_name"].nunique() < 2:
        return None
    stats = summarize(ok, ["dataset", "dataset_name", "row_label"],
                      {"r1": ("recall@1", 100.0), "cost": (column, scale)})
    stats = stats.dropna(subset=["r1_mean", "cost_mean"])
    stats = stats[stats["cost_mean"] > 0] if log else stats
    if stats.empty:
        return None
    datasets = sorted(stats["dataset"].unique(), key=names.dataset_rank)
    labels = list(dict.fromkeys(ok["row_label"]))
    colors = _palette(labels)
    with mpl.rc_context(STYLE):
        fig, axes = _figure(len(datasets))
        for ax, dataset in zip(axes, datasets):
            part = stats[stats["dataset"] == dataset].reset_index(drop=True)
            for i, row in part.iterrows():
                ax.errorbar(row["cost_mean"], row["r1_mean"], yerr=row["r1_std"], fmt=MARKERS[labels.index(row["row_label"]) % len(MARKERS)],
                            color=colors[row["row_label"]], markersize=8, capsize=3, label=row["row_label"],
                            markeredgecolor="black", markeredgewidth=0.5, zorder=3)
            front = pareto_front(part["cost_mean"].to_numpy(), part["r1_mean"].to_numpy())
            ax.plot(part["cost_mean"].iloc[front], part["r1_mean"].iloc[front], ls="--", color="0.35",
                    lw=1.2, zorder=2, label="Pareto front")
            ax.scatter(part["cost_mean"].iloc[front], part["r1_mean"].iloc[front], s=220, facecolors="none",
                       edgecolors="0.35", linewidths=1.2, zorder=2)
            if log:
                ax.set_xscale("log")
                # parameter counts read better as 0.2 / 0.5 / 1 / 2 than as powers of ten, and
                # 1-2-5 steps still label a range narrower than a decade
                ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.margins(x=0.12, y=0.12)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("R@1 (%)")
            ax.set_title(f"R@1 vs {what}, {names.dataset_display(dataset)}" if len(datasets) == 1
                         else names.dataset_display(dataset))
        if len(datasets) > 1:
            fig.suptitle(f"R@1 vs {what}")
        _legend(fig, axes)
    return fig


# --- training curves -----------------------------------------------------------------------

def fig_epoch_curves(results: SuiteResults, dataset: Any) -> Figure | None:
    """Learning curves: training loss and test R@1 per epoch, mean over seeds with a ±1 std band,
    one line per row; a star marks each row's reported epoch (the last, or the validation pick)."""
    epochs = results.epochs
    if epochs.empty or "epoch/train_loss" not in epochs:
        return None
    part = epochs[(epochs["status"] == "ok") & (epochs["dataset"].map(_text) == _text(dataset))].copy()
    part = part.dropna(subset=["epoch/train_loss"])
    if part.empty or part["epoch"].nunique() < 2:
        return None
    part = _in_table_order(part, results.grid_axes)
    part["row_label"] = row_labels(part, results.grid_axes)
    labels = list(dict.fromkeys(part["row_label"]))
    if len(labels) > MAX_CURVES:
        return None
    ok = _ok(results)
    reported = ok[ok["dataset"].map(_text) == _text(dataset)].groupby("row_label")["final_epoch"].agg(
        lambda s: s.mode().iloc[0] if s.notna().any() else math.nan)
    metrics = [("epoch/train_loss", "Training loss", 1.0), ("test/recall@1", "Test R@1 (%)", 100.0)]
    metrics = [m for m in metrics if m[0] in part and part[m[0]].notna().any()]
    colors = _palette(labels)
    first_epoch, last_epoch = int(part["epoch"].min()), int(part["epoch"].max())
    with mpl.rc_context(STYLE):
        fig, axes = _figure(len(metrics))
        for ax, (metric, ylabel, scale) in zip(axes, metrics):
            for label in labels:
                line = part[part["row_label"] == label].dropna(subset=[metric]).groupby("epoch")[metric].agg(
                    ["mean", "std"]) * scale
                if line.empty:
                    continue
                line["std"] = line["std"].fillna(0.0)
                ax.plot(line.index, line["mean"], marker="o", markersize=3.5, color=colors[label], label=label)
                ax.fill_between(line.index, line["mean"] - line["std"], line["mean"] + line["std"],
                                color=colors[label], alpha=0.18, linewidth=0)
                chosen = reported.get(label)
                if chosen is not None and chosen in line.index:
                    ax.plot([chosen], [line.loc[chosen, "mean"]], marker="*", markersize=11, color=colors[label],
                            markeredgecolor="black", markeredgewidth=0.6, linestyle="none")
            ax.plot([], [], marker="*", markersize=11, color="white", markeredgecolor="black",
                    markeredgewidth=0.6, linestyle="none", label="reported epoch")  # one legend entry
            ax.set_xlabel("Epoch")
            ax.set_ylabel(ylabel)
            ax.set_title(ylabel.split(" (")[0] + " per epoch")
            # both panels over the same epochs, whole-number ticks (a panel with one evaluated
            # epoch would otherwise be labelled 1.900 ... 2.100)
            ax.set_xlim(first_epoch - 0.25, last_epoch + 0.25)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.suptitle(f"Learning curves on {names.dataset_display(dataset)} (mean ± std over seeds; "
                     "star: the reported epoch)")
        _legend(fig, axes)
    return fig


# --- latency -------------------------------------------------------------------------------

def fig_latency(results: SuiteResults) -> Figure | None:
    """Median step latency per method, a bar per batch size."""
    ok = _ok(results)
    column = "step_latency_ms_median"
    if column not in ok or ok[column].isna().all() or "batch_size" not in ok:
        return None
    ok = ok.assign(row_label=row_labels(ok, results.grid_axes, skip=("batch_size",)))
    stats = summarize(ok, ["row_label", "batch_size"], {"ms": (column, 1.0)}).dropna(subset=["ms_mean"])
    # bars per method: a sweep of one method over other axes is not what this figure compares
    if ok["method_name"].nunique() < 2 and stats["batch_size"].nunique() < 2:
        return None
    labels = list(dict.fromkeys(ok["row_label"]))
    sizes = sorted(stats["batch_size"].unique(), key=names.value_sort_key)
    colors = sns.color_palette(PALETTE, n_colors=len(sizes))
    width = 0.8 / len(sizes)
    with mpl.rc_context(STYLE):
        fig, (ax,) = _figure(1)
        # room for rotated method names below and the legend under them
        fig.set_size_inches(max(PANEL[0], 1.1 * len(labels) + 2), PANEL[1] + 1.0)
        x = np.arange(len(labels))
        for j, size in enumerate(sizes):
            part = stats[stats["batch_size"] == size].set_index("row_label").reindex(labels)
            ax.bar(x + (j - (len(sizes) - 1) / 2) * width, part["ms_mean"], width, yerr=part["ms_std"],
                   capsize=3, color=colors[j], edgecolor="black", linewidth=0.5,
                   label=names.value_display("batch_size", size))
        ax.set_xticks(x, labels, rotation=20, ha="right")
        ax.set_xlabel("Method")
        ax.set_ylabel("Step latency (ms)")
        ax.set_title("Training step latency (median, fwd + bwd)")
        _legend(fig, [ax], title="Batch size")
    return fig


# --- ablations -----------------------------------------------------------------------------


def fig_backbones(results: SuiteResults) -> Figure | None:
    """R@1 (and MAP@R) grouped by backbone, a bar per method, a panel per dataset and metric;
    error bars are the 95 % t interval over seeds."""
    ok = _ok(results)
    if ok.empty or ok["backbone"].nunique() < 2:
        return None
    values = {"r1": ("recall@1", 100.0), "map": ("map@r", 100.0)}
    if "step_latency_ms_median" in ok and ok["step_latency_ms_median"].notna().any():
        values["ms"] = ("step_latency_ms_median", 1.0)  # what each bar costs
    # and what it trains: backbones of one size differ in tokens, norms and registers
    params = "params_shared" if "params_shared" in ok and ok["params_shared"].notna().any() else "params_trainable"
    if params in ok and ok[params].notna().any():
        values["params"] = (params, 1e-6)
    stats = summarize(ok, ["dataset", "backbone", "method_name"], values)
    panels = [(k, t) for k, t in (("r1", "R@1 (%)"), ("map", "MAP@R (%)"), ("ms", "Step latency (ms)"),
                                  ("params", "Trainable params (M)")) if k in values]
    datasets = sorted(stats["dataset"].unique(), key=names.dataset_rank)
    backbones = sorted(stats["backbone"].unique(), key=names.backbone_rank)
    methods = list(dict.fromkeys(ok["method_name"]))
    colors = _palette(methods)
    width = 0.8 / len(methods)
    with mpl.rc_context(STYLE):
        fig, axes = _figure(len(panels) * len(datasets), rows=len(datasets))
        fig.set_size_inches(max(PANEL[0], 1.4 * len(backbones) + 2) * len(panels), PANEL[1] * len(datasets) + 0.5)
        for d, dataset in enumerate(datasets):
            for m, (metric, ylabel) in enumerate(panels):
                ax = axes[len(panels) * d + m]
                part = stats[stats["dataset"] == dataset]
                x = np.arange(len(backbones))
                for j, method in enumerate(methods):
                    rows = part[part["method_name"] == method].set_index("backbone").reindex(backbones)
                    half = ((rows[f"{metric}_ci_high"] - rows[f"{metric}_ci_low"]) / 2).fillna(0.0)
                    ax.bar(x + (j - (len(methods) - 1) / 2) * width, rows[f"{metric}_mean"], width, yerr=half,
                           capsize=2, color=colors[method], edgecolor="black", linewidth=0.5, label=method)
                ax.set_xticks(x, [names.backbone_display(b) for b in backbones], rotation=30, ha="right")
                ax.set_ylabel(ylabel)
                what = {"ms": "cost per step", "params": "trainable parameters"}.get(metric, ylabel.split(" ")[0])
                ax.set_title(f"{names.dataset_display(dataset)}: {what}")
        fig.suptitle("Pretraining source (mean and 95% interval over seeds)")
        _legend(fig, axes)
    return fig


# --- significance --------------------------------------------------------------------------

def fig_significance(sig) -> Figure | None:
    """Each row's difference to its group's best with the 95 % t interval of the paired test
    over seeds, coloured by its verdict (worse, equivalent, not resolved); the band around zero
    is the equivalence margin, the diamond at zero the best itself. Panels stack vertically:
    ablation units carry every swept value in their names, which are wrapped and given room."""
    import textwrap

    from report.significance import BEST, against
    from report.stats import BETTER, EQUIVALENT, NOT_RESOLVED, WORSE

    panels = [(group, metric) for (group, metric) in sig.best
              if not sig.family(group, metric, BEST)["verdict"].str.startswith("not testable").all()]
    if not panels:
        return None

    def wrap(name: str) -> str:
        return textwrap.fill(name, width=LABEL_WRAP, break_long_words=False, break_on_hyphens=False)

    palette = sns.color_palette(PALETTE)
    styles = {WORSE: (palette[3], True, "worse (p_holm < 0.05)"), BETTER: (palette[3], True, "better (p_holm < 0.05)"),
              EQUIVALENT: (palette[2], True, f"equivalent within ±{sig.settings.margin:g} (TOST)"),
              NOT_RESOLVED: ("0.45", False, "not resolved")}
    data = []
    for group, metric in panels:
        best = sig.best[(group, metric)]
        part = sig.family(group, metric, BEST)
        rows = sorted(against(part, best), key=lambda r: r[1])  # other minus best: negative is worse
        data.append((group, metric, best, rows + [(best, 0.0, 0.0, 0.0, None, "best")]))
    labels = [wrap(name) for *_, rows in data for name, *_ in rows]
    lines = max(label.count("\n") + 1 for label in labels)
    label_inches = max(len(line) for label in labels for line in label.split("\n")) * 0.075 + 0.4
    heights = [len(rows) * (0.22 * lines + 0.18) + 1.3 for *_, rows in data]
    margin = sig.settings.margin
    with mpl.rc_context(STYLE):
        # at least as wide as the title (9.5 in at this style's font size)
        fig = Figure(figsize=(max(label_inches + PANEL[0] + 0.6, 10.5), sum(heights) + 1.2), layout="constrained")
        axes = fig.subplots(len(data), 1, squeeze=False, height_ratios=heights).ravel().tolist()
        for ax, (group, metric, best, rows) in zip(axes, data):
            ax.axvspan(-margin, margin, color=palette[2], alpha=0.12, lw=0, label=f"equivalence margin ±{margin:g}")
            for i, (name, diff, low, high, p, verdict) in enumerate(rows):
                if p is None:
                    ax.plot(0, i, marker="D", color="0.1", markersize=7, zorder=3, linestyle="none",
                            label="the best (reference)")
                    continue
                colour, filled, label = styles.get(verdict, ("0.7", False, verdict))
                if not np.isfinite(low):
                    ax.plot(diff, i, marker="x", color=colour, zorder=3, linestyle="none", label=label)
                    continue
                ax.errorbar(diff, i, xerr=[[diff - low], [high - diff]], fmt="o", color=colour, capsize=3,
                            markerfacecolor=colour if filled else "white", markersize=7, zorder=3, label=label)
            ax.axvline(0, color="0.2", lw=1)
            ax.set_ylim(-0.6, len(rows) - 0.4)
            ax.set_yticks(np.arange(len(rows)), [wrap(r[0]) for r in rows], fontsize="small")
            ax.set_xlabel(f"{names.metric_display(metric)}: difference to the best (points)")
            n = sig.power[(group, metric)].n
            ax.set_title(f"{group}: {names.metric_display(metric)} (n = {n} seeds)")
        fig.suptitle("Differences to the best row (paired t-test over seeds, test split fixed; 95% t intervals)")
        _legend(fig, axes)
    return fig


# --- all of them ---------------------------------------------------------------------------

def make_figures(results: SuiteResults, kind: str) -> dict[str, Figure]:
    """Every figure the data supports, by file stem."""
    from report import kinds
    from report.tables import swept_axes  # tables imports nothing from plots

    shape = kinds.kind(kind)
    if not shape.accuracy:  # short timing runs: their accuracy means nothing
        fig = fig_latency(results)
        return {"latency": fig} if fig is not None else {}
    figures: dict[str, Figure | None] = {
        "acc_vs_params": fig_accuracy_vs_cost(results, "params"),
        "acc_vs_memory": fig_accuracy_vs_cost(results, "memory"),
    }
    for dataset in sorted(results.ok["dataset"].dropna().unique(), key=names.dataset_rank):
        figures[f"curves_{dataset}"] = fig_epoch_curves(results, dataset)
    figures["latency"] = fig_latency(results)
    records = results.cells.to_dict("records")
    swept = swept_axes(results, records, kind)
    for axis in swept:
        figures[f"ablation_{names.axis_canonical(axis).replace('.', '_')}"] = fig_ablation(
            results, axis, others=swept)
    if shape.backbone_figure:
        figures["ablation_backbone"] = fig_backbones(results)
    named = shape.axes
    if not swept and named and named[0] != "backbone":
        # the ablation's rows are method entries (labels): compare those
        figures[f"ablation_{named[0]}"] = fig_ablation(results, "method_name", names.axis_display(named[0]),
                                                       paper_axis=named[0])
    return {name: fig for name, fig in figures.items() if fig is not None}


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """``stem.png`` and ``stem.pdf``."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    with mpl.rc_context(STYLE):
        for ext in ("png", "pdf"):
            path = stem.with_suffix(f".{ext}")
            fig.savefig(path)
            paths.append(path)
    return paths
