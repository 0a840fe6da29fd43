"""Initial values of what PEFT methods add, under the two schemes of the ``init`` cell field.

``vpt`` (this suite's own, the default for new suites):
- prompts: Xavier-uniform with VPT's fan-in of one patch, ``U(-b, b)``, ``b = sqrt(6 / (3 p^2 + W))``
  for patch size ``p`` and width ``W`` (Jia et al.), the same for every prompt tensor;
- embedding heads: torch's default ``nn.Linear`` init; loss proxies: Kaiming-normal (fan out).

``reference`` (the paper's released code; its suites use it):
- prompts and class prompts: ``xavier_normal_`` on the reference's ``[length, num, W]`` tensor,
  whose fans make ``std = sqrt(2 / ((length + num) W))``: for dataset prompts ``length = 1``
  (std 0.0218 at N = 10, W = 384), for class prompts ``length`` is the class count (0.0071 for
  CUB's 100 classes at m = 3, 0.00068 for SOP's 11,318 at m = 5). A block with fewer tokens
  (the decrease step) keeps the full tensor's std, as the reference slices one tensor per block;
- heads (sample and proxy tower): Xavier-uniform weights, zero bias;
- the loss's proxies: Xavier-uniform / 8; the semantic memory: L2-normalised Xavier-uniform rows.
In both schemes the semantic-proxy bias is Xavier-uniform / 8 and the GRU Xavier-uniform with
zero biases (what the reference does, and what SPEC section 6 states).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = ("vpt", "reference")


def vpt_prompt_bound(backbone: nn.Module) -> float:
    """VPT's Xavier-uniform bound, with fan-in from one patch (3 x p x p) and fan-out the width."""
    patch = backbone.patch_embed.patch_size
    patch_area = patch[0] * patch[1] if isinstance(patch, (tuple, list)) else patch * patch
    return math.sqrt(6.0 / float(3 * patch_area + backbone.embed_dim))


def reference_prompt_std(length: int, num: int, width: int) -> float:
    """``xavier_normal_``'s std for a ``[length, num, width]`` tensor (fan in ``num * width``, fan
    out ``length * width``)."""
    return math.sqrt(2.0 / float((length + num) * width))


def init_prompts_(tensor: torch.Tensor, scheme: str, backbone: nn.Module, *, length: int, num: int) -> None:
    """Fill a prompt tensor (any shape ending in the width) in place. ``length`` and ``num`` are
    the reference's ``[length, num, W]`` shape it comes from: 1 and the full token count for
    dataset prompts, the class count and the tokens per class for class prompts."""
    with torch.no_grad():
        if scheme == "reference":
            tensor.normal_(0.0, reference_prompt_std(length, num, backbone.embed_dim))
        else:
            bound = vpt_prompt_bound(backbone)
            tensor.uniform_(-bound, bound)


def init_head_(head: nn.Sequential, scheme: str) -> None:
    """A LayerNorm + Linear head: the reference's Xavier-uniform weight and zero bias, or as built."""
    if scheme != "reference":
        return
    for module in head.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)


def init_loss_proxies_(proxies: torch.Tensor, scheme: str) -> None:
    """The loss's own proxies: Kaiming-normal (fan out) as built, or the reference's Xavier / 8."""
    if scheme != "reference":
        return
    with torch.no_grad():
        nn.init.xavier_uniform_(proxies)
        proxies.div_(8)


def init_bias_proxies_(proxies: torch.Tensor) -> None:
    """Semantic-proxy bias: Xavier-uniform / 8 in both schemes (the reference's, and SPEC 6)."""
    with torch.no_grad():
        nn.init.xavier_uniform_(proxies)
        proxies.div_(8)


def initial_memory(num_classes: int, size: int, scheme: str) -> torch.Tensor:
    """Unit rows: Gaussian directions (uniform on the sphere), or the reference's normalised
    Xavier-uniform rows."""
    if scheme == "reference":
        return F.normalize(nn.init.xavier_uniform_(torch.empty(num_classes, size)), dim=1)
    return F.normalize(torch.randn(num_classes, size), dim=1)
