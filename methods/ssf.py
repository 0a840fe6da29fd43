"""SSF (Lian et al., NeurIPS 2022): a learned per-channel scale and shift after every linear layer
and LayerNorm of the backbone, ``y = gamma * op(x) + beta``, with ``gamma ~ N(1, 0.02)`` and
``beta ~ N(0, 0.02)``. Both fold into the preceding layer (``W' = diag(gamma) W``,
``b' = gamma * b + beta``), so an exported model is the plain architecture again.
"""
from __future__ import annotations

import torch
from torch import nn

from methods.base import Component

INIT_STD = 0.02


class ScaleShift(nn.Module):
    """``gamma * base(x) + beta`` over the last dimension (the channels)."""

    def __init__(self, base: nn.Linear | nn.LayerNorm, channels: int, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.gamma = nn.Parameter(1.0 + INIT_STD * torch.randn(channels, generator=generator))
        self.beta = nn.Parameter(INIT_STD * torch.randn(channels, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) * self.gamma + self.beta

    def merged(self) -> nn.Module:
        """The base layer with the scale and shift folded into its weight and bias."""
        base = self.base
        with torch.no_grad():
            weight = base.weight
            if isinstance(base, nn.Linear):
                weight.mul_(self.gamma.to(weight.dtype)[:, None])
            else:
                weight.mul_(self.gamma.to(weight.dtype))
            if base.bias is None:
                base.bias = nn.Parameter(torch.zeros_like(self.beta, dtype=weight.dtype), requires_grad=False)
            base.bias.mul_(self.gamma.to(weight.dtype)).add_(self.beta.to(weight.dtype))
        return base


def channels_of(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine and len(module.normalized_shape) == 1:
        return module.normalized_shape[0]
    return None


class SSF(Component):
    name = "ssf"

    def apply(self, learner):
        backbone = learner.model.backbone
        targets = [(parent, name, child) for parent in backbone.modules() for name, child in parent.named_children()
                   if channels_of(child) is not None and not isinstance(parent, ScaleShift)]
        for parent, name, child in targets:
            wrapped = ScaleShift(child, channels_of(child))
            wrapped.to(child.weight.device)
            setattr(parent, name, wrapped)

    def merge(self, learner) -> bool:
        targets = [(parent, name, child) for parent in learner.model.modules() for name, child in parent.named_children()
                   if isinstance(child, ScaleShift)]
        for parent, name, child in targets:
            setattr(parent, name, child.merged())
        return bool(targets)
