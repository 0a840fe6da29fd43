"""The demo's own pretrained backbone (bench.demo_pretrain) and its data, with a tiny recipe.

The real recipe takes minutes; these tests train a few steps on a handful of source classes
into a temporary cache, which exercises the same code path (data, training, saving, cache,
lock) in a second or two.
"""
from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from bench import demo_pretrain, demo_weights
from bench.backbones import BackboneError, create_backbone
from bench.data import load_dataset
from bench.data.hooks import ensure_demo_data
from bench.demo_pretrain import demo_weights_path
from bench.demo_weights import Recipe

TINY = Recipe(source_classes=4, images_per_class=4, held_out_per_class=1, steps=2, batch_size=8,
              warmup_steps=1)


@pytest.fixture
def tiny_default(monkeypatch, tmp_path):
    """The tiny recipe as the default and an empty cache: what `weights: hub` would use."""
    monkeypatch.setattr(demo_weights, "DEFAULT_RECIPE", TINY)
    monkeypatch.setenv("PEFT_DML_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_pretraining_writes_backbone_weights_that_load(tmp_path):
    path = demo_weights_path(TINY, cache=tmp_path)
    assert path.parent == tmp_path and path.name.startswith("demo_vit-v") and path.suffix == ".safetensors"
    saved = load_file(str(path))
    assert not any(k.startswith("head") for k in saved), "the pretraining classifier must not be saved"

    backbone = create_backbone("demo_vit", weights=str(path))
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, saved[name]), name

    record = json.loads(path.with_suffix(".json").read_text())
    assert record["recipe"] == TINY.to_dict()
    assert 0.0 <= record["source_top1_held_out"] <= 1.0
    assert record["total_seconds"] > 0 and record["command"]
    assert record["source_data"]["class_offset"] >= demo_weights.DEMO_CLASSES  # disjoint from the demo's


def test_cached_weights_are_reused_without_training(tmp_path, monkeypatch):
    first = demo_weights_path(TINY, cache=tmp_path)
    written = first.stat().st_mtime_ns

    def must_not_train(*args, **kwargs):
        raise AssertionError("trained again although the weights were cached")

    monkeypatch.setattr(demo_pretrain, "pretrain", must_not_train)
    assert demo_weights_path(TINY, cache=tmp_path) == first
    assert first.stat().st_mtime_ns == written


def test_pretraining_is_deterministic(tmp_path):
    a = demo_weights_path(TINY, cache=tmp_path / "a")
    b = demo_weights_path(TINY, cache=tmp_path / "b")
    state_a, state_b = load_file(str(a)), load_file(str(b))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_another_recipe_gets_another_file(tmp_path):
    other = Recipe(**{**TINY.to_dict(), "steps": 3})
    assert demo_weights.weights_file(TINY, tmp_path) != demo_weights.weights_file(other, tmp_path)


