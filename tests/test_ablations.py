"""The ablations (issue 14): the new accumulators, prompt location and output pooling checked
against hand computation, every method on register-token and pre-norm ViTs, the seeded
training-data subsets, and a tiny run of each new ablation suite producing its figure."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from bench.config import CellConfig
from bench.learner import build_learner
from bench.train import build_optimizers, train_step
from tests.tiny import tiny_config

SMALL = {"prompt_depth": 3, "class_prompt_depth": 3, "num_prompts": 4, "num_class_prompts": 2}


def learner(method="vptsp_g", backbone="vit_test", num_classes=4, output="cls", **args):
    torch.manual_seed(0)
    config = CellConfig(backbone=backbone, weights=None, embedding_size=16, method=method, output=output,
                        method_args={**{k: v for k, v in SMALL.items() if k in _accepted(method)}, **args})
    return build_learner(config, num_classes)


def _accepted(method):
    from methods.registry import method_arguments

    return method_arguments(method)


def batch(size=32, classes=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, size, size, generator=g), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]) % classes


def step(l, images, labels):
    optimizers = build_optimizers(l, CellConfig(optimizer="adamw", lr=1e-2, proxy_lr=1e-2, weight_decay=0.0))
    l.train()
    return train_step(l, images, labels, optimizers)


# --- accumulators ---------------------------------------------------------------------------

def test_mean_accumulator_is_the_exact_mean_of_every_vector_seen():
    l = learner(accumulator="mean", proxy_bias_ratio=0.0)
    module = l.extras["semantic_proxies"]
    seen = {c: [] for c in range(4)}
    original = module.semantic_vectors

    def recording(learner_, images, labels):
        vectors = original(learner_, images, labels)
        for v, c in zip(vectors.detach(), labels.tolist()):
            seen[c].append(v.float())
        return vectors

    module.semantic_vectors = recording
    for s in range(3):
        images, labels = batch(seed=s)
        step(l, images, labels[[0, 1, 2, 3, 4, 5, 6, 7]] if s else labels)
    for c, vectors in seen.items():
        exact = torch.stack(vectors).mean(0)
        torch.testing.assert_close(module.mean.total[c] / module.mean.count[c], exact, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(module.memory[c], F.normalize(exact, dim=0), rtol=1e-5, atol=1e-6)
        assert module.mean.count[c] == len(vectors)


def test_attention_accumulator_equals_its_equations():
    l = learner(accumulator="attention")
    attention = l.extras["semantic_proxies"].attention
    torch.manual_seed(3)
    h = F.normalize(torch.randn(2, 16), dim=1)
    vectors = F.normalize(torch.randn(3, 16), dim=1)
    inverse = torch.tensor([0, 1, 0])  # class 0 has v0 and v2, class 1 has v1
    membership = F.one_hot(inverse, 2)
    out = attention(h, vectors, inverse, membership)
    for row, members in ((0, [0, 2]), (1, [1])):
        tokens = torch.cat([h[row:row + 1], vectors[members]])
        q = h[row] @ attention.query.weight.T
        scores = (tokens @ attention.key.weight.T) @ q / math.sqrt(16)
        expected = h[row] + torch.softmax(scores, 0) @ (tokens @ attention.value.weight.T)
        torch.testing.assert_close(out[row], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("accumulator", ["mean", "attention"])
def test_new_accumulators_train_what_they_should_and_nothing_else(accumulator):
    l = learner(accumulator=accumulator)
    frozen = {n: p.detach().clone() for n, p in l.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in l.named_parameters() if p.requires_grad}
    step(l, *batch())
    params = dict(l.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    moved = {n for n, v in trainable.items() if not torch.equal(params[n], v)}
    if accumulator == "attention":
        assert {n for n in trainable if ".attention." in n} <= moved  # query, key, value learn
    assert any("class_prompts" in n for n in moved) and any(n.startswith("model.head") for n in moved)


# --- prompt location and output pooling ------------------------------------------------------

def block_inputs(l, images):
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
             for b in l.model.backbone.blocks]
    with torch.no_grad():
        l.model.features(images)
    for h in hooks:
        h.remove()
    return seen


def test_added_prompts_are_summed_onto_the_patch_tokens():
    l = learner("vpt_deep", prompt_location="add", prompt_depth=2).eval()
    plain = learner("linear_probe").eval()
    images, _ = batch()
    added, original = block_inputs(l, images), block_inputs(plain, images)
    tokens = l.extras["prompts"].tokens
    assert tokens[0].shape[0] == l.model.backbone.patch_embed.num_patches  # one prompt per patch
    assert added[0].shape == original[0].shape  # no tokens inserted
    torch.testing.assert_close(added[0][:, 1:], original[0][:, 1:] + tokens[0])
    torch.testing.assert_close(added[0][:, 0], original[0][:, 0])  # the CLS token untouched


def test_mean_output_averages_the_patch_tokens_without_prompts_and_cls():
    l = learner("vpt_deep", output="mean", num_prompts=3, prompt_depth=3).eval()
    images, _ = batch()
    final = {}
    hook = l.model.backbone.norm.register_forward_hook(lambda m, a, out: final.setdefault("x", out.detach()))
    with torch.no_grad():
        features = l.model.features(images)
    hook.remove()
    torch.testing.assert_close(features, final["x"][:, 1 + 3:].mean(1))  # CLS and the 3 prompts left out


# --- backbones with register tokens and a pre-norm ----------------------------------------------

METHODS = ["zero_shot", "linear_probe", "bitfit", "adapter", "lora", "vpt_shallow", "vpt_deep", "vptsp_g+bitfit",
           "full_ft"]


@pytest.mark.parametrize("backbone, size, prefix", [("vit_test_dinov2", 28, 5), ("vit_test_clip", 32, 1)])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_other_pretrainings_architectures(backbone, size, prefix, method):
    extra = {"adapter_blocks": 2} if "adapter" in method else {}
    l = learner(method, backbone=backbone, **extra)
    images, labels = batch(size)
    assert l.model.backbone.num_prefix_tokens == prefix
    if method != "zero_shot":
        assert math.isfinite(step(l, images, labels).item())
    if method == "vpt_deep":  # prompts after all prefix tokens (CLS and the registers)
        first = block_inputs(l.eval(), images)[0]
        torch.testing.assert_close(first[:, prefix:prefix + 4], l.extras["prompts"].tokens[0].expand(8, -1, -1))
    with torch.no_grad():
        assert l.eval()(images).shape[0] == 8


def test_each_backbone_brings_its_own_normalisation():
    from bench.backbones import create_backbone, data_config

    clip = data_config(create_backbone("vit_test_clip"))
    assert clip.mean == pytest.approx((0.4815, 0.4578, 0.4082), abs=1e-4) and clip.interpolation == "bicubic"


# --- training-data subsets -------------------------------------------------------------------

def test_train_fraction_keeps_class_balance_and_is_a_function_of_the_seed(tmp_path):
    from bench.data import load_dataset, make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "synthetic", num_classes=8, images_per_class=20, image_size=16)
    full = load_dataset("synthetic", tmp_path)
    quarter = load_dataset("synthetic", tmp_path, train_fraction=0.25, seed=3, min_per_class=2)
    assert np.bincount(quarter.train.labels).tolist() == [5] * 4  # every class, a quarter each
    assert set(quarter.train.paths) <= set(full.train.paths)
    again = load_dataset("synthetic", tmp_path, train_fraction=0.25, seed=3, min_per_class=2)
    other = load_dataset("synthetic", tmp_path, train_fraction=0.25, seed=4, min_per_class=2)
    assert again.train.paths == quarter.train.paths != other.train.paths
    # the same subset on every machine: NumPy's PCG64 with this seed picks these first images
    assert [Path(p).name for p in quarter.train.paths[:3]] == EXPECTED_FIRST
    tiny = load_dataset("synthetic", tmp_path, train_fraction=0.01, seed=0, min_per_class=2)
    assert np.bincount(tiny.train.labels).tolist() == [2] * 4  # at least samples_per_class
    assert quarter.test.paths == full.test.paths  # the test split is never reduced
    half_classes = load_dataset("synthetic", tmp_path, train_classes_fraction=0.5, seed=0)
    assert half_classes.train.num_classes == 2


EXPECTED_FIRST = ["0000_0006.jpg", "0000_0007.jpg", "0000_0013.jpg"]  # written down once, 2026-12-02


# --- a tiny run of each new suite: its figures ------------------------------------------------

TINY = tiny_config(dataset="synthetic", image_size=None, max_steps_per_epoch=5, eval_batch_size=256,
                   interpolation=None, lr_cosine_period=None)
SCALE = {"prompt_depth": 3, "class_prompt_depth": 3, "adapter_blocks": 2, "num_prompts": 4, "num_class_prompts": 1}


def tiny_copy(name: str, tmp_path: Path) -> Path:
    """The shipped suite on generated data, the test ViT, one seed and one epoch of two steps."""
    from bench.suite import SUITES_DIR

    data = yaml.safe_load((SUITES_DIR / f"{name}.yaml").read_text())
    data["name"] = f"tiny_{name}"
    grids = data["grid"] if isinstance(data["grid"], list) else [data["grid"]]
    for grid in grids:
        grid["seed"] = [0]
        grid.pop("dataset", None)
        if "backbone" in grid:
            grid["backbone"] = ["vit_test", "vit_test_dinov2", "vit_test_clip"]
        for entry in grid.get("method", []):
            if isinstance(entry, dict):
                entry["args"] = {k: min(v, SCALE[k]) if k in SCALE else v for k, v in (entry.get("args") or {}).items()}
        for axis in ("num_prompts", "prompt_depth"):
            if axis in grid:
                grid[axis] = sorted({min(v, 3 if axis == "prompt_depth" else 12) for v in grid[axis]})
    data["defaults"] = {**{k: v for k, v in (data.get("defaults") or {}).items()
                           if k not in ("backbone", "dataset", "image_size", "amp")}, **TINY}
    if "backbone" in str(grids):
        data["defaults"].pop("backbone")
    for k in ("num_prompts", "prompt_depth"):
        if k in data["defaults"]:
            data["defaults"][k] = min(data["defaults"][k], SCALE[k])
    data["overrides"] = [o for o in data.get("overrides", []) if "dataset" not in (o.get("when") or {})]
    for o in data["overrides"]:
        o.get("set", {}).pop("lr", None)
    data.pop("resources", None)
    path = tmp_path / f"tiny_{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name, figures", [
    ("ablation_datasize", {"ablation_train_fraction"}),
    ("ablation_accumulator", {"ablation_accumulator"}),
    ("ablation_pretraining", {"ablation_backbone"}),
    ("ablation_vpt", {"ablation_num_prompts", "ablation_prompt_depth", "ablation_prompt_location", "ablation_output"}),
])
def test_each_new_ablation_suite_runs_tiny_and_draws_its_figure(tmp_path, synthetic_root, name, figures, capsys):
    import peft_dml_cli as cli

    path = tiny_copy(name, tmp_path)
    code = cli.main(["run", str(path), "--executor", "local", "--data-root", str(synthetic_root),
                     "--out", str(tmp_path / "out"), "--jobs", "2"])
    assert code == 0, capsys.readouterr().out[-3000:]
    drawn = {p.stem for p in (tmp_path / "out" / f"tiny_{name}" / "report" / "figures").glob("*.png")}
    assert figures <= drawn, drawn
