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
from report import stats
from report.stats import holm, paired_t
from tests.tiny import tiny_config


def test_t_interval_over_seeds_is_the_closed_form():
    values = [71.0, 74.5, 72.25]
    s = seed_stats(values)
    half = scipy_stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / np.sqrt(3)
    assert s.n == 3 and s.ci_low == pytest.approx(np.mean(values) - half) and s.ci_high == pytest.approx(
        np.mean(values) + half)
    single = seed_stats([70.0])
    assert single.n == 1 and np.isnan(single.ci_low) and np.isnan(single.std)  # one seed: no interval


def test_paired_t_is_scipys_paired_t_test_and_its_interval():
    a = np.array([0.712, 0.745, 0.731, 0.726, 0.752])
    b = np.array([0.701, 0.739, 0.735, 0.712, 0.740])
    r = paired_t(a - b, margin=0.01)
    reference = scipy_stats.ttest_rel(a, b)
    low, high = reference.confidence_interval(0.95)
    assert r.diff == pytest.approx((a - b).mean()) and r.p == pytest.approx(reference.pvalue)
    assert (r.ci_low, r.ci_high) == (pytest.approx(low), pytest.approx(high)) and r.df == 4 and r.n == 5
    # the interval excludes 0 exactly when p < 0.05: one test, one interval
    for shift in np.linspace(-0.02, 0.02, 41):
        r = paired_t(a - b + shift, margin=0.01)
        assert (r.p < 0.05) == (not r.ci_low <= 0 <= r.ci_high)


def test_tost_is_two_one_sided_t_tests_against_the_margin():
    d = np.array([0.2, -0.1, 0.3, 0.05, 0.15, -0.05])
    r = paired_t(d, margin=0.5)
    lower = scipy_stats.ttest_1samp(d, -0.5, alternative="greater").pvalue
    upper = scipy_stats.ttest_1samp(d, 0.5, alternative="less").pvalue
    assert r.p_equiv == pytest.approx(max(lower, upper))
    # equivalent at 0.05 exactly when the 90 % interval lies inside the margin
    half = scipy_stats.t.ppf(0.95, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    assert (r.p_equiv < 0.05) == (-0.5 < d.mean() - half and d.mean() + half < 0.5)


def test_one_seed_is_not_testable_and_says_so():
    r = paired_t([0.03], margin=0.01)
    assert not r.testable and r.test == "not testable: n = 1" and np.isnan(r.p)
    assert stats.verdict(r, float("nan"), float("nan")) == "not testable: n = 1"
    assert np.isnan(stats.detectable(float("nan"), 1))


def test_holm_step_down_by_hand_and_untestable_entries_do_not_count():
    # sorted 0.01, 0.02, 0.03, 0.5 -> 0.04, 0.06, 0.06, 0.5 (monotone), in the input order
    assert holm([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.06, 0.04, 0.5, 0.06])
    adjusted = holm([0.01, float("nan"), 0.04])
    assert adjusted[0] == pytest.approx(0.02) and np.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)


def test_power_and_detectable_difference_agree_with_simulation():
    rng = np.random.default_rng(7)
    sd, n = 1.0, 5
    delta = stats.detectable(sd, n)
    assert stats.power(delta, sd, n) == pytest.approx(0.8, abs=1e-6)
    draws = rng.normal(delta, sd, size=(20000, n))
    t = draws.mean(1) / (draws.std(1, ddof=1) / np.sqrt(n))
    simulated = np.mean(np.abs(t) > scipy_stats.t.ppf(0.975, n - 1))
    assert simulated == pytest.approx(0.8, abs=0.015)
    # a normal-approximation formula would claim less: t with 4 df needs more than 2.8 SD
    assert delta > (1.96 + 0.84) * sd / np.sqrt(n)
    assert stats.detectable(sd, n, alpha=0.05 / 10) > delta  # Holm's first step needs more


