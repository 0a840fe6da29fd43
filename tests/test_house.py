"""The house's seams (issue 28): what refactoring must not change, and where each concept lives."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from bench.config import CellConfig
from bench.runner import run_cell
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
