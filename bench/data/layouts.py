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
- the official archives as they untar: ``CUB_200_2011/`` (its ``images/`` holds the class
  folders), Cars' ``car_ims/`` + ``cars_annos.mat`` (read with scipy; class ids decide the order
  and the split), ``Stanford_Online_Products/`` (index files at its top level), and In-Shop's
  ``Eval/list_eval_partition.txt`` + ``Img/img/``. ``--data-root`` may name the folder that holds
  such an archive, the archive itself, or a folder named after the dataset.
- class folders whose names are all numbers (``1`` .. ``196``) sort numerically; other names
  sort as text, as the reference implementation sorts them.
- every listed image must lie inside the dataset folder: absolute paths and ``..`` that leave
  it are refused (``bench.data.datasets`` also checks that train and test share no image and
  no class).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from bench.data.errors import DataError, list_some

Entry = tuple[str, str]  # (absolute image path, class name)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class Layout:
    expected: str  # what the dataset folder must hold, for error messages
    markers: tuple[str, ...]  # any of these in a folder says "this is the dataset folder"
    parse: Callable[[Path], dict[str, list[Entry]]]
    official: tuple[str, ...] = ()  # folder names of the official archive, looked for in the data root


def resolve_root(name: str, data_root, layout: Layout) -> Path:
    """``<data_root>/<name>/``, the official archive's folder in ``data_root``, or ``data_root``
    itself when it already has the layout."""
    data_root = Path(data_root).expanduser()
    if not data_root.is_dir():
        raise DataError(f"{data_root}: data root not found; expected a folder holding {name}/")
    # abspath, not resolve: a symlinked data folder keeps the name the user gave it.
    for candidate in (name, *layout.official):
        if (data_root / candidate).is_dir():
            return Path(os.path.abspath(data_root / candidate))
    if any((data_root / marker).exists() for marker in layout.markers):
        return Path(os.path.abspath(data_root))
    raise DataError(f"{data_root / name}: folder not found; {name} expects {layout.expected}"
                    f"{found_instead(data_root)}")


def found_instead(folder: Path) -> str:
    """'; found in /data: CUB_200_2011/, notes.txt': what is there, so the fix is visible."""
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if not p.name.startswith("."))
    except OSError:
        return ""
    return f"; found in {folder}: {list_some(names, 8)}" if names else f"; {folder} is empty"


def inside(root: Path, relative: str, index: Path, number: int) -> str:
    """The absolute path of an index entry, refusing absolute paths and '..' that leave the root."""
    path = PurePosixPath(relative)
    joined = os.path.normpath(os.path.join(root, relative))
    if path.is_absolute() or not (joined + os.sep).startswith(os.path.normpath(root) + os.sep):
        raise DataError(f"{index}:{number}: image path {relative!r} leaves the dataset folder {root}; "
                        "index paths must be relative to it")
    return joined


def class_sort_key(name: str):
    """Numbers in numeric order ('2' before '10') when every name is a number, else text."""
    return int(name) if name.isdigit() else name


# --- folder-per-class layouts: cub200, cars196, synthetic ----------------------------------

def class_folders(root: Path, expected: str) -> list[Path]:
    images = root / "images"
    if not images.is_dir():
        raise DataError(f"{images}: folder not found; expected {expected}{found_instead(root)}")
    folders = [p for p in images.iterdir() if p.is_dir() and not p.name.startswith(".")]
    numeric = bool(folders) and all(p.name.isdigit() for p in folders)
    return sorted(folders, key=(lambda p: int(p.name)) if numeric else (lambda p: p.name))


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
CARS_EXPECTED = "images/<class folder>/*.jpg with 196 class folders, or car_ims/ + cars_annos.mat"
SYNTHETIC_EXPECTED = ("images/<NNN.name>/*.jpg with at least 2 class folders "
                      "(write one with: python -m bench.data.synthetic ROOT)")


def parse_cub200(root: Path) -> dict[str, list[Entry]]:
    return split_folders_in_order(root, CUB_EXPECTED, count=200)


CARS_OFFICIAL = "car_ims/ + cars_annos.mat (the official archive)"


def parse_cars196(root: Path) -> dict[str, list[Entry]]:
    if not (root / "images").is_dir() and (root / "cars_annos.mat").is_file():
        return parse_cars_annos(root)
    return split_folders_in_order(root, CARS_EXPECTED, count=196)


