"""bench.data: dataset layouts, bad files, validation split, transforms, sampler, synthetic data."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.data import (
    ClassBalancedBatchSampler,
    DataError,
    ImageDataset,
    build_transforms,
    load_dataset,
    load_image,
    make_synthetic_dataset,
    verify_images,
)
from bench.data.synthetic import main as synthetic_main
from bench.errors import UserError
from tests import layouts

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def assert_contiguous(split):
    assert split.labels.dtype == np.int64
    assert sorted(set(split.labels.tolist())) == list(range(split.num_classes))
    assert len(split.paths) == len(split.labels)


def class_counts(split) -> dict[str, int]:
    return {split.class_names[label]: n for label, n in Counter(split.labels.tolist()).items()}


# --- the five real layouts ------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """One data root holding every real layout, as <data_root>/<name>/."""
    root = tmp_path_factory.mktemp("data")
    layouts.make_cub200(root / "cub200")
    layouts.make_cars196(root / "cars196", images_per_class=2)
    layouts.make_sop(root / "sop")
    layouts.make_inshop(root / "inshop")
    layouts.make_inaturalist(root / "inaturalist")
    return root


def test_cub200_splits_classes_1_to_100_for_training(data_root):
    data = load_dataset("cub200", data_root)
    names = layouts.cub200_class_names()
    assert data.root == str(data_root / "cub200")
    assert data.train.class_names == names[:100] and data.test.class_names == names[100:]
    assert (len(data.train), len(data.test)) == (100, 100)
    assert data.val is None and data.query is None and data.gallery is None
    assert data.num_skipped == 0
    for split in (data.train, data.test):
        assert_contiguous(split)
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in split.paths)
    # Labels follow the sorted folder order, and each path sits in its class's folder.
    assert Path(data.train.paths[0]).parent.name == "001.Bird_001"
    assert Path(data.test.paths[5]).parent.name == data.test.class_names[data.test.labels[5]]


def test_cars196_splits_sorted_folder_names_in_halves(data_root):
    data = load_dataset("cars196", data_root)
    names = sorted(layouts.cars196_class_names())
    assert data.train.class_names == names[:98] and data.test.class_names == names[98:]
    assert (len(data.train), len(data.test)) == (196, 196)
    assert set(class_counts(data.train).values()) == {2}


def test_sop_reads_index_files_with_paths_under_images(data_root):
    data = load_dataset("sop", data_root)
    assert data.train.class_names == ["1", "2", "3"] and data.test.class_names == ["4", "5"]
    assert (len(data.train), len(data.test)) == (6, 4)
    assert data.train.paths[0] == str(data_root / "sop/images/bicycle_final/111085122801_0.JPG")
    assert_contiguous(data.train)
    assert_contiguous(data.test)


@pytest.mark.parametrize("in_info_files, in_images", [(False, False), (True, False), (False, True)])
def test_sop_also_accepts_the_original_archive_layout(tmp_path, in_info_files, in_images):
    folder = layouts.make_sop(tmp_path / "sop", index_in_info_files=in_info_files,
                              images_in_subfolder=in_images)
    data = load_dataset("sop", tmp_path)
    assert (data.train.num_classes, data.test.num_classes) == (3, 2)
    expected_base = folder / "images" if in_images else folder
    assert data.test.paths[0] == str(expected_base / "chair_final/111085122804_0.JPG")


def test_inshop_query_and_gallery_share_one_class_list(data_root):
    data = load_dataset("inshop", data_root)
    assert data.test is None
    assert data.train.num_classes == 3 and len(data.train) == 6
    assert data.train.class_names == ["id_00000002", "id_00000003", "id_00000004"]
    assert (len(data.query), len(data.gallery)) == (2, 4)
    assert data.query.class_names == data.gallery.class_names == ["id_00000005", "id_00000006"]
    # The same item has the same label on both sides.
    for split in (data.query, data.gallery):
        for path, label in zip(split.paths, split.labels):
            assert Path(path).parent.name == split.class_names[label]
    assert data.train.paths[0] == str(data_root / "inshop/img/WOMEN/Dresses/id_00000002/01_1_front.jpg")


def test_inaturalist_class_is_the_two_folders_above_the_file(data_root):
    data = load_dataset("inaturalist", data_root)
    assert data.train.class_names == ["Plantae/7000", "Aves/7001", "Plantae/7002"]
    assert data.test.class_names == ["Aves/7003", "Plantae/7004"]
    assert (len(data.train), len(data.test)) == (6, 4)
    assert_contiguous(data.train)


def test_data_root_may_be_the_dataset_folder_itself(data_root):
    direct = load_dataset("inshop", data_root / "inshop")
    assert direct.root == str(data_root / "inshop")
    assert direct.query.class_names == load_dataset("inshop", data_root).query.class_names


def test_summary_names_each_split(data_root):
    summary = load_dataset("inshop", data_root).summary()
    assert summary == ("inshop: train 3 classes / 6 images, query 2 classes / 2 images, "
                       "gallery 2 classes / 4 images")


# --- wrong layouts: one DataError that names what is missing --------------------------------

def load_error(name, root, **kwargs) -> str:
    with pytest.raises(DataError) as caught:
        load_dataset(name, root, **kwargs)
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)
    return str(caught.value)


def test_missing_data_root_is_named(tmp_path):
    message = load_error("cub200", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in message and "data root not found" in message


def test_missing_dataset_folder_is_named_with_the_expected_layout(tmp_path):
    message = load_error("cars196", tmp_path)
    assert f"{tmp_path / 'cars196'}: folder not found" in message and "196 class folders" in message


def test_unknown_dataset_name_lists_the_known_ones(tmp_path):
    message = load_error("cub", tmp_path)
    assert "'cub'" in message and "cub200" in message


def test_missing_images_folder(tmp_path):
    (tmp_path / "cub200").mkdir()
    message = load_error("cub200", tmp_path)
    assert f"{tmp_path / 'cub200' / 'images'}: folder not found" in message
    assert "images/<NNN.ClassName>/*.jpg with 200 class folders" in message


def test_wrong_number_of_class_folders(tmp_path):
    layouts.make_cub200(tmp_path / "cub200", num_classes=199)
    message = load_error("cub200", tmp_path)
    assert "found 199 class folders, expected 200" in message


def test_class_folder_without_images(tmp_path):
    layouts.make_class_folders(tmp_path / "synthetic", ["001.a", "002.b", "003.c"])
    empty = tmp_path / "synthetic" / "images" / "004.d"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    message = load_error("synthetic", tmp_path)
    assert f"{empty}: class folder has no images" in message


def test_missing_index_file(tmp_path):
    layouts.make_sop(tmp_path / "sop")
    (tmp_path / "sop" / "Info_Files" / "Ebay_test.txt").unlink()
    message = load_error("sop", tmp_path)
    assert f"{tmp_path / 'sop' / 'Info_Files' / 'Ebay_test.txt'}: file not found" in message


def test_missing_inaturalist_set_file(tmp_path):
    layouts.make_inaturalist(tmp_path / "inaturalist")
    (tmp_path / "inaturalist" / "Inaturalist_test_set1.txt").unlink()
    assert "Inaturalist_test_set1.txt: file not found" in load_error("inaturalist", tmp_path)


def append_line(path: Path, line: str) -> None:
    path.write_text(path.read_text() + line + "\n")


def test_malformed_sop_line_names_file_and_line(tmp_path):
    layouts.make_sop(tmp_path / "sop")
    index = tmp_path / "sop" / "Info_Files" / "Ebay_train.txt"
    append_line(index, "7 x 1 bicycle_final/1_0.JPG")  # header + 6 images: this is line 8
    message = load_error("sop", tmp_path)
    assert f"{index}:8:" in message and "'7 x 1 bicycle_final/1_0.JPG'" in message


def test_sop_without_header_line(tmp_path):
    layouts.make_sop(tmp_path / "sop")
    index = tmp_path / "sop" / "Info_Files" / "Ebay_test.txt"
    index.write_text("\n".join(index.read_text().splitlines()[1:]))
    assert f"{index}:1: expected the header line" in load_error("sop", tmp_path)


def test_malformed_inshop_status(tmp_path):
    layouts.make_inshop(tmp_path / "inshop")
    index = tmp_path / "inshop" / "list_eval_partition.txt"
    lines = index.read_text().splitlines()
    lines[4] = lines[4].replace("train", "validation")
    index.write_text("\n".join(lines))
    message = load_error("inshop", tmp_path)
    assert f"{index}:5:" in message and "train, query or gallery" in message


def test_inshop_count_line_must_match(tmp_path):
    layouts.make_inshop(tmp_path / "inshop")
    index = tmp_path / "inshop" / "list_eval_partition.txt"
    lines = index.read_text().splitlines()
    index.write_text("\n".join(lines[:-1]))
    assert "line 1 declares 12 images but 11 are listed" in load_error("inshop", tmp_path)


def test_inaturalist_line_without_class_folders(tmp_path):
    layouts.make_inaturalist(tmp_path / "inaturalist")
    index = tmp_path / "inaturalist" / "Inaturalist_train_set1.txt"
    append_line(index, "loose.jpg")
    assert f"{index}:7:" in load_error("inaturalist", tmp_path)


def test_listed_image_that_does_not_exist(tmp_path):
    layouts.make_inaturalist(tmp_path / "inaturalist")
    gone = tmp_path / "inaturalist" / "train_val2018" / "Aves" / "7001"
    for image in gone.iterdir():
        image.unlink()
    message = load_error("inaturalist", tmp_path)
    assert "2 listed images do not exist" in message and str(gone) in message


# --- empty and corrupt images ---------------------------------------------------------------

@pytest.fixture
def small_dataset(tmp_path) -> Path:
    """A 6-class folder dataset (3 train, 3 test) with 3 images each; returns its data root."""
    layouts.make_class_folders(tmp_path / "synthetic", [f"{i:03d}.c{i}" for i in range(1, 7)], 3)
    return tmp_path


def image_of(data_root: Path, class_folder: str, k: int = 0) -> Path:
    return data_root / "synthetic" / "images" / class_folder / f"{class_folder}_{k:04d}.jpg"


def test_zero_byte_files_are_an_error_naming_them(small_dataset):
    empty = [image_of(small_dataset, "001.c1"), image_of(small_dataset, "005.c5", 2)]
    for path in empty:
        path.write_bytes(b"")
    message = load_error("synthetic", small_dataset)
    assert "2 image files are empty (0 bytes)" in message
    assert all(str(path) in message for path in empty) and "--set skip_corrupt_images=true" in message


def test_long_lists_of_bad_files_are_shortened(small_dataset):
    for path in (small_dataset / "synthetic" / "images").rglob("*.jpg"):
        path.write_bytes(b"")
    assert "18 image files are empty" in (message := load_error("synthetic", small_dataset))
    assert "and 13 more" in message


def test_skip_corrupt_drops_and_counts_empty_and_undecodable_files(small_dataset):
    empty = image_of(small_dataset, "001.c1")
    garbage = image_of(small_dataset, "002.c2", 1)
    truncated = image_of(small_dataset, "004.c4")
    empty.write_bytes(b"")
    garbage.write_bytes(b"this is not a JPEG file at all")
    truncated.write_bytes(layouts.tiny_jpeg(size=64)[:200])
    data = load_dataset("synthetic", small_dataset, skip_corrupt=True)
    assert data.num_skipped == 3
    kept = set(data.train.paths) | set(data.test.paths)
    assert not kept & {str(empty), str(garbage), str(truncated)}
    assert (len(data.train), len(data.test)) == (7, 8)
    assert "(3 unreadable images skipped)" in data.summary()


def test_undecodable_image_is_reported_when_first_read(small_dataset):
    garbage = image_of(small_dataset, "002.c2", 1)
    garbage.write_bytes(b"this is not a JPEG file at all")
    data = load_dataset("synthetic", small_dataset)  # indexing reads no image
    dataset = ImageDataset(data.train)
    position = data.train.paths.index(str(garbage))
    with pytest.raises(DataError, match=str(garbage)):
        dataset[position]
    image, label = dataset[0]
    assert image.mode == "RGB" and label == 0


def test_verify_images_returns_the_paths_that_do_not_decode(tmp_path):
    good = layouts.write_image(tmp_path / "good.jpg")
    bad = layouts.write_image(tmp_path / "bad.jpg", b"\xff\xd8\xff garbage")
    assert verify_images([str(good), str(bad), str(good)]) == [str(bad)]


def test_image_dataset_converts_to_rgb_and_applies_the_transform(tmp_path):
    gray = layouts.write_image(tmp_path / "synthetic/images/001.a/g.jpg", layouts.tiny_jpeg(mode="L"))
    layouts.write_image(tmp_path / "synthetic/images/002.b/b.jpg")
    data = load_dataset("synthetic", tmp_path)
    assert load_image(str(gray)).mode == "RGB"
    image, label = ImageDataset(data.train, build_transforms(16, MEAN, STD, train=False))[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == 0


# --- validation split -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def twenty_classes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("twenty")
    layouts.make_class_folders(root / "synthetic", [f"{i:03d}.c{i}" for i in range(1, 21)], 2)
    return root


def test_validation_classes_are_disjoint_from_train_and_test(twenty_classes):
    data = load_dataset("synthetic", twenty_classes, val_fraction=0.3, seed=4)
    assert (data.train.num_classes, data.val.num_classes, data.test.num_classes) == (7, 3, 10)
    train, val, test = (set(s.class_names) for s in (data.train, data.val, data.test))
    assert not train & val and not val & test and not train & test
    assert train | val == set(load_dataset("synthetic", twenty_classes).train.class_names)
    for split in (data.train, data.val):
        assert_contiguous(split)
        for path, label in zip(split.paths, split.labels):
            assert Path(path).parent.name == split.class_names[label]


def test_validation_split_is_a_function_of_the_seed(twenty_classes):
    def val_classes(seed):
        return load_dataset("synthetic", twenty_classes, val_fraction=0.3, seed=seed).val.class_names

    assert val_classes(1) == val_classes(1)
    assert len({tuple(val_classes(seed)) for seed in range(4)}) > 1


def test_validation_keeps_at_least_one_class_and_two_for_training(twenty_classes):
    assert load_dataset("synthetic", twenty_classes, val_fraction=0.01).val.num_classes == 1
    assert "leaves 1 of 10 train classes" in load_error("synthetic", twenty_classes, val_fraction=0.9)
    assert "[0, 1)" in load_error("synthetic", twenty_classes, val_fraction=1.0)


# --- transforms -----------------------------------------------------------------------------

def test_transforms_follow_the_spec(tmp_path):
    image = load_image(str(layouts.write_image(tmp_path / "x.jpg", layouts.tiny_jpeg(size=40))))
    train = build_transforms(32, MEAN, STD, train=True)
    test = build_transforms(32, MEAN, STD, train=False, interpolation="bicubic")
    names = [type(t).__name__ for t in train.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    resize, crop = test.transforms[:2]
    assert resize.size == round(32 * 256 / 224) == 37 and crop.size == (32, 32)
    assert train(image).shape == test(image).shape == (3, 32, 32)
    assert torch.equal(test(image), test(image))
    # A plain (200, 40, 40) image normalised with mean 0.5, std 0.25.
    assert test(image)[0].mean().item() == pytest.approx((200 / 255 - 0.5) / 0.25, abs=0.05)
    with pytest.raises(DataError, match="interpolation 'lanczos'"):
        build_transforms(32, MEAN, STD, train=True, interpolation="lanczos")


# --- sampler --------------------------------------------------------------------------------

# 8 classes with 1 to 8 images each: classes 0-2 have fewer than 3 images.
LABELS = np.repeat(np.arange(8), np.arange(1, 9))


def test_sampler_batches_hold_distinct_classes_in_contiguous_runs():
    sampler = ClassBalancedBatchSampler(LABELS, batch_size=12, samples_per_class=3, seed=0)
    assert sampler.classes_per_batch == 4 and len(sampler) == len(LABELS) // 12 == 3
    batches = list(sampler)
    assert len(batches) == 3
    for batch in batches:
        assert len(batch) == 12 and all(isinstance(i, int) for i in batch)
        runs = np.asarray(LABELS[batch]).reshape(4, 3)
        assert (runs == runs[:, :1]).all()  # each class's samples are contiguous
        assert len(set(runs[:, 0])) == 4  # distinct classes
        for run_indices, run in zip(np.reshape(batch, (4, 3)), runs):
            available = np.flatnonzero(LABELS == run[0])
            if len(available) >= 3:
                assert len(set(run_indices)) == 3  # without replacement when possible
            else:
                assert set(run_indices) == set(available)  # all of them, then repeats


def test_sampler_visits_classes_evenly():
    labels = np.repeat(np.arange(10), 5)
    sampler = ClassBalancedBatchSampler(labels, batch_size=6, samples_per_class=2, seed=3,
                                        num_batches=40)
    assert len(list(sampler)) == 40
    per_class = Counter(int(labels[first]) for batch in sampler for first in batch[0::2])
    assert sum(per_class.values()) == 120 and max(per_class.values()) - min(per_class.values()) <= 1


def test_sampler_is_a_pure_function_of_seed_and_epoch():
    def epoch_batches(seed, epoch):
        sampler = ClassBalancedBatchSampler(LABELS, 12, 3, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert epoch_batches(0, 2) == epoch_batches(0, 2)
    assert epoch_batches(0, 1) != epoch_batches(0, 2)
    assert epoch_batches(1, 2) != epoch_batches(0, 2)
    resumed = ClassBalancedBatchSampler(LABELS, 12, 3, seed=0)
    resumed.set_epoch(2)
    assert list(resumed) == list(resumed) == epoch_batches(0, 2)


def test_sampler_rejects_batches_it_cannot_fill():
    with pytest.raises(DataError, match="8 classes cannot fill a batch of 9 classes"):
        ClassBalancedBatchSampler(LABELS, batch_size=18, samples_per_class=2, seed=0)
    with pytest.raises(DataError, match="multiple of samples_per_class"):
        ClassBalancedBatchSampler(LABELS, batch_size=10, samples_per_class=3, seed=0)
    with pytest.raises(DataError, match="no full batch"):
        ClassBalancedBatchSampler(np.arange(5), batch_size=8, samples_per_class=2, seed=0)


def test_sampler_drives_a_dataloader(twenty_classes):
    split = load_dataset("synthetic", twenty_classes).train
    sampler = ClassBalancedBatchSampler(split.labels, batch_size=4, samples_per_class=2, seed=0)
    dataset = ImageDataset(split, build_transforms(8, MEAN, STD, train=True))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 8, 8) and labels[0] == labels[1] != labels[2] == labels[3]


# --- synthetic data -------------------------------------------------------------------------

def test_synthetic_dataset_loads_with_half_the_classes_for_training(tmp_path):
    root = make_synthetic_dataset(tmp_path / "synthetic", num_classes=5, images_per_class=3,
                                  image_size=24, class_offset=1000)
    assert root == tmp_path / "synthetic" and "family_seed: 0" in (root / "README.txt").read_text()
    data = load_dataset("synthetic", tmp_path)
    assert data.train.class_names == ["001.class_1000", "002.class_1001"]
    assert data.test.class_names == ["003.class_1002", "004.class_1003", "005.class_1004"]
    assert len(data.train) == 6 and load_image(data.test.paths[0]).size == (24, 24)


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_synthetic_dataset_is_deterministic_and_a_class_depends_only_on_its_id(tmp_path):
    first = make_synthetic_dataset(tmp_path / "a", num_classes=4, images_per_class=2, image_size=24)
    again = make_synthetic_dataset(tmp_path / "b", num_classes=4, images_per_class=2, image_size=24)
    assert folder_bytes(first) == folder_bytes(again)
    shifted = make_synthetic_dataset(tmp_path / "c", num_classes=2, images_per_class=2,
                                     image_size=24, class_offset=2)
    assert list(folder_bytes(shifted).values()) == list(folder_bytes(first).values())[4:]
    reseeded = make_synthetic_dataset(tmp_path / "d", num_classes=4, images_per_class=2,
                                      image_size=24, seed=1)
    assert folder_bytes(reseeded).keys() == folder_bytes(first).keys()
    assert folder_bytes(reseeded) != folder_bytes(first)


def test_synthetic_folder_is_reused_only_with_the_same_arguments(tmp_path):
    make_synthetic_dataset(tmp_path, num_classes=2, images_per_class=1, image_size=16)
    written = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.jpg")}
    make_synthetic_dataset(tmp_path, num_classes=2, images_per_class=1, image_size=16)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.jpg")} == written
    with pytest.raises(DataError, match="other arguments"):
        make_synthetic_dataset(tmp_path, num_classes=3, images_per_class=1, image_size=16)
    with pytest.raises(DataError, match="family has 2880 classes"):
        make_synthetic_dataset(tmp_path / "big", num_classes=10, images_per_class=1, class_offset=2875)


def test_synthetic_cli(tmp_path, capsys):
    arguments = [str(tmp_path / "cli"), "--classes", "3", "--per-class", "2", "--size", "16"]
    assert synthetic_main(arguments) == 0
    assert len(list((tmp_path / "cli" / "images").rglob("*.jpg"))) == 6
    assert synthetic_main([str(tmp_path / "cli"), "--classes", "4"]) == 2
    assert "other arguments" in capsys.readouterr().err


def leave_one_out_accuracy(features: np.ndarray, labels: np.ndarray, metric: str) -> float:
    if metric == "cosine":
        centred = features - features.mean(axis=1, keepdims=True)
        unit = centred / np.linalg.norm(centred, axis=1, keepdims=True)
        distances = -unit @ unit.T
    else:
        distances = ((features[:, None] - features[None]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    return float((labels[distances.argmin(axis=1)] == labels).mean())


def test_synthetic_classes_have_structure_that_mean_colour_does_not_reveal(tmp_path):
    make_synthetic_dataset(tmp_path / "synthetic", num_classes=20, images_per_class=10, image_size=32)
    data = load_dataset("synthetic", tmp_path)
    paths = data.train.paths + data.test.paths
    labels = np.concatenate([data.train.labels, data.test.labels + data.train.num_classes])
    pixels = np.stack([np.asarray(load_image(p), dtype=np.float32) / 255 for p in paths])
    gray = pixels.mean(axis=-1)
    downsampled = gray.reshape(len(gray), 16, 2, 16, 2).mean(axis=(2, 4)).reshape(len(gray), -1)
    # Stripe orientation and frequency show in the spectrum wherever the shapes sit.
    spectrum = np.abs(np.fft.fft2(gray - gray.mean(axis=(1, 2), keepdims=True))).reshape(len(gray), -1)
    chance = 1 / 20
    assert leave_one_out_accuracy(downsampled, labels, "cosine") >= 2 * chance
    assert leave_one_out_accuracy(spectrum, labels, "cosine") >= 5 * chance
    assert leave_one_out_accuracy(pixels.mean(axis=(1, 2)), labels, "euclidean") <= 2 * chance


def test_synthetic_images_drawn_in_parallel_have_the_same_bytes(tmp_path, monkeypatch):
    """2,000+ images are drawn by several processes; every image has its own seed."""
    import hashlib
    import os

    from bench.data.synthetic import make_synthetic_dataset

    def digest(root):
        h = hashlib.sha256()
        for f in sorted(root.rglob("*")):
            if f.is_file():
                h.update(str(f.relative_to(root)).encode())
                h.update(f.read_bytes())
        return h.hexdigest()

    arguments = dict(num_classes=100, images_per_class=20, image_size=16, seed=3)
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: the parallel path is not taken")
    make_synthetic_dataset(tmp_path / "parallel", **arguments)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # one worker: drawn in-process
    make_synthetic_dataset(tmp_path / "serial", **arguments)
    assert digest(tmp_path / "parallel") == digest(tmp_path / "serial")
