"""Backbones: any timm ViT by name, pretrained from the hub, a local file, or random init.

Weights sources (``weights`` argument):
- ``"hub"``: timm / Hugging Face hub. With ``HF_HUB_OFFLINE=1`` only the local HF cache is used,
  which is what compute nodes without internet need after a one-time download on a login node.
- a file (``.safetensors``, ``.pth``/``.pt``/``.bin`` loaded with ``weights_only=True``, or a
  Google ``.npz``): loaded into the timm architecture, strictly (a mismatch is an error).
- a directory: a Hugging Face hub cache (``HF_HUB_CACHE`` layout), used offline.
- ``None`` / ``"none"``: random init (tests; also for counting parameters).

Besides timm names, a few small architectures exist for tests and the demo (``SMALL_VITS``).
``demo_vit`` with ``weights="hub"`` means the project's own pretrained demo weights from the
cache (``bench.demo_weights``); construction never trains: when they are missing the error
says how to make them (``python -m bench.demo_pretrain``, which the demo suite's ``prepare``
hook runs).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg
from timm.models._registry import get_arch_pretrained_cfgs
from torch import nn

from bench.catalog import BACKBONES, SMALL_VITS, closest, resolve_backbone_alias
from bench.errors import UserError

# Small ViTs the project builds itself: a timm architecture with other sizes.


class BackboneError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class DataConfig:
    """What the data pipeline needs from a backbone: its input size and normalisation."""
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"  # the model's pretrained config's (bicubic for DINO, CLIP, AugReg)


def resolve_name(name: str) -> str:
    """The full timm name a backbone name stands for: a catalog alias (``vit_s16``) becomes its
    timm name; an architecture without a pretrained tag (``vit_small_patch16_224``) gets timm's
    default tag for it (recorded in result.json, so the weights are never ambiguous); a tag that
    the architecture does not have is an error listing those it has."""
    name = resolve_backbone_alias(name)
    if name in SMALL_VITS:
        return name
    if not timm.is_model(name):
        candidates = timm.list_models("vit_*", pretrained=True) + list(BACKBONES) + list(SMALL_VITS)
        raise BackboneError(f"backbone: unknown timm model {name!r}{closest(name, candidates)}")
    arch, _, tag = name.partition(".")
    tagged = list(get_arch_pretrained_cfgs(arch))
    if not tagged:  # an architecture timm has no weights for: random init only
        return arch
    if not tag:
        return f"{arch}.{get_pretrained_cfg(arch).tag}"
    if name not in tagged:
        raise BackboneError(f"backbone: timm has no pretrained tag {tag!r} for {arch}; tags: "
                            + ", ".join(t.partition(".")[2] for t in tagged))
    return name


def create_backbone(name: str, weights: str | None = None, image_size: int | None = None) -> nn.Module:
    """A timm VisionTransformer without classifier (``num_classes=0``); ``resolved_name`` holds
    the full timm name it was built from (``resolve_name``)."""
    model = _create(resolve_name(name), weights, image_size)
    model.resolved_name = resolve_name(name)
    return model


def _create(name: str, weights: str | None, image_size: int | None) -> nn.Module:
    if weights in (None, "", "none"):
        weights = None
    if name in SMALL_VITS:
        return _create_small(name, weights)
    kwargs: dict[str, Any] = {"num_classes": 0}
    if image_size:
        kwargs["img_size"] = image_size
    if weights is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    if weights == "hub":
        return _create_from_hub(name, kwargs)
    path = Path(weights).expanduser()
    if path.is_dir():
        return _create_from_hf_cache(name, path, kwargs)
    model = timm.create_model(name, pretrained=False, **kwargs)
    load_weights_file(model, path, name)
    return model


def _create_small(name: str, weights: str | None) -> nn.Module:
    spec = dict(SMALL_VITS[name])
    arch = spec.pop("arch")
    model = timm.create_model(arch, pretrained=False, num_classes=0, **spec)
    norm = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)} if name in ("vit_test", "demo_vit") else {}
    # the stand-ins keep their architecture's normalisation and interpolation (CLIP's own mean/std)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, spec["img_size"], spec["img_size"]), **norm}
    if weights == "hub":
        if name != "demo_vit":
            raise BackboneError(f"weights: {name} has no pretrained weights; use weights: none")
        from bench.demo_weights import find_weights, weights_file

        path = find_weights()
        if path is None:
            raise BackboneError(f"weights: the demo backbone's pretrained weights are not at {weights_file()}; "
                                "make them once with `python -m bench.demo_pretrain` (`make demo` does it)")
        weights = str(path)
    if weights is not None:
        load_weights_file(model, Path(weights), name)
    return model


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _create_from_hub(name: str, kwargs: dict[str, Any]) -> nn.Module:
    if _hub_offline():
        return _create_from_hf_cache(name, None, kwargs)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # network failures come in many types
        raise BackboneError(f"weights: cannot load pretrained {name} from the hub (no network? download once "
                            f"on a login node, then set HF_HUB_OFFLINE=1, or pass a local weights file): {e}") from e


def _create_from_hf_cache(name: str, cache_dir: Path | None, kwargs: dict[str, Any]) -> nn.Module:
    """Offline: the weights timm would download, read straight from a Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    repo_id = getattr(cfg, "hf_hub_id", None) if cfg else None
    if not repo_id:
        raise BackboneError(f"weights: {name} has no Hugging Face hub id; pass a local weights file")
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo_id, filename, cache_dir=str(cache_dir) if cache_dir else None)
        if isinstance(found, str):
            model = timm.create_model(name, pretrained=False, **kwargs)
            load_weights_file(model, Path(found), name)
            return model
    where = cache_dir or os.environ.get("HF_HUB_CACHE") or "the default Hugging Face cache"
    raise BackboneError(f"weights: {repo_id} is not in {where} (offline: HF_HUB_OFFLINE is set or a cache "
                        "directory was given); download it once where there is network, e.g. "
                        f"`python -c \"import timm; timm.create_model('{name}', pretrained=True)\"`")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only: safetensors, or torch.load(weights_only=True); never unpickles code."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise BackboneError(f"weights: cannot read {path}: {e}") from e
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BackboneError(f"weights: {path} does not hold a state dict")
    return state


