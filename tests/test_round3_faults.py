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
    from bench.cell_evaluation import check_embeddings

    with pytest.raises(CellFailure, match="degenerate|non-finite"):
        check_embeddings(embeddings.astype(np.float32), "val")


def test_ordinary_embeddings_pass():
    from bench.cell_evaluation import check_embeddings

    check_embeddings(np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32), "test")


def test_a_nan_score_never_wins_a_tuning_trial():
    from bench.tune import winner

    trials = [{"trial": 0, "params": {"lr": 1}, "scores": [float("nan")]},
              {"trial": 1, "params": {"lr": 2}, "scores": [0.3]}]
    assert winner(trials, "recall@1")["trial"] == 1
    trials[1]["scores"] = [float("nan")]
    assert winner(trials, "recall@1") is None  # every trial failed: no winner


def test_embed_and_export_refuse_an_out_inside_a_cell_folder(tmp_path):
    from peft_dml_cli.reuse import check_out

    cell = tmp_path / "results" / "suite" / "cell"
    cell.mkdir(parents=True)
    (cell / "result.json").write_text(json.dumps({"status": "ok"}))
    for out in (cell / "result.json", cell / "emb.npy", cell / "sub" / "model.safetensors"):
        with pytest.raises(UserError, match="inside the cell folder"):
            check_out(out)
    assert check_out(tmp_path / "exports" / "model.safetensors")


def test_max_cells_counts_every_cell_of_the_call(synthetic_root, tmp_path, capsys):
    import yaml

    import peft_dml_cli as cli

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
    (result_file,) = (out / "few").glob("*/result.json")
    test = json.loads(result_file.read_text())["final"]["test"]
    assert test["ties_checked"] == test["num_queries"] and 0 <= test["ties_top1"] <= test["ties_checked"]


