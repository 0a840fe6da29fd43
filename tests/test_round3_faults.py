"""Round 3's adversarial cases (TESTING.md): a collapsed model never wins, a NaN score never wins a
max, --out never lands inside a cell folder, --max-cells counts every cell of a call."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bench.errors import CellFailure, UserError


@pytest.mark.parametrize("embeddings", [np.zeros((20, 8)), np.ones((20, 8)) * 3.0,
                                        np.tile(np.arange(8.0), (20, 1)) + 1e-9,
                                        np.full((20, 8), np.nan)])
def test_degenerate_embeddings_fail_the_cell_with_the_reason(embeddings):
    from bench.train import check_embeddings

    with pytest.raises(CellFailure, match="degenerate|non-finite"):
        check_embeddings(embeddings.astype(np.float32), "val")


def test_ordinary_embeddings_pass():
    from bench.train import check_embeddings

    check_embeddings(np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32), "test")


def test_a_nan_score_never_wins_a_tuning_trial():
    from bench.tune import winner

    trials = [{"trial": 0, "params": {"lr": 1}, "scores": [float("nan")]},
              {"trial": 1, "params": {"lr": 2}, "scores": [0.3]}]
    assert winner(trials, "recall@1")["trial"] == 1
    trials[1]["scores"] = [float("nan")]
    assert winner(trials, "recall@1") is None  # every trial failed: no winner


def test_embed_and_export_refuse_an_out_inside_a_cell_folder(tmp_path):
    from cli.reuse import check_out

    cell = tmp_path / "results" / "suite" / "cell"
    cell.mkdir(parents=True)
    (cell / "result.json").write_text(json.dumps({"status": "ok"}))
    for out in (cell / "result.json", cell / "emb.npy", cell / "sub" / "model.safetensors"):
        with pytest.raises(UserError, match="inside the cell folder"):
            check_out(out)
    assert check_out(tmp_path / "exports" / "model.safetensors")


def test_max_cells_counts_every_cell_of_the_call(synthetic_root, tmp_path, capsys):
    import yaml

    import cli

    suite = {"name": "few", "grid": {"method": ["linear_probe"], "seed": [0, 1, 2]},
             "defaults": {"dataset": "synthetic", "backbone": "vit_test", "weights": None, "image_size": 32,
                          "embedding_size": 16, "epochs": 1, "max_steps_per_epoch": 2, "batch_size": 8,
                          "samples_per_class": 2, "num_workers": 0, "device": "cpu"}}
    path = tmp_path / "few.yaml"
    path.write_text(yaml.safe_dump(suite))
    out = tmp_path / "results"
    run = ["run", str(path), "--executor", "local", "--data-root", str(synthetic_root), "--out", str(out),
           "--no-report", "--jobs", "2", "--max-cells", "1"]
    assert cli.main(run) == 0
    assert len(list((out / "few").glob("*/result.json"))) == 1


def test_describe_a_small_backbone_without_naming_methods(capsys):
    import cli

    assert cli.main(["describe", "--backbone", "vit_test", "--num-classes", "10", "--embedding-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "vptsp_g" in out and "prompt_depth=3" in out  # the default depth, shrunk to the 3 blocks


def test_status_of_a_suite_without_results_says_so(tmp_path, capsys):
    import cli

    assert cli.main(["status", "smoke", "--out", str(tmp_path / "nowhere")]) == 0
    assert "no results yet" in capsys.readouterr().out


def test_dry_run_refuses_a_suite_name_another_file_owns(tmp_path, capsys):
    import yaml

    import cli

    suite = {"name": "twin", "grid": {"method": ["linear_probe"], "seed": [0]},
             "defaults": {"dataset": "synthetic", "backbone": "vit_test", "weights": None}}
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(yaml.safe_dump(suite))
    second.write_text(yaml.safe_dump(suite))
    out = tmp_path / "results"
    (out / "twin").mkdir(parents=True)
    (out / "twin" / "cells.json").write_text(json.dumps({"suite_file": str(first.resolve()), "cells": []}))
    assert cli.main(["run", str(second), "--dry-run", "--no-data-check", "--out", str(out)]) == 2
    assert "is also the name of" in capsys.readouterr().err


def test_a_trial_is_named_by_its_values_so_a_grown_space_reruns_none_of_the_old_ones(tmp_path):
    import yaml

    from bench.suite import load_suite

    def trial_ids(values):
        suite = {"name": "grow", "grid": {"method": ["linear_probe"], "seed": [0]},
                 "defaults": {"dataset": "synthetic", "backbone": "vit_test", "weights": None},
                 "tune": {"budget": 10, "sampler": "grid", "seed": 0, "space": {"default": {"lr": values}}}}
        path = tmp_path / "grow.yaml"
        path.write_text(yaml.safe_dump(suite))
        plan = load_suite(path).plan()
        return {c.config.lr: c.cell_id for c in plan.cells if c.key.get("stage") == "trial"}

    before, after = trial_ids([1e-4, 1e-3]), trial_ids([1e-4, 1e-3, 3e-3])
    assert len(after) == 3 and all(after[lr] == cell_id for lr, cell_id in before.items())


def test_a_tie_between_trials_is_reported():
    from bench.tune import winner
    from report.tuning import summary_frame

    trials = [{"trial": 0, "params": {"lr": 1}, "scores": [0.5]}, {"trial": 1, "params": {"lr": 2}, "scores": [0.5]}]
    best = winner(trials, "recall@1")
    assert best["trial"] == 0 and best["tied_with"] == [1]
    frame = summary_frame({"plan": {"budget": 2}, "methods": [{"key": {"method": "lora"}, "space": {"lr": "{1, 2}"},
                                                                "trials": trials, "winner": best}]})
    assert "tied with trial 1" in frame["tie"].iloc[0]
