"""The researcher's habits (issue 16): files colleagues can read, metrics.jsonl and TensorBoard
while a cell runs, every subcommand readable when piped, and a proper package (console script,
suites as data, version ranges with a constraints file, exclusive faiss extras)."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from bench.config import CellConfig
from bench.results import atomic_write_json
from bench.runner import run_cell
from tests.tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]
TINY = tiny_config(epochs=2, method="linear_probe")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    previous = os.umask(0o022)
    os.umask(previous)
    yield set_mask
    os.umask(previous)


# --- files colleagues can read -------------------------------------------------------------

def test_written_files_get_the_umask_mode(tmp_path, umask, synthetic_root):
    umask(0o027)
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert mode(tmp_path / "a.json") == 0o640
    umask(0o002)
    atomic_write_json(tmp_path / "b.json", {"x": 1})
    assert mode(tmp_path / "b.json") == 0o664
    umask(0o022)
    cell = tmp_path / "cell"
    result = run_cell(CellConfig(dataset="synthetic", data_root=str(synthetic_root), **TINY), cell, key={})
    assert result["status"] == "ok", result["reason"]
    for name in ("result.json", "per_query.npz", "retrieval.npz", "attention.npz", "proxies.npz",
                 "trainable.safetensors", "metrics.jsonl"):
        assert mode(cell / name) == 0o644, name


# --- watching a run ------------------------------------------------------------------------

def test_metrics_jsonl_has_each_epoch_as_soon_as_it_ends(tmp_path, synthetic_root):
    cell = tmp_path / "cell"
    seen = []

    def listener(event):
        if event["event"] == "epoch_end":
            seen.append(len((cell / "metrics.jsonl").read_text().splitlines()))

    config = CellConfig(dataset="synthetic", data_root=str(synthetic_root), eval_every=1, **TINY)
    result = run_cell(config, cell, key={}, progress=listener)
    assert seen == [1, 2]  # written before the epoch's end is announced
    lines = [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    for line, epoch in zip(lines, result["epochs"]):
        assert line["train_loss"] == epoch["train_loss"] and line["lr"] == epoch["lr"]
        assert line["test"]["recall@1"] == epoch["test"]["recall@1"]
        assert line["memory_bytes"] > 0 and line["time_s"] > 0
        # the median over timed steps: None until the warm-up steps are past (3 steps here)
        assert "step_ms_median" in line and (line["step_ms_median"] is None or line["step_ms_median"] > 0)


def test_tensorboard_event_files_hold_the_epoch_scalars(tmp_path, synthetic_root):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    cell = tmp_path / "cell"
    config = CellConfig(dataset="synthetic", data_root=str(synthetic_root), eval_every=1, logger=["tensorboard"],
                        **TINY)
    result = run_cell(config, cell, key={})
    assert result["status"] == "ok", result["reason"]
    events = event_accumulator.EventAccumulator(str(cell / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "lr", "time_s", "memory_bytes", "test/recall@1", "test/map@r"} <= tags
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([e["train_loss"] for e in result["epochs"]], rel=1e-6)
    assert [e.value for e in events.Scalars("test/recall@1")] == pytest.approx(
        [e["test"]["recall@1"] for e in result["epochs"]], rel=1e-6)
    assert result["measurements"]["knn_engine"] and result["measurements"]["faiss_package"].startswith("faiss")


# --- piped output --------------------------------------------------------------------------

def piped(*args: str, cwd: Path = REPO) -> str:
    """A subcommand with stdout to a pipe (not a terminal) on a narrow COLUMNS."""
    env = {**os.environ, "COLUMNS": "60", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, str(REPO / "run_suite.py"), *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "…" not in run.stdout, run.stdout
    return run.stdout


@pytest.fixture(scope="module")
def piped_cell(tmp_path_factory):
    """A tiny cell run through the CLI, on its own small synthetic dataset."""
    from bench.data import make_synthetic_dataset

    base = tmp_path_factory.mktemp("piped")
    make_synthetic_dataset(base / "data" / "synthetic", num_classes=8, images_per_class=6, seed=0)
    out = piped("cell", "--dataset", "synthetic", "--data-root", str(base / "data"), "--backbone", "vit_test",
                "--weights", "none", "--method", "vpt_shallow", "--method-arg", "num_prompts=2", "--epochs", "1",
                "--set", "image_size=32", "--set", "batch_size=8", "--set", "samples_per_class=2",
                "--set", "num_workers=0", "--set", "embedding_size=16", "--out", str(base / "results"))
    (cell_dir,) = [p.parent for p in (base / "results").rglob("result.json")]
    return base, cell_dir, out


def test_describe_piped_shows_every_method_name_whole():
    out = piped("describe", "--backbone", "vit_test", "--method-arg", "adapter_blocks=3", "--method-arg",
                "prompt_depth=3", "--method-arg", "class_prompt_depth=3")
    from methods import method_names

    for name in method_names():
        assert re.search(rf"\b{re.escape(name)}\b", out), name


def test_run_dry_run_and_status_piped_show_full_names(tmp_path):
    out = piped("run", "table1", "--dry-run", "--data-root", str(tmp_path), "--no-data-check")
    for label in ("adapter+bitfit", "linear_probe", "vptsp_g+bitfit", "Zero-shot (no training)"):
        assert label in out, label
    out = piped("status", "table1", "--out", str(tmp_path / "results"))
    assert "vptsp_g+bitfit" in out or "VPTSP-G (B)" in out


def test_cell_evaluate_embed_export_and_report_piped(piped_cell, tmp_path):
    base, cell_dir, out = piped_cell
    assert "vpt_shallow" in out and str(cell_dir) in " ".join(out.split()) or cell_dir.name in out
    embeddings = tmp_path / "emb.npy"
    out = piped("embed", str(cell_dir), "--split", "test", "--out", str(embeddings))
    assert str(embeddings) in out and str(tmp_path / "emb_labels.npy") in out
    out = piped("evaluate", str(embeddings), str(tmp_path / "emb_labels.npy"), "--k", "1", "2")
    assert "R@1" in out and "MAP@R" in out
    out = piped("export", str(cell_dir), "--out", str(tmp_path / "model.safetensors"))
    assert str(tmp_path / "model.safetensors") in out
    out = piped("report", "adhoc", "--results", str(base / "results"))
    assert "VPT-shallow" in out


# --- a proper package ----------------------------------------------------------------------

def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[ ;]", spec, maxsplit=1)[0].lower().replace("_", "-")


def test_dependencies_are_ranges_pinned_by_the_constraints_file():
    project = pyproject()["project"]
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    specs = project["dependencies"] + [s for extra in project["optional-dependencies"].values() for s in extra]
    for spec in specs:
        assert ">=" in spec or "<" in spec, f"{spec}: give a range (constraints.txt pins the version)"
        assert requirement_name(spec) in pins, f"{spec}: not pinned in constraints.txt"
    assert "constraints.txt" in (REPO / "Makefile").read_text()


def test_faiss_extras_exclude_each_other_and_one_is_the_default():
    project = pyproject()["project"]
    assert not [d for d in project["dependencies"] if d.startswith("faiss")]
    extras = project["optional-dependencies"]
    assert [requirement_name(s) for s in extras["cpu"]] == ["faiss-cpu"]
    assert [requirement_name(s) for s in extras["gpu"]] == ["faiss-gpu-cu12"]
    assert re.search(r"^FAISS\s*\?=\s*cpu", (REPO / "Makefile").read_text(), re.M)


def test_requires_python_matches_the_readme():
    assert pyproject()["project"]["requires-python"] == ">=3.11"
    assert "Python 3.11 or newer" in (REPO / "README.md").read_text()


def test_the_wheel_ships_suites_the_cli_and_the_console_script(tmp_path):
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    (wheel,) = tmp_path.glob("peft_dml_bench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("suites/") and n.endswith(".yaml")}
    assert shipped == {p.name for p in (REPO / "suites").glob("*.yaml")}
    assert "peft_dml_cli/__init__.py" in names and "run_suite.py" in names and "bench/reuse.py" in names
    # Only the layout's names (and the command line under a name of its own) go on users' paths.
    top_level = {n.split("/")[0] for n in names if ".dist-info" not in n.split("/")[0]}
    assert top_level == {"bench", "methods", "report", "suites", "peft_dml_cli", "run_suite.py"}
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "peft-dml = peft_dml_cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_console_script_runs_like_run_suite():
    script = Path(sys.executable).parent / "peft-dml"
    if not script.exists():
        pytest.skip(f"{script} not installed: `make setup` installs the package with its console script")
    run = subprocess.run([str(script), "describe", "--backbone", "vit_test", "--method", "lora"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "lora" in run.stdout
