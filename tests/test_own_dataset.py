"""Your own dataset (README, "Your own dataset"): a folder tree and a CSV index as datasets with
their own names, run through the README's own suite, and the rules they share with `embed`."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import peft_dml_cli as cli
from bench.data import DataError, load_dataset
from bench.data.synthetic import make_family, render_image

README = Path(__file__).resolve().parent.parent / "README.md"
FORMATS = (".jpg", ".png", ".tif", ".webp")


def _image(class_id: int, index: int) -> Image.Image:
    rng = np.random.default_rng([class_id, index])
    return Image.fromarray(render_image(make_family(0), class_id, rng, 32))


def make_folder_tree(root: Path, classes: int = 8, per_class: int = 6) -> Path:
    for c in range(1, classes + 1):
        folder = root / f"class{c}"  # class2 before class10: natural order
        folder.mkdir(parents=True)
        for i in range(per_class):
            _image(c, i).save(folder / f"{i:03d}{FORMATS[(c + i) % len(FORMATS)]}")
    (root / "README.txt").write_text("not an image")
    return root


def make_csv_dataset(root: Path, classes: int = 8, per_class: int = 6) -> Path:
    (root / "images").mkdir(parents=True)
    rows = ["label,path,split,is_query,is_gallery"]
    for c in range(classes):
        for i in range(per_class):
            name = f"images/c{c}_{i}.jpg"
            _image(100 + c, i).save(root / name)
            if c < classes // 2:
                rows.append(f"shoe{c},{name},train,,")
            else:  # the first two images of a test class query, the rest are the gallery
                rows.append(f"shoe{c},{name},test,{str(i < 2).lower()},{str(i >= 2).lower()}")
    (root / "index.csv").write_text("\n".join(rows) + "\n")
    return root


def readme_suite() -> dict:
    text = README.read_text().split("### Your own dataset")[1].split("### Pretrained weights")[0]
    (block,) = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    return yaml.safe_load(block)


def test_folder_tree_splits_class_disjoint_in_natural_order_and_reads_every_pillow_format(tmp_path):
    make_folder_tree(tmp_path / "flowers", classes=12, per_class=3)
    data = load_dataset("folder:flowers", tmp_path)
    assert data.train.class_names == [f"class{c}" for c in range(1, 7)]
    assert data.test.class_names == [f"class{c}" for c in range(7, 13)]
    suffixes = {Path(p).suffix for p in data.train.paths + data.test.paths}
    assert suffixes == set(FORMATS)  # .tif and .webp read like .jpg; README.txt left out
    assert load_dataset("folder:flowers", tmp_path / "flowers").root == data.root  # the folder itself


def test_nested_folders_are_an_error_in_training_and_in_embed(tmp_path):
    from bench.reuse import CellLoadError, image_folder_split

    root = make_folder_tree(tmp_path / "flowers", classes=4, per_class=2)
    (root / "class1" / "more").mkdir()
    _image(1, 9).save(root / "class1" / "more" / "x.jpg")
    with pytest.raises(DataError, match="class folder holds folders"):
        load_dataset("folder:flowers", tmp_path)
    with pytest.raises(CellLoadError, match="class folder holds folders"):
        image_folder_split(root)


def test_csv_index_gives_query_and_gallery_and_its_own_validation_classes(tmp_path):
    make_csv_dataset(tmp_path / "shoes")
    data = load_dataset("csv:shoes", tmp_path)
    assert data.test is None and len(data.query) == 4 * 2 and len(data.gallery) == 4 * 4
    assert data.query.class_names == data.gallery.class_names
    index = tmp_path / "shoes" / "index.csv"
    lines = index.read_text().splitlines()
    lines[1] = lines[1].replace(",train,", ",val,")  # shoe0's first image: a val class shared with train
    index.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="classes are in both train and val"):
        load_dataset("csv:shoes", tmp_path)
    index.write_text("label,file,split\nx,a.jpg,train\n")
    with pytest.raises(DataError, match="missing columns path"):
        load_dataset("csv:shoes", tmp_path)


def test_the_readme_example_runs_and_the_report_names_the_datasets(tmp_path, monkeypatch, capsys):
    suite = readme_suite()
    assert suite["grid"]["dataset"] == ["folder:flowers", "csv:shoes"]
    assert suite["defaults"]["backbone"] == "vit_s16"
    suite["defaults"]["backbone"] = "vit_test"  # the one change: a tiny ViT that needs no download
    suite["grid"]["seed"] = [0, 1]
    monkeypatch.chdir(tmp_path)
    make_folder_tree(tmp_path / "my_data" / "flowers")
    make_csv_dataset(tmp_path / "my_data" / "shoes")
    Path("flowers.yaml").write_text(yaml.safe_dump(suite))
    tiny = ["--set", "weights=none", "--set", "epochs=1", "--set", "image_size=32", "--set", "embedding_size=16",
            "--set", "max_steps_per_epoch=2", "--set", "batch_size=8", "--set", "samples_per_class=2",
            "--set", "num_workers=0", "--set", "device=cpu"]
    assert cli.main(["run", "flowers.yaml", "--data-root", "my_data", "--executor", "local", *tiny]) == 0
    cells = sorted(p.name for p in (tmp_path / "results" / "flowers").iterdir() if (p / "result.json").is_file())
    assert len(cells) == 8 and any(c.startswith("folder_flowers-") for c in cells)
    assert any(c.startswith("csv_shoes-") for c in cells)
    index = (tmp_path / "results" / "flowers" / "report" / "index.md").read_text()
    assert "flowers" in index and "shoes" in index and "data in" in index
    table = next((tmp_path / "results" / "flowers" / "report" / "tables").glob("*.md")).read_text()
    assert "flowers" in table and "shoes" in table and "Synthetic" not in table


def test_a_symlinked_class_folder_is_a_class_in_training_and_in_embed(tmp_path):
    from bench.reuse import image_folder_split

    root = make_folder_tree(tmp_path / "flowers", classes=4, per_class=2)
    elsewhere = make_folder_tree(tmp_path / "elsewhere", classes=1, per_class=2) / "class1"
    (root / "class5").symlink_to(elsewhere, target_is_directory=True)
    data = load_dataset("folder:flowers", tmp_path)
    assert "class5" in data.test.class_names
    assert "class5" in image_folder_split(root).class_names
