"""AdaptFormer-style adapters (Chen et al., 2022), as the VPTSP reference configures them.

A bottleneck (down-projection, ReLU, zero-initialised up-projection, then a LayerNorm on its
output: the reference's 'post' position) runs parallel to the MLP of each of the last
``adapter_blocks`` blocks, on the MLP's input, scaled by ``adapter_scale``. The zero
up-projection makes the adapted model start exactly at the pretrained one.
"""
from dataclasses import dataclass

import torch
from torch import nn

from methods.args import arg
from methods.base import Component, require_blocks


class Bottleneck(nn.Module):
    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        self.norm = nn.LayerNorm(width)
        nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.up(torch.relu(self.down(x))))


class MLPWithAdapter(nn.Module):
    """Wraps a block's MLP: ``mlp(x) + scale * adapter(x)``."""

    def __init__(self, mlp: nn.Module, adapter: Bottleneck, scale: float):
        super().__init__()
        self.mlp = mlp
        self.adapter = adapter
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + self.scale * self.adapter(x)


@dataclass
class AdapterArgs:
    adapter_width: int = arg(64, "bottleneck width d", min=1)
    adapter_blocks: int = arg(12, "adapted blocks L, counted back from the last", min=1)
    adapter_scale: float = arg(1.0, "scale s of the adapter's output", min=0.0)


class Adapter(Component):
    name = "adapter"
    Args = AdapterArgs

    def apply(self, learner):
        blocks = learner.model.backbone.blocks
        require_blocks(learner.model.backbone, "adapter_blocks", self.adapter_blocks)
        for block in list(blocks)[len(blocks) - self.adapter_blocks:]:
            adapter = Bottleneck(learner.model.width, self.adapter_width)
            block.mlp = MLPWithAdapter(block.mlp, adapter, self.adapter_scale)
