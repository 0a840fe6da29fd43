"""Backbones: local weight files load strictly and safely; nothing downloads in tests."""
import pytest
import torch
from safetensors.torch import save_file

from bench.backbones import BackboneError, create_backbone, data_config


def test_local_safetensors_and_torch_files_round_trip(tmp_path):
    torch.manual_seed(0)
    source = create_backbone("vit_test")
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        torch.manual_seed(1)
        loaded = create_backbone("vit_test", weights=str(tmp_path / name))
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, state[key]), key


def test_missing_and_mismatched_weights_are_named(tmp_path):
    with pytest.raises(BackboneError, match="file not found: .*nope.safetensors"):
        create_backbone("vit_test", weights=str(tmp_path / "nope.safetensors"))
    save_file({k: v.contiguous() for k, v in create_backbone("vit_test").state_dict().items()},
              str(tmp_path / "small.safetensors"))
    with pytest.raises(BackboneError, match="does not match backbone demo_vit"):
        create_backbone("demo_vit", weights=str(tmp_path / "small.safetensors"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="cannot read .*junk.pth"):
        create_backbone("vit_test", weights=str(tmp_path / "junk.pth"))


def test_unknown_backbone_suggests_a_name():
    with pytest.raises(BackboneError, match="unknown timm model 'vit_smal_patch16_224'.*did you mean"):
        create_backbone("vit_smal_patch16_224")


def test_offline_hub_gives_an_actionable_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(BackboneError, match="HF_HUB_OFFLINE"):
        create_backbone("vit_small_patch16_224.augreg_in21k", weights="hub")


def test_normalisation_comes_from_the_pretrained_config():
    cfg = data_config(create_backbone("vit_small_patch16_224.augreg_in21k", weights=None))
    assert cfg.image_size == 224 and cfg.mean == (0.5, 0.5, 0.5) and cfg.std == (0.5, 0.5, 0.5)


def test_hf_cache_directory_is_read_offline(tmp_path):
    """A compute node without network: weights from a copied Hugging Face cache folder."""
    name = "vit_small_patch16_224.augreg_in21k"
    torch.manual_seed(0)
    source = create_backbone(name, weights=None)
    snapshot = tmp_path / "models--timm--vit_small_patch16_224.augreg_in21k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(snapshot / "model.safetensors"))
    loaded = create_backbone(name, weights=str(tmp_path))
    assert torch.equal(loaded.pos_embed, source.pos_embed)
    assert torch.equal(loaded.blocks[5].mlp.fc1.weight, source.blocks[5].mlp.fc1.weight)
