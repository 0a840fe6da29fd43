"""Your own images as a dataset: ``folder:NAME`` and ``csv:NAME`` (README, "Your own dataset").

``folder:NAME`` reads ``<data_root>/NAME/<class>/<image>``: one folder per class, classes in
natural order (``class2`` before ``class10``), the first half of them train, the second half
test (class-disjoint, as DML evaluates); ``val_fraction`` carves validation classes from train.
A class folder that holds further folders is an error naming it: nested folders are never a
class in one place and ignored in another (``embed`` reads folders by the same rule).

``csv:NAME`` reads ``<data_root>/NAME/index.csv`` in the style of open-metric-learning: columns
``label, path, split`` and optionally ``is_query, is_gallery``. ``path`` is relative to the
dataset folder; ``split`` is ``train``, ``val`` (validation classes of your own) or ``test``.
Test rows with ``is_query`` / ``is_gallery`` set are evaluated as queries against a gallery
(a row may be both); without those columns the test split retrieves from itself.

Images are any file whose extension Pillow opens (``.jpg``, ``.png``, ``.tif``, ``.webp``, ...);
other files (a ``README.txt``) are not images and are left out.
"""
from __future__ import annotations

import csv
import functools
import os
import re
from pathlib import Path

from bench.data.errors import DataError, list_some
from bench.data.layouts import Entry, Layout, inside

CSV_FILE = "index.csv"
CSV_COLUMNS = ("label", "path", "split")
TRUE = {"1", "true", "yes", "y", "t"}
FALSE = {"0", "false", "no", "n", "f", ""}


@functools.lru_cache(maxsize=1)
def image_extensions() -> tuple[str, ...]:
    """Every extension Pillow can open here."""
    from PIL import Image

    return tuple(sorted(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))


def natural_key(name: str):
    """'class2' < 'class10': digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", name)]


def folder_classes(root: Path) -> list[tuple[str, list[str]]]:
    """(class name, its image paths) per class folder, in natural order; nested folders are an error."""
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found; expected <class>/<image> folders")
    extensions = image_extensions()
    classes = []
    for folder in sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                         key=lambda p: natural_key(p.name)):
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
        nested = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
        if nested:
            raise DataError(f"{folder}: class folder holds folders ({list_some(nested)}); a class is one folder of "
                            "images: move them up, or make each a class folder of its own")
        images = [e.path for e in entries if e.is_file() and not e.name.startswith(".")
                  and os.path.splitext(e.name)[1].lower() in extensions]
        if not images:
            raise DataError(f"{folder}: class folder has no images (extensions Pillow opens: "
                            f"{', '.join(extensions[:8])}, ...)")
        classes.append((folder.name, images))
    loose = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in extensions]
    if loose:
        raise DataError(f"{root}: images outside class folders ({list_some(loose)}); put each image in the folder "
                        "of its class")
    return classes


def parse_folder(root: Path) -> dict[str, list[Entry]]:
    classes = folder_classes(root)
    if len(classes) < 2:
        raise DataError(f"{root}: found {len(classes)} class folders, need at least 2 (half train, half test)")
    half = len(classes) // 2
    return {"train": [(path, name) for name, paths in classes[:half] for path in paths],
            "test": [(path, name) for name, paths in classes[half:] for path in paths]}


def _flag(value: str, index: Path, number: int, column: str) -> bool:
    text = (value or "").strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise DataError(f"{index}:{number}: {column} must be true/false (or 1/0), got {value!r}")


def parse_csv(root: Path) -> dict[str, list[Entry]]:
    index = root / CSV_FILE
    if not index.is_file():
        raise DataError(f"{index}: not found; csv:NAME expects {CSV_FILE} with columns "
                        f"{', '.join(CSV_COLUMNS)} (and optionally is_query, is_gallery)")
    with open(index, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in CSV_COLUMNS if c not in columns]
        if missing:
            raise DataError(f"{index}: missing columns {', '.join(missing)} (found: {', '.join(columns) or 'none'}); "
                            f"expected {', '.join(CSV_COLUMNS)}[, is_query, is_gallery]")
        retrieval = "is_query" in columns or "is_gallery" in columns
        splits: dict[str, list[Entry]] = {"train": []}
        for number, row in enumerate(reader, 2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            label, split = row["label"], row["split"].lower()
            if not label or not row["path"]:
                raise DataError(f"{index}:{number}: empty label or path")
            path = inside(root, row["path"], index, number)
            if split == "validation":
                split = "val"
            if split not in ("train", "val", "test"):
                raise DataError(f"{index}:{number}: split must be train, val or test, got {row['split']!r}")
            if split == "test" and retrieval:
                query = _flag(row.get("is_query", ""), index, number, "is_query")
                gallery = _flag(row.get("is_gallery", ""), index, number, "is_gallery")
                if not (query or gallery):
                    raise DataError(f"{index}:{number}: a test row with is_query and is_gallery both false is "
                                    "never used; set one of them")
                if query:
                    splits.setdefault("query", []).append((path, label))
                if gallery:
                    splits.setdefault("gallery", []).append((path, label))
                continue
            splits.setdefault(split, []).append((path, label))
    if not splits["train"]:
        raise DataError(f"{index}: no train rows")
    if not any(k in splits for k in ("test", "query")):
        raise DataError(f"{index}: no test rows (split test, or is_query / is_gallery rows)")
    if "query" in splits and "gallery" not in splits:
        raise DataError(f"{index}: test rows are marked is_query but none is_gallery: nothing to retrieve from")
    return splits


OWN_LAYOUTS = {
    "folder": Layout("<class>/<image> folders (one folder per class)", (), parse_folder),
    "csv": Layout(f"{CSV_FILE} with columns label, path, split[, is_query, is_gallery]", (CSV_FILE,), parse_csv),
}
