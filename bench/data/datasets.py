"""The standard DML datasets as labelled splits of image paths (SPEC section 2).

``load_dataset(name, data_root)`` looks for the dataset in ``<data_root>/<name>/`` and also
accepts ``data_root`` being the dataset folder itself (when it already has the layout). Where
each dataset's files must be is described in ``bench.data.layouts``.

Labels are contiguous ``0..C-1`` within each split, numbered in the order classes first appear
in the layout (sorted folder order, or index-file order); ``class_names`` maps them back. In-Shop
query and gallery share one class list, so their labels can be compared directly.
"""
from __future__ import annotations

import os
from pathlib import Path
from dataclasses import dataclass

import numpy as np

from bench.data.errors import DataError, list_some
from bench.data.images import verify_images
from bench.data.layouts import LAYOUTS, Entry, Layout, resolve_root

DATASET_NAMES = tuple(LAYOUTS)


@dataclass
class Split:
    """One list of images with integer labels."""

    paths: list[str]  # absolute paths
    labels: np.ndarray  # int64, indexes class_names
    class_names: list[str]  # label -> original class name or id

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def from_entries(cls, entries: list[Entry], class_names: list[str] | None = None) -> "Split":
        """Labels follow ``class_names``, by default the order in which classes first appear."""
        if class_names is None:
            class_names = list(dict.fromkeys(name for _, name in entries))
        index = {name: label for label, name in enumerate(class_names)}
        labels = np.fromiter((index[name] for _, name in entries), dtype=np.int64, count=len(entries))
        return cls([path for path, _ in entries], labels, list(class_names))

    def select_classes(self, labels) -> "Split":
        """The images of the given classes, relabelled 0..len(labels)-1 in the given order."""
        labels = np.asarray(labels, dtype=np.int64)
        new_label = np.full(self.num_classes, -1, dtype=np.int64)
        new_label[labels] = np.arange(len(labels))
        keep = np.flatnonzero(new_label[self.labels] >= 0)
        return Split([self.paths[i] for i in keep], new_label[self.labels[keep]],
                     [self.class_names[label] for label in labels])


@dataclass
class DatasetSplits:
    name: str
    root: str  # the dataset folder that was read
    train: Split
    val: Split | None  # class-disjoint validation classes carved from train
    test: Split | None  # None for inshop
    query: Split | None  # inshop only
    gallery: Split | None  # inshop only, same class list as query
    num_skipped: int = 0  # empty or undecodable images left out (skip_corrupt=True)
    fingerprint: str = ""  # of the image list as listed (data_fingerprint): what a result was computed on

    def record(self) -> dict:
        """What ``result.json`` keeps of the splits (``data``), so that a wrong split is visible:
        per split the classes, images and first and last class names; the lone queries (a test
        image with no other image of its class to find, left out of every metric)."""
        present = [(name, getattr(self, name)) for name in ("train", "val", "test", "query", "gallery")]
        splits = {name: {"classes": split.num_classes, "images": len(split),
                         "first_class": split.class_names[0], "last_class": split.class_names[-1]}
                  for name, split in present if split is not None}
        return {"dataset": self.name, "root": self.root, "splits": splits, "lone_queries": self.lone_queries(),
                "skipped_images": self.num_skipped, "fingerprint": self.fingerprint}

    def lone_queries(self) -> int:
        if self.query is not None and self.gallery is not None:
            in_gallery = set(self.gallery.labels.tolist())
            return int(sum(1 for label in self.query.labels.tolist() if label not in in_gallery))
        if self.test is None:
            return 0
        return int((np.bincount(self.test.labels) == 1).sum())

    def summary(self) -> str:
        """'cub200: train 100 classes / 5864 images, test 100 / 5924' for logs."""
        present = [(name, getattr(self, name)) for name in ("train", "val", "test", "query", "gallery")]
        parts = [f"{name} {split.num_classes} classes / {len(split)} images"
                 for name, split in present if split is not None]
        skipped = f" ({self.num_skipped} unreadable images skipped)" if self.num_skipped else ""
        return f"{self.name}: " + ", ".join(parts) + skipped


