"""How each dataset lies on disk: find its folder and list its images per split.

A parser returns ``{split name: [(absolute image path, class name), ...]}`` in a stable order;
turning that into labelled splits, checking files and carving validation classes is shared
(``bench.data.datasets``). Parsers only read folder listings and index files, never images.

Choices beyond SPEC section 2, so that the usual copies of each dataset load as they are:

- sop: index files in ``Info_Files/`` (SPEC) or beside the images (the original archive); image
  paths such as ``bicycle_final/111085122871_0.JPG`` are looked up under ``images/`` first, then
  under the dataset folder itself (decided once, from the first listed image).
- inshop: ``list_eval_partition.txt`` in the dataset folder (SPEC) or in ``Eval/`` (the original
  archive); image paths (``img/WOMEN/...``) are relative to the dataset folder.
- inaturalist: paths in the two set files are relative to the dataset folder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from bench.data.errors import DataError

Entry = tuple[str, str]  # (absolute image path, class name)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class Layout:
    expected: str  # what the dataset folder must hold, for error messages
    markers: tuple[str, ...]  # any of these in a folder says "this is the dataset folder"
    parse: Callable[[Path], dict[str, list[Entry]]]


def resolve_root(name: str, data_root, layout: Layout) -> Path:
    """``<data_root>/<name>/``, or ``data_root`` itself when it already has the layout."""
    data_root = Path(data_root).expanduser()
    if not data_root.is_dir():
        raise DataError(f"{data_root}: data root not found; expected a folder holding {name}/")
    nested = data_root / name
    # abspath, not resolve: a symlinked data folder keeps the name the user gave it.
    if nested.is_dir():
        return Path(os.path.abspath(nested))
    if any((data_root / marker).exists() for marker in layout.markers):
        return Path(os.path.abspath(data_root))
    raise DataError(f"{nested}: folder not found; {name} expects {layout.expected}")


# --- folder-per-class layouts: cub200, cars196, synthetic ----------------------------------

def class_folders(root: Path, expected: str) -> list[Path]:
    images = root / "images"
    if not images.is_dir():
        raise DataError(f"{images}: folder not found; expected {expected}")
    return sorted((p for p in images.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def folder_entries(folder: Path, expected: str) -> list[Entry]:
    files = sorted(entry.path for entry in os.scandir(folder)
                   if entry.name.lower().endswith(IMAGE_EXTENSIONS) and not entry.name.startswith("."))
    if not files:
        raise DataError(f"{folder}: class folder has no images; expected {expected}")
    return [(path, folder.name) for path in files]


def split_folders_in_order(root: Path, expected: str, count: int | None) -> dict[str, list[Entry]]:
    """First half of the sorted class folders trains, the second half tests."""
    folders = class_folders(root, expected)
    if count is not None and len(folders) != count:
        raise DataError(f"{root / 'images'}: found {len(folders)} class folders, expected {count}; "
                        f"expected {expected}")
    if len(folders) < 2:
        raise DataError(f"{root / 'images'}: found {len(folders)} class folders, need at least 2; "
                        f"expected {expected}")
    half = len(folders) // 2
    return {
        "train": [e for folder in folders[:half] for e in folder_entries(folder, expected)],
        "test": [e for folder in folders[half:] for e in folder_entries(folder, expected)],
    }


CUB_EXPECTED = "images/<NNN.ClassName>/*.jpg with 200 class folders"
CARS_EXPECTED = "images/<class folder>/*.jpg with 196 class folders"
SYNTHETIC_EXPECTED = ("images/<NNN.name>/*.jpg with at least 2 class folders "
                      "(write one with: python -m bench.data.synthetic ROOT)")


def parse_cub200(root: Path) -> dict[str, list[Entry]]:
    return split_folders_in_order(root, CUB_EXPECTED, count=200)


def parse_cars196(root: Path) -> dict[str, list[Entry]]:
    return split_folders_in_order(root, CARS_EXPECTED, count=196)


def parse_synthetic(root: Path) -> dict[str, list[Entry]]:
    return split_folders_in_order(root, SYNTHETIC_EXPECTED, count=None)


# --- index-file layouts ---------------------------------------------------------------------

def read_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of the non-blank lines."""
    with open(path, encoding="utf-8") as handle:
        return [(number, line.strip()) for number, line in enumerate(handle, 1) if line.strip()]


def first_existing(root: Path, candidates: list[str], expected: str) -> Path:
    for candidate in candidates:
        if (root / candidate).is_file():
            return root / candidate
    raise DataError(f"{root / candidates[0]}: file not found; expected {expected}")


SOP_EXPECTED = ("Info_Files/Ebay_train.txt and Info_Files/Ebay_test.txt (a header line, then "
                "'image_id class_id super_class_id path' with paths relative to images/)")
