"""One cell end to end through the CLI: result file, exact resume after kill -9, failures."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.config import CellConfig
from bench.results import read_result
from bench.runner import run_cell

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from bench.data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("engine-data")
    make_synthetic_dataset(root / "synthetic", num_classes=12, images_per_class=10, image_size=40, seed=0)
    return root


def cell_args(data_root, out, epochs=3, method="vpt_deep", extra=()):
    return [sys.executable, str(ROOT / "run_suite.py"), "cell", "--dataset", "synthetic", "--data-root",
            str(data_root), "--backbone", "vit_test", "--weights", "none", "--method", method,
            "--method-arg", "prompt_depth=3", "--epochs", str(epochs), "--out", str(out),
            "--set", "num_workers=0", "--set", "batch_size=12", "--set", "samples_per_class=2",
            "--set", "embedding_size=32", "--set", "optimizer=adamw", "--set", "lr=1e-3", *extra]


def only_result(out: Path) -> dict:
    files = list(out.glob("adhoc/*/result.json"))
    assert len(files) == 1, files
    return read_result(files[0])


def test_cell_cli_writes_a_valid_result(data_root, tmp_path):
    proc = subprocess.run(cell_args(data_root, tmp_path, epochs=2), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = only_result(tmp_path)
    assert result["status"] == "ok" and result["reason"] is None
    assert [e["epoch"] for e in result["epochs"]] == [1, 2]
    test = result["final"]["test"]
    assert set(test) >= {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "num_queries"}
    assert 0.0 <= test["recall@1"] <= test["recall@8"] <= 1.0
    assert result["final"]["selection"] == "last" and result["final"]["epoch"] == 2
    m = result["measurements"]
    assert m["params_trainable"] > m["params_trainable_no_head"] > 0
    assert m["params_total"] > m["params_trainable"]
    assert m["step_latency_ms_median"] > 0 and m["throughput_img_s"] > 0 and m["wall_time_s"] > 0
    # on the CPU the cell's own memory is counted; the process's peak RSS is kept, labelled
    assert m["memory_kind"] == "counted_training" and m["peak_memory_bytes"] == m["counted_memory_bytes"] > 0
    assert m["process_peak_rss_bytes"] > 0
    assert result["provenance"]["packages"]["torch"]
    cell_dir = next(tmp_path.glob("adhoc/*"))
    assert (cell_dir / "trainable.safetensors").exists() and not (cell_dir / "checkpoint.pt").exists()
    # a second run reuses the finished cell
    again = subprocess.run(cell_args(data_root, tmp_path, epochs=2), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert only_result(tmp_path)["provenance"]["started"] == result["provenance"]["started"]


@pytest.mark.slow  # kill-and-resume / a whole script: over 10 s on 2 cores; `make test` runs it
def test_killed_cell_resumes_to_the_same_result(data_root, tmp_path):
    """kill -9 after the first epoch checkpoint; the rerun resumes and matches an uninterrupted run."""
    epochs = 4
    reference = tmp_path / "reference"
    proc = subprocess.run(cell_args(data_root, reference, epochs, method="vptsp_g",
                                    extra=["--method-arg", "class_prompt_depth=2"]),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    expected = only_result(reference)

    killed = tmp_path / "killed"
    args = cell_args(data_root, killed, epochs, method="vptsp_g", extra=["--method-arg", "class_prompt_depth=2"])
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list(killed.glob("adhoc/*/checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not list(killed.glob("adhoc/*/result.json")), "killed before the end: no result may exist"

    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    resumed = only_result(killed)
    assert resumed["measurements"]["resumed_from_epoch"] >= 1
    assert [e["epoch"] for e in resumed["epochs"]] == list(range(1, epochs + 1))
    assert resumed["final"]["test"] == expected["final"]["test"]
    assert [e["train_loss"] for e in resumed["epochs"]] == [e["train_loss"] for e in expected["epochs"]]


def test_nan_loss_fails_the_cell_with_epoch_and_step(data_root, tmp_path):
    config = CellConfig(dataset="synthetic", data_root=str(data_root), backbone="vit_test", weights=None,
                        method="linear_probe", epochs=2, batch_size=12, samples_per_class=2, num_workers=0,
                        embedding_size=16, optimizer="sgd", lr=1e30, proxy_lr=1e30)
    result = run_cell(config, tmp_path / "cell", key={"method": "linear_probe"})
    assert result["status"] == "failed"
    assert "non-finite loss" in result["reason"] and "epoch" in result["reason"] and "step" in result["reason"]
    on_disk = json.loads((tmp_path / "cell" / "result.json").read_text())
    assert on_disk["status"] == "failed"


def test_missing_data_root_fails_the_cell_with_its_path(tmp_path):
    config = CellConfig(dataset="cub200", data_root=str(tmp_path / "nowhere"), backbone="vit_test", weights=None,
                        num_workers=0)
    result = run_cell(config, tmp_path / "cell", key={})
    assert result["status"] == "failed" and "nowhere" in result["reason"]


def test_a_locked_cell_is_left_to_its_owner(data_root, tmp_path):
    from bench.runner import cell_lock

    config = CellConfig(dataset="synthetic", data_root=str(data_root), backbone="vit_test", weights=None)
    with cell_lock(tmp_path / "cell") as held:
        assert held
        code = ("import sys; from pathlib import Path; from bench.config import CellConfig; "
                "from bench.runner import run_cell; "
                f"r = run_cell(CellConfig(**{config.to_dict()!r}), Path({str(tmp_path / 'cell')!r}), key={{}}); "
                "sys.exit(0 if r is None else 1)")
        assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
    assert not (tmp_path / "cell" / "result.json").exists()


def test_compiled_cell_trains_and_scores_like_the_eager_one(data_root, tmp_path):
    """``compile=true`` (torch.compile per block): training, checkpointing and evaluation (other
    batch sizes, no grad) all go through the compiled blocks and end where eager mode ends."""
    results = {}
    for compiled in (False, True):
        config = CellConfig(dataset="synthetic", data_root=str(data_root), backbone="vit_test", weights=None,
                            method="vptsp_g+bitfit", method_args={"prompt_depth": 3, "class_prompt_depth": 3},
                            epochs=2, batch_size=12, samples_per_class=2, num_workers=0, embedding_size=16,
                            optimizer="adamw", lr=1e-3, compile=compiled)
        results[compiled] = run_cell(config, tmp_path / str(compiled), key={"method": "vptsp_g+bitfit"})
    eager, compiled = results[False], results[True]
    assert compiled["status"] == "ok", compiled["reason"]
    assert compiled["config"]["compile"] is True
    for e, c in zip(eager["epochs"], compiled["epochs"]):
        assert c["train_loss"] == pytest.approx(e["train_loss"], rel=1e-3)
    assert compiled["final"]["test"]["map@r"] == pytest.approx(eager["final"]["test"]["map@r"], abs=0.02)
