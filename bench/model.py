"""The embedding model (backbone + head) and the learner (model + loss) that methods modify.

The forward pass walks the timm ViT block by block so that methods can insert prompt tokens
before any block (``Prompts``); everything else a method does (freezing, BitFit, adapters, LoRA)
changes modules in place. Evaluation calls ``EmbeddingModel.forward`` only: no labels, no proxy
pass.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bench.losses import ProxyAnchorLoss


class Prompts(Protocol):
    """Prompt tokens to place after the prefix (CLS) tokens before block ``i``.

    ``for_block`` returns ``[B, n, width]`` to *replace* the prompts currently in the sequence
    (VPT-deep: the previous block's prompt outputs are dropped), or ``None`` to leave the
    sequence as it is (VPT-shallow after block 0; blocks past the prompt depth). Prompts with
    ``mixes = True`` also get the prompt tokens currently in the sequence (``current``), to mix
    them into what replaces them (GateVPT's gates).
    """

    def for_block(self, index: int, batch_size: int) -> torch.Tensor | None: ...


class EmbeddingModel(nn.Module):
    """timm ViT -> final-norm CLS token -> LayerNorm + Linear -> L2-normalised embedding."""

    def __init__(self, backbone: nn.Module, embedding_size: int):
        super().__init__()
        self.backbone = backbone
        width = backbone.embed_dim
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, embedding_size))
        self.prompts: Prompts | None = None  # set by prompt methods
        self.grad_checkpointing = False
        self.output = "cls"  # what the head reads: "cls", or "mean" of the patch tokens (prompts left out)

    @property
    def width(self) -> int:
        return self.backbone.embed_dim

    @property
    def num_blocks(self) -> int:
        return len(self.backbone.blocks)

    def compile_blocks(self) -> None:
        """torch.compile each transformer block in place (regional compilation): the blocks are
        identical, so they share one compiled graph and compile once; the loop around them, with
        its prompt concatenation and sparse class-prompt lookups, stays eager. Parameter names
        do not change, so checkpoints are interchangeable with uncompiled runs."""
        for block in self.backbone.blocks:
            block.compile()

    def features(self, images: torch.Tensor, prompts: Prompts | None | str = "default",
                 checkpointing: bool | None = None) -> torch.Tensor:
        """CLS token after the final norm. ``prompts="default"`` uses the model's own prompts;
        ``checkpointing`` (default: ``grad_checkpointing``) recomputes each block in backward
        instead of keeping its activations."""
        if isinstance(prompts, str):
            prompts = self.prompts
        if checkpointing is None:
            checkpointing = self.grad_checkpointing
        vit = self.backbone
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        prefix = vit.num_prefix_tokens  # CLS, and register or distillation tokens when the model has them
        num_prompts = 0
        added = getattr(prompts, "location", "prepend") == "add"
        for i, block in enumerate(vit.blocks):
            if prompts is not None:
                if getattr(prompts, "mixes", False):
                    new = prompts.for_block(i, x.shape[0], current=x[:, prefix:prefix + num_prompts])
                else:
                    new = prompts.for_block(i, x.shape[0])
                if new is not None and added:  # summed onto the patch tokens, one prompt per patch
                    x = torch.cat([x[:, :prefix], x[:, prefix:] + new.to(x.dtype)], dim=1)
                elif new is not None:
                    x = torch.cat([x[:, :prefix], new.to(x.dtype), x[:, prefix + num_prompts:]], dim=1)
                    num_prompts = new.shape[1]
            if checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = vit.norm(x)
        if self.output == "mean":  # the patch tokens' mean; prefix tokens and prompts left out
            return x[:, prefix + num_prompts:].mean(dim=1)
        return x[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.features(images)), dim=-1)


class ProxySource(Protocol):
    """Produces the proxies the loss uses in a training step (semantic proxies)."""

    def __call__(self, learner: "MetricLearner", images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...


class MetricLearner(nn.Module):
    """What trains: the embedding model, the loss with its proxies, and any method modules.

    Methods register their modules in ``extras`` so that they are saved, moved and counted with
    the rest; a method that makes its own proxies sets ``proxy_source``.
    """

    def __init__(self, model: EmbeddingModel, criterion: ProxyAnchorLoss, init: str = "vpt"):
        super().__init__()
        self.model = model
        self.criterion = criterion
        self.extras = nn.ModuleDict()
        self.proxy_source: ProxySource | None = None
        self.components: list = []  # the method's components (methods.base.Component), for their hooks
        # (vectors, labels) -> the global batch's; one process: as they are. On several ranks
        # bench.distributed sets it, so that a method's per-image vectors (VPTSP's semantic
        # vectors) are accumulated over the global batch, in its order, on every rank alike.
        self.gather_batch = lambda vectors, labels: (vectors, labels)
        # a random draw every rank must share (VPTSP's dropout on the memory update): rank 0's
        # on several ranks (bench.distributed); one process: None, the draw as it is
        self.same_on_every_rank = None
        self.init = init  # the initialisation scheme methods use for what they add (methods.init)

    @property
    def num_classes(self) -> int:
        return self.criterion.num_classes

    @property
    def embedding_size(self) -> int:
        return self.criterion.proxies.shape[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        embeddings = self.model(images)
        proxies = self.proxy_source(self, images, labels) if self.proxy_source is not None else None
        return self.criterion(embeddings, labels, proxies)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trained parameters plus method buffers (e.g. proxy memory): all a checkpoint needs
        on top of the pretrained backbone."""
        state = {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}
        state.update({f"extras.{name}": b for name, b in self.extras.named_buffers()})
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"trainable state does not match: missing {missing[:5]}, unexpected {extra[:5]}")
        current = dict(self.named_parameters())
        current.update({f"extras.{n}": b for n, b in self.extras.named_buffers()})
        with torch.no_grad():
            for name, value in state.items():
                current[name].copy_(value)


def set_reference(owner: nn.Module, name: str, value) -> None:
    """Point ``owner.name`` at a module without making it a child: the module belongs to
    ``MetricLearner.extras``, and a second registration would duplicate it in state dicts."""
    owner.__dict__[name] = value
