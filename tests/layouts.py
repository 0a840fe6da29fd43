"""Tiny copies of the real dataset layouts (SPEC section 2), for tests.

Each builder writes a dataset folder with the real folder names and index-file formats and a
few 8x8 JPEGs per class, and returns that folder. All images hold the same bytes (encoding once
keeps building 200 class folders fast); tests that need distinct pixels write their own.
"""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

CAR_MAKES = ("Acura", "BMW", "Chevrolet", "Dodge", "Ford", "Hyundai", "Toyota")


def tiny_jpeg(colour=(200, 40, 40), size: int = 8, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (size, size), colour if mode == "RGB" else colour[0]).save(buffer, "JPEG")
    return buffer.getvalue()


TINY_JPEG = tiny_jpeg()


def write_image(path: Path, data: bytes = TINY_JPEG) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_class_folders(folder: Path, class_names, images_per_class: int = 1) -> Path:
    """``folder/images/<class name>/<k>.jpg``: the cub200, cars196 and synthetic layout."""
    for name in class_names:
        for k in range(images_per_class):
            write_image(folder / "images" / name / f"{name.replace(' ', '_')}_{k:04d}.jpg")
    return folder


def cub200_class_names(num_classes: int = 200) -> list[str]:
    return [f"{i:03d}.Bird_{i:03d}" for i in range(1, num_classes + 1)]


def cars196_class_names(num_classes: int = 196) -> list[str]:
    # Real names ("Acura Integra Type R 2001") do not sort in creation order; neither do these.
    return [f"{CAR_MAKES[i % len(CAR_MAKES)]} Model {i} {2000 + i % 13}" for i in range(num_classes)]


def make_cub200(folder: Path, *, num_classes: int = 200, images_per_class: int = 1) -> Path:
    return make_class_folders(folder, cub200_class_names(num_classes), images_per_class)


def make_cars196(folder: Path, *, num_classes: int = 196, images_per_class: int = 1) -> Path:
    return make_class_folders(folder, cars196_class_names(num_classes), images_per_class)


