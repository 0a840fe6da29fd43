"""The tuning record of a tuned suite (``tuning.json``, written by the dispatcher): each method's
search space, its equal budget, the values it was given and their validation score."""
from __future__ import annotations

from typing import Any

import pandas as pd

from report import names


def _value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def method_label(key: dict[str, Any]) -> str:
    return names.method_display(key.get("method"), key.get("label"))


def summary_frame(tuning: dict[str, Any] | None) -> pd.DataFrame:
    """One row per tuned method: space, budget, trials ended, chosen values, validation score."""
    if not tuning:
        return pd.DataFrame()
    plan = tuning.get("plan") or {}
    rows = []
    for entry in tuning.get("methods", []):
        key, best = entry.get("key") or {}, entry.get("winner")
        trials = entry.get("trials") or []
        ended = sum(1 for t in trials if t.get("scores") is not None)
        space = entry.get("space") or {}
        rows.append({
            "dataset": names.dataset_display(key.get("dataset")),
            "backbone": names.backbone_display(key.get("backbone")),
            "method": method_label(key),
            "search space": "; ".join(f"{k} in {v}" for k, v in space.items()) or "nothing to tune",
            "budget": plan.get("budget") if space else 0,
            "trials ended": f"{ended}/{len(trials)}",
            "chosen": ", ".join(f"{k}={_value(v)}" for k, v in ((best or {}).get("params") or {}).items())
                      or ("-" if space else "(defaults)"),
            f"val {plan.get('metric', 'recall@1')} (%)":
                "" if not best or best.get("mean") is None else f"{100 * best['mean']:.1f}",
            "tie": (f"tied with trial {', '.join(str(t) for t in best['tied_with'])}: the sampler's first wins"
                    if best and best.get("tied_with") else ""),
        })
    return pd.DataFrame(rows)


def trials_frame(tuning: dict[str, Any] | None) -> pd.DataFrame:
    """Every trial: method, trial, its values, its validation scores (one per trial seed)."""
    if not tuning:
        return pd.DataFrame()
    rows = []
    for entry in tuning.get("methods", []):
        for trial in entry.get("trials") or []:
            scores = trial.get("scores")
            rows.append({"method": method_label(entry.get("key") or {}), "trial": trial.get("trial"),
                         **{f"param:{k}": v for k, v in (trial.get("params") or {}).items()},
                         "scores": "pending" if scores is None else ";".join(
                             "failed" if s is None else f"{s:.6f}" for s in scores)})
    return pd.DataFrame(rows)


def plan_text(tuning: dict[str, Any] | None) -> str:
    if not tuning:
        return ""
    plan = tuning.get("plan") or {}
    return (f"Equal budget: {plan.get('budget')} trials per method ({plan.get('sampler')} sampler, seed "
            f"{plan.get('seed')}), scored by validation {plan.get('metric')} on {plan.get('val_fraction')} of "
            f"the training classes (seeds {plan.get('seeds')}); each method's best trial was then retrained on all "
            "training classes and evaluated once on the test split.")