def parse_cars_annos(root: Path) -> dict[str, list[Entry]]:
    """The official ``cars_annos.mat``: each annotation's ``relative_im_path`` and ``class`` (1-196);
    classes 1-98 train and 99-196 test (the DML split; its ``test`` flag is the classification
    split, which DML does not use). Class names come from the file's ``class_names``."""
    try:
        from scipy.io import loadmat

        mat = loadmat(str(root / "cars_annos.mat"), squeeze_me=True)
        annotations = mat["annotations"]
        names = [str(n) for n in mat["class_names"]]
        rows = [(str(a["relative_im_path"]), int(a["class"])) for a in annotations]
    except (ImportError, KeyError, ValueError, TypeError, IndexError, OSError, NotImplementedError) as e:
        raise DataError(f"{root / 'cars_annos.mat'}: cannot read the official Cars annotations "
                        f"(annotations with relative_im_path and class, class_names): {e}") from None
    if sorted({c for _, c in rows}) != list(range(1, 197)) or len(names) != 196:
        raise DataError(f"{root / 'cars_annos.mat'}: expected classes 1..196 and 196 class names, found "
                        f"{len({c for _, c in rows})} classes and {len(names)} names")
    index = root / "cars_annos.mat"
    splits: dict[str, list[Entry]] = {"train": [], "test": []}
    for number, (path, class_id) in enumerate(sorted(rows, key=lambda r: (r[1], r[0])), 1):
        split = "train" if class_id <= 98 else "test"
        splits[split].append((inside(root, path, index, number), f"{class_id:03d}.{names[class_id - 1]}"))
    return splits


def parse_synthetic(root: Path) -> dict[str, list[Entry]]:
    return split_folders_in_order(root, SYNTHETIC_EXPECTED, count=None)


SYNTHETIC_FAR_EXPECTED = ("images/<NNN.name>/*.jpg with at least 2 class folders "
                          "(write one with: python -m bench.data.synthetic ROOT --variant far)")


def parse_synthetic_far(root: Path) -> dict[str, list[Entry]]:
    return split_folders_in_order(root, SYNTHETIC_FAR_EXPECTED, count=None)


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
    splits, indexes = {}, {}
    for split, file_name in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
        indexes[split] = first_existing(root, [f"Info_Files/{file_name}", file_name], SOP_EXPECTED)
        splits[split] = _parse_sop_index(indexes[split])
    base = _image_base(root, splits["train"][0][1], [root / "images", root])
    return {split: [(inside(base, path, indexes[split], number), label) for number, path, label in entries]
            for split, entries in splits.items()}


def _parse_sop_index(index: Path) -> list[tuple[int, str, str]]:
    """(line number, image path, class id) of each listed image."""
    lines = read_lines(index)
    if not lines or lines[0][1].split() != SOP_HEADER:
        raise DataError(f"{index}:1: expected the header line '{' '.join(SOP_HEADER)}'")
    entries = []
    for number, line in lines[1:]:
        columns = line.split()
        if len(columns) != 4 or not all(c.isdigit() for c in columns[:3]):
            raise DataError(f"{index}:{number}: expected 'image_id class_id super_class_id path' "
                            f"with integer ids, got {line!r}")
        entries.append((number, columns[3], columns[1]))
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
    rows = []
    for number, line in lines[2:]:
        columns = line.split()
        if len(columns) != 3 or columns[2] not in INSHOP_STATUSES:
            raise DataError(f"{index}:{number}: expected 'image_name item_id evaluation_status' "
                            f"with status train, query or gallery, got {line!r}")
        rows.append((number, columns))
    # img/... is relative to the dataset folder, or to Img/ in the official tree (Img/img/...)
    base = _image_base(root, rows[0][1][0], [root, root / "Img"]) if rows else root
    for number, (path, item, status) in rows:
        splits[status].append((inside(base, path, index, number), item))
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
            entries.append((inside(root, line, index, number), f"{parts[-3]}/{parts[-2]}"))
        if not entries:
            raise DataError(f"{index}: no image paths listed")
        splits[split] = entries
    return splits


LAYOUTS: dict[str, Layout] = {
    "cub200": Layout(CUB_EXPECTED, ("images",), parse_cub200, official=("CUB_200_2011",)),
    "cars196": Layout(CARS_EXPECTED, ("images", "cars_annos.mat"), parse_cars196),
    "sop": Layout(SOP_EXPECTED, ("Info_Files", "Ebay_train.txt"), parse_sop, official=("Stanford_Online_Products",)),
    "inshop": Layout(INSHOP_EXPECTED, ("list_eval_partition.txt", "Eval"), parse_inshop,
                     official=("In-shop Clothes Retrieval Benchmark", "In-shop_Clothes_Retrieval_Benchmark")),
    "inaturalist": Layout(INAT_EXPECTED, ("Inaturalist_train_set1.txt",), parse_inaturalist),
    "synthetic": Layout(SYNTHETIC_EXPECTED, ("images",), parse_synthetic),
    "synthetic_far": Layout(SYNTHETIC_FAR_EXPECTED, ("images",), parse_synthetic_far),
}
