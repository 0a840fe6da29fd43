"""FacT-TT (Jie & Deng, AAAI 2023): the updates of all blocks' weights as one low-rank tensor.

Every ``width x width`` slice of the qkv, fc1 and fc2 weights of every block gets the update
``dW = s * U Sigma V^T``: ``U`` and ``V`` (``width x r``) are shared by all slices of all blocks,
each slice has its own ``r x r`` core ``Sigma``. The cores start at zero, so the model starts
exactly at the pretrained one; the update folds into the weights for export.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from bench.model import set_reference
from methods.base import Component


class FactorShared(nn.Module):
    """The shared factors ``U`` and ``V`` and every slice's core (``[slices, r, r]``)."""

    def __init__(self, width: int, rank: int, slices: int):
        super().__init__()
        self.u = nn.Parameter(torch.empty(width, rank))
        self.v = nn.Parameter(torch.empty(width, rank))
        nn.init.kaiming_uniform_(self.u, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.v, a=math.sqrt(5))
        self.cores = nn.Parameter(torch.zeros(slices, rank, rank))


class FactLinear(nn.Module):
    """``base(x)`` plus the FacT update of its slices. ``along``: "out" when the slices stack the
    output (qkv, fc1: ``[k * width, width]``), "in" when they stack the input (fc2)."""

    def __init__(self, base: nn.Linear, factors: FactorShared, first: int, along: str, scale: float):
        super().__init__()
        self.base = base
        set_reference(self, "factors", factors)  # shared: owned by the learner's extras
        width = factors.u.shape[0]
        size = base.out_features if along == "out" else base.in_features
        self.count, self.first, self.along, self.scale, self.width = size // width, first, along, scale, width

    def delta_weight(self) -> torch.Tensor:
        f = self.factors
        slices = [f.u @ f.cores[self.first + i] @ f.v.T for i in range(self.count)]  # each [width, width]
        return self.scale * torch.cat(slices, dim=0 if self.along == "out" else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + nn.functional.linear(x, self.delta_weight().to(x.dtype))

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        return self.base


TARGETS = (("attn", "qkv", "out"), ("mlp", "fc1", "out"), ("mlp", "fc2", "in"))


class FacT(Component):
    name = "fact_tt"

    def apply(self, learner):
        backbone = learner.model.backbone
        width = backbone.embed_dim
        layers = []
        for block in backbone.blocks:
            for parent_name, name, along in TARGETS:
                parent = getattr(block, parent_name)
                base = getattr(parent, name)
                size = base.out_features if along == "out" else base.in_features
                layers.append((parent, name, base, along, size // width))
        factors = FactorShared(width, self.fact_rank, sum(count for *_, count in layers))
        learner.extras["fact"] = factors.to(backbone.cls_token.device)
        first = 0
        for parent, name, base, along, count in layers:
            setattr(parent, name, FactLinear(base, factors, first, along, self.fact_scale))
            first += count

    def merge(self, learner) -> bool:
        targets = [(parent, name, child) for parent in learner.model.modules()
                   for name, child in parent.named_children() if isinstance(child, FactLinear)]
        for parent, name, child in targets:
            setattr(parent, name, child.merged())
        if targets and "fact" in learner.extras:
            del learner.extras["fact"]  # folded into the weights: the factors are no longer used
        return bool(targets)
