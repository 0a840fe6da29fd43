"""LoRA (Hu et al., 2022) on the attention projections: ``W x + (alpha / r) B A x``.

Beyond the paper, the most used PEFT method today. ``B`` starts at zero, so the model starts
exactly at the pretrained one (and ``A`` only receives gradient once ``B`` has moved).
"""
import math

import torch
from torch import nn

from methods.base import Component
from methods.configs import lora_targets


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scaling


    def merged(self) -> nn.Linear:
        """The plain linear layer with the update folded in: ``W + (alpha / r) B A``."""
        with torch.no_grad():
            self.base.weight += self.scaling * (self.lora_b @ self.lora_a).to(self.base.weight.dtype)
        return self.base


def merge_lora_(model: nn.Module) -> int:
    """Replace every LoRALinear in ``model`` by its merged linear layer; returns how many."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, LoRALinear)]
    for parent, name, child in targets:
        setattr(parent, name, child.merged())
    return len(targets)


class LoRA(Component):
    name = "lora"

    @property
    def targets(self) -> list[str]:
        return lora_targets(self.lora_targets)

    def merge(self, learner) -> bool:
        return merge_lora_(learner.model) > 0

    def apply(self, learner):
        for block in learner.model.backbone.blocks:
            for target in self.targets:
                base = getattr(block.attn, target)
                setattr(block.attn, target, LoRALinear(base, self.lora_rank, self.lora_alpha))
