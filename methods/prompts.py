"""Visual prompt tuning (Jia et al., ECCV 2022): learnable tokens placed after the CLS token.

- shallow: ``num_prompts`` tokens inserted once before block 1 (after the position embedding);
  they stay in the sequence through every block.
- deep: fresh tokens before each of the first ``prompt_depth`` blocks, replacing the previous
  block's prompt outputs; block i gets ``num_prompts - prompt_decrease * i`` tokens (the
  paper's decrease step). Past the depth the prompt outputs are dropped and the remaining blocks
  see the plain sequence, as in the VPTSP reference implementation.
"""
from __future__ import annotations

import torch
from torch import nn

from bench.model import set_reference
from methods.base import Component, require_blocks
from methods.init import init_prompts_


def prompt_counts(num_prompts: int, depth: int, decrease: int = 0) -> list[int]:
    """Tokens per prompted block; the decrease step stops at zero."""
    return [max(num_prompts - decrease * i, 0) for i in range(depth)]


class PromptTokens(nn.Module):
    """One learnable ``[n_i, width]`` tensor per prompted block, initialised by ``scheme``
    (``methods.init``)."""

    def __init__(self, counts: list[int], backbone: nn.Module, scheme: str, shallow: bool = False,
                 location: str = "prepend"):
        super().__init__()
        self.shallow = shallow
        self.location = location  # "prepend": extra tokens after the prefix; "add": summed onto the patches
        self.tokens = nn.ParameterList()
        full = max(counts, default=0)  # the reference's tensor per block holds the full count
        for n in counts:
            p = nn.Parameter(torch.empty(n, backbone.embed_dim))
            init_prompts_(p, scheme, backbone, length=1, num=full)
            self.tokens.append(p)

    def for_block(self, index: int, batch_size: int) -> torch.Tensor | None:
        if index < len(self.tokens):
            return self.tokens[index].unsqueeze(0).expand(batch_size, -1, -1)
        if self.shallow or index > len(self.tokens) or self.location == "add":
            return None  # shallow: carried through every block; added prompts leave no tokens behind
        first = self.tokens[0]
        return first.new_zeros(batch_size, 0, first.shape[1])  # deep, past the depth: drop them


def patch_count(backbone: nn.Module) -> int:
    return int(backbone.patch_embed.num_patches)


class ShallowPrompts(Component):
    name = "vpt_shallow"

    def apply(self, learner):
        backbone = learner.model.backbone
        counts = [patch_count(backbone)] if self.prompt_location == "add" else [self.num_prompts]
        prompts = PromptTokens(counts, backbone, learner.init, shallow=True, location=self.prompt_location)
        learner.extras["prompts"] = prompts
        set_reference(learner.model, "prompts", prompts)


class DeepPrompts(Component):
    name = "vpt_deep"

    def apply(self, learner):
        backbone = learner.model.backbone
        require_blocks(backbone, "prompt_depth", self.prompt_depth)
        if self.prompt_location == "add":
            counts = [patch_count(backbone)] * self.prompt_depth
        else:
            counts = prompt_counts(self.num_prompts, self.prompt_depth, self.prompt_decrease)
        prompts = PromptTokens(counts, backbone, learner.init, location=self.prompt_location)
        learner.extras["prompts"] = prompts
        set_reference(learner.model, "prompts", prompts)
