"""The one tiny cell configuration tests build on: a 2-block ViT of width 32 on 32-pixel images,
a few steps of batch 8 on the CPU. ``tiny_config(**changes)`` returns a fresh dict with the
changes applied, so a test says only what differs from it."""
from __future__ import annotations

from typing import Any

TINY: dict[str, Any] = {
    "backbone": "vit_test", "weights": None, "image_size": 32, "embedding_size": 16, "epochs": 1,
    "max_steps_per_epoch": 3, "batch_size": 8, "samples_per_class": 2, "optimizer": "adamw", "lr": 1e-3,
    "num_workers": 0, "device": "cpu",
}


def tiny_config(**changes: Any) -> dict[str, Any]:
    return {**TINY, **changes}
