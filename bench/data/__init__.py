"""Datasets, transforms and samplers for deep metric learning (SPEC section 2).

Public API::

    load_dataset(name, data_root, *, val_fraction=0.0, seed=0, skip_corrupt=False) -> DatasetSplits
    ImageDataset(split, transform)            # item: (tensor, int label)
    build_transforms(image_size, mean, std, *, train, interpolation="bilinear")
    ClassBalancedBatchSampler(labels, batch_size, samples_per_class, *, seed, num_batches=None)
    make_synthetic_dataset(root, *, num_classes, images_per_class, image_size=48, seed=0,
                           class_offset=0, family_seed=0) -> Path
    verify_images(paths) -> list of paths that do not decode
"""
from bench.data.datasets import DATASET_NAMES, DatasetSplits, Split, check_dataset, load_dataset
from bench.data.errors import DataError
from bench.data.images import ImageDataset, load_image, verify_images
from bench.data.sampler import AugmentationSeeds, ClassBalancedBatchSampler
from bench.data.transforms import build_transforms


def available_cpus() -> int:
    """CPUs this process may use: SLURM's --cpus-per-task when set, else the affinity mask."""
    import os

    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm and slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def loader_workers(num_workers: int | str) -> int:
    """``num_workers: auto``: one loader process per CPU of the job, leaving one for training."""
    if num_workers == "auto":
        return max(available_cpus() - 1, 0)
    return int(num_workers)

__all__ = [
    "AugmentationSeeds",
    "DATASET_NAMES",
    "ClassBalancedBatchSampler",
    "available_cpus",
    "check_dataset",
    "loader_workers",
    "DataError",
    "DatasetSplits",
    "ImageDataset",
    "Split",
    "build_transforms",
    "load_dataset",
    "load_image",
    "make_synthetic_dataset",
    "verify_images",
]


def __getattr__(name):
    # Imported on first use: importing bench.data.synthetic here would make
    # `python -m bench.data.synthetic` run a module that is already imported (runpy warns).
    if name == "make_synthetic_dataset":
        from bench.data.synthetic import make_synthetic_dataset

        return make_synthetic_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