def test_describe_a_small_backbone_without_naming_methods(capsys):
    import peft_dml_cli as cli

    assert cli.main(["describe", "--backbone", "vit_test", "--num-classes", "10", "--embedding-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "vptsp_g" in out and "prompt_depth=3" in out  # the default depth, shrunk to the 3 blocks


def test_status_of_a_suite_without_results_says_so(tmp_path, capsys):
    import peft_dml_cli as cli

    assert cli.main(["status", "smoke", "--out", str(tmp_path / "nowhere")]) == 0
    assert "no results yet" in capsys.readouterr().out


def test_dry_run_refuses_a_suite_name_another_file_owns(tmp_path, capsys):
    import yaml

    import peft_dml_cli as cli

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


def test_prepare_names_a_registered_hook_and_nothing_else(tmp_path):
    import yaml

    from bench.suite import SuiteError, load_suite

    base = {"name": "p", "grid": {"method": ["linear_probe"], "seed": [0]},
            "defaults": {"dataset": "synthetic", "backbone": "vit_test", "weights": None}}
    for hook in ("bench.checkpoint:remove_checkpoint", "bench.runner:_save_weights", "os:remove", 3):
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump({**base, "prepare": hook}))
        with pytest.raises(SuiteError, match="not a registered prepare hook; choose one of demo, synthetic"):
            load_suite(path)
    path.write_text(yaml.safe_dump({**base, "prepare": "synthetic"}))
    assert load_suite(path).prepare == "synthetic"
    path.write_text(yaml.safe_dump({**base, "prepare": "bench.demo_pretrain:prepare_demo"}))  # an older file
    assert load_suite(path).prepare == "demo"


def _tuned_suite(tmp_path, **tune):
    import yaml

    suite = {"name": "tuned", "grid": {"method": ["linear_probe"], "seed": [0]},
             "defaults": {"dataset": "synthetic", "backbone": "vit_test", "weights": None, "image_size": 32,
                          "embedding_size": 16, "epochs": 1, "max_steps_per_epoch": 2, "batch_size": 8,
                          "samples_per_class": 2, "num_workers": 0, "device": "cpu"},
             "tune": {"budget": 2, "sampler": "grid", "val_fraction": 0.25, "seeds": [0],
                      "space": {"default": {"lr": [1.0e-3, 1.0e-2]}}, **tune}}
    path = tmp_path / "tuned.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


@pytest.mark.parametrize("tune, field", [
    ({"space": {"default": {"seed": [0, 1]}}}, "tune.space.default.seed"),
    ({"space": {"linear_probe": {"method": ["lora"]}}}, "tune.space.linear_probe.method"),
    ({"space": {"Linear probe": {"lr": [1.0e-3]}}}, "tune.space.Linear probe"),
    ({"budget": 10 ** 9, "sampler": "random"}, "tune.budget"),
    ({"metric": "recall@1000"}, "tune.metric"),
])
def test_tuning_refuses_what_it_cannot_do(tmp_path, tune, field):
    from bench.suite import SuiteError, load_suite

    with pytest.raises(SuiteError, match=field.replace(".", r"\.")):
        load_suite(_tuned_suite(tmp_path, **tune))


def test_set_of_a_tuned_field_is_refused(tmp_path):
    from bench.suite import SuiteError, load_suite

    with pytest.raises(SuiteError, match="--set lr: tuned tunes lr"):
        load_suite(_tuned_suite(tmp_path), overrides={"lr": 0.5})


def test_a_random_sampler_on_a_small_space_draws_each_point_once(tmp_path):
    from bench.suite import load_suite

    suite = load_suite(_tuned_suite(tmp_path, budget=50, sampler="random"))
    trials = [c for c in suite.plan().cells if c.key.get("stage") == "trial"]
    assert sorted(c.config.lr for c in trials) == [1.0e-3, 1.0e-2]


def test_when_every_trial_fails_the_run_says_so_and_fails(synthetic_root, tmp_path, capsys):
    import peft_dml_cli as cli

    path = _tuned_suite(tmp_path, space={"default": {"lr": [1.0e30]}})
    code = cli.main(["run", str(path), "--executor", "local", "--data-root", str(synthetic_root), "--out",
                     str(tmp_path / "out"), "--no-report"])
    out = capsys.readouterr().out
    assert code == 1 and "tuning failed" in out and "every trial failed" in out


def test_metrics_csv_stays_one_table_when_later_epochs_add_columns(tmp_path):
    import pandas as pd

    from bench.loggers import CsvSink

    sink = CsvSink(tmp_path / "metrics.csv")
    sink.log({"train/loss": 1.0}, 1)  # epoch 1: not evaluated
    sink.log({"train/loss": 0.8, "test/recall@1": 0.4}, 2)
    sink.log({"train/loss": 0.7}, 3)
    frame = pd.read_csv(tmp_path / "metrics.csv")
    assert list(frame["epoch"]) == [1, 2, 3] and frame["test/recall@1"].iloc[1] == 0.4
    assert frame["test/recall@1"].isna().tolist() == [True, False, True]


def test_a_tracker_named_twice_is_refused():
    from bench.config import CellConfig, ConfigError

    with pytest.raises(ConfigError, match="logger: names a tracker twice"):
        CellConfig(logger=["csv", "csv"])


def test_the_resize_tool_refuses_a_used_or_nested_output_and_leaves_no_half_copy(tmp_path):
    from bench.data import DataError, make_synthetic_dataset
    from bench.data.resize import main, resize_dataset

    make_synthetic_dataset(tmp_path / "data" / "synthetic", num_classes=4, images_per_class=3, image_size=40)
    with pytest.raises(DataError, match="inside its source"):
        resize_dataset("synthetic", tmp_path / "data", tmp_path / "data" / "synthetic" / "out", short_side=32)
    (tmp_path / "used" / "synthetic").mkdir(parents=True)
    (tmp_path / "used" / "synthetic" / "stale.jpg").write_bytes(b"old")
    with pytest.raises(DataError, match="already exists"):
        resize_dataset("synthetic", tmp_path / "data", tmp_path / "used", short_side=32)
    victim = sorted((tmp_path / "data" / "synthetic" / "images").rglob("*.jpg"))[-1]
    victim.write_bytes(b"not a jpeg")
    assert main(["synthetic", str(tmp_path / "data"), str(tmp_path / "out"), "--short-side", "32"]) == 2
    assert not (tmp_path / "out" / "synthetic").exists() and not list((tmp_path / "out").glob(".synthetic*"))


def test_load_exported_refuses_bad_metadata_with_one_message(tmp_path):
    import torch
    from safetensors.torch import save_file

    from bench import load_exported
    from bench.reuse import CellLoadError

    path = tmp_path / "model.safetensors"
    weights = {"head.linear.weight": torch.zeros(16, 8)}
    cases = [
        ({"export": "{not json"}, "not a peft-dml-bench export"),
        ({"export": json.dumps({"format": "peft-dml-bench-export-v1"})}, "missing or not"),
        ({"export": json.dumps({"format": "peft-dml-bench-export-v1", "backbone": "vit_test", "image_size": 32,
                                "embedding_size": 10 ** 9, "num_classes": 10 ** 9, "method": "linear_probe",
                                "method_args": {}, "output": "cls", "init": "vpt"})}, "embedding_size"),
    ]
    from bench.reuse import EXPORT_FORMAT

    for metadata, message in cases:
        metadata = {k: v.replace("peft-dml-bench-export-v1", EXPORT_FORMAT) for k, v in metadata.items()}
        save_file(weights, str(path), metadata=metadata)
        with pytest.raises(CellLoadError, match=message):
            load_exported(path)
    path.write_bytes(b"garbage")
    with pytest.raises(CellLoadError, match="not a readable safetensors file"):
        load_exported(path)


def test_an_image_size_the_backbone_cannot_cut_into_patches_fails_before_any_data(tmp_path, capsys):
    import yaml

    import peft_dml_cli as cli

    assert cli.main(["cell", "--dataset", "synthetic", "--data-root", str(tmp_path / "none"), "--backbone",
                     "vit_test", "--weights", "none", "--set", "image_size=30"]) == 2
    assert "not a multiple of vit_test's 8 px patches; use 24 or 32" in capsys.readouterr().err
    suite = {"name": "odd", "grid": {"method": ["linear_probe"], "seed": [0]},
             "defaults": {"dataset": "synthetic", "backbone": "vit_test", "weights": None, "image_size": 30}}
    path = tmp_path / "odd.yaml"
    path.write_text(yaml.safe_dump(suite))
    assert cli.main(["run", str(path), "--dry-run", "--no-data-check"]) == 2
    assert "defaults.image_size" in capsys.readouterr().err


def test_an_80_column_progress_bar_keeps_steps_elapsed_time_and_eta():
    import io

    from rich.console import Console

    from peft_dml_cli.progress import ProgressView

    stream = io.StringIO()
    console = Console(file=stream, width=80, force_terminal=True, color_system=None)
    with ProgressView(console) as on_event:
        on_event({"event": "cell_begin", "name": "cub200/vit_small_patch16_224.augreg_in21k/VPTSP-G (B) long label/0"})
        on_event({"event": "cell_start", "total_epochs": 30, "start_epoch": 0, "steps": 100})
        for step in range(7):
            on_event({"event": "step", "epoch": 1, "step": step, "loss": 0.123456})
        on_event.progress.refresh()
    import re

    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", stream.getvalue())  # cursor and erase codes
    frames = [line for line in text.replace("\r", "\n").splitlines() if "/3000" in line]
    last = frames[-1]
    assert len(last.rstrip()) <= 80, last
    assert "7/3000" in last and "0:00:0" in last  # the step count and the elapsed time
    assert "-:--:--" in last or last.rstrip().count(":") >= 4, last  # and the ETA


def test_status_says_when_the_trials_are_done_and_the_finals_wait(synthetic_root, tmp_path, capsys):
    import peft_dml_cli as cli

    path = _tuned_suite(tmp_path)
    out = tmp_path / "out"
    assert cli.main(["run", str(path), "--executor", "local", "--data-root", str(synthetic_root), "--out", str(out),
                     "--no-report", "--max-cells", "2"]) == 0  # the two trials only
    capsys.readouterr()
    assert cli.main(["status", str(path), "--out", str(out)]) == 0
    assert "trials done: rerun `run` to start the final cells" in capsys.readouterr().out


def test_a_cell_folder_that_cannot_be_written_is_one_message(tmp_path, capsys):
    import peft_dml_cli as cli

    out = tmp_path / "results"
    out.mkdir()
    (out / "adhoc").write_text("a file where the suite folder should be")  # as unwritable as it gets for root
    code = cli.main(["cell", "--dataset", "synthetic", "--data-root", str(tmp_path), "--backbone", "vit_test",
                     "--weights", "none", "--out", str(out)])
    assert code == 2 and "cannot write in the cell folder" in capsys.readouterr().err


# --- ties that decide R@1 are said, not hidden (27.3) ---------------------------------------

def test_top1_ties_count_the_queries_that_index_order_decided():
    from bench.evaluate import top1_ties

    a, b = [1.0, 0.0], [0.0, 1.0]
    # 0 and 1 share class 0, 2 is class 1 with the same vector: for queries 0, 1 and 3 the best
    # similarity is shared by a positive and a negative; query 2's best are all negatives.
    embeddings = np.array([a, a, a, b])
    assert top1_ties(embeddings, np.array([0, 0, 1, 1])) == {"checked": 4, "decided_by_tie": 3}
    apart = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert top1_ties(apart, np.array([0, 0, 1, 1])) == {"checked": 4, "decided_by_tie": 0}
    assert top1_ties(np.eye(4), np.array([0, 0, 1, 1]))["decided_by_tie"] == 4  # all at 0: a tie


def test_top1_ties_agree_with_brute_force_in_both_modes():
    from bench.evaluate import top1_ties

    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(6, 8))
    embeddings = vectors[rng.integers(0, 6, size=60)]  # many exact duplicates
    labels = rng.integers(0, 5, size=60)

    def brute(q, ql, g, gl, self_search):
        decided = checked = 0
        for i in range(len(q)):
            others = [j for j in range(len(g)) if not (self_search and j == i)]
            if not any(gl[j] == ql[i] for j in others):
                continue
            checked += 1
            sims = {j: float(q[i] @ g[j]) / np.linalg.norm(q[i]) / np.linalg.norm(g[j]) for j in others}
            best = max(sims.values())
            tied = [j for j in others if sims[j] >= best - 1e-9]
            decided += any(gl[j] == ql[i] for j in tied) and any(gl[j] != ql[i] for j in tied)
        return {"checked": checked, "decided_by_tie": decided}

    assert top1_ties(embeddings, labels) == brute(embeddings, labels, embeddings, labels, True)
    q, ql, g, gl = embeddings[:20], labels[:20], embeddings[20:], labels[20:]
    assert top1_ties(q, ql, gallery_embeddings=g, gallery_labels=gl) == brute(q, ql, g, gl, False)
    assert top1_ties(embeddings, labels, max_queries=7)["checked"] == 7


def test_the_report_names_cells_whose_r1_ties_decided():
    import pandas as pd

    from report.summary import tie_notes

    ok = pd.DataFrame({"cell_id": ["good", "tied"], "ties_top1": [0, 30], "ties_checked": [1000, 1000]})
    text = "\n".join(tie_notes(ok))
    assert "`tied`: 30 of 1000" in text and "`good`" not in text
    assert tie_notes(ok.iloc[:1]) == []
