"""The significance results in words (``index.md``'s "What the differences mean"), the
descriptive summary across groups, and the seed planner. Every sentence names its n, its test,
its family and the equivalence margin; none says "not significantly worse": a difference the
seeds cannot resolve is called "not resolved".
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from report import names, stats
from report.significance import BEST, CONTRAST, Significance, against
from report.stats import BETTER, EQUIVALENT, NOT_RESOLVED, WORSE

ORDER = (BETTER, WORSE, EQUIVALENT, NOT_RESOLVED)


def _fmt_p(p: float) -> str:
    return "n/a" if not math.isfinite(p) else (f"{p:.2g}" if p >= 0.001 else "< 0.001")


def _partial(sig: Significance, key, unit: str, other: str, n: int) -> str:
    seeds = sig.seeds.get(key, {})
    most = max(seeds.get(unit, 0), seeds.get(other, 0))
    return f", on {n} of {most} seeds" if n < most else ""


def _listing(sig: Significance, key, unit: str, rows, margin: float, e=str) -> str:
    """``rows`` from ``against(part, unit)``: the others grouped by verdict (theirs against unit)."""
    by: dict[str, list[str]] = {}
    for other, diff, low, high, p_holm, verdict, n in rows:
        if verdict in (BETTER, WORSE):
            text = f"{e(other)} ({diff:+.1f}, 95% CI {low:+.1f} to {high:+.1f}, p_holm {_fmt_p(p_holm)}"
        else:
            text = f"{e(other)} ({diff:+.1f}"
        by.setdefault(verdict, []).append(text + _partial(sig, key, unit, other, n) + ")")
    words = {BETTER: "better", WORSE: "worse", EQUIVALENT: f"equivalent within ±{margin:g}",
             NOT_RESOLVED: "not resolved"}
    parts = [f"{words[v]}: {', '.join(by.pop(v))}" for v in ORDER if v in by]
    parts += [f"{v}: {', '.join(items)}" for v, items in by.items()]  # not testable: n = 1
    return "; ".join(parts)


def _rows(sig: Significance, group: str, metric: str, family: str, unit: str):
    part = sig.family(group, metric, family)
    n_of = {frozenset((r.method_a, r.method_b)): int(r.n_seeds) for r in part.itertuples()}
    return [(*row, n_of[frozenset((unit, row[0]))]) for row in against(part, unit)], part


def sentences(sig: Significance, escape=str) -> list[str]:
    """One paragraph per group and metric; ``escape`` is applied to every name from a suite or a
    result (the report passes Markdown escaping: the paragraph's own emphasis stays)."""
    e = escape
    if sig.empty:
        return ["No comparisons: fewer than two methods with per-query records in a group."]
    margin = sig.settings.margin
    lines = []
    for (group, metric), best in sig.best.items():
        key = (group, metric)
        title = names.metric_display(metric)
        power = sig.power[key]
        rows, part = _rows(sig, group, metric, BEST, best)
        means = sig.means[key]
        test = part["test"].iloc[0] if not part.empty else stats.TEST_SEEDS
        if power.n < 2:
            lines.append(f"**{e(group)}, {title}**: the highest mean is {e(best)} ({means[best]:.1f}). Not testable: "
                         f"n = {power.n} shared seed per pair of rows; with one run per row, a difference between "
                         "rows cannot be told from run-to-run noise. Run at least 2 seeds (`run_suite.py plan` says "
                         "how many a given difference needs).")
            continue
        text = (f"**{e(group)}, {title}** (n = {power.n} seeds, {test}; one Holm correction over all "
                f"{power.family_size} pairs of the group; equivalence within ±{margin:g} points by two one-sided "
                f"tests): the best row is {e(best)} ({means[best]:.1f}).")
        text += " Against it (family `best`): " + _listing(sig, key, best, rows, margin, e) + "."
        text += " " + power_sentence(power, title)
        for method, unit in sig.references.get(key, {}).items():
            family = f"vs {unit}"
            ref_rows, ref_part = _rows(sig, group, metric, family, unit)
            if ref_part.empty:
                continue
            what = ("the backbone as it is: does training help?" if method == "zero_shot"
                    else "can full fine-tuning be dropped?")
            text += (f" Against {e(unit)} ({what} Family: vs {e(unit)}): "
                     + _listing(sig, key, unit, ref_rows, margin, e) + ".")
        contrast = sig.family(group, metric, CONTRAST)
        if not contrast.empty:
            size = int(contrast["family_size"].iloc[0])
            items = []
            for r in contrast.itertuples():
                items.append(f"{e(r.method_a)} vs {e(r.method_b)}: {r.verdict} ({r.diff:+.1f}, 95% CI {r.ci_low:+.1f} to "
                             f"{r.ci_high:+.1f}, p_holm {_fmt_p(r.p_holm)}, n = {r.n_seeds})")
            text += (f" Declared contrasts (planned: family `contrast`, Holm over its {size}): " + "; ".join(items)
                     + ".")
        lines.append(text)
    return lines


def control_lines(sig: Significance, escape=str) -> list[str]:
    """Each designed control's outcome, per group and metric it applies to, in words: whether the
    calibrated test found what the design put in (or, for an A/A pair, claimed nothing)."""
    e = escape
    lines = []
    for control in sig.settings.controls:
        found_any = False
        for (group, metric), _best in sig.best.items():
            if control.dataset not in (None, sig.group_dataset.get(group)):
                continue
            part = sig.family(group, metric, CONTRAST)
            rows = part[((part.method_a == control.a) & (part.method_b == control.b))
                        | ((part.method_a == control.b) & (part.method_b == control.a))]
            if rows.empty:
                continue
            found_any = True
            r = rows.iloc[0]
            flip = r.method_a != control.a
            diff = -r["diff"] if flip else r["diff"]
            low, high = (-r.ci_high, -r.ci_low) if flip else (r.ci_low, r.ci_high)
            verdict = {BETTER: WORSE, WORSE: BETTER}.get(r.verdict, r.verdict) if flip else r.verdict
            seeds = sig.seeds.get((group, metric), {})
            n = (f"n = {seeds.get(control.a, '?')} + {seeds.get(control.b, '?')} seeds" if r.test == stats.TEST_WELCH
                 else f"n = {r.n_seeds} seeds")
            numbers = (f"{e(control.a)} minus {e(control.b)} {diff:+.1f} points, 95% CI {low:+.1f} to {high:+.1f}, "
                       f"p {_fmt_p(r.p)}, p_holm {_fmt_p(r.p_holm)}; {r.test}, {n}")
            where = f"{e(group)}, {names.metric_display(metric)}"
            if control.kind == "negative":
                ok = verdict not in (BETTER, WORSE)
                what = (f"A/A control: no difference ({verdict})" if ok
                        else f"A/A control: called {verdict}: a false positive of the procedure or a real difference "
                             "between runs that should be equal")
            else:
                ok = verdict == BETTER
                what = (f"positive control: {e(control.a)} better than {e(control.b)}" if ok
                        else f"positive control not found: {verdict}")
            lines.append(f"{where}: {what} ({numbers}). {'As designed.' if ok else 'NOT as designed.'}")
        if not found_any:
            lines.append(f"{control.kind} control {e(control.a)} vs {e(control.b)}: the report has no group with "
                         "both rows; not tested.")
    return lines


def power_sentence(power, title: str) -> str:
    if not math.isfinite(power.detectable):
        return f"Power: no seed spread to estimate it from (n = {power.n})."
    text = (f"Power: with n = {power.n} seeds (SD of a per-seed difference {power.seed_sd:.2f} points), "
            f"differences below {power.detectable:.1f} {title} points cannot be resolved here with 80 % power "
            f"({power.detectable_holm:.1f} after Holm over {power.family_size}).")
    if power.detectable_holm > power.spread:
        text += (f" The rows span {power.spread:.1f} points, less than that: the ranking is not resolved "
                 f"with n = {power.n}.")
    return text


def marks_caption(sig: Significance) -> str:
    """The table's caption for its mark."""
    ns = sorted({p.n for p in sig.power.values()})
    n_text = "n = " + "/".join(str(n) for n in ns)
    detectable = [p.detectable_holm for p in sig.power.values() if math.isfinite(p.detectable_holm)]
    resolve = (f"; with these seeds differences below {min(detectable):.1f}-{max(detectable):.1f} points are not "
               "resolved" if detectable else "")
    return (f"the best row of its group and the rows not shown worse than it: equivalent within "
            f"±{sig.settings.margin:g} points, or not resolved with {n_text}{resolve} (paired t-test over seeds, "
            "test split fixed, Holm over the pairs of the group; verdicts in report/significance.csv)")


# --- across groups: descriptive -------------------------------------------------------------------

def across_groups(sig: Significance, metric: str = "recall@1") -> pd.DataFrame:
    """Per method: its average rank over the (dataset, backbone) groups and how often it is
    better / equivalent / worse / not resolved against full fine-tuning. Descriptive only."""
    keys = [k for k in sig.means if k[1] == metric]
    if len(keys) < 2:
        return pd.DataFrame()
    ranks: dict[str, list[float]] = {}
    counts: dict[str, dict[str, int]] = {}
    for key in keys:
        means = sig.means[key]
        units = list(means)
        order = pd.Series({u: -means[u] for u in units}).rank(method="average")
        for unit in units:
            ranks.setdefault(unit, []).append(float(order[unit]))
        reference = sig.references.get(key, {}).get("full_ft")
        if reference is None:
            continue
        rows, _ = _rows(sig, key[0], metric, f"vs {reference}", reference)
        for other, *_, verdict, _n in rows:
            counts.setdefault(other, {}).setdefault(verdict, 0)
            counts[other][verdict] += 1
    frame = pd.DataFrame([{"method": unit, "groups": len(r), "average rank": float(np.mean(r)),
                           **{f"vs full FT: {v}": counts.get(unit, {}).get(v, 0) for v in ORDER}}
                          for unit, r in ranks.items()])
    return frame.sort_values(["average rank", "method"]).reset_index(drop=True)


def across_text(frame: pd.DataFrame) -> str:
    k = int(frame["groups"].max())
    return (f"Descriptive only, over {k} (dataset, backbone) groups: average rank by mean R@1 (1 = best) and "
            "the per-group verdicts against full fine-tuning. No p-value is given: with "
            f"{k} groups, no rank test across them can reach p < {2 / 2 ** k:.3g} (two-sided sign or "
            "signed-rank test, every group in one direction).")


# --- the seed planner -----------------------------------------------------------------------------

def plan(sig: Significance, difference: float = 1.0, target: float = stats.POWER) -> pd.DataFrame:
    """Per group, metric and comparison of the default and declared families: the seed SD of the
    difference and the seeds that find ``difference`` points with power ``target`` at alpha
    (and with the family's Holm correction, at alpha / m)."""
    rows = []
    seen = set()
    for r in sig.frame.itertuples():
        if r.family == "other pairs":
            continue
        key = (r.table, r.metric, frozenset((r.method_a, r.method_b)))
        if key in seen:
            continue
        seen.add(key)
        sd = r.seed_sd / 100 if math.isfinite(r.seed_sd) else math.nan
        needed = stats.seeds_needed(sd, difference / 100, target=target)
        needed_holm = stats.seeds_needed(sd, difference / 100, alpha=stats.ALPHA / max(r.family_size, 1),
                                         target=target)
        rows.append({"table": r.table, "metric": r.metric, "comparison": f"{r.method_a} vs {r.method_b}",
                     "family": r.family, "n now": r.n_seeds, "seed SD": r.seed_sd, "difference": difference,
                     "seeds": needed, "seeds with Holm": needed_holm, "family size": r.family_size})
    return pd.DataFrame(rows)


def plan_groups(sig: Significance, difference: float = 1.0, target: float = stats.POWER) -> pd.DataFrame:
    """Per group and metric: the pooled seed SD of a difference with the best row, and the seeds
    that find ``difference`` points with power ``target`` (alone, and after Holm over the
    best family)."""
    rows = []
    for (group, metric), power in sig.power.items():
        sd = power.seed_sd / 100 if math.isfinite(power.seed_sd) else math.nan
        m = max(power.family_size, 1)
        rows.append({"table": group, "metric": names.metric_display(metric), "comparison": "a row vs the best (pooled)",
                     "family": BEST, "n now": power.n, "seed SD": power.seed_sd, "difference": difference,
                     "seeds": stats.seeds_needed(sd, difference / 100, target=target),
                     "seeds with Holm": stats.seeds_needed(sd, difference / 100, alpha=stats.ALPHA / m, target=target),
                     "family size": m})
    return pd.DataFrame(rows)


def plan_lines(frame: pd.DataFrame, target: float = stats.POWER) -> list[str]:
    if frame.empty:
        return ["No comparison to plan for: fewer than two rows with per-query records in a group."]

    def count(value) -> str:
        return "more than 1000" if value is None or (isinstance(value, float) and math.isnan(value)) else str(int(value))

    lines = []
    for r in frame.to_dict("records"):
        where = f"{r['comparison']} on {r['table']}, {r['metric']}"
        if not math.isfinite(r["seed SD"]):
            lines.append(f"{where}: seed SD unknown (n = {r['n now']}); a pilot of at least 2 seeds per row is needed.")
            continue
        unit = "point" if r["difference"] == 1 else "points"
        lines.append(f"{where}: seed SD {r['seed SD']:.2f} points, so {count(r['seeds'])} seeds find "
                     f"{r['difference']:g} {unit} with {target:.0%} power ({count(r['seeds with Holm'])} with Holm over "
                     f"the {r['family size']} comparisons of family {r['family']}; n now {r['n now']}).")
    return lines
