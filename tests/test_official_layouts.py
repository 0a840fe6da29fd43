"""The official dataset archives as users untar them (issue 16, item 7): each loads with
``--data-root`` pointing at the folder that holds it, with the standard DML split."""
from __future__ import annotations

from pathlib import Path

from bench.data import load_dataset
from tests import layouts


def test_cub_200_2011_archive(tmp_path):
    layouts.make_cub_official(tmp_path)
    splits = load_dataset("cub200", tmp_path)
    assert Path(splits.root).name == "CUB_200_2011"
    assert splits.train.class_names[0] == "001.Bird_001" and splits.train.class_names[-1] == "100.Bird_100"
    assert splits.test.class_names[0] == "101.Bird_101"  # classes 101-200, not train_test_split.txt


def test_cars_car_ims_and_cars_annos_mat(tmp_path):
    layouts.make_cars_official(tmp_path / "cars196", images_per_class=2)
    splits = load_dataset("cars196", tmp_path)
    assert splits.train.num_classes == splits.test.num_classes == 98
    assert splits.train.class_names[0].startswith("001.") and splits.test.class_names[0].startswith("099.")
    assert len(splits.train) == len(splits.test) == 196
    assert all(Path(p).is_file() for p in splits.train.paths[:3])


def test_stanford_online_products_archive(tmp_path):
    layouts.make_sop_official(tmp_path)
    splits = load_dataset("sop", tmp_path)
    assert Path(splits.root).name == "Stanford_Online_Products"
    assert splits.train.num_classes == 3 and splits.test.num_classes == 2


def test_inshop_official_tree_with_whitespace_aligned_columns(tmp_path):
    folder = layouts.make_inshop_official(tmp_path)
    index = (folder / "Eval" / "list_eval_partition.txt").read_text().splitlines()
    assert "  " in index[2]  # the real file pads its columns with spaces
    splits = load_dataset("inshop", tmp_path)
    assert splits.query.num_classes == splits.gallery.num_classes == 2
    assert all(Path(p).is_file() for p in splits.gallery.paths)
