"""The project's own pretraining of ``demo_vit``: the demo's stand-in for ImageNet-21k.

PEFT methods only make sense on a backbone that already sees something, and the demo cannot
download one. So the demo backbone is pretrained here, once per machine (2-3 minutes on 2 CPU
cores), by supervised classification of generated *source* classes and of their attributes.
A synthetic class is a combination of the family's visual factors (outline, layout, stripe
orientation and frequency); the source classes are combinations disjoint from the demo's own
train and test classes (``class_offset`` 1000 on; the demo uses 0-99). What transfers is the
visual vocabulary, not the classes, as with ImageNet pretraining and CUB.

Public API::

    demo_weights_path(recipe=None, cache=None) -> Path  # trains unless cached, then the path
    pretrain(out, recipe=None) -> dict                  # always trains; returns what the JSON holds
    prepare_demo(data_root) -> Path                     # the demo suite's prepare hook

Where the weights live and what names them: ``bench.demo_weights``. The demo's data:
``bench.data.hooks``. CLI: ``python -m bench.demo_pretrain [--force] [--out PATH] [--data-root DIR]``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from bench.data.hooks import ensure_demo_data, exclusive_lock, generate_once
from bench.demo_weights import (BACKBONE, SOURCE_CLASS_OFFSET, Recipe, pretrain_threads,
                                cache_dir, version, weights_file)
from bench import demo_weights

def demo_weights_path(recipe: Recipe | None = None, cache: Path | None = None,
                      say: Callable[[str], None] | None = None) -> Path:
    """The cached pretrained backbone, trained first if this machine has none yet.

    A file lock makes concurrent callers (parallel cells of the demo) wait for one training
    instead of each starting their own; the weights appear atomically, so a file that exists
    is complete.
    """
    recipe = recipe or demo_weights.DEFAULT_RECIPE
    found = demo_weights.find_weights(recipe, cache)
    if found is not None:
        return found
    path = weights_file(recipe, cache)
    with exclusive_lock(path.with_suffix(".lock")):
        if not path.is_file():  # another process may have finished while we waited
            pretrain(path, recipe, say=say)
    return path


def prepare_demo(data_root, say: Callable[[str], None] | None = None) -> Path:
    """The demo suite's ``prepare`` hook: its data and the pretrained backbone, trained here
    (once per machine) rather than inside a cell, whose time it would distort. What it does
    is said through ``say`` (the caller's events), never printed."""
    root = ensure_demo_data(data_root)
    demo_weights_path(say=say)
    return root


# --- pretraining -----------------------------------------------------------------------------

def pretrain(out: Path, recipe: Recipe | None = None, *, source_dir: Path | None = None,
             threads: int | None = None, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train ``demo_vit`` on the source classes; write ``out`` (safetensors) and ``out.json``.

    The source images are generated into ``source_dir`` (default: beside ``out``) and kept,
    so that training again (``--force``) skips that step.
    """
    import torch

    recipe = recipe or demo_weights.DEFAULT_RECIPE
    out = Path(out)
    source_dir = Path(source_dir) if source_dir is not None else out.parent
    say = say or (lambda msg: None)
    say(f"{BACKBONE}: pretraining the demo backbone once for this machine ({recipe.steps} steps on "
        f"{recipe.source_classes} generated source classes, about 2-3 minutes on 2 CPU cores) -> {out}")
    start = time.perf_counter()
    source = _source_data(source_dir / f"demo-source-{version(recipe)}", recipe)
    images, labels, held_out = _load_images(source, recipe)
    train_seconds_start = time.perf_counter()
    threads = threads or pretrain_threads()
    with _deterministic(recipe.seed), _torch_threads(threads):
        backbone, heads = _train(images[~held_out], labels[~held_out], recipe)
        accuracy = _held_out_accuracy(backbone, heads, images[held_out], labels[held_out])
    seconds = time.perf_counter() - start
    record = {
        "backbone": BACKBONE,
        "version": version(recipe),
        "command": _command_line(),
        "recipe": recipe.to_dict(),
        "source_data": {"root": str(source), "num_classes": recipe.source_classes,
                        "class_offset": SOURCE_CLASS_OFFSET, "family_seed": recipe.family_seed,
                        "images_per_class": recipe.images_per_class, "image_size": recipe.image_size,
                        "seed": recipe.data_seed},
        # top-1 on images never trained on: the class, and each factor (chance: 1/400, 1/16,
        # 1/12, 1/5, 1/3). Low class top-1 is expected: a class is right only if all four are.
        "source_top1_held_out": accuracy["class"],
        "source_factor_top1_held_out": {k: v for k, v in accuracy.items() if k != "class"},
        "train_seconds": time.perf_counter() - train_seconds_start,
        "total_seconds": seconds,
        "torch": torch.__version__,
        "threads": threads,
    }
    _save(out, backbone, record)
    factors = ", ".join(f"{k} {100 * v:.0f} %" for k, v in accuracy.items() if k != "class")
    say(f"{BACKBONE}: pretrained in {seconds:.0f} s (held-out top-1: class {100 * accuracy['class']:.1f} %, "
        f"{factors})")
    return record


def _source_data(root: Path, recipe: Recipe) -> Path:
    return generate_once(root, num_classes=recipe.source_classes, images_per_class=recipe.images_per_class,
                          image_size=recipe.image_size, seed=recipe.data_seed,
                          class_offset=SOURCE_CLASS_OFFSET, family_seed=recipe.family_seed)


def _load_images(root: Path, recipe: Recipe):
    """All source images as one uint8 tensor: at this size they fit in memory many times over,
    and augmenting whole batches on tensors is far cheaper than a DataLoader per image."""
    import numpy as np
    import torch
    from PIL import Image

    folders = sorted(p for p in (root / "images").iterdir() if p.is_dir())
    pixels, labels, held_out = [], [], []
    for label, folder in enumerate(folders):
        files = sorted(folder.glob("*.jpg"))
        for index, file in enumerate(files):
            with Image.open(file) as image:
                pixels.append(np.asarray(image.convert("RGB")))
            labels.append(label)
            held_out.append(index >= len(files) - recipe.held_out_per_class)
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(labels), torch.tensor(held_out)


@contextmanager
def _deterministic(seed: int):
    """Seeded torch RNG for the duration, restored afterwards (the caller may be a cell)."""
    import torch

    saved = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(saved)


# The synthetic family's factors, in the column order of Family.combinations.
FACTOR_NAMES = ("outline", "layout", "orientation", "frequency")


class PretrainHeads:
    """Linear classifiers on the CLS feature: the source class, and each of its factors.

    The factor labels (outline, layout, stripe orientation, stripe frequency) are the source
    classes' attributes, as ImageNet classes come with a hierarchy and CUB with attributes.
    Class labels alone teach the ViT too slowly for a budget of minutes (held-out top-1 at
    chance after 300 steps); each factor is shared by dozens of source classes, so its
    labels give every image four dense signals about the vocabulary the demo's classes use.
    """

    def __init__(self, width: int, recipe: Recipe):
        import torch

        from bench.data.synthetic import make_family

        combinations = make_family(recipe.family_seed).combinations
        first = SOURCE_CLASS_OFFSET
        self.factors = torch.as_tensor(combinations[first:first + recipe.source_classes])  # label -> factors
        sizes = [int(combinations[:, j].max()) + 1 for j in range(combinations.shape[1])]
        self.classes = torch.nn.Linear(width, recipe.source_classes)
        self.factor_heads = torch.nn.ModuleList(torch.nn.Linear(width, n) for n in sizes)
        self.recipe = recipe

    def parameters(self):
        return [*self.classes.parameters(), *self.factor_heads.parameters()]

    def loss(self, features, labels):
        import torch.nn.functional as F

        loss = F.cross_entropy(self.classes(features), labels, label_smoothing=self.recipe.label_smoothing)
        factors = self.factors[labels]
        for j, head in enumerate(self.factor_heads):
            loss = loss + self.recipe.factor_loss_weight * F.cross_entropy(head(features), factors[:, j])
        return loss


@contextmanager
def _torch_threads(count: int):
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _train(images, labels, recipe: Recipe):
    import torch
    from timm.layers import PatchDropout

    from bench.backbones import create_backbone

    backbone = create_backbone(BACKBONE, weights=None)
    # Training on a random 30 % of the patches is ~2.5x cheaper per image and, for a fixed
    # time, gave better features than all patches (kNN R@1 on the demo's test classes 16 vs 12).
    # Evaluation (and every later use of the weights) sees all patches: the module is a no-op
    # in eval mode and has no parameters, so the saved state dict is unchanged.
    backbone.patch_drop = PatchDropout(recipe.patch_drop, num_prefix_tokens=backbone.num_prefix_tokens)
    heads = PretrainHeads(backbone.embed_dim, recipe)
    params = list(backbone.parameters()) + heads.parameters()
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, recipe))
    generator = torch.Generator().manual_seed(recipe.seed)
    size = _input_size(backbone)
    order = torch.empty(0, dtype=torch.long)
    backbone.train()
    for _ in range(recipe.steps):
        if len(order) < recipe.batch_size:  # epochs of a fresh permutation; the remainder carries over
            order = torch.cat([order, torch.randperm(len(labels), generator=generator)])
        batch, order = order[:recipe.batch_size], order[recipe.batch_size:]
        inputs = _augment(images[batch], size, recipe.min_crop_area, generator)
        loss = heads.loss(backbone(inputs), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # early ViT steps spike without it
        optimizer.step()
        schedule.step()
    backbone.patch_drop = torch.nn.Identity()
    return backbone, heads


def _lr_factor(step: int, recipe: Recipe) -> float:
    """Linear warmup, then cosine to zero."""
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(recipe.steps - recipe.warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _input_size(backbone) -> int:
    return int(backbone.pretrained_cfg["input_size"][-1])


def _normalise(images):
    # demo_vit's pretrained_cfg: mean 0.5, std 0.5, as the benchmark's transforms use
    return (images.float() / 255 - 0.5) / 0.5


def _augment(images, size: int, min_area: float, generator):
    """Per-image random resized crop (area >= min_area, aspect 3/4-4/3) and horizontal flip,
    as one batched affine resampling. The synthetic classes are flip-invariant by design."""
    import torch

    n = len(images)
    area = min_area + (1 - min_area) * torch.rand(n, generator=generator)
    log_ratio = (torch.rand(n, generator=generator) * 2 - 1) * math.log(4 / 3)
    width = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    height = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    shift_x = (torch.rand(n, generator=generator) * 2 - 1) * (1 - width)
    shift_y = (torch.rand(n, generator=generator) * 2 - 1) * (1 - height)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width * flip, shift_x
    theta[:, 1, 1], theta[:, 1, 2] = height, shift_y
    return _resample(images, theta, size)


def _centre_view(images, size: int):
    """The benchmark's test view: resize to size * 256/224, centre crop ``size``."""
    import torch

    fraction = size / round(size * 256 / 224)
    theta = torch.tensor([[fraction, 0.0, 0.0], [0.0, fraction, 0.0]]).expand(len(images), 2, 3)
    return _resample(images, theta, size)


def _resample(images, theta, size: int):
    import torch.nn.functional as F

    grid = F.affine_grid(theta, [len(images), 3, size, size], align_corners=False)
    return F.grid_sample(_normalise(images), grid, mode="bilinear", padding_mode="border", align_corners=False)


def _held_out_accuracy(backbone, heads: PretrainHeads, images, labels, batch_size: int = 500) -> dict[str, float]:
    import torch

    backbone.eval()
    size = _input_size(backbone)
    heads_by_name = {"class": heads.classes, **dict(zip(FACTOR_NAMES, heads.factor_heads))}
    targets = {"class": labels, **{name: heads.factors[labels][:, j] for j, name in enumerate(FACTOR_NAMES)}}
    correct = dict.fromkeys(heads_by_name, 0)
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            features = backbone(_centre_view(images[start:start + batch_size], size))
            for name, head in heads_by_name.items():
                predicted = head(features).argmax(1)
                correct[name] += int((predicted == targets[name][start:start + batch_size]).sum())
    return {name: count / max(len(labels), 1) for name, count in correct.items()}


def _command_line() -> str:
    args = sys.argv[1:] if sys.argv and sys.argv[0].endswith("demo_pretrain.py") else None
    if args is not None:
        return " ".join(["python -m bench.demo_pretrain", *args])
    return " ".join(["python", *sys.argv])  # trained on first use, by whatever needed the weights


def _save(out: Path, backbone, record: dict[str, Any]) -> None:
    """JSON first, then the weights by atomic rename: existing weights always have their record."""
    from safetensors.torch import save_file

    from bench.results import atomic_write_json

    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in backbone.state_dict().items()}
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        save_file(state, str(tmp), metadata={"backbone": BACKBONE, "version": record["version"]})
        record["sha256"] = demo_weights.sha256(tmp)  # the shipped copy is checked against it
        atomic_write_json(out.with_suffix(".json"), record)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


# --- command line ----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.demo_pretrain",
                                     description=f"Pretrain the demo backbone ({BACKBONE}) on generated "
                                                 "source classes (once: the weights are cached) and print "
                                                 "where the weights are.")
    parser.add_argument("--force", action="store_true", help="train again even if the weights exist")
    parser.add_argument("--out", default=None,
                        help=f"weights file to write (default: the cache, {weights_file()})")
    parser.add_argument("--data-root", default=None,
                        help="also write the demo's dataset into DATA_ROOT/synthetic unless it is there")
    args = parser.parse_args(argv)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731  (a command: it prints)
    if args.data_root is not None:
        print(f"demo data: {ensure_demo_data(args.data_root)}")
    if args.out is not None:
        path = Path(args.out)
        if path.is_file() and not args.force:
            print(f"{path} exists; use --force to train again")
            return 0
        pretrain(path, source_dir=cache_dir(), say=say)
    elif args.force:
        path = weights_file()
        with exclusive_lock(path.with_suffix(".lock")):
            pretrain(path, say=say)
    else:
        path = demo_weights_path(say=say)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
