"""Where the demo backbone's pretrained weights live, and the recipe that names them.

Torch-free and side-effect free: ``bench.backbones`` reads ``weights_file()`` to load
``demo_vit`` with ``weights="hub"`` and fails with the command that makes the file when it is
missing; ``bench.demo_pretrain`` trains it. Cache: ``$PEFT_DML_CACHE`` if set, else
``$XDG_CACHE_HOME/peft-dml-bench`` (default ``~/.cache/peft-dml-bench``). Files:
``demo_vit-<version>.safetensors`` (backbone only) and ``demo_vit-<version>.json`` (command,
recipe, source accuracy, time). ``<version>`` is the code version plus a hash of the recipe, so
a changed recipe never reuses stale weights.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Bump when the training code changes what it produces (the recipe hash covers the numbers).
CODE_VERSION = 1
BACKBONE = "demo_vit"
# The demo's target classes are 0..DEMO_CLASSES-1 of family 0; source classes start here.
SOURCE_CLASS_OFFSET = 1000
DEMO_CLASSES = 100
DEMO_IMAGES_PER_CLASS = 20
# 36 px is a little larger than the backbone's 32 px input, as photos are larger than 224 px:
# the usual resize-and-crop then works as it does on real data.
DEMO_IMAGE_SIZE = 36
# The model is tiny (matrices of 96 columns): a second thread gains little on an idle machine,
# and on a shared one the threads wait for each other. On the 2-core dev box with other jobs
# running, 2 threads trained at 60 img/s and 1 thread at 500 img/s. One thread also keeps the
# result independent of the core count.
PRETRAIN_THREADS = 1


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the pretrained weights (hashed into the file name)."""

    source_classes: int = 400
    images_per_class: int = 40
    held_out_per_class: int = 5  # per class, never trained on: the source accuracy
    image_size: int = DEMO_IMAGE_SIZE
    family_seed: int = 0  # the demo's family: the same visual vocabulary
    data_seed: int = 1
    steps: int = 1200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 60
    label_smoothing: float = 0.1
    factor_loss_weight: float = 1.0  # see PretrainHeads
    patch_drop: float = 0.7  # fraction of patch tokens left out of each training image
    # Crops keep at least this fraction of the image's area: the default 8 % of
    # RandomResizedCrop would cut most shapes of a 36 px image out of view.
    min_crop_area: float = 0.35
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DEFAULT_RECIPE = Recipe()


def cache_dir() -> Path:
    override = os.environ.get("PEFT_DML_CACHE")
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "peft-dml-bench"


def version(recipe: Recipe) -> str:
    from bench.results import config_hash

    return f"v{CODE_VERSION}-{config_hash(recipe.to_dict())}"


def weights_file(recipe: Recipe | None = None, cache: Path | None = None) -> Path:
    recipe = recipe or DEFAULT_RECIPE  # looked up at call time: tests swap in a tiny recipe
    return Path(cache or cache_dir()) / f"{BACKBONE}-{version(recipe)}.safetensors"
