"""GateVPT (Yoo et al., ICML 2023): VPT-deep with a learnable gate per block on the prompts.

Before block ``l`` the prompt tokens in the sequence become
``g_l * P_l + (1 - g_l) * p_l``, where ``P_l`` is the block's own learned prompts, ``p_l`` the
previous block's prompt outputs (VPT-deep drops them: ``g_l = 1``) and ``g_l = sigmoid(a_l)``
a learned gate per block: how much each block's prompts replace what the earlier blocks made of
them. Block 1 takes its prompts as they are. The gates start at ``sigmoid(gate_init)``.
"""
from __future__ import annotations

import torch
from torch import nn

from bench.model import set_reference
from methods.base import Component, require_blocks
from methods.init import init_prompts_


class GatedPromptTokens(nn.Module):
    """Deep prompts (``[n, width]`` per block) and one gate logit per block."""

    location = "prepend"
    mixes = True  # bench.model passes the current prompt outputs to for_block

    def __init__(self, num_prompts: int, depth: int, backbone: nn.Module, scheme: str, gate_init: float):
        super().__init__()
        self.tokens = nn.ParameterList()
        for _ in range(depth):
            p = nn.Parameter(torch.empty(num_prompts, backbone.embed_dim))
            init_prompts_(p, scheme, backbone, length=1, num=num_prompts)
            self.tokens.append(p)
        self.gate_logits = nn.Parameter(torch.full((depth,), float(gate_init)))

    def gates(self) -> torch.Tensor:
        return torch.sigmoid(self.gate_logits)

    def for_block(self, index: int, batch_size: int, current: torch.Tensor | None = None) -> torch.Tensor | None:
        if index >= len(self.tokens):
            return None  # past the depth: the prompts go on through the blocks as they are
        own = self.tokens[index].unsqueeze(0).expand(batch_size, -1, -1)
        if current is None or current.shape[1] != own.shape[1]:
            return own
        gate = self.gates()[index].to(current.dtype)
        return gate * own.to(current.dtype) + (1 - gate) * current


class GatedPrompts(Component):
    name = "gate_vpt"

    def apply(self, learner):
        backbone = learner.model.backbone
        require_blocks(backbone, "prompt_depth", self.prompt_depth)
        prompts = GatedPromptTokens(self.num_prompts, self.prompt_depth, backbone, learner.init, self.gate_init)
        learner.extras["prompts"] = prompts
        set_reference(learner.model, "prompts", prompts)
