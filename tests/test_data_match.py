"""A finished result belongs to the data it was computed on (bench.data_match): never reused for
another data root or for changed data, always said aloud when reused."""
from __future__ import annotations

import json

import pytest
import yaml

import peft_dml_cli as cli
from bench.data import make_synthetic_dataset

TINY = ["--backbone", "vit_test", "--weights", "none", "--epochs", "1", "--set", "image_size=32",
        "--set", "embedding_size=16", "--set", "max_steps_per_epoch=2", "--set", "batch_size=8",
        "--set", "samples_per_class=2", "--set", "num_workers=0", "--set", "device=cpu"]


@pytest.fixture(scope="module")
def two_roots(tmp_path_factory):
    """Two data roots holding a dataset of the same name ('synthetic') with different images:
    the birds and the flowers of the issue."""
    base = tmp_path_factory.mktemp("roots")
    make_synthetic_dataset(base / "own1" / "synthetic", num_classes=8, images_per_class=6, image_size=32, seed=0)
    make_synthetic_dataset(base / "own2" / "synthetic", num_classes=8, images_per_class=6, image_size=32, seed=1,
                           class_offset=100)
    return base / "own1", base / "own2"


def _cell(root, out, *extra):
    return cli.main(["cell", "--dataset", "synthetic", "--data-root", str(root), "--out", str(out), *TINY, *extra])


def test_the_same_cell_on_another_data_root_never_prints_the_first_roots_numbers(two_roots, tmp_path, capsys):
    from bench.data_match import clear_cache

    own1, own2 = two_roots
    assert _cell(own1, tmp_path) == 0
    first = capsys.readouterr().out
    assert "recall@1" in first
    (result_file,) = list(tmp_path.glob("adhoc/*/result.json"))
    before = result_file.read_bytes()
    clear_cache()
    assert _cell(own2, tmp_path) == 2
    captured = capsys.readouterr()
    assert "recall@1" not in captured.out
    assert str(own1 / "synthetic") in captured.err and str(own2 / "synthetic") in captured.err
    assert "--fresh" in captured.err
    assert result_file.read_bytes() == before  # the first root's result is untouched
    clear_cache()
    assert _cell(own1, tmp_path) == 0  # the first root again: reused, and said so
    out = capsys.readouterr()
    assert "reused finished result of" in out.out + out.err and str(own1 / "synthetic") in out.out + out.err
    assert _cell(own2, tmp_path, "--fresh") == 0
    assert json.loads(result_file.read_text())["data"]["root"] == str(own2 / "synthetic")


def test_changed_images_under_the_same_root_are_not_reused(tmp_path, capsys):
    from bench.data_match import clear_cache

    root = tmp_path / "data"
    make_synthetic_dataset(root / "synthetic", num_classes=8, images_per_class=6, image_size=32)
    assert _cell(root, tmp_path / "out") == 0
    result = json.loads(next((tmp_path / "out").glob("adhoc/*/result.json")).read_text())
    assert result["data"]["fingerprint"].startswith("sha256:")
    victim = sorted((root / "synthetic" / "images").iterdir())[-1]
    next(victim.iterdir()).unlink()  # one test image less
    clear_cache()
    capsys.readouterr()
    assert _cell(root, tmp_path / "out") == 2
    assert "changed since it was computed" in capsys.readouterr().err


def test_a_suite_pointed_at_other_data_refuses_instead_of_reporting_the_old_numbers(two_roots, tmp_path, capsys):
    from bench.data_match import clear_cache

    own1, own2 = two_roots
    suite = {"name": "own", "grid": {"method": ["linear_probe"], "seed": [0]},
             "defaults": {"dataset": "synthetic", "backbone": "vit_test", "weights": None, "image_size": 32,
                          "embedding_size": 16, "epochs": 1, "max_steps_per_epoch": 2, "batch_size": 8,
                          "samples_per_class": 2, "num_workers": 0, "device": "cpu"}}
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump(suite))
    run = ["run", str(path), "--executor", "local", "--out", str(tmp_path / "results"), "--no-report"]
    assert cli.main(run + ["--data-root", str(own1)]) == 0
    capsys.readouterr()
    clear_cache()
    assert cli.main(run + ["--data-root", str(own1)]) == 0
    out = capsys.readouterr().out
    assert "1 cells done: skipped" in out and f"reused 1 finished results of" in out and str(own1) in out
    clear_cache()
    assert cli.main(run + ["--data-root", str(own2)]) == 2
    err = capsys.readouterr().err
    assert "computed on other data than this run reads" in err and str(own2 / "synthetic") in err
    assert "--fresh" in err
