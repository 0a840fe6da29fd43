"""One cell on several processes: the pieces that keep it the same training problem as one
process (``bench.train`` uses them when a cell runs on several ranks, ``bench.launch`` starts
the ranks, ``bench.rank_evaluation`` evaluates on them).

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
* ``wrap``: the learner in DDP, an offloaded (sparse) table left to ``exchange_sparse_gradients``.
* ``start`` / ``collective``: every collective has a timeout; one that does not complete (a rank
  died or hangs) fails with ``CollectiveTimeout`` naming the collective and the rank; ``leave``
  ends such a rank without the teardown that would abort it.

``tests/test_distributed.py`` runs 2 gloo processes on the CPU against one process with the full
batch: loss, every trained parameter's gradient and the parameters after 3 optimiser steps agree
to 1e-5 for every registered method (VPTSP-G's GRU memory also stays equal), and whole cells.
"""
from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from bench.errors import CellFailure, UserError

T = TypeVar("T")
_peer_lost = False  # a collective of this process failed: its group cannot be torn down cleanly
COLLECTIVE_TIMEOUT_S = 600  # a collective that waits longer fails the cell, naming itself


class CollectiveTimeout(CellFailure):
    """A collective that did not complete on every rank in time (a rank died or hangs)."""


def start(ranks, device: torch.device, *, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
    """Join the cell's process group from the environment torchrun or submitit set (``env://``):
    NCCL on GPUs (this rank's GPU made current), gloo on the CPU."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                            rank=ranks.rank, world_size=ranks.world_size,
                            timeout=dt.timedelta(seconds=timeout_s))
    _start_heartbeat(ranks.rank, ranks.world_size)


# --- which rank is gone: a heartbeat in the group's own key-value store ---------------------------
HEARTBEAT_S = 2.0
_heartbeat: tuple | None = None  # (store for reading, rank, world size, stop event, thread)


def _start_heartbeat(rank: int, world_size: int) -> None:
    """Every HEARTBEAT_S this rank bumps its counter in the process group's store (hosted by rank
    0), from a thread that runs while the main one waits in a collective: a rank whose counter
    stops has died; one whose counter moves is alive, and hangs if it does not join. Without the
    store (another launcher's setup) failures name the collective only."""
    import atexit
    import threading

    global _heartbeat
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
        writer, reader = store.clone(), store.clone()  # own connections: no contention with torch's
    except Exception:
        return
    key = f"peft_dml/heartbeat/{rank}"
    stop = threading.Event()

    def beat() -> None:
        count = 0
        while not stop.is_set():
            try:
                writer.set(key, str(count))
            except Exception:  # the store's host (rank 0) is gone, or the group was torn down
                return
            count += 1
            stop.wait(HEARTBEAT_S)

    thread = threading.Thread(target=beat, name="peft-dml-heartbeat", daemon=True)
    thread.start()
    _heartbeat = (reader, rank, world_size, stop, thread)
    # an exit without finish(): the thread and its store connections go first, while the
    # interpreter is whole (a store client still busy at the C++ teardown aborts the process)
    atexit.register(_stop_heartbeat)


def _stop_heartbeat() -> None:
    global _heartbeat
    if _heartbeat is not None:
        _heartbeat[3].set()
        _heartbeat[4].join(timeout=2 * HEARTBEAT_S)
        _heartbeat = None


def silent_ranks(wait_s: float = 3 * HEARTBEAT_S) -> list[int] | None:
    """The other ranks whose heartbeat did not move within ``wait_s`` (they died); [] when every
    other rank is alive; None when that cannot be known (no store, or rank 0 hosting it is gone)."""
    if _heartbeat is None:
        return None
    store, rank, world, _, _ = _heartbeat
    others = [r for r in range(world) if r != rank]
    try:
        def read() -> dict[int, bytes | None]:
            keys = {r: f"peft_dml/heartbeat/{r}" for r in others}
            return {r: store.get(k) if store.check([k]) else None for r, k in keys.items()}

        first, moved = read(), set()
        deadline = time.monotonic() + wait_s
        while len(moved) < len(others) and time.monotonic() < deadline:
            time.sleep(0.25)
            now = read()
            moved |= {r for r in others if now[r] != first[r]}
        return [r for r in others if r not in moved]
    except Exception:
        return None


def _who(silent: list[int] | None) -> str:
    if silent is None:
        return "a rank died or hangs"
    if len(silent) == 1:
        return f"rank {silent[0]} stopped answering (its heartbeat ended: it died)"
    if silent:
        return f"ranks {', '.join(map(str, silent))} stopped answering (their heartbeats ended: they died)"
    return "every other rank is alive: one of them hangs, or never called it"


def finish() -> None:
    import torch.distributed as dist

    _stop_heartbeat()  # before the group goes: no thread left talking to its store
    if dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (a stop signal one rank got stops them all at the same
    step, or the others would wait in the next collective)."""
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int32,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
    collective("all_reduce (stop request)", lambda: dist.all_reduce(value, op=dist.ReduceOp.MAX))
    return bool(value.item())


def to_main(obj, name: str):
    """Every rank's ``obj``, in rank order, on rank 0 (None on the others): only the main rank
    holds them all, as one process would."""
    import torch.distributed as dist

    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    collective(f"gather ({name})", lambda: dist.gather_object(obj, parts, dst=0))
    return parts


def from_main(obj, name: str):
    """Rank 0's ``obj`` on every rank."""
    return from_rank(0, obj, name)


def from_rank(source: int, obj, name: str):
    """Rank ``source``'s ``obj`` on every rank."""
    import torch.distributed as dist

    box = [obj]
    collective(f"broadcast ({name})", lambda: dist.broadcast_object_list(box, src=source))
    return box[0]


def every_rank(obj, name: str) -> list:
    """Every rank's ``obj``, in rank order, on every rank (small things: labels, sums)."""
    import torch.distributed as dist

    parts = [None] * dist.get_world_size()
    collective(f"all_gather ({name})", lambda: dist.all_gather_object(parts, obj))
    return parts


def collective(name: str, run: Callable[[], T], *, only_transport_errors: bool = False) -> T:
    """``run()``, a collective; its timeout or a lost peer becomes ``CollectiveTimeout`` naming
    the collective and this rank, never a wait without end. ``only_transport_errors``: ``run``
    also computes (a training step, whose backward all-reduces gradients): only errors of the
    transport (gloo, NCCL, a closed connection, a timeout) become ``CollectiveTimeout``; any
    other error is the computation's own and passes unchanged."""
    import torch.distributed as dist

    global _peer_lost
    try:
        return run()
    except (RuntimeError, dist.DistBackendError) as e:
        if only_transport_errors and not is_transport_error(e):
            raise
        _peer_lost = True
        where = f"rank {dist.get_rank()} of {dist.get_world_size()}" if dist.is_initialized() else "this rank"
        raise CollectiveTimeout(f"{name} did not complete on every rank ({where}): {_who(silent_ranks())} "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); the last checkpoint "
                                "is kept: run the cell again to resume") from None