def test_class_variance_is_the_cluster_robust_variance_by_brute_force():
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(8), rng.integers(2, 7, 8))
    x = rng.normal(size=len(labels)) + labels * 0.1
    variance, classes = stats.class_variance(x, labels)
    assert classes == 8
    totals = np.array([x[labels == c].sum() for c in range(8)])
    sizes = np.array([(labels == c).sum() for c in range(8)])
    by_hand = 8 / 7 * np.sum((totals - sizes * x.mean()) ** 2) / len(x) ** 2
    assert variance == pytest.approx(by_hand)
    # one query per class: the ordinary variance of a mean (n / (n - 1) scaled)
    singles, count = stats.class_variance(x, np.arange(len(x)))
    assert singles == pytest.approx(np.var(x, ddof=1) / len(x))
    r = paired_t([0.01, 0.02, 0.015], margin=0.01, class_term=(variance, classes))
    plain = paired_t([0.01, 0.02, 0.015], margin=0.01)
    assert r.se > plain.se and r.test == stats.TEST_CLASSES and 2 <= r.df <= 2 + 7


# --- per-query records ----------------------------------------------------------------------

TINY = {k: v for k, v in tiny_config().items() if k != "epochs"}  # each test sets its epochs


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
    import peft_dml_cli as cli

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
            data["final"]["test"] = {**{f"recall@{k}": float(hits[:, j].mean()) for j, k in enumerate((1, 2, 4))},
                                     "map@r": float(ap.mean()), "num_queries": queries, "num_lone_queries": 0}
            cell = write(suite_dir, data).parent
            np.savez(cell / "per_query.npz", query_index=np.arange(queries), label=np.arange(queries) // 4,
                     ks=np.array([1, 2, 4]), hit_at_k=hits, ap_at_r=ap)
    return suite_dir


def test_the_report_writes_significance_marks_and_says_what_differs(tmp_path):
    import pandas as pd

    from report.cli import build_report
    from report.significance import COLUMNS

    build_report(_per_query_suite(tmp_path))
    out = tmp_path / "table1" / "report"
    frame = pd.read_csv(out / "significance.csv")
    assert list(frame.columns) == COLUMNS
    r1 = frame[frame.metric == "R@1"]
    # families: 3 comparisons with the best, 3 with zero-shot, 3 with full FT, 3 other pairs
    assert r1.groupby("family").size().to_dict() == {"best": 3, "other pairs": 3, "vs Full fine-tuning": 3,
                                                     "vs Zero-shot (no training)": 3}
    assert set(frame["test"]) == {"paired t over seeds (test split fixed)"} and (frame["n_seeds"] == 3).all()
    assert (r1["family_size"] == 6).all()  # one Holm correction over all 6 pairs for every claim
    assert r1.groupby(r1[["method_a", "method_b"]].apply(frozenset, axis=1))["p_holm"].nunique().max() == 1

    def row(family, a, b):
        part = r1[(r1.family == family) & (r1.method_a == a) & (r1.method_b == b)]
        assert len(part) == 1, (family, a, b)
        return part.iloc[0]

    best = r1[r1.family == "best"].method_a.iloc[0]
    other = ({"VPTSP-G (B)", "Full fine-tuning"} - {best}).pop()  # the two share all but a few queries
    clear = row("best", best, "Linear probing")
    assert clear.verdict == "better" and clear.p_holm < 0.05 and 30 < clear["diff"] < 40 and clear.n_queries == 400
    close = row("best", best, other)
    assert close.verdict in ("not resolved", "equivalent") and close.ci_low < 0.5
    assert row("vs Zero-shot (no training)", "Linear probing", "Zero-shot (no training)").verdict == "worse"
    # the CSV's interval is the paired t interval of the per-seed means
    assert close.ci_low <= close["diff"] <= close.ci_high and close.p == pytest.approx(
        2 * scipy_stats.t.sf(abs(close["diff"]) / (close.seed_sd / np.sqrt(3)), 2), rel=1e-4)
    table = (out / "tables" / "table1.md").read_text()
    marked = {line.split("|")[1].strip(): "†" in line.split("|")[-3] for line in table.splitlines()
              if line.startswith("| ") and "Method" not in line}
    assert marked["VPTSP-G (B)"] and marked["Full fine-tuning"]
    assert not marked["Linear probing"] and not marked["Zero-shot (no training)"]
    index = (out / "index.md").read_text()
    assert "not significantly" not in index
    assert "**Synthetic" in index or "**CUB-200" in index
    paragraph = next(line for line in index.splitlines() if line.startswith("- **") and ", R@1**" in line)
    assert "n = 3 seeds, paired t over seeds (test split fixed)" in paragraph
    assert "one Holm correction over all 6 pairs of the group" in paragraph and "equivalence within ±1 points" in paragraph
    assert "Linear probing (" in paragraph.split("worse: ")[1]
    assert "Power: with n = 3 seeds" in paragraph and "cannot be resolved here with 80 % power" in paragraph
    assert "Against Zero-shot (no training) (the backbone as it is" in paragraph
    assert "Seeds needed" in index and "Intervals are 95% t intervals over seeds and hold for this test split" in index
    assert (out / "figures" / "significance.png").is_file()