def test_concurrent_callers_train_once(tmp_path, monkeypatch):
    """Parallel cells asking for the weights wait for one training instead of each running one."""
    calls = []

    def slow_pretrain(out, recipe=None, **kwargs):
        calls.append(out)
        time.sleep(0.5)  # long enough for the other caller to arrive while the lock is held
        out.write_bytes(b"weights")

    monkeypatch.setattr(demo_pretrain, "pretrain", slow_pretrain)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(demo_weights_path(TINY, cache=tmp_path)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(calls) == 1 and len(paths) == 2 and paths[0] == paths[1]


def test_hub_weights_of_demo_vit_come_from_the_cache(tiny_default):
    with pytest.raises(BackboneError, match="python -m bench.demo_pretrain"):  # constructing never trains
        create_backbone("demo_vit", weights="hub")
    assert not demo_weights.weights_file().exists()
    demo_weights_path()  # what the demo's prepare hook does
    backbone = create_backbone("demo_vit", weights="hub")
    path = demo_weights.weights_file()
    assert path.parent == tiny_default and path.is_file()
    saved = load_file(str(path))
    assert torch.equal(backbone.state_dict()["pos_embed"], saved["pos_embed"])


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("PEFT_DML_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo_weights.cache_dir() == tmp_path / "xdg" / "peft-dml-bench"
    monkeypatch.setenv("PEFT_DML_CACHE", str(tmp_path / "mine"))
    assert demo_weights.cache_dir() == tmp_path / "mine"


def test_cli_writes_the_requested_file(tiny_default, tmp_path, capsys):
    out = tmp_path / "weights.safetensors"
    assert demo_pretrain.main(["--out", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".json").is_file()
    written = out.stat().st_mtime_ns
    assert demo_pretrain.main(["--out", str(out)]) == 0  # exists: kept without --force
    assert out.stat().st_mtime_ns == written
    assert demo_pretrain.main([]) == 0  # the cache entry, trained on first use
    assert str(demo_weights.weights_file()) in capsys.readouterr().out


def test_demo_data_is_generated_once_with_disjoint_train_and_test_classes(tmp_path):
    root = ensure_demo_data(tmp_path)
    readme = (root / "README.txt").read_text()
    assert ensure_demo_data(tmp_path) == root and (root / "README.txt").read_text() == readme
    splits = load_dataset("synthetic", tmp_path)
    assert splits.train.num_classes == splits.test.num_classes == demo_weights.DEMO_CLASSES // 2
    assert not set(splits.train.class_names) & set(splits.test.class_names)
    assert len(splits.test) == demo_weights.DEMO_CLASSES // 2 * demo_weights.DEMO_IMAGES_PER_CLASS


def test_a_killed_generation_leaves_nothing_that_blocks_the_next(tmp_path):
    partial = tmp_path / ".synthetic.partial" / "images" / "001.class_0000"
    partial.mkdir(parents=True)
    (partial / "half.jpg").write_bytes(b"")  # what a run killed while writing leaves
    root = ensure_demo_data(tmp_path)
    assert (root / "README.txt").is_file() and not (tmp_path / ".synthetic.partial").exists()


def test_pretraining_threads_can_be_pinned(monkeypatch):
    from bench.errors import UserError
    from bench.demo_weights import PRETRAIN_THREADS_ENV, pretrain_threads

    for value in ("1", "2"):
        monkeypatch.setenv(PRETRAIN_THREADS_ENV, value)
        assert pretrain_threads(window_s=0) == int(value)
    monkeypatch.setenv(PRETRAIN_THREADS_ENV, "4")
    with pytest.raises(UserError, match="PEFT_DML_PRETRAIN_THREADS='4': expected 1 or 2"):
        pretrain_threads(window_s=0)
    monkeypatch.delenv(PRETRAIN_THREADS_ENV)
    assert pretrain_threads(window_s=0.05) in (1, 2)


def test_the_shipped_weights_match_their_recipe_checksum_and_loader(monkeypatch, tmp_path):
    """bench/assets holds the default recipe's weights: the file's checksum is its record's, the
    record's recipe is the code's default, and `weights: hub` loads exactly that file, with or
    without anything in the cache."""
    monkeypatch.setenv("PEFT_DML_CACHE", str(tmp_path / "empty-cache"))
    path = demo_weights.shipped_file()
    assert path.is_file(), "the default recipe changed: run python -m bench.demo_pretrain and ship its weights"
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["recipe"] == demo_weights.DEFAULT_RECIPE.to_dict()
    assert record["version"] == demo_weights.version(demo_weights.DEFAULT_RECIPE)
    assert record["sha256"] == demo_weights.sha256(path)
    assert demo_weights.find_weights() == path == demo_weights_path()  # nothing to train
    saved = load_file(str(path))
    backbone = create_backbone("demo_vit", weights="hub")
    assert all(torch.equal(t, saved[name]) for name, t in backbone.state_dict().items())


def test_the_far_target_is_defined_by_colour_and_the_near_one_is_not(tmp_path):
    """The demo's designed-in domain shift: a nearest-centroid classifier on an image's mean
    colour separates the far classes and not the near ones."""
    import numpy as np
    from PIL import Image

    from bench.data import make_synthetic_dataset

    def colour_accuracy(variant: str) -> float:
        root = make_synthetic_dataset(tmp_path / variant, num_classes=12, images_per_class=8, image_size=36,
                                      variant=variant)
        features, labels = [], []
        for label, folder in enumerate(sorted((root / "images").iterdir())):
            for image in sorted(folder.iterdir()):
                pixels = np.asarray(Image.open(image), dtype=np.float64) / 255
                features.append(np.concatenate([pixels[:4].mean((0, 1)), pixels.mean((0, 1))]))
                labels.append(label)
        features, labels = np.array(features), np.array(labels)
        train = np.arange(len(labels)) % 2 == 0
        centroids = np.stack([features[train & (labels == c)].mean(0) for c in range(12)])
        guess = np.argmin(((features[~train, None] - centroids[None]) ** 2).sum(-1), axis=1)
        return float((guess == labels[~train]).mean())

    far, near = colour_accuracy("far"), colour_accuracy("near")
    assert far > 0.45 and near < far / 3, (far, near)  # chance: 1/12