def load_weights_file(model: nn.Module, path: Path, name: str) -> None:
    if not path.is_file():
        raise BackboneError(f"weights: file not found: {path} (expected 'hub', 'none', a weights file "
                            "or a Hugging Face cache directory)")
    if path.suffix == ".npz":  # Google AugReg checkpoints, as timm's own loader reads them
        from timm.models.vision_transformer import _load_weights

        try:
            _load_weights(model, str(path))
        except Exception as e:
            raise BackboneError(f"weights: {path} does not match backbone {name}: {e}") from e
        return
    state = read_state_dict(path)
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = {k: v for k, v in state.items() if not k.startswith("head.")}  # classifier of pretraining
    try:
        state = checkpoint_filter_fn(state, model)  # resizes position embeddings if needed
        missing, unexpected = model.load_state_dict(state, strict=False)
    except Exception as e:
        raise BackboneError(f"weights: {path} does not match backbone {name}: {e}") from e
    if missing or unexpected:
        raise BackboneError(
            f"weights: {path} does not match backbone {name}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")


def data_config(backbone: nn.Module, image_size: int | None = None) -> DataConfig:
    """Input size and normalisation from the backbone's timm pretrained config."""
    cfg = getattr(backbone, "pretrained_cfg", {}) or {}
    size = image_size or int(cfg.get("input_size", (3, 224, 224))[-1])
    mean = tuple(float(x) for x in cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(float(x) for x in cfg.get("std", (0.229, 0.224, 0.225)))
    interpolation = str(cfg.get("interpolation") or "bilinear")
    return DataConfig(image_size=size, mean=mean, std=std, interpolation=interpolation)  # type: ignore[arg-type]
