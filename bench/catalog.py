"""The one catalog of names: datasets, backbones, methods, accumulators and metrics.

Every layer reads names, display names, orders and K lists from here, so that adding a dataset
or a method is one row here plus its implementation, and a forgotten row fails a test
(``tests/test_architecture.py``) instead of degrading silently. Torch-free: the reporter and
``status`` import it on machines without torch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from bench.errors import UserError


class CatalogError(UserError, ValueError):
    """A name the catalog does not know; the message lists the known ones."""


# --- datasets --------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetInfo:
    name: str
    display: str
    eval_ks: tuple[int, ...]  # R@K the engine computes (SPEC section 2)
    paper_ks: tuple[int, ...]  # the R@K triple the paper's Table 2 / 3 prints
    query_gallery: bool = False  # evaluated as queries against a gallery (In-Shop)
    large: bool = False  # SOP / iNat size: optional per-cell artifacts are off by default


DATASETS: dict[str, DatasetInfo] = {info.name: info for info in (
    DatasetInfo("cub200", "CUB-200", (1, 2, 4, 8), (1, 2, 4)),
    DatasetInfo("cars196", "Cars-196", (1, 2, 4, 8), (1, 2, 4)),
    DatasetInfo("sop", "SOP", (1, 10, 100, 1000), (1, 10, 100), large=True),
    DatasetInfo("inshop", "In-Shop", (1, 10, 20, 30, 40, 50), (1, 10, 20), query_gallery=True),
    DatasetInfo("inaturalist", "iNaturalist", (1, 4, 16, 32), (1, 4, 16), large=True),
    DatasetInfo("synthetic", "Synthetic", (1, 2, 4, 8), (1, 2, 4)),
    # the demo's shifted target: classes by colour, which the demo backbone's pretraining ignored
    DatasetInfo("synthetic_far", "Synthetic (far)", (1, 2, 4, 8), (1, 2, 4)),
)}
DATASET_NAMES = tuple(DATASETS)
# Your own images: `folder:NAME` (<data_root>/NAME/<class>/*.jpg) or `csv:NAME` (<data_root>/NAME/
# index.csv with label, path, split[, is_query, is_gallery]); NAME shows in tables and cell ids.
OWN_KINDS = ("folder", "csv")
OWN_KS = (1, 2, 4, 8)
_OWN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def own_dataset(name: str) -> tuple[str, str] | None:
    """``("folder", "flowers")`` for ``folder:flowers``; None for a catalog name or a malformed one."""
    kind, sep, own = str(name).partition(":")
    if sep and kind in OWN_KINDS and _OWN_NAME.match(own):
        return kind, own
    return None


def is_dataset(name: str) -> bool:
    return name in DATASETS or own_dataset(name) is not None


def dataset(name: str) -> DatasetInfo:
    own = own_dataset(name)
    if own is not None:
        return DatasetInfo(name, own[1], OWN_KS, OWN_KS[:3])
    if name not in DATASETS:
        kind, sep, rest = str(name).partition(":")
        if sep and kind in OWN_KINDS:
            raise CatalogError(f"dataset {name!r}: after '{kind}:' give a name of letters, digits, '.', '_' or '-' "
                               "(it shows in tables and cell ids), e.g. folder:flowers")
        raise CatalogError(f"unknown dataset {name!r}{closest(name, DATASETS)}; choose one of "
                           f"{', '.join(DATASETS)}, or your own images as folder:NAME or csv:NAME")
    return DATASETS[name]


# --- backbones -------------------------------------------------------------------------------

@dataclass(frozen=True)
class BackboneInfo:
    alias: str  # the short name suites and cell ids use
    timm_name: str  # architecture.pretrained_tag
    embedding_size: int  # the paper's embedding size for it (a suite may set its own)
    display: str
    pretraining: str = ""  # for the pretraining-source ablation's legend


BACKBONES: dict[str, BackboneInfo] = {info.alias: info for info in (
    BackboneInfo("vit_s16", "vit_small_patch16_224.augreg_in21k", 384, "ViT-S/16", "IN-21k (AugReg)"),
    BackboneInfo("vit_b16", "vit_base_patch16_224.augreg_in21k", 512, "ViT-B/16", "IN-21k (AugReg)"),
    BackboneInfo("vit_s16_in1k", "vit_small_patch16_224.augreg_in1k", 384, "ViT-S/16 IN-1k", "IN-1k (AugReg)"),
    BackboneInfo("vit_s16_dino", "vit_small_patch16_224.dino", 384, "ViT-S/16 DINO", "DINO (IN-1k, self-sup.)"),
    BackboneInfo("vit_s14_dinov2", "vit_small_patch14_dinov2.lvd142m", 384, "ViT-S/14 DINOv2",
                 "DINOv2 (LVD-142M, self-sup.)"),
    BackboneInfo("vit_b16_clip", "vit_base_patch16_clip_224.openai", 512, "ViT-B/16 CLIP", "CLIP (OpenAI WIT)"),
)}
# Small ViTs the project builds itself: their architectures (bench.backbones builds them).
SMALL_VITS: dict[str, dict[str, Any]] = {
    # a few seconds per cell on CPU: contract tests and the smoke suite
    "vit_test": dict(arch="vit_small_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=3,
                     num_heads=3, mlp_ratio=2.0),
    # the demo's backbone, pretrained by the project on generated source classes
    "demo_vit": dict(arch="vit_small_patch16_224", img_size=32, patch_size=4, embed_dim=96, depth=4,
                     num_heads=3, mlp_ratio=2.0),
    # tiny stand-ins of the pretraining-source ablation's architectures, for tests: register
    # tokens and layer scale (DINOv2), a pre-norm before the blocks and its own mean/std (CLIP)
    "vit_test_dinov2": dict(arch="vit_small_patch14_reg4_dinov2", img_size=28, patch_size=7, embed_dim=48, depth=3,
                            num_heads=3, mlp_ratio=2.0, init_values=1e-5, reg_tokens=4),
    "vit_test_clip": dict(arch="vit_base_patch16_clip_224", img_size=32, patch_size=8, embed_dim=48, depth=3,
                          num_heads=3, mlp_ratio=2.0),
}

# Small ViTs the project builds itself (architectures in bench.backbones.SMALL_VITS).
SMALL_BACKBONES: dict[str, str] = {"vit_test": "Test ViT", "demo_vit": "Demo ViT",
                                   "vit_test_dinov2": "Test ViT (registers)", "vit_test_clip": "Test ViT (pre-norm)"}

_VIT = re.compile(r"^vit_(tiny|small|base|large|huge|giant)_patch(\d+)")
_VIT_SIZES = {"tiny": "T", "small": "S", "base": "B", "large": "L", "huge": "H", "giant": "g"}


def backbone_by_name(name: str) -> BackboneInfo | None:
    """The catalog row for an alias or for its full timm name."""
    if name in BACKBONES:
        return BACKBONES[name]
    return next((b for b in BACKBONES.values() if b.timm_name == name), None)


def resolve_backbone_alias(name: str) -> str:
    """An alias -> its timm name; anything else unchanged."""
    info = BACKBONES.get(name)
    return info.timm_name if info else name


def backbone_display(name: str) -> str:
    """'ViT-S/16' for the paper's backbones, 'ViT-S/16 DINO' for the others in the catalog, and
    a name derived from timm's naming scheme for any other timm ViT."""
    info = backbone_by_name(name)
    if info is not None:
        return info.display
    if name in SMALL_BACKBONES:
        return SMALL_BACKBONES[name]
    match = _VIT.match(str(name))
    if not match:
        return str(name)
    base = f"ViT-{_VIT_SIZES[match.group(1)]}/{match.group(2)}"
    tag = str(name).partition(".")[2]
    return f"{base} {tag}" if tag else base


