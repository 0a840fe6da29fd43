"""Fixtures shared by several test files: the local SLURM cluster and a small synthetic dataset."""
from __future__ import annotations

import shutil
import subprocess

import pytest

READY_NODE_STATES = ("idle", "mixed", "allocated", "completing")


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """Skip (with the reason in the summary) unless a SLURM controller answers with a usable node."""
    if not shutil.which("sinfo"):
        pytest.skip("no SLURM here (`sinfo` not on PATH); bring one up: bash scripts/slurm-local.sh up")
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.skip("SLURM cluster down: sinfo timed out; bash scripts/slurm-local.sh up")
    states = out.stdout.split()
    if out.returncode or not any(s.rstrip("*~#") in READY_NODE_STATES for s in states):
        reason = out.stderr.strip() or f"node states {states}"
        pytest.skip(f"SLURM cluster down ({reason}); bash scripts/slurm-local.sh up")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A data root with <root>/synthetic/: 8 train classes x 20 images, 20 steps of batch 8."""
    from bench.data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("data")
    make_synthetic_dataset(root / "synthetic", num_classes=16, images_per_class=20, seed=0)
    return root
