"""Statistics of the reporter (report/stats.py, report/significance.py) against closed forms and
simulation, the per-query records they read, and equal-budget tuning (bench/tune.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as scipy_stats

from report.aggregate import seed_stats
from report.stats import compare, holm


def test_t_interval_over_seeds_is_the_closed_form():
    values = [71.0, 74.5, 72.25]
    s = seed_stats(values)
    half = scipy_stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / np.sqrt(3)
    assert s.n == 3 and s.ci_low == pytest.approx(np.mean(values) - half) and s.ci_high == pytest.approx(
        np.mean(values) + half)
    single = seed_stats([70.0])
    assert single.n == 1 and np.isnan(single.ci_low) and np.isnan(single.std)  # one seed: no interval


def test_bootstrap_over_seeds_agrees_with_the_paired_t_test():
    rng = np.random.default_rng(3)
    seeds, queries = 30, 40
    a = {s: np.full(queries, 0.5 + 0.02 * rng.normal()) for s in range(seeds)}  # no query noise
    b = {s: a[s] - 0.008 + 0.02 * rng.normal() for s in range(seeds)}
    (c,) = compare({"a": a, "b": b}, resamples=4000)
    diffs = np.array([a[s].mean() - b[s].mean() for s in range(seeds)])
    t = scipy_stats.ttest_rel([a[s].mean() for s in range(seeds)], [b[s].mean() for s in range(seeds)])
    low, high = scipy_stats.t.interval(0.95, seeds - 1, loc=diffs.mean(), scale=diffs.std(ddof=1) / np.sqrt(seeds))
    assert c.diff == pytest.approx(diffs.mean())
    assert c.ci_low == pytest.approx(low, abs=0.15 * (high - low)) and c.ci_high == pytest.approx(high, abs=0.15 * (high - low))
    assert c.p == pytest.approx(t.pvalue, abs=0.03)


def test_bootstrap_over_queries_of_one_seed_agrees_with_mcnemar():
    rng = np.random.default_rng(5)
    # 70 queries only a finds, 45 only b finds, the rest agree: McNemar's chi2 = 25^2 / 115
    pattern = np.array([(1, 0)] * 70 + [(0, 1)] * 45 + [(1, 1)] * 1800 + [(0, 0)] * 1085, dtype=float)
    pattern = pattern[rng.permutation(len(pattern))]
    a, b = pattern[:, 0], pattern[:, 1]
    (c,) = compare({"a": {0: a}, "b": {0: b}}, resamples=4000)
    n01, n10 = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    mcnemar = scipy_stats.chi2.sf((n01 - n10) ** 2 / (n01 + n10), 1)
    assert 0.002 < mcnemar < 0.2  # a case where both are informative
    assert c.p == pytest.approx(mcnemar, rel=0.3)


def test_interval_covers_the_true_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(11)
    covered, trials, truth = 0, 200, 0.04
    for _ in range(trials):
        difficulty = rng.random(400)  # per query, shared by both methods
        values = {}
        for name, level in (("a", 0.55 + truth), ("b", 0.55)):
            values[name] = {s: (difficulty < level + 0.01 * rng.normal()).astype(float) for s in range(3)}
        (c,) = compare(values, resamples=400, seed=int(rng.integers(1 << 30)))
        covered += c.ci_low <= truth <= c.ci_high
    assert 0.88 <= covered / trials <= 0.995


def test_holm_step_down_by_hand():
    # sorted 0.01, 0.02, 0.03, 0.5 -> 0.04, 0.06, 0.06, 0.5 (monotone), in the input order
    assert holm([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.06, 0.04, 0.5, 0.06])


def test_the_same_inputs_give_the_same_answer():
    rng = np.random.default_rng(0)
    values = {m: {s: (rng.random(500) < 0.5).astype(float) for s in range(2)} for m in "abc"}
    first, second = compare(values, resamples=500), compare(values, resamples=500)
    assert [(c.p, c.ci_low) for c in first] == [(c.p, c.ci_low) for c in second]


# --- per-query records ----------------------------------------------------------------------

TINY = {"backbone": "vit_test", "weights": None, "image_size": 32, "embedding_size": 16, "max_steps_per_epoch": 3,
        "batch_size": 8, "samples_per_class": 2, "optimizer": "adamw", "lr": 1e-3, "num_workers": 0,
        "device": "cpu"}


@pytest.mark.parametrize("selection", ["last", "val"])
def test_per_query_means_equal_the_reported_metrics_exactly(synthetic_root, tmp_path, selection):
    from bench.config import CellConfig
    from bench.runner import run_cell

    extra = {"val_fraction": 0.25, "selection": "val"} if selection == "val" else {}
    config = CellConfig(dataset="synthetic", data_root=str(synthetic_root), epochs=3, **TINY, **extra)
    result = run_cell(config, tmp_path / "cell", key={})
    assert result["status"] == "ok", result["reason"]
    with np.load(tmp_path / "cell" / "per_query.npz") as records:
        test = result["final"]["test"]
        assert len(records["query_index"]) == test["num_queries"]
        for j, k in enumerate(records["ks"].tolist()):
            assert float(records["hit_at_k"][:, j].mean()) == test[f"recall@{k}"]
        assert float(records["ap_at_r"].mean()) == test["map@r"]
    chosen = next(e for e in result["epochs"] if e["epoch"] == result["final"]["epoch"])
    assert chosen["test"] == result["final"]["test"]  # the reported epoch's own numbers
    if selection == "val":
        assert (tmp_path / "cell" / "val_per_query.npz").is_file()
        assert not (tmp_path / "cell" / "best.safetensors").exists()  # removed with the checkpoint


# --- tuning ---------------------------------------------------------------------------------

def test_winner_is_the_best_mean_validation_score_ties_to_the_lower_trial():
    from bench.tune import winner

    trials = [{"trial": 0, "params": {"lr": 1}, "scores": [0.5, 0.7]},
              {"trial": 1, "params": {"lr": 2}, "scores": [0.6, 0.6]},
              {"trial": 2, "params": {"lr": 3}, "scores": [0.9, None]}]  # a failed seed: out
    assert winner(trials, "recall@1")["trial"] == 0  # 0.6 each: the lower trial
    trials[1]["scores"] = [0.61, 0.6]
    assert winner(trials, "recall@1")["params"] == {"lr": 2}
    trials.append({"trial": 3, "params": {"lr": 4}, "scores": None})  # not ended yet
    assert winner(trials, "recall@1") is None


def test_stage_one_picks_the_clearly_better_learning_rate_and_stage_two_retrains_it(synthetic_root, tmp_path, capsys):
    import cli

    # lr 1e30 makes every weight infinite after one step (a non-finite loss: the trial fails),
    # 1e-3 trains: an unambiguous choice on any machine, made by stage 1's own cells
    suite = {"name": "tuned", "grid": {"method": ["full_ft"], "seed": [0, 1]},
             "defaults": {"dataset": "synthetic", **TINY, "epochs": 2, "optimizer": "sgd"},
             "tune": {"budget": 2, "sampler": "grid", "seed": 0, "val_fraction": 0.25, "seeds": [0],
                      "space": {"default": {"lr": [1.0e30, 1.0e-3]}}}}
    path = tmp_path / "tuned.yaml"
    path.write_text(yaml.safe_dump(suite))
    out = tmp_path / "out"
    code = cli.main(["run", str(path), "--executor", "local", "--data-root", str(synthetic_root), "--out", str(out),
                     "--no-report"])
    assert code == 1  # the diverging trial failed
    record = json.loads((out / "tuned" / "tuning.json").read_text())
    (method,) = record["methods"]
    assert method["winner"]["params"] == {"lr": 0.001}
    assert [t["scores"] for t in sorted(method["trials"], key=lambda t: t["params"]["lr"])][1] == [None]
    assert len(method["trials"]) == 2 and record["waiting"] == 0
    finals = [json.loads(p.read_text()) for p in (out / "tuned").glob("*/result.json")]
    finals = [r for r in finals if r["key"].get("stage") == "final"]
    assert sorted(r["key"]["seed"] for r in finals) == [0, 1]
    assert all(r["config"]["lr"] == 0.001 and r["config"]["val_fraction"] == 0.0 and r["status"] == "ok"
               for r in finals)
    trials = [json.loads(p.read_text()) for p in (out / "tuned").glob("*/result.json")]
    assert all(r["config"]["val_fraction"] == 0.25 for r in trials if r["key"].get("stage") == "trial")
    from report.load import load_suite

    results = load_suite(out / "tuned")
    assert len(results.cells) == 2 and len(results.trials) == 2  # trials kept apart from the table


def test_tune_section_is_validated(tmp_path):
    from bench.suite import SuiteError, load_suite

    bad = {"name": "bad", "grid": {"seed": [0]}, "tune": {"budget": 0}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(SuiteError, match="tune.budget"):
        load_suite(path)
    bad["tune"] = {"budget": 2, "space": {"default": {"num_prompts": [1, 2]}}}
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(SuiteError, match="default holds config fields only"):
        load_suite(path)


def _per_query_suite(root: Path) -> Path:
    """table1-shaped results with per-query records: 400 queries, 3 seeds; VPTSP-G (B) and full
    FT share their hits but for a few queries, linear probing hits far less, zero-shot between."""
    from tests.report_fixtures import VIT_S, result, write

    suite_dir = root / "table1"
    rng = np.random.default_rng(0)
    queries = 400
    difficulty = rng.random(queries)
    rates = {"vptsp_g+bitfit": 0.80, "full_ft": 0.795, "zero_shot": 0.62, "linear_probe": 0.45}
    for index, (method, rate) in enumerate(rates.items()):
        for seed in range(3):
            noise = (np.random.default_rng([seed, index]).random(queries) - 0.5) * 0.1
            hits = np.stack([difficulty + noise < rate + 0.02 * k for k in range(3)], axis=1)  # R@1, 2, 4
            ap = np.clip(hits[:, 0] * 0.6 + hits[:, 2] * 0.2, 0, 1).astype(np.float64)
            key = {"dataset": "cub200", "backbone": VIT_S, "method": method, "seed": seed}
            if method == "vptsp_g+bitfit":
                key["label"] = "VPTSP-G (B)"
            data = result(key, float(hits[:, 0].mean()), float(ap.mean()))
            cell = write(suite_dir, data).parent
            np.savez(cell / "per_query.npz", query_index=np.arange(queries), label=np.arange(queries) // 4,
                     ks=np.array([1, 2, 4]), hit_at_k=hits, ap_at_r=ap)
    return suite_dir


def test_the_report_writes_significance_marks_and_says_what_differs(tmp_path):
    from report.cli import build_report
    from report.significance import COLUMNS

    build_report(_per_query_suite(tmp_path))
    out = tmp_path / "table1" / "report"
    frame = __import__("pandas").read_csv(out / "significance.csv")
    assert list(frame.columns) == COLUMNS
    assert len(frame) == 2 * 6  # R@1 and MAP@R, every pair of 4 methods
    def pair(a, b):
        rows = frame[(frame.metric == "R@1") & (frame.method_a.isin([a, b])) & (frame.method_b.isin([a, b]))]
        assert len(rows) == 1
        return rows.iloc[0]

    clear = pair("VPTSP-G (B)", "Linear probing")
    assert clear.method_a == "VPTSP-G (B)"  # each pair is written better minus worse
    assert clear.p_holm < 0.05 and 30 < clear["diff"] < 40 and clear.n_seeds == 3 and clear.n_queries == 400
    close = pair("VPTSP-G (B)", "Full fine-tuning")
    assert close.p_holm >= 0.05 and close.ci_low < 0 < close.ci_high
    table = (out / "tables" / "table1.md").read_text()
    marked = {line.split("|")[1].strip(): "†" in line.split("|")[-3] for line in table.splitlines()
              if line.startswith("| ") and "Method" not in line}
    assert marked["VPTSP-G (B)"] and marked["Full fine-tuning"]
    assert not marked["Linear probing"] and not marked["Zero-shot (no training)"]
    index = (out / "index.md").read_text()
    best, other = close.method_a, close.method_b
    assert f"the best is {best}; not significantly worse than it: {other}." in index
    reference = index[index.index("Against Zero-shot (no training)"):].splitlines()[0]
    assert "(the backbone as it is, no training; differences in points): significantly better: " in reference
    assert "Full fine-tuning (+1" in reference and "VPTSP-G (B) (+1" in reference
    assert "significantly worse: Linear probing (-1" in reference
    assert (out / "figures" / "significance.png").is_file()


def test_the_significance_figure_keeps_long_ablation_names_readable(tmp_path):
    """Ablation units name every swept value; the figure wraps them and sizes itself, so that
    matplotlib never collapses the panels (it warns when it does)."""
    import warnings

    import pandas as pd

    from report import plots
    from report.significance import COLUMNS, Significance

    names = [f"VPT-deep (num_prompts={n}, output=mean, prompt_depth=3, prompt_location=prepend)" for n in range(8)]
    rows = [{"table": "Synthetic, Test ViT", "metric": metric, "method_a": names[0], "method_b": other,
             "diff": 1.0 + i, "ci_low": 0.2, "ci_high": 2.0 + i, "p": 0.01, "p_holm": 0.04 * i, "n_seeds": 3,
             "n_queries": 100} for metric in ("R@1", "MAP@R") for i, other in enumerate(names[1:])]
    group = "Synthetic, Test ViT"
    sig = Significance(pd.DataFrame(rows, columns=COLUMNS),
                       best={(group, "recall@1"): names[0], (group, "map@r"): names[0]})
    fig = plots.fig_significance(sig)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = plots.save_figure(fig, tmp_path / "significance")
    assert all(p.is_file() for p in paths)
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(ticks) == 8 and all(max(len(line) for line in t.split("\n")) <= plots.LABEL_WRAP for t in ticks)