def load_dataset(name: str, data_root, *, val_fraction: float = 0.0, seed: int = 0,
                 skip_corrupt: bool = False, train_fraction: float = 1.0, train_classes_fraction: float = 1.0,
                 min_per_class: int = 1) -> DatasetSplits:
    """Index dataset ``name`` found in ``<data_root>/<name>/`` (or in ``data_root`` itself).

    Zero-byte files are an error naming them unless ``skip_corrupt``; with it they and every
    image that fails a full decode (slow: reads every image once) are left out and counted in
    ``num_skipped``. Without it, an image that does not decode is reported when first read.
    ``val_fraction`` > 0 moves that fraction of the train classes, chosen with ``seed``, to
    ``val``. Then ``train_classes_fraction`` keeps a seeded share of the remaining training
    classes and ``train_fraction`` a seeded, class-stratified share of each class's images
    (every class keeps at least ``min_per_class``): the training-data-size ablation. The
    validation and test splits are never reduced.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction}: expected a fraction in [0, 1)")
    root, layout = dataset_root(name, data_root)
    parsed = layout.parse(root)
    check_disjoint(parsed, root)
    fingerprint = fingerprint_entries(parsed, root)
    entries, num_skipped = drop_unreadable(parsed, root, skip_corrupt)
    splits = make_splits(entries, root)
    if "val" in splits:  # your own validation classes (csv:NAME's split column)
        if val_fraction:
            raise DataError(f"{root}: the index file lists val rows (your validation classes); with them, "
                            f"val_fraction must be 0, got {val_fraction}")
        train, val = splits["train"], splits["val"]
    else:
        train, val = carve_validation(splits["train"], val_fraction, seed)
    train = subset_classes(train, train_classes_fraction, seed)
    train = subset_images(train, train_fraction, seed, min_per_class)
    return DatasetSplits(name=name, root=str(root), train=train, val=val,
                         test=splits.get("test"), query=splits.get("query"),
                         gallery=splits.get("gallery"), num_skipped=num_skipped, fingerprint=fingerprint)


def data_fingerprint(name: str, data_root) -> str:
    """What identifies a dataset's content without reading an image: a hash of every listed
    image's split, path (relative to the dataset folder), class and size in bytes. A finished
    result is reused only for data with the same fingerprint (bench.runner)."""
    root, layout = dataset_root(name, data_root)
    return fingerprint_entries(layout.parse(root), root)


def fingerprint_entries(entries: dict[str, list[Entry]], root) -> str:
    import hashlib

    digest = hashlib.sha256()
    for split in sorted(entries):
        for path, class_name in entries[split]:
            try:
                size = os.stat(path).st_size
            except OSError:
                size = -1
            digest.update(f"{split}\0{os.path.relpath(path, root)}\0{class_name}\0{size}\n".encode())
    return "sha256:" + digest.hexdigest()[:32]


def check_dataset(name: str, data_root) -> None:
    """What ``load_dataset`` checks before reading any image: the folder, the layout, the index
    files, paths inside the dataset folder and disjoint splits (cheap: run before queueing)."""
    root, layout = dataset_root(name, data_root)
    check_disjoint(layout.parse(root), root)


def dataset_root(name: str, data_root) -> tuple[Path, Layout]:
    """The dataset folder ``name`` reads in ``data_root`` and its layout: a catalog dataset, or
    your own (``folder:NAME`` / ``csv:NAME``: ``<data_root>/NAME/``, or ``data_root`` itself when it
    is that folder)."""
    from bench.catalog import own_dataset
    from bench.data.own import OWN_LAYOUTS

    own = own_dataset(name)
    if own is not None:
        kind, folder = own
        layout = OWN_LAYOUTS[kind]
        base = Path(data_root).expanduser()
        if base.name == folder and base.is_dir() and not (base / folder).is_dir():
            return Path(os.path.abspath(base)), layout
        return resolve_root(folder, data_root, layout), layout
    if name not in LAYOUTS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}, or your own images as "
                        "folder:NAME or csv:NAME")
    return resolve_root(name, data_root, LAYOUTS[name]), LAYOUTS[name]


def check_disjoint(entries: dict[str, list[Entry]], root) -> None:
    """DML's protocol evaluates on classes never trained on: train must share no image and no
    class with the evaluation splits (query and gallery share classes by design)."""
    evaluated = [split for split in ("val", "test", "query", "gallery") if split in entries]
    train_paths = {os.path.normpath(path) for path, _ in entries["train"]}
    train_classes = {name for _, name in entries["train"]}
    for split in evaluated:
        shared = [path for path, _ in entries[split] if os.path.normpath(path) in train_paths]
        if shared:
            raise DataError(f"{root}: {len(shared)} images are listed in both train and {split}: "
                            f"{list_some(shared)}; the splits must not overlap")
        classes = sorted({name for _, name in entries[split]} & train_classes)
        if classes:
            raise DataError(f"{root}: {len(classes)} classes are in both train and {split} "
                            f"({list_some(classes)}); deep metric learning evaluates on unseen classes")


def drop_unreadable(entries: dict[str, list[Entry]], root, skip_corrupt: bool):
    """Entries without missing, empty (and, if skipping, undecodable) files; and how many went."""
    paths = list(dict.fromkeys(path for split in entries.values() for path, _ in split))
    missing, empty = find_missing_and_empty(paths)
    if missing:
        raise DataError(f"{root}: {len(missing)} listed images do not exist: {list_some(missing)}")
    if empty and not skip_corrupt:
        raise DataError(f"{root}: {len(empty)} image files are empty (0 bytes): {list_some(empty)}; "
                        "replace or delete them, or leave them out with --set skip_corrupt_images=true "
                        "(in a suite: defaults: {skip_corrupt_images: true})")
    if not skip_corrupt:
        return entries, 0
    bad = set(empty)
    bad.update(verify_images(path for path in paths if path not in bad))
    kept = {split: [entry for entry in items if entry[0] not in bad] for split, items in entries.items()}
    num_skipped = sum(len(entries[split]) - len(kept[split]) for split in entries)
    return kept, num_skipped


def find_missing_and_empty(paths) -> tuple[list[str], list[str]]:
    """A cheap ``stat`` per file: finds absent and zero-byte files without reading images."""
    missing, empty = [], []
    for path in paths:
        try:
            if os.stat(path).st_size == 0:
                empty.append(path)
        except FileNotFoundError:
            missing.append(path)
    return missing, empty


def make_splits(entries: dict[str, list[Entry]], root) -> dict[str, Split]:
    for split, items in entries.items():
        if not items:
            raise DataError(f"{root}: no readable images left in the {split} split")
    splits = {split: Split.from_entries(items) for split, items in entries.items()
              if split not in ("query", "gallery")}
    if "query" in entries:
        # One class list for both, so a query's label can be matched against the gallery's.
        shared = list(dict.fromkeys(name for split in ("query", "gallery")
                                    for _, name in entries[split]))
        splits["query"] = Split.from_entries(entries["query"], shared)
        splits["gallery"] = Split.from_entries(entries["gallery"], shared)
    return splits


def subset_classes(train: Split, fraction: float, seed: int) -> Split:
    """A seeded share of the classes (at least 2), chosen as NumPy's PCG64 with the seed chooses:
    the same classes on every machine."""
    if fraction >= 1.0:
        return train
    keep = max(2, round(fraction * train.num_classes))
    rng = np.random.default_rng([seed, 0x5C1A55])
    return train.select_classes(np.sort(rng.choice(train.num_classes, size=keep, replace=False)))


def subset_images(train: Split, fraction: float, seed: int, min_per_class: int) -> Split:
    """Per class, a seeded ``round(fraction * n)`` of its images, at least ``min_per_class`` (or
    all it has): class balance is kept and the images are a pure function of the seed."""
    if fraction >= 1.0:
        return train
    rng = np.random.default_rng([seed, 0x1A6E5])
    kept: list[int] = []
    for label in range(train.num_classes):
        members = np.flatnonzero(train.labels == label)
        count = min(len(members), max(min_per_class, round(fraction * len(members))))
        kept.extend(np.sort(rng.choice(members, size=count, replace=False)).tolist())
    kept.sort()
    return Split([train.paths[i] for i in kept], train.labels[kept], list(train.class_names))


def carve_validation(train: Split, val_fraction: float, seed: int) -> tuple[Split, Split | None]:
    """Move round(val_fraction * C) randomly chosen train classes (at least 1) to validation."""
    if val_fraction == 0:
        return train, None
    num_val = max(1, round(val_fraction * train.num_classes))
    if train.num_classes - num_val < 2:
        raise DataError(f"val_fraction={val_fraction} leaves {train.num_classes - num_val} of "
                        f"{train.num_classes} train classes for training; at least 2 must remain")
    rng = np.random.default_rng(seed)
    val_classes = np.sort(rng.choice(train.num_classes, size=num_val, replace=False))
    train_classes = np.setdiff1d(np.arange(train.num_classes), val_classes)
    return train.select_classes(train_classes), train.select_classes(val_classes)
