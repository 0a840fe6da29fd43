"""Bad input, table-driven: one message naming the file, field or value; non-zero exit; no
traceback; results that exist are untouched. Listed in TESTING.md."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import run_suite
from tests import layouts

CELL = ["cell", "--backbone", "vit_test", "--weights", "none", "--set", "num_workers=0", "--epochs", "1"]


def build_synthetic(root: Path) -> Path:
    from bench.data import make_synthetic_dataset

    make_synthetic_dataset(root / "synthetic", num_classes=4, images_per_class=5, image_size=32)
    return root


def broken_layout(builder, remove: str):
    def build(root: Path) -> Path:
        folder = builder(root / NAME_OF[builder])
        target = folder / remove
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        return root
    return build


def malformed_sop(root: Path) -> Path:
    folder = layouts.make_sop(root / "sop")
    index = folder / "Info_Files" / "Ebay_train.txt"
    index.write_text(index.read_text() + "7 not-a-number\n")
    return root


def with_bad_image(data: bytes):
    def build(root: Path) -> Path:
        build_synthetic(root)
        victim = sorted((root / "synthetic" / "images").rglob("*.jpg"))[0]
        victim.write_bytes(data)
        return root
    return build


NAME_OF = {layouts.make_cub200: "cub200", layouts.make_cars196: "cars196", layouts.make_sop: "sop",
           layouts.make_inshop: "inshop", layouts.make_inaturalist: "inaturalist"}


def small_weights(root: Path) -> Path:
    from bench.backbones import create_backbone

    save_file({k: v.contiguous() for k, v in create_backbone("vit_test").state_dict().items()},
              str(root / "vit_test.safetensors"))
    return build_synthetic(root)


# (id, argv template with {root}, data builder, text the message must contain)
CELL_CASES = [
    ("missing data root", ["--dataset", "cub200", "--data-root", "{root}/nowhere"], None, "nowhere"),
    ("cub200 without images/", ["--dataset", "cub200", "--data-root", "{root}"],
     broken_layout(layouts.make_cub200, "images"), "images"),
    ("cars196 without images/", ["--dataset", "cars196", "--data-root", "{root}"],
     broken_layout(layouts.make_cars196, "images"), "images"),
    ("sop without Ebay_train.txt", ["--dataset", "sop", "--data-root", "{root}"],
     broken_layout(layouts.make_sop, "Info_Files/Ebay_train.txt"), "Ebay_train.txt"),
    ("inshop without list_eval_partition.txt", ["--dataset", "inshop", "--data-root", "{root}"],
     broken_layout(layouts.make_inshop, "list_eval_partition.txt"), "list_eval_partition.txt"),
    ("inaturalist without train list", ["--dataset", "inaturalist", "--data-root", "{root}"],
     broken_layout(layouts.make_inaturalist, "Inaturalist_train_set1.txt"), "Inaturalist_train_set1.txt"),
    ("malformed index line", ["--dataset", "sop", "--data-root", "{root}"], malformed_sop, "Ebay_train.txt"),
    ("zero-byte jpeg", ["--dataset", "synthetic", "--data-root", "{root}"], with_bad_image(b""), ".jpg"),
    ("corrupt jpeg", ["--dataset", "synthetic", "--data-root", "{root}", "--set", "batch_size=4"],
     with_bad_image(b"\xff\xd8\xff\xe0 this is not a jpeg"), ".jpg"),
    ("unknown dataset", ["--dataset", "cub2000", "--data-root", "{root}"], None, "did you mean 'cub200'"),
    ("unknown method", ["--dataset", "synthetic", "--data-root", "{root}", "--method", "vpt_dep"],
     build_synthetic, "did you mean 'vpt_deep'"),
    ("unknown method argument", ["--dataset", "synthetic", "--data-root", "{root}", "--method", "vpt_deep",
                                 "--method-arg", "num_promts=3"], build_synthetic, "did you mean 'num_prompts'"),
    ("method argument of the wrong type", ["--dataset", "synthetic", "--data-root", "{root}", "--method",
                                          "vpt_deep", "--method-arg", "num_prompts=many"], build_synthetic,
     "num_prompts"),
    ("unknown config field", ["--dataset", "synthetic", "--data-root", "{root}", "--set", "learning_rate=1"],
     None, "unknown field 'learning_rate' (did you mean 'lr'?); fields: dataset, data_root"),
    ("misspelt config field", ["--dataset", "synthetic", "--data-root", "{root}", "--set", "epoch=1"],
     None, "did you mean 'epochs'"),
    ("batch not divisible", ["--dataset", "synthetic", "--data-root", "{root}", "--set", "batch_size=7"],
     None, "samples_per_class"),
    ("missing weights file", ["--dataset", "synthetic", "--data-root", "{root}", "--weights", "{root}/no.pth"],
     build_synthetic, "no.pth"),
    ("weights of another architecture", ["--dataset", "synthetic", "--data-root", "{root}", "--backbone",
                                         "demo_vit", "--weights", "{root}/vit_test.safetensors"], small_weights,
     "does not match backbone demo_vit"),
    ("unknown backbone", ["--dataset", "synthetic", "--data-root", "{root}", "--backbone", "vit_tset"],
     build_synthetic, "did you mean"),
]


@pytest.mark.parametrize("case", CELL_CASES, ids=[c[0] for c in CELL_CASES])
def test_cell_bad_input(case, tmp_path, capsys):
    _, argv, build, expected = case
    if build:
        build(tmp_path)
    out = tmp_path / "results"
    finished = out / "adhoc" / "finished-cell" / "result.json"
    finished.parent.mkdir(parents=True)
    finished.write_text(json.dumps({"status": "ok", "marker": 1}))
    args = [a.format(root=tmp_path) for a in CELL + argv] + ["--out", str(out)]
    # the weights flag given twice: the last one wins, as argparse does
    code = run_suite.main(args)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code != 0
    assert expected in " ".join(text.split()), text
    assert "Traceback" not in text
    assert json.loads(finished.read_text()) == {"status": "ok", "marker": 1}


def write_npy(path: Path, array) -> str:
    np.save(path, np.asarray(array))
    return str(path)


EVALUATE_CASES = [
    ("missing embeddings file", lambda d: [str(d / "none.npy"), write_npy(d / "l.npy", [0, 1])], "none.npy"),
    ("labels of another length", lambda d: [write_npy(d / "e.npy", np.eye(3, dtype=np.float32)),
                                            write_npy(d / "l.npy", [0, 1])], "3"),
    ("k larger than the gallery", lambda d: [write_npy(d / "e.npy", np.eye(3, dtype=np.float32)),
                                             write_npy(d / "l.npy", [0, 0, 1]), "--k", "50"], "50"),
]


@pytest.mark.parametrize("case", EVALUATE_CASES, ids=[c[0] for c in EVALUATE_CASES])
def test_evaluate_bad_input(case, tmp_path, capsys):
    _, make_args, expected = case
    code = run_suite.main(["evaluate", *make_args(tmp_path)])
    captured = capsys.readouterr()
    assert code != 0
    assert expected in captured.err, captured.err
    assert "Traceback" not in captured.err + captured.out


def test_debug_flag_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="nowhere"):
        run_suite.main(["--debug", "evaluate", str(tmp_path / "nowhere.npy"), str(tmp_path / "l.npy")])


class Payload:
    """Stands for any pickled object: loading it would mean running its class's code."""


def test_weights_are_never_unpickled(tmp_path):
    """A .pth holding arbitrary objects is refused (weights_only=True), not executed."""
    from bench.backbones import BackboneError, create_backbone

    torch.save({"state_dict": {"x": Payload()}}, tmp_path / "evil.pth")
    with pytest.raises(BackboneError, match="cannot read"):
        create_backbone("vit_test", weights=str(tmp_path / "evil.pth"))