def test_sentences_name_what_the_csv_says(tmp_path):
    """Every unit the index calls better / worse / equivalent / not resolved against the best
    has that verdict in significance.csv's best family, and its numbers."""
    import re

    import pandas as pd

    from report.cli import build_report

    build_report(_per_query_suite(tmp_path))
    out = tmp_path / "table1" / "report"
    frame = pd.read_csv(out / "significance.csv")
    index = (out / "index.md").read_text()
    for metric in ("R@1", "MAP@R"):
        paragraph = next(line for line in index.splitlines() if line.startswith("- **") and f", {metric}**" in line)
        best = re.search(r"the best row is (.+?) \(", paragraph).group(1)
        part = frame[(frame.metric == metric) & (frame.family == "best")]
        assert set(part.method_a) == {best}
        listing = paragraph.split("(family `best`): ")[1].split(". Power")[0]
        for r in part.itertuples():
            word = {"better": "worse", "worse": "better"}.get(r.verdict, r.verdict)  # read as other vs best
            section = next(s for s in listing.split("; ") if s.startswith(word))
            assert f"{r.method_b} ({-r.diff:+.1f}" in section


def test_one_seed_is_not_tested_and_two_seeds_use_t_with_one_df(tmp_path):
    import pandas as pd

    from report.cli import build_report

    suite = _per_query_suite(tmp_path)
    for cell in suite.iterdir():
        if (cell / "result.json").is_file() and '"seed": 2' in (cell / "result.json").read_text():
            import shutil

            shutil.rmtree(cell)
    build_report(suite)
    frame = pd.read_csv(suite / "report" / "significance.csv")
    assert (frame.n_seeds == 2).all()
    for cell in suite.iterdir():
        if (cell / "result.json").is_file() and '"seed": 1' in (cell / "result.json").read_text():
            import shutil

            shutil.rmtree(cell)
    build_report(suite)
    frame = pd.read_csv(suite / "report" / "significance.csv")
    assert (frame.verdict == "not testable: n = 1").all() and frame.p.isna().all()
    index = (suite / "report" / "index.md").read_text()
    assert "Not testable: n = 1 shared seed" in index and "resamples of the seeds" not in index
    assert "†" not in (suite / "report" / "tables" / "table1.md").read_text()


def test_a_per_query_file_that_disagrees_with_its_result_is_left_out(tmp_path):
    import pandas as pd

    from report.cli import build_report

    suite = _per_query_suite(tmp_path)
    victims = sorted(p for p in suite.iterdir() if p.is_dir() and '"linear_probe"' in (p / "result.json").read_text())
    with np.load(victims[0] / "per_query.npz") as data:
        records = dict(data)
    records["hit_at_k"] = np.ones_like(records["hit_at_k"])  # fabricated: best by far
    np.savez(victims[0] / "per_query.npz", **records)
    (victims[1] / "per_query.npz").write_bytes(b"PK\x03\x04 cut short")
    records["hit_at_k"] = records["hit_at_k"][:10]
    build_report(suite)
    frame = pd.read_csv(suite / "report" / "significance.csv")
    lp = frame[(frame.method_a == "Linear probing") | (frame.method_b == "Linear probing")]
    assert (lp.n_seeds == 1).all()  # only its one intact seed remains
    index = (suite / "report" / "index.md").read_text()
    assert "Left out of the comparisons, per_query.npz's mean recall@1" in index
    assert "per_query.npz cannot be read" in index


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
             "n_queries": 100, "family": "best", "verdict": "better" if i < 2 else "not resolved"}
            for metric in ("R@1", "MAP@R") for i, other in enumerate(names[1:])]
    group = "Synthetic, Test ViT"
    from report.significance import GroupPower

    power = GroupPower(3, 1.0, 4.0, 8.0, 28, 7.0)
    sig = Significance(pd.DataFrame(rows, columns=COLUMNS),
                       best={(group, "recall@1"): names[0], (group, "map@r"): names[0]},
                       power={(group, "recall@1"): power, (group, "map@r"): power})
    fig = plots.fig_significance(sig)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = plots.save_figure(fig, tmp_path / "significance")
    assert all(p.is_file() for p in paths)
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(ticks) == 8 and all(max(len(line) for line in t.split("\n")) <= plots.LABEL_WRAP for t in ticks)