SOP_HEADER = ["image_id", "class_id", "super_class_id", "path"]


def parse_sop(root: Path) -> dict[str, list[Entry]]:
    splits = {}
    for split, file_name in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
        index = first_existing(root, [f"Info_Files/{file_name}", file_name], SOP_EXPECTED)
        splits[split] = _parse_sop_index(index)
    base = _image_base(root, splits["train"][0][0], [root / "images", root])
    return {split: [(str(base / path), label) for path, label in entries]
            for split, entries in splits.items()}


def _parse_sop_index(index: Path) -> list[Entry]:
    lines = read_lines(index)
    if not lines or lines[0][1].split() != SOP_HEADER:
        raise DataError(f"{index}:1: expected the header line '{' '.join(SOP_HEADER)}'")
    entries = []
    for number, line in lines[1:]:
        columns = line.split()
        if len(columns) != 4 or not all(c.isdigit() for c in columns[:3]):
            raise DataError(f"{index}:{number}: expected 'image_id class_id super_class_id path' "
                            f"with integer ids, got {line!r}")
        entries.append((columns[3], columns[1]))
    if not entries:
        raise DataError(f"{index}: no images listed after the header line")
    return entries


def _image_base(root: Path, first_path: str, bases: list[Path]) -> Path:
    """The folder that relative index paths start from, judged by the first listed image."""
    for base in bases:
        if (base / first_path).exists():
            return base
    tried = " or ".join(str(base / first_path) for base in bases)
    raise DataError(f"{root}: first listed image not found at {tried}; index paths must be "
                    "relative to that folder")


INSHOP_EXPECTED = ("list_eval_partition.txt (line 1: image count, line 2: header "
                   "'image_name item_id evaluation_status', then one image per line with status "
                   "train, query or gallery) and the img/ folder it lists")
INSHOP_STATUSES = ("train", "query", "gallery")


def parse_inshop(root: Path) -> dict[str, list[Entry]]:
    index = first_existing(root, ["list_eval_partition.txt", "Eval/list_eval_partition.txt"],
                           INSHOP_EXPECTED)
    lines = read_lines(index)
    if len(lines) < 2 or not lines[0][1].isdigit() or lines[1][1].split()[:1] != ["image_name"]:
        raise DataError(f"{index}: first two lines must be the image count and the header "
                        "'image_name item_id evaluation_status'")
    splits: dict[str, list[Entry]] = {status: [] for status in INSHOP_STATUSES}
    for number, line in lines[2:]:
        columns = line.split()
        if len(columns) != 3 or columns[2] not in INSHOP_STATUSES:
            raise DataError(f"{index}:{number}: expected 'image_name item_id evaluation_status' "
                            f"with status train, query or gallery, got {line!r}")
        splits[columns[2]].append((str(root / columns[0]), columns[1]))
    listed, declared = len(lines) - 2, int(lines[0][1])
    if listed != declared:
        raise DataError(f"{index}: line 1 declares {declared} images but {listed} are listed "
                        "(truncated file?)")
    for status, entries in splits.items():
        if not entries:
            raise DataError(f"{index}: no images with status {status!r}")
    return splits


INAT_EXPECTED = ("Inaturalist_train_set1.txt and Inaturalist_test_set1.txt (one image path per "
                 "line, relative to the dataset folder, like train_val2018/Plantae/7172/x.jpg)")


def parse_inaturalist(root: Path) -> dict[str, list[Entry]]:
    splits = {}
    for split, file_name in (("train", "Inaturalist_train_set1.txt"),
                             ("test", "Inaturalist_test_set1.txt")):
        index = first_existing(root, [file_name], INAT_EXPECTED)
        entries = []
        for number, line in read_lines(index):
            parts = PurePosixPath(line).parts
            if len(parts) < 3:
                raise DataError(f"{index}:{number}: expected one relative image path with at "
                                f"least two folders (supercategory/class/file), got {line!r}")
            # The class is the two folders above the file: "Plantae/7172".
            entries.append((str(root / line), f"{parts[-3]}/{parts[-2]}"))
        if not entries:
            raise DataError(f"{index}: no image paths listed")
        splits[split] = entries
    return splits


LAYOUTS: dict[str, Layout] = {
    "cub200": Layout(CUB_EXPECTED, ("images",), parse_cub200),
    "cars196": Layout(CARS_EXPECTED, ("images",), parse_cars196),
    "sop": Layout(SOP_EXPECTED, ("Info_Files", "Ebay_train.txt"), parse_sop),
    "inshop": Layout(INSHOP_EXPECTED, ("list_eval_partition.txt", "Eval"), parse_inshop),
    "inaturalist": Layout(INAT_EXPECTED, ("Inaturalist_train_set1.txt",), parse_inaturalist),
    "synthetic": Layout(SYNTHETIC_EXPECTED, ("images",), parse_synthetic),
}
