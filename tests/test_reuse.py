"""A trained cell, reused (issue 16): load_cell gives the model that was evaluated, `embed`
writes embeddings that `evaluate` scores to the cell's own numbers, and `export` writes one
standalone file (LoRA merged) that loads from a 3-line snippet to the same embeddings."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

import run_suite
from bench import load_cell, load_exported
from bench.config import CellConfig
from bench.reuse import CellLoadError
from bench.runner import run_cell
from tests.tiny import tiny_config

TINY = tiny_config(lr=1e-2, eval_batch_size=32)
METHODS = {
    "lora+bitfit": {"lora_rank": 2, "lora_alpha": 4.0},
    "vptsp_g+bitfit": {"num_prompts": 2, "prompt_depth": 2, "num_class_prompts": 1, "class_prompt_depth": 2},
    "adapter": {"adapter_blocks": 2, "adapter_width": 4},
    # the wider table's methods: two fold into the weights on export (the plain architecture)
    "ssf": {},
    "fact_tt": {"fact_rank": 4},
    "ln_tuning": {},
    "gate_vpt": {"num_prompts": 2, "prompt_depth": 2},
    "lora": {"lora_rank": 2},  # all merged: exported as the plain backbone with its head
    **{f"peft:{m}": {"peft_block_size": 8} if m in ("oft", "boft") else {}
       for m in ("lora", "dora", "vera", "loha", "lokr", "ia3", "oft", "boft")},  # peft's own merge
}


@pytest.fixture(scope="module")
def cells(synthetic_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("reuse")
    done = {}
    for method, args in METHODS.items():
        config = CellConfig(dataset="synthetic", data_root=str(synthetic_root), method=method, method_args=args,
                            **TINY)
        result = run_cell(config, base / method.replace("+", "_"), key={"method": method})
        assert result["status"] == "ok", result["reason"]
        done[method] = (base / method.replace("+", "_"), result)
    return done


def test_embed_of_the_test_split_scores_to_the_cell_metrics(cells, tmp_path, capsys):
    for method, (cell_dir, result) in cells.items():
        out = tmp_path / f"{cell_dir.name}.npy"
        assert run_suite.main(["embed", str(cell_dir), "--split", "test", "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert "score them: run_suite.py evaluate" in printed
        embeddings = np.load(out)
        stored = np.load(cell_dir / "test_embeddings.npy")
        assert np.allclose(embeddings, stored.astype(np.float32), atol=1e-3)  # float16 copy of the same
        assert run_suite.main(["evaluate", str(out), str(tmp_path / f"{cell_dir.name}_labels.npy"), "--k", "1", "2",
                               "4", "8", "--json"]) == 0
        rescored = json.loads(capsys.readouterr().out)
        for metric, value in result["final"]["test"].items():
            if "@" in metric:
                assert rescored[metric] == value, (method, metric)


def test_load_cell_is_the_evaluated_model_in_eval_mode(cells):
    cell_dir, result = cells["vptsp_g+bitfit"]
    model = load_cell(cell_dir)
    assert not model.training and all(not m.training for m in model.modules())
    assert model.cell_result["cell_id"] == result["cell_id"]
    with safe_open(str(cell_dir / "trainable.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["cell_id"] == result["cell_id"] and metadata["method"] == "vptsp_g+bitfit"
    assert metadata["identity_hash"] == result["identity_hash"] and metadata["backbone"] == "vit_test"
    assert "torch" in json.loads(metadata["versions"])
    assert json.loads(metadata["config"])["method_args"]["num_prompts"] == 2


def test_export_loads_standalone_to_the_same_embeddings(cells, tmp_path, capsys):
    images = torch.randn(4, 3, 32, 32)
    for method, (cell_dir, _) in cells.items():
        out = tmp_path / f"{cell_dir.name}.safetensors"
        assert run_suite.main(["export", str(cell_dir), "--out", str(out)]) == 0
        assert "load_exported" in capsys.readouterr().out
        with torch.no_grad():
            expected = load_cell(cell_dir)(images)
        moved = tmp_path / "elsewhere" / out.name  # the file alone: no cell folder beside it
        moved.parent.mkdir(exist_ok=True)
        shutil.move(out, moved)
        # the documented snippet
        model = load_exported(moved)
        with torch.no_grad():
            embeddings = model(images)
        assert torch.allclose(embeddings, expected, atol=1e-5), method
        with safe_open(str(moved), framework="pt") as f:
            keys = list(f.keys())
        assert not [k for k in keys if "lora_" in k]  # merged into the linear layers
        info = model.export_info
        assert info["trained_method"] == method and info["backbone"] == "vit_test"
        if method == "lora+bitfit":
            assert info["method"] == "bitfit"
        if method in ("lora", "ssf", "fact_tt") or method.startswith("peft:"):  # folded: the plain architecture
            assert info["method"] == "linear_probe"
            assert not [k for k in keys if ".base." in k or "base_layer" in k or "fact" in k
                        or k.endswith((".gamma", ".beta"))]
        if method.startswith("vptsp"):
            assert any("prompts" in k for k in keys)


def test_loading_a_folder_that_is_no_finished_cell_says_which_file(tmp_path, cells):
    with pytest.raises(CellLoadError, match="no result.json"):
        load_cell(tmp_path)
    cell_dir, _ = cells["adapter"]
    copy = tmp_path / "copy"
    shutil.copytree(cell_dir, copy)
    (copy / "trainable.safetensors").unlink()
    with pytest.raises(CellLoadError, match="trainable.safetensors: missing"):
        load_cell(copy)
    assert run_suite.main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "m.safetensors")]) == 2


def test_embed_a_folder_of_images_labels_by_subfolder(cells, synthetic_root, tmp_path):
    from bench.reuse import embed

    folder = tmp_path / "images"
    for name in ("b_class", "a_class"):
        (folder / name).mkdir(parents=True)
        for source in sorted((synthetic_root / "synthetic" / "images").iterdir())[0].glob("*.jpg"):
            shutil.copy(source, folder / name / source.name)
            if len(list((folder / name).iterdir())) == 2:
                break
    embeddings, labels = embed(cells["adapter"][0], images=folder)
    assert embeddings.shape == (4, 16) and labels.tolist() == [0, 0, 1, 1]  # a_class first
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_an_export_carries_its_evaluation_transform_and_embeds_like_the_cell(cells, tmp_path):
    """``export_transform`` is the cell's own evaluation transform: an image prepared with it and
    embedded by the exported model gives the embedding ``embed`` computes for the cell."""
    from PIL import Image

    from bench import export_transform
    from bench.reuse import embed

    cell_dir, result = cells["lora+bitfit"]
    out = tmp_path / "model.safetensors"
    assert run_suite.main(["export", str(cell_dir), "--out", str(out)]) == 0
    model = load_exported(out)
    pre = model.export_info["preprocess"]
    assert pre["resize"] == round(32 * 256 / 224) and pre["center_crop"] == 32
    assert pre["interpolation"] in ("bilinear", "bicubic") and len(pre["mean"]) == 3
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    expected, _ = embed(cell_dir, images=str(tmp_path / "images"))
    transform = export_transform(model)
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in sorted(folder.iterdir())])
    with torch.no_grad():
        got = model(batch).numpy()
    assert np.allclose(got, expected, atol=1e-5)
