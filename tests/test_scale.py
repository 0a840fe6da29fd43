"""Real scale (issue 18): draft decoding keeps the crop distribution, num_workers: auto, per-cell
SLURM requests, shared vs per-class parameters, and the resized dataset copy."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def test_draft_decoding_keeps_the_crop_distribution(tmp_path):
    from torchvision import transforms

    from bench.data import load_image

    rng = np.random.default_rng(0)
    photo = tmp_path / "large.jpg"
    Image.fromarray(rng.integers(0, 255, (700, 900, 3), dtype=np.uint8)).save(photo, quality=90)
    full, drafted = load_image(str(photo)), load_image(str(photo), draft=224)
    assert full.size == (900, 700) and drafted.size == (450, 350)  # DCT scale 1/2: shorter side >= 224
    boxes = {}
    for name, image in (("full", full), ("drafted", drafted)):
        torch.manual_seed(0)
        w, h = image.size
        boxes[name] = np.array([[top / h, left / w, height / h, width / w]
                                for top, left, height, width in
                                (transforms.RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
                                 for _ in range(2000))])
    # the same distribution of relative crops (top, left, height, width): RandomResizedCrop
    # samples the area and aspect as fractions; only the integer pixel positions differ
    from scipy import stats

    for column in range(4):
        assert stats.ks_2samp(boxes["full"][:, column], boxes["drafted"][:, column]).pvalue > 0.01, column
    assert boxes["full"].mean(axis=0) == pytest.approx(boxes["drafted"].mean(axis=0), abs=0.015)


def test_draft_leaves_small_images_as_they_are(tmp_path):
    from bench.data import load_image

    small = tmp_path / "small.jpg"
    Image.new("RGB", (300, 240), (10, 200, 30)).save(small)
    assert load_image(str(small), draft=224).size == (300, 240)


def test_num_workers_auto_follows_the_job_cpus(monkeypatch):
    from bench.config import CellConfig
    from bench.data import available_cpus, loader_workers

    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")
    assert available_cpus() == 8 and loader_workers("auto") == 7
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    import os

    assert available_cpus() == len(os.sched_getaffinity(0))
    assert loader_workers(3) == 3 and CellConfig(num_workers="auto").num_workers == "auto"


def test_dry_run_shows_each_cells_request():
    out = subprocess.run([sys.executable, "run_suite.py", "run", "table2", "--dry-run", "--no-data-check"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("│")]
    cub_s = next(r for r in rows if "cub200" in r and "vit_s16" in r)
    sop = next(r for r in rows if "│ sop " in r)
    assert "2 h" in cub_s and "24 GB" in cub_s
    assert "24 h" in sop and "96 GB" in sop and "16 CPU" in sop


def test_submission_groups_cells_by_their_request(tmp_path):
    from bench.suite import load_suite

    cells = load_suite("table2", check_methods=False).cells()
    requests = {c.cell_id: c.resources["timeout_min"] for c in cells}
    assert len(set(requests.values())) == 3


def test_shared_and_per_class_parameters_add_up():
    from bench.config import CellConfig
    from bench.learner import build_learner
    from bench.measure import parameter_counts

    small, large = (parameter_counts(build_learner(CellConfig(backbone="vit_test", weights=None, embedding_size=16,
                                                              method="vptsp_g", method_args={
                                                                  "prompt_depth": 3, "class_prompt_depth": 3}), n))
                    for n in (10, 100))
    assert small["params_shared"] == large["params_shared"]  # independent of the class count
    assert large["params_per_class"] == 10 * small["params_per_class"]
    assert large["params_shared"] + large["params_per_class"] == large["params_trainable"]


def test_resized_copy_keeps_the_layout_and_shrinks_large_images(tmp_path):
    from bench.data import load_dataset, make_synthetic_dataset
    from bench.data.resize import resize_dataset

    make_synthetic_dataset(tmp_path / "data" / "synthetic", num_classes=4, images_per_class=3, image_size=400)
    out = resize_dataset("synthetic", tmp_path / "data", tmp_path / "small", short_side=128)
    original, copy = load_dataset("synthetic", tmp_path / "data"), load_dataset("synthetic", tmp_path / "small")
    assert copy.train.class_names == original.train.class_names and len(copy.test) == len(original.test)
    with Image.open(copy.train.paths[0]) as image:
        assert min(image.size) == 128
    assert (out / "README.txt").is_file()  # the non-image files come along
