"""Suite ``prepare`` hooks that make a data root ready: generated data, written once.

A suite names one with ``prepare: module:function``; it runs once per data root on the
submitting machine, before any cell. The demo's hook, which also pretrains the demo backbone,
is ``bench.demo_pretrain:prepare_demo``.
"""
from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from bench.demo_weights import DEMO_CLASSES, DEMO_IMAGE_SIZE, DEMO_IMAGES_PER_CLASS


@contextmanager
def exclusive_lock(lock_path: Path):
    """Blocks until this process holds ``lock_path`` (made if missing) exclusively."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocks: waiting beats training twice
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_synthetic_data(data_root, say=None) -> Path:
    """``<data_root>/synthetic`` as it is when present (any generated dataset), else the demo's."""
    root = Path(data_root) / "synthetic"
    return root if root.exists() else ensure_demo_data(data_root)


def ensure_demo_data(data_root) -> Path:
    """Write the demo's two target datasets unless they are there: ``<data_root>/synthetic``
    (*near*: 100 classes of family 0, ids 0-99, disjoint from the pretraining classes) and
    ``<data_root>/synthetic_far`` (*far*: 100 colour classes of the same family, a factor the
    pretraining ignored). The first 50 classes train, the last 50 test, as
    ``load_dataset('synthetic', ...)`` splits them; 20 images each. Cheap (a few seconds) and
    idempotent: a finished dataset is reused."""
    common = dict(num_classes=DEMO_CLASSES, images_per_class=DEMO_IMAGES_PER_CLASS, image_size=DEMO_IMAGE_SIZE,
                  seed=0, class_offset=0, family_seed=0)
    generate_once(Path(data_root) / "synthetic_far", variant="far", **common)
    return generate_once(Path(data_root) / "synthetic", **common)


def generate_once(root: Path, **arguments) -> Path:
    """``make_synthetic_dataset`` into a temporary sibling, renamed into place when complete.

    A run killed half-way then leaves no half-written dataset, which the generator would
    refuse ever after; the lock keeps two processes from writing the same one.
    """
    from bench.data import make_synthetic_dataset

    if not root.exists():
        with exclusive_lock(root.parent / f".{root.name}.lock"):
            if not root.exists():
                partial = root.parent / f".{root.name}.partial"
                shutil.rmtree(partial, ignore_errors=True)  # a killed run's; the lock is ours
                make_synthetic_dataset(partial, **arguments)
                os.replace(partial, root)
    return make_synthetic_dataset(root, **arguments)  # checks that the arguments match


