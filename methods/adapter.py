"""AdaptFormer-style parallel adapters (Chen et al., 2022), as the VPTSP reference configures them.

In each of the last ``adapter_blocks`` blocks, a bottleneck runs parallel to the MLP on the
block's residual stream ``x`` (after attention, *before* ``norm2``), as AdaptFormer and the
reference do::

    x = x + attn(norm1(x))
    x = x + mlp(norm2(x)) + s * LN(up(relu(down(x))))

The bottleneck is a down-projection, ReLU, a zero-initialised up-projection and a LayerNorm on
its output (the reference's 'post' position); ``s`` is ``adapter_scale``. At initialisation the
up-projection outputs zeros and the LayerNorm maps them to its bias, also zero: the adapted
model starts exactly at the pretrained one.

Two deliberate differences from the released code (README, "Differences from the released
code"): the reference multiplies by the scale *before* its LayerNorm, which cancels it (any
scale gives the same output), so here the scale multiplies the normalised output and means
something; and the reference rebuilds the adapted blocks' attention with 12 heads, no qkv bias
and LayerNorm eps 1e-5, dropping the pretrained qkv bias, while here the frozen block is the
pretrained one, untouched: its own attention, norms and layer scales.
"""

import torch
from torch import nn

from methods.args import MethodError
from methods.base import Component, require_blocks

# What a timm ViT block must have for the adapter to wrap it (timm's Block: ViT, DeiT, DINO(v2), CLIP).
BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


class Bottleneck(nn.Module):
    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        self.norm = nn.LayerNorm(width)
        nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)  # the reference's 'lora' init option
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.up(torch.relu(self.down(x))))


class AdaptFormerBlock(nn.Module):
    """A pretrained timm block with a parallel adapter on its MLP branch. It holds the block's
    own modules under the same names, so parameter names stay timm's (``blocks.3.attn.qkv``);
    only ``adapter`` is new."""

    def __init__(self, block: nn.Module, adapter: Bottleneck, scale: float):
        super().__init__()
        for part in BLOCK_PARTS:
            setattr(self, part, getattr(block, part))
        self.adapter = adapter
        self.scale = scale

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        attended = self.attn(self.norm1(x)) if attn_mask is None else self.attn(self.norm1(x), attn_mask=attn_mask)
        x = x + self.drop_path1(self.ls1(attended))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))) + self.scale * self.adapter(x)


class Adapter(Component):
    name = "adapter"

    def apply(self, learner):
        blocks = learner.model.backbone.blocks
        require_blocks(learner.model.backbone, "adapter_blocks", self.adapter_blocks)
        for index in range(len(blocks) - self.adapter_blocks, len(blocks)):
            block = blocks[index]
            missing = [part for part in BLOCK_PARTS if not hasattr(block, part)]
            if missing:
                raise MethodError(f"method: adapter needs timm ViT blocks with {', '.join(BLOCK_PARTS)}; "
                                  f"block {index} ({type(block).__name__}) has no {', '.join(missing)}")
            adapter = Bottleneck(learner.model.width, self.adapter_width)
            blocks[index] = AdaptFormerBlock(block, adapter, self.adapter_scale)
