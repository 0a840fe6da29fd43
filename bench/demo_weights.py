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
DEMO_IMAGES_PER_CLASS = 20  # 50 test classes: 1,000 test queries per target
# 36 px is a little larger than the backbone's 32 px input, as photos are larger than 224 px:
# the usual resize-and-crop then works as it does on real data.
DEMO_IMAGE_SIZE = 36
# Threads for pretraining. On an idle 2-core box, 2 threads trained 1.8x faster than one
# (100 steps: 5.5 s vs 9.8 s, 2026-12-02); on a box where another job holds the second core,
# 2 threads were 8x *slower* (60 vs 500 img/s: OpenMP threads spin-wait for each other). So: two
# when the machine is idle enough at the start, else one (``pretrain_threads``); the count
# used is recorded in the weights' JSON. Float sums differ between thread counts, so the
# weights, and every demo number after them, are bitwise reproducible for one thread count
# only (2026-12-06: 60 steps, the same checksum in repeated runs of each count, another one
# between counts); PRETRAIN_THREADS_ENV pins the count.
MAX_PRETRAIN_THREADS = 2
PRETRAIN_THREADS_ENV = "PEFT_DML_PRETRAIN_THREADS"


def pretrain_threads(window_s: float = 0.5) -> int:
    """``$PEFT_DML_PRETRAIN_THREADS`` (1 or 2) when set; else two when this process may use 2+
    CPUs and they are idle now (under half a core busy over ``window_s``, read from
    /proc/stat), else one."""
    import os
    import time

    pinned = os.environ.get(PRETRAIN_THREADS_ENV, "").strip()
    if pinned:
        if pinned not in ("1", "2"):
            from bench.errors import UserError

            raise UserError(f"{PRETRAIN_THREADS_ENV}={pinned!r}: expected 1 or 2 (torch threads for the demo "
                            "backbone's pretraining), or unset to choose by the machine's load")
        return int(pinned)
    try:
        cpus = len(os.sched_getaffinity(0))
        first = _cpu_times()
        time.sleep(window_s)
        second = _cpu_times()
    except (AttributeError, OSError, ValueError):
        return 1
    busy = (second[0] - first[0]) / max(second[1] - first[1], 1) * (os.cpu_count() or 1)  # cores busy
    return MAX_PRETRAIN_THREADS if cpus >= MAX_PRETRAIN_THREADS and busy < 0.5 else 1


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


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
    """Where pretraining writes the weights of ``recipe`` (the cache)."""
    recipe = recipe or DEFAULT_RECIPE  # looked up at call time: tests swap in a tiny recipe
    return Path(cache or cache_dir()) / f"{BACKBONE}-{version(recipe)}.safetensors"


# The default recipe's weights ship with the package (1.2 MB), made by `python -m
# bench.demo_pretrain` with 2 threads; beside them their JSON record (recipe, sha256). Everyone
# then gets the same weights, whatever their thread count, and the demo skips 100 s of pretraining.
ASSETS = Path(__file__).resolve().parent / "assets"


def shipped_file(recipe: Recipe | None = None) -> Path:
    recipe = recipe or DEFAULT_RECIPE
    return ASSETS / f"{BACKBONE}-{version(recipe)}.safetensors"


def find_weights(recipe: Recipe | None = None, cache: Path | None = None) -> Path | None:
    """The weights of ``recipe``: the shipped file when there is one, else the cache's, else None."""
    for path in (shipped_file(recipe), weights_file(recipe, cache)):
        if path.is_file():
            return path
    return None


def sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
