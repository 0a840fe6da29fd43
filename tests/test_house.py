"""The house's seams (issue 28): what refactoring must not change, and where each concept lives."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from bench.config import CellConfig
from bench.runner import run_cell
from tests.no_torch import sitecustomize
from tests.tiny import tiny_config

GOLDEN = Path(__file__).parent / "data" / "golden_tiny_cell.json"


def _fingerprint(cell: Path, result: dict) -> dict:
    digest = lambda name: hashlib.sha256((cell / name).read_bytes()).hexdigest()  # noqa: E731
    return {"final": result["final"], "history": [{k: h[k] for k in ("epoch", "val", "test")} for h in result["epochs"]],
            "per_query.npz": digest("per_query.npz"), "val_per_query.npz": digest("val_per_query.npz")}


def test_a_fixed_seed_cell_gives_the_recorded_metrics_and_per_query_bytes(synthetic_root, tmp_path):
    """No behaviour change across refactors: the metrics of every evaluated epoch and the bytes
    of the per-query files of a fixed-seed cell are those recorded. An intended change re-records
    with ``GOLDEN_RECORD=1 pytest tests/test_house.py -k recorded`` (and says why in its commit)."""
    config = CellConfig(dataset="synthetic", data_root=str(synthetic_root), **tiny_config(
        method="lora", epochs=2, eval_every=1, selection="val", val_fraction=0.25, seed=3,
        method_args={"lora_rank": 2, "lora_alpha": 4.0}))
    cell = tmp_path / "cell"
    result = run_cell(config, cell, key={})
    assert result["status"] == "ok", result["reason"]
    found = _fingerprint(cell, result)
    if os.environ.get("GOLDEN_RECORD"):
        GOLDEN.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    assert found == json.loads(GOLDEN.read_text())


# --- one home for metrics: a metric added in one place reaches every consumer ------------------

def _reciprocal_rank():
    """A dummy metric for the test: 1 / (rank of the best positive), exact within the deepest K."""
    from bench.metrics import Metric

    return Metric(key="rr", display="RR", record="reciprocal_rank", table_keys=("rr",), compared=True,
                  per_query=lambda base, ks: 1.0 / (base["first_hit"] + 1.0))


def test_every_registered_metric_goes_from_the_cell_to_the_report_table_csv_and_significance(
        synthetic_root, tmp_path, monkeypatch):
    """The registry end to end, with a metric registered in this one place for the test: every
    metric's keys land in result.json, its record in per_query.npz, its table keys in the report
    table and cells.csv, and its compared keys in significance.csv."""
    import numpy as np
    import pandas as pd
    import yaml

    import peft_dml_cli as cli
    from bench import metrics
    from report.cli import build_report

    monkeypatch.setitem(metrics.METRICS, "rr", _reciprocal_rank())
    suite = {"name": "registry", "grid": {"method": ["linear_probe", "lora"], "seed": [0, 1]},
             "defaults": {"dataset": "synthetic", **tiny_config(epochs=1)}}
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(suite))
    out = tmp_path / "results"
    assert cli.main(["run", str(path), "--executor", "local", "--data-root", str(synthetic_root), "--out", str(out),
                     "--no-report"]) == 0
    written = build_report(out / "registry")

    cells = sorted(p.parent for p in (out / "registry").glob("*/result.json"))
    assert len(cells) == 4
    for cell in cells:
        test = json.loads((cell / "result.json").read_text())["final"]["test"]
        with np.load(cell / "per_query.npz") as records:
            ks = records["ks"].tolist()
            assert set(metrics.result_keys(ks)) <= set(test)
            for metric in metrics.METRICS.values():
                assert metric.record in records.files, metric.key
                for key in metric.keys(ks):
                    assert float(metrics.query_values(dict(records), key).mean()) == test[key]
    table = pd.read_csv(next(path for name, path in written.items() if name.startswith("tables/") and name.endswith(".csv")))
    cells_csv = pd.read_csv(written["cells.csv"])
    significance = pd.read_csv(written["significance.csv"])
    for key in metrics.table_keys():
        assert any(key in column for column in table.columns), (key, list(table.columns))
        assert key in cells_csv.columns
    assert set(significance["metric"]) == {metrics.display(k) for k in metrics.compared_keys()}
    assert "RR" in set(significance["metric"])


# --- one home for the cell folder's files -------------------------------------------------------

def test_a_cell_writes_only_the_files_that_cell_files_names(synthetic_root, tmp_path, monkeypatch):
    """Every file a cell leaves, and every file it writes while training (checkpoints kept here
    by a no-op removal, tables forced out by a 1-byte threshold), is one of bench.cell_files.FILES."""
    import bench.checkpoint
    import bench.checkpointer
    from bench import cell_files

    monkeypatch.setattr(bench.checkpoint, "TABLE_BYTES", 1)
    monkeypatch.setattr(bench.checkpointer, "remove_checkpoint", lambda cell_dir: None)
    config = CellConfig(dataset="synthetic", data_root=str(synthetic_root), **tiny_config(
        method="vptsp_g", epochs=2, val_fraction=0.25, selection="val", logger=["csv"], save_embeddings=True,
        method_args={"num_prompts": 2, "prompt_depth": 2, "num_class_prompts": 1, "class_prompt_depth": 2}))
    cell = tmp_path / "cell"
    assert run_cell(config, cell, key={})["status"] == "ok"
    names = sorted(p.name for p in cell.iterdir())
    assert [n for n in names if not cell_files.known(n)] == []
    files = cell_files.CellFiles(cell)
    for path in (files.result, files.weights, files.per_query, files.val_per_query, files.retrieval, files.proxies,
                 files.test_embeddings, files.metrics_log, files.metrics_csv, files.checkpoint, files.runs_log):
        assert path.exists(), path.name
    assert len(files.all_checkpoint_tables()) == 1


def test_no_module_spells_a_cell_file_name_but_cell_files():
    """A string that is exactly a cell file's name, anywhere but bench/cell_files.py, is a second
    home for it (the reporter once restated 8 of them)."""
    import ast

    from bench.cell_files import FILES

    root = Path(__file__).resolve().parent.parent
    # ".lock" and the tracker folders ("tensorboard", "wandb") are words other things use too
    names = {f.name for f in FILES.values() if "." in f.name and not f.name.startswith(".")}
    offenders = []
    for package in ("bench", "methods", "report", "peft_dml_cli"):
        for path in sorted((root / package).rglob("*.py")):
            if path.name == "cell_files.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in names:
                    offenders.append(f"{path.relative_to(root)}:{node.lineno} {node.value!r}")
    assert offenders == []


# --- one home for methods: reading a suite never imports torch --------------------------------

def test_dry_run_and_status_work_where_torch_cannot_be_imported(tmp_path):
    """The method registry, the suite check and the grid are torch-free: ``run --dry-run`` and
    ``status`` of a suite with every method (and a bad argument refused) run with torch blocked."""
    import subprocess
    import sys

    import yaml

    from methods import METHODS

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(sitecustomize())
    suite = {"name": "notorch", "grid": {"method": sorted(METHODS), "seed": [0]},
             "defaults": {"dataset": "synthetic", **tiny_config()}}
    (tmp_path / "notorch.yaml").write_text(yaml.safe_dump(suite))
    bad = {**suite, "name": "bad", "grid": {"method": [{"name": "lora", "args": {"lora_targets": "qkv,mlp"}}], "seed": [0]}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))

    def run(*argv):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(root)]),
               "MODULES_OUT": str(tmp_path / "modules.json")}
        done = subprocess.run([sys.executable, str(root / "run_suite.py"), *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        return done, json.loads((tmp_path / "modules.json").read_text())

    for argv in (["run", "notorch.yaml", "--dry-run", "--no-data-check", "--out", "out"],
                 ["status", "notorch.yaml", "--out", "out"]):
        done, modules = run(*argv)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"{len(METHODS)} cells" in done.stdout
        assert not [m for m in modules if m.split(".")[0] in ("torch", "timm", "faiss")]
    done, _ = run("run", "bad.yaml", "--dry-run", "--no-data-check")
    assert done.returncode == 2 and "lora_targets ['mlp'] unknown" in done.stderr + done.stdout