def make_sop(folder: Path, *, train_classes: int = 3, test_classes: int = 2,
             images_per_class: int = 2, index_in_info_files: bool = True,
             images_in_subfolder: bool = True) -> Path:
    """Ebay_{train,test}.txt: header, then ``image_id class_id super_class_id path``.

    Paths such as ``bicycle_final/111085122871_0.JPG`` are relative to ``images/`` (SPEC) or,
    with ``images_in_subfolder=False``, to the dataset folder (the original archive).
    """
    super_classes = ("bicycle_final", "chair_final")
    image_root = folder / "images" if images_in_subfolder else folder
    index_dir = folder / "Info_Files" if index_in_info_files else folder
    index_dir.mkdir(parents=True, exist_ok=True)
    image_id = 1
    class_ids = {"train": range(1, train_classes + 1),
                 "test": range(train_classes + 1, train_classes + test_classes + 1)}
    for split, ids in class_ids.items():
        lines = ["image_id class_id super_class_id path"]
        for class_id in ids:
            super_id = (class_id - 1) % len(super_classes)
            for k in range(images_per_class):
                path = f"{super_classes[super_id]}/{111085122800 + class_id}_{k}.JPG"
                write_image(image_root / path)
                lines.append(f"{image_id} {class_id} {super_id + 1} {path}")
                image_id += 1
        (index_dir / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


def make_inshop(folder: Path, *, train_items: int = 3, test_items: int = 2,
                images_per_train_item: int = 2, queries_per_item: int = 1,
                gallery_per_item: int = 2) -> Path:
    """list_eval_partition.txt: count, header, then ``image_name item_id evaluation_status``."""
    rows = []
    for item in range(train_items + test_items):
        item_id = f"id_{item + 2:08d}"
        if item < train_items:
            statuses = ["train"] * images_per_train_item
        else:
            statuses = ["query"] * queries_per_item + ["gallery"] * gallery_per_item
        for k, status in enumerate(statuses):
            path = f"img/WOMEN/Dresses/{item_id}/{k + 1:02d}_{k + 1}_front.jpg"
            write_image(folder / path)
            rows.append(f"{path:<60}{item_id:<12}{status}")  # the real file pads with spaces
    lines = [str(len(rows)), "image_name item_id evaluation_status", *rows]
    (folder / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return folder


def make_inaturalist(folder: Path, *, train_classes: int = 3, test_classes: int = 2,
                     images_per_class: int = 2) -> Path:
    """Inaturalist_{train,test}_set1.txt: one path per line, class = the two folders above."""
    kingdoms = ("Plantae", "Aves")
    splits = {"train": range(train_classes), "test": range(train_classes, train_classes + test_classes)}
    for split, classes in splits.items():
        lines = []
        for c in classes:
            for k in range(images_per_class):
                path = f"train_val2018/{kingdoms[c % 2]}/{7000 + c}/{c:04x}{k:028x}.jpg"
                write_image(folder / path)
                lines.append(path)
        (folder / f"Inaturalist_{split}_set1.txt").write_text("\n".join(lines) + "\n")
    return folder


# --- the official archives, as they untar ------------------------------------------------------

def make_cub_official(parent: Path, *, num_classes: int = 200) -> Path:
    """``CUB_200_2011/``: images/<NNN.Name>/, images.txt, image_class_labels.txt, train_test_split.txt."""
    folder = make_cub200(parent / "CUB_200_2011", num_classes=num_classes)
    images = sorted((folder / "images").rglob("*.jpg"))
    rel = [p.relative_to(folder / "images").as_posix() for p in images]
    (folder / "images.txt").write_text("".join(f"{i} {r}\n" for i, r in enumerate(rel, 1)))
    (folder / "image_class_labels.txt").write_text("".join(f"{i} {int(r[:3])}\n" for i, r in enumerate(rel, 1)))
    (folder / "train_test_split.txt").write_text("".join(f"{i} {i % 2}\n" for i in range(1, len(rel) + 1)))
    return folder


def make_cars_official(folder: Path, *, images_per_class: int = 1) -> Path:
    """``car_ims/000001.jpg`` ... and ``cars_annos.mat`` (annotations, class_names), as Stanford ships it."""
    import numpy as np
    from scipy.io import savemat

    names = [f"{CAR_MAKES[i % len(CAR_MAKES)]} Model {i} {2000 + i % 13}" for i in range(196)]
    rows = []
    for class_id in range(1, 197):
        for k in range(images_per_class):
            path = f"car_ims/{len(rows) + 1:06d}.jpg"
            write_image(folder / path)
            rows.append((path, 10, 10, 50, 50, class_id, k % 2))
    dtype = [("relative_im_path", "O"), ("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"),
             ("class", "O"), ("test", "O")]
    annotations = np.array([tuple(row) for row in rows], dtype=dtype)
    savemat(str(folder / "cars_annos.mat"), {"annotations": annotations,
                                              "class_names": np.array(names, dtype=object)})
    return folder


def make_sop_official(parent: Path, **kwargs) -> Path:
    """``Stanford_Online_Products/`` with Ebay_train.txt / Ebay_test.txt at its top level."""
    return make_sop(parent / "Stanford_Online_Products", index_in_info_files=False, images_in_subfolder=False,
                    **kwargs)


def make_inshop_official(parent: Path, **kwargs) -> Path:
    """``In-shop Clothes Retrieval Benchmark/Eval/list_eval_partition.txt`` + ``Img/img/...``."""
    folder = parent / "In-shop Clothes Retrieval Benchmark"
    make_inshop(folder / "Img", **kwargs)
    (folder / "Eval").mkdir(parents=True, exist_ok=True)
    (folder / "Img" / "list_eval_partition.txt").rename(folder / "Eval" / "list_eval_partition.txt")
    return folder
