"""One cell on several processes (issue 30, first part): the pieces that keep it the same
training problem as one process. Not yet wired into ``train_cell`` or the launchers.

* ``RankBatches``: each step's global batch is exactly the one-process sampler's batch
  (``ClassBalancedBatchSampler``, a pure function of seed, epoch and step), cut into equal,
  consecutive parts, one per rank.
* ``gather_embeddings``: the global batch's embeddings on every rank, with gradients. Its
  backward (``torch.distributed.nn.functional.all_gather``) sums the ranks' gradients, so that
  after DDP's averaging the backbone gets exactly the gradient of the global-batch loss, and the
  proxies (replicated, each rank computing the same full loss) get it too: no world-size loss
  scaling, whose misuse is pytorch-metric-learning's open question on parameterised losses.
* ``global_batch_loss``: Proxy-Anchor on the global batch, so its positive and negative sets
  are those of the global batch.

``tests/test_distributed.py`` runs 2 gloo processes on the CPU against one process with the full
batch: loss, every trained parameter's gradient and the parameters after 3 optimiser steps agree
to 1e-5 (full fine-tuning, LoRA, VPT-deep). Semantic proxies (VPTSP's class-prompt table and
its GRU memory) need their rows exchanged across ranks and are refused here until they are.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from bench.errors import UserError


class RankBatches:
    """A rank's part of every global batch of a batch sampler (``set_epoch`` passes through)."""

    def __init__(self, sampler, rank: int, world_size: int):
        if sampler.batch_size % world_size:
            raise UserError(f"batch_size {sampler.batch_size} does not split into {world_size} equal rank batches")
        self.sampler, self.rank, self.world_size = sampler, rank, world_size
        self.per_rank = sampler.batch_size // world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch, start=start)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler:
            yield batch[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]


def gather_embeddings(local: torch.Tensor) -> torch.Tensor:
    """Every rank's embeddings in rank order (the global batch), differentiable: the backward
    all-reduces (sums) the gradient of each rank's part."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(local.contiguous()), dim=0)


def gather_labels(local: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts, dim=0)


def global_batch_loss(model, learner, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss of the global batch on every rank. ``model`` is the (DDP-wrapped) learner whose
    forward gives the local embeddings; ``learner`` the unwrapped one, for its criterion."""
    if learner.proxy_source is not None:
        raise UserError("semantic proxies (VPTSP) do not run on several ranks yet: their class-prompt rows and "
                        "GRU memory must be exchanged across ranks first")
    embeddings = gather_embeddings(model(images))
    return learner.criterion(embeddings, gather_labels(labels))