def backbone_rank(name: str) -> tuple[int, int, str]:
    """Catalog order first (the paper's S before B), then timm ViTs by size, then by name."""
    aliases = list(BACKBONES)
    info = backbone_by_name(name)
    if info is not None:
        return (0, aliases.index(info.alias), "")
    match = _VIT.match(str(name))
    if match:
        return (1, list(_VIT_SIZES).index(match.group(1)) * 100 + int(match.group(2)), str(name))
    return (2, 0, str(name))


def check_image_size(name: str, image_size: int | None) -> None:
    """A ViT cuts the image into patches: an ``image_size`` that is not a multiple of the
    backbone's patch size fails here, before any data is read (not as a traceback per cell)."""
    if not image_size:
        return
    resolved = resolve_backbone_alias(name)
    if resolved in SMALL_VITS:
        patch = SMALL_VITS[resolved]["patch_size"]
    else:
        match = re.search(r"patch(\d+)", resolved)
        patch = int(match.group(1)) if match else None
    if patch and image_size % patch:
        low = image_size // patch * patch
        raise CatalogError(f"image_size: {image_size} px is not a multiple of {name}'s {patch} px patches; "
                            f"use {low or patch} or {low + patch}")


def known_backbone(name: str) -> str:
    """The timm name of a catalog backbone or the name of a small ViT, without timm: what a suite
    check can say where torch is not installed (``bench.backbones.resolve_name`` asks timm)."""
    resolved = resolve_backbone_alias(name)
    if resolved in SMALL_VITS or any(info.timm_name == resolved for info in BACKBONES.values()):
        return resolved
    raise CatalogError(f"backbone: {name!r} is not in the catalog, and timm, which would check it, cannot be imported "
                       "here; install the package's dependencies (make setup) to check any timm model")


# --- semantic-proxy accumulators -------------------------------------------------------------

ACCUMULATORS: dict[str, str] = {
    "gru_relu": "GRU + ReLU",
    "gru_tanh": "GRU + tanh",
    "ema": "EMA",
    "mean": "Class mean",
    "attention": "Attention",
}

# --- helpers -----------------------------------------------------------------------------------

def closest(name: str, choices) -> str:
    """' (did you mean X?)' for an unknown name, or '' when nothing is close."""
    import difflib

    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


# --- suite prepare hooks -----------------------------------------------------------------------

# What a suite's `prepare:` may name: a hook registered here, called with each data root before
# any cell. Nothing else can be called from a suite file (one such call once deleted another
# cell's checkpoint). The value is the function, imported only when the hook runs.
PREPARE_HOOKS: dict[str, str] = {
    "demo": "bench.demo_pretrain:prepare_demo",  # the demo's two targets and its pretrained backbone
    "synthetic": "bench.data.hooks:ensure_synthetic_data",  # generated data unless the root has some
}


def prepare_hook(name: Any) -> str:
    """The registered hook a suite's ``prepare:`` names (its name, or its registered target)."""
    if isinstance(name, str):
        if name in PREPARE_HOOKS:
            return name
        for hook, target in PREPARE_HOOKS.items():
            if name == target:
                return hook
    raise CatalogError(f"{name!r} is not a registered prepare hook; choose one of "
                       f"{', '.join(PREPARE_HOOKS)} (bench/catalog.py:PREPARE_HOOKS)")
