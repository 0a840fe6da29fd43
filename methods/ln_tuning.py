"""LayerNorm tuning: only the scale and shift of every LayerNorm of the backbone train (besides
the head and the proxies): ``2 x width`` parameters per LayerNorm."""
from __future__ import annotations

from torch import nn

from methods.base import Component


class LayerNormTuning(Component):
    name = "ln_tuning"

    def apply(self, learner):
        for module in learner.model.backbone.modules():
            if isinstance(module, nn.LayerNorm):
                for p in module.parameters():
                    p.requires_grad_(True)