TRANSPORT_WORDS = ("gloo", "nccl", "connection reset", "connection closed", "timed out", "timeout", "broken pipe")


def is_transport_error(error: BaseException) -> bool:
    """Whether ``error`` came from the ranks' communication rather than from a computation."""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return any(word in text for word in TRANSPORT_WORDS)


def peer_lost() -> bool:
    """Whether a collective of this process failed (then end it with ``leave``)."""
    return _peer_lost


def leave(code: int) -> None:
    """End this rank's process now, after a collective failed. The process group cannot be torn
    down cleanly while a peer is lost: its backend threads still wait on that peer, and the
    normal interpreter exit then aborts (``terminate called without an active exception``,
    SIGABRT), hiding the exit code the failure chose. Streams are flushed first."""
    import os
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


class RankBatches:
    """A rank's part of every global batch of a batch sampler (``set_epoch`` passes through). Over
    ``AugmentationSeeds``, each image keeps the seed of its global position: the crops are those
    of one process."""

    def __init__(self, sampler, rank: int, world_size: int):
        if sampler.batch_size % world_size:
            raise UserError(f"batch_size {sampler.batch_size} does not split into {world_size} equal rank batches; "
                            f"use a multiple of {world_size}")
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
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # deprecated in favour of a private (underscored) module; this one's semantics are the tested ones
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
        return torch.cat(collective("all_gather (embeddings)", lambda: all_gather(local.contiguous())), dim=0)


