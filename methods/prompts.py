"""Visual prompt tuning (Jia et al., ECCV 2022): learnable tokens placed after the CLS token.

- shallow: ``num_prompts`` tokens inserted once before block 1 (after the position embedding);
  they stay in the sequence through every block.
- deep: fresh tokens before each of the first ``prompt_depth`` blocks, replacing the previous
  block's prompt outputs; block i gets ``num_prompts - prompt_decrease * i`` tokens (the
  paper's decrease step). Past the depth the prompt outputs are dropped and the remaining blocks
  see the plain sequence, as in the VPTSP reference implementation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from bench.model import set_reference
from methods.args import arg
from methods.base import Component, require_blocks


def prompt_counts(num_prompts: int, depth: int, decrease: int = 0) -> list[int]:
    """Tokens per prompted block; the decrease step stops at zero."""
    return [max(num_prompts - decrease * i, 0) for i in range(depth)]


def prompt_init_bound(backbone: nn.Module) -> float:
    """VPT's Xavier-uniform bound, with fan-in from one patch (3 x p x p) and fan-out the width."""
    patch = backbone.patch_embed.patch_size
    patch_area = patch[0] * patch[1] if isinstance(patch, (tuple, list)) else patch * patch
    return math.sqrt(6.0 / float(3 * patch_area + backbone.embed_dim))


class PromptTokens(nn.Module):
    """One learnable ``[n_i, width]`` tensor per prompted block."""

    def __init__(self, counts: list[int], width: int, bound: float, shallow: bool = False):
        super().__init__()
        self.shallow = shallow
        self.tokens = nn.ParameterList()
        for n in counts:
            p = nn.Parameter(torch.empty(n, width))
            nn.init.uniform_(p, -bound, bound)
            self.tokens.append(p)

    def for_block(self, index: int, batch_size: int) -> torch.Tensor | None:
        if index < len(self.tokens):
            return self.tokens[index].unsqueeze(0).expand(batch_size, -1, -1)
        if self.shallow or index > len(self.tokens):
            return None  # shallow: carried through every block
        first = self.tokens[0]
        return first.new_zeros(batch_size, 0, first.shape[1])  # deep, past the depth: drop them


@dataclass
class ShallowPromptArgs:
    num_prompts: int = arg(10, "prompt tokens inserted once, before block 1", min=1)


@dataclass
class DeepPromptArgs:
    num_prompts: int = arg(10, "prompt tokens N before each prompted block", min=0)
    prompt_depth: int = arg(12, "prompted blocks L, from the first", min=1)
    prompt_decrease: int = arg(0, "decrease step tau: block i gets N - tau * i tokens", min=0)


class ShallowPrompts(Component):
    name = "vpt_shallow"
    Args = ShallowPromptArgs
    sets_prompts = True

    def apply(self, learner):
        backbone = learner.model.backbone
        prompts = PromptTokens([self.num_prompts], backbone.embed_dim, prompt_init_bound(backbone), shallow=True)
        learner.extras["prompts"] = prompts
        set_reference(learner.model, "prompts", prompts)


class DeepPrompts(Component):
    name = "vpt_deep"
    Args = DeepPromptArgs
    sets_prompts = True

    def apply(self, learner):
        backbone = learner.model.backbone
        require_blocks(backbone, "prompt_depth", self.prompt_depth)
        counts = prompt_counts(self.num_prompts, self.prompt_depth, self.prompt_decrease)
        prompts = PromptTokens(counts, backbone.embed_dim, prompt_init_bound(backbone))
        learner.extras["prompts"] = prompts
        set_reference(learner.model, "prompts", prompts)