def test_identical_differences_on_every_seed_are_not_a_significant_difference():
    r = paired_t([0.1 + 0.2 - 0.25, 0.05], margin=0.01)  # equal up to float rounding: common at 2 seeds
    assert not r.testable and np.isnan(r.p) and r.test.startswith("not testable")
    assert stats.verdict(r, float("nan"), float("nan")).startswith("not testable")


def test_plan_prints_seeds_per_group_and_per_pair(tmp_path, capsys):
    import peft_dml_cli as cli

    suite = _per_query_suite(tmp_path)
    assert cli.main(["plan", suite.name, "--results", str(tmp_path), "--difference", "2"]) == 0
    out = capsys.readouterr().out
    assert "Seeds for a difference of 2 points at 80% power" in out
    assert "a row vs the best (pooled) on CUB-200, ViT-S/16, R@1: seed SD" in out and "seeds find 2 points" in out
    assert cli.main(["plan", suite.name, "--results", str(tmp_path), "--pairs"]) == 0
    out = capsys.readouterr().out
    assert "Linear probing vs Zero-shot (no training) on CUB-200, ViT-S/16, R@1: seed SD" in out
    assert cli.main(["plan", suite.name, "--results", str(tmp_path), "--difference", "0"]) == 2


def test_report_block_is_validated_and_travels_with_the_results(tmp_path):
    from bench.suite import SuiteError, load_suite

    base = {"name": "r", "grid": {"seed": [0]}, "defaults": {"dataset": "synthetic", "backbone": "vit_test",
                                                              "method": "linear_probe"}}
    for report, field in (({"equivalence_margin": -1}, "report.equivalence_margin"),
                          ({"contrasts": [["A"]]}, "report.contrasts"), ({"populaton": "classes"}, "report.populaton"),
                          ({"population": "all"}, "report.population")):
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump({**base, "report": report}))
        with pytest.raises(SuiteError, match=field.replace(".", r"\.")):
            load_suite(path)
    path.write_text(yaml.safe_dump({**base, "report": {"equivalence_margin": 0.5, "contrasts": [["A", "B"]]}}))
    suite = load_suite(path)
    from bench.dispatch import write_cells_file
    from report.cli import report_settings
    from report.load import load_suite as load_results

    suite_dir = tmp_path / "results" / "r"
    suite_dir.mkdir(parents=True)
    write_cells_file(suite_dir, suite, [])
    settings = report_settings(load_results(suite_dir))
    assert settings.margin == 0.5 and settings.contrasts == [("A", "B")]
    assert report_settings(load_results(suite_dir), margin=2.0, population="classes").margin == 2.0


def test_rows_without_shared_seeds_get_welchs_t_test():
    a = np.array([0.51, 0.53, 0.50, 0.52, 0.515])
    b = np.array([0.49, 0.50, 0.505, 0.48, 0.495])
    r = stats.welch_t(a, b, margin=0.01)
    reference = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert r.p == pytest.approx(reference.pvalue) and r.test == stats.TEST_WELCH
    low, high = reference.confidence_interval(0.95)
    assert (r.ci_low, r.ci_high) == (pytest.approx(low), pytest.approx(high))
    from report.significance import decide

    rng = np.random.default_rng(0)
    values = {"LoRA": {s: (rng.random(300) < 0.5).astype(float) for s in range(5)},
              "LoRA (replicate)": {s: (rng.random(300) < 0.5).astype(float) for s in range(5, 10)}}
    (row,), _ = decide(values)
    assert row["test"] == stats.TEST_WELCH and row["n_seeds"] == 5