def gather_labels(local: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    collective("all_gather (labels)", lambda: dist.all_gather(parts, local.contiguous()))
    return torch.cat(parts, dim=0)


def use_global_batch(learner) -> None:
    """Make the learner's methods see the global batch: per-image vectors (VPTSP's semantic
    vectors) are gathered with gradients before they are accumulated, so every rank updates the
    same memory rows from the same vectors in the same order, and a random draw on that update
    (the GRU's dropout mask) is rank 0's on every rank. An offloaded (sparse, CPU) class-prompt
    table's row gradients are exchanged by ``exchange_sparse_gradients``."""
    learner.gather_batch = lambda vectors, labels: (gather_embeddings(vectors), gather_labels(labels))
    learner.same_on_every_rank = rank0_tensor


def rank0_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` (same shape and dtype on every rank) on every rank."""
    import torch.distributed as dist

    moved = tensor.cuda() if dist.get_backend() == "nccl" and tensor.device.type != "cuda" else tensor.contiguous()
    collective("broadcast (a shared random draw)", lambda: dist.broadcast(moved, src=0))
    return moved.to(tensor.device)


def global_batch_loss(model, learner, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss of the global batch on every rank. ``model`` is the (DDP-wrapped) learner whose
    forward gives the local embeddings; ``learner`` the unwrapped one (``use_global_batch``
    applied), for its proxies and criterion."""
    embeddings = gather_embeddings(model(images))
    proxies = learner.proxy_source(learner, images, labels) if learner.proxy_source is not None else None
    return learner.criterion(embeddings, gather_labels(labels), proxies)


# --- sparse tables (an offloaded class-prompt table) ---------------------------------------------

def sparse_parameter_names(learner) -> list[str]:
    """Parameters whose gradients are sparse rows (``nn.Embedding(sparse=True)``: an offloaded
    class-prompt table). NCCL cannot all-reduce them: DDP leaves them alone
    (``wrap``) and ``exchange_sparse_gradients`` all-gathers their rows after each backward."""
    from torch import nn

    return [f"{name}.weight" for name, module in learner.named_modules()
            if isinstance(module, nn.Embedding) and module.sparse]


def wrap(learner):
    """The learner on the global batch (``use_global_batch``), in DDP, sparse tables left to
    ``exchange_sparse_gradients``. No ``find_unused_parameters``: every trained parameter gets a
    gradient in every step (frozen ones are not DDP's business)."""
    from torch.nn.parallel import DistributedDataParallel

    use_global_batch(learner)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(learner, sparse_parameter_names(learner))
    return DistributedDataParallel(learner)


def exchange_sparse_gradients(learner) -> None:
    """After backward: each sparse table's gradient becomes the mean over ranks of the ranks' row
    gradients (all-gathered, summed, divided by the world size), what DDP does for dense ones."""
    import torch.distributed as dist

    world = dist.get_world_size()
    parameters = dict(learner.named_parameters())
    for name in sparse_parameter_names(learner):
        p = parameters[name]
        if p.grad is None:
            continue
        grad = p.grad.coalesce()
        parts = [None] * world
        collective(f"all_gather (rows of {name})",
                   lambda: dist.all_gather_object(parts, (grad.indices().cpu(), grad.values().cpu())))
        indices = torch.cat([i for i, _ in parts], dim=1).to(grad.device)
        values = torch.cat([v for _, v in parts], dim=0).to(grad.device)
        p.grad = (torch.sparse_coo_tensor(indices, values, grad.shape).coalesce() / world)
