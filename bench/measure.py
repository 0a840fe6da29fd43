"""Cost measurements of a cell: parameters, step latency, throughput, peak memory."""
from __future__ import annotations

import resource
import statistics
import sys
import time
from contextlib import contextmanager

import torch

from bench.model import MetricLearner


def parameter_counts(learner: MetricLearner) -> dict[str, int]:
    """Trainable parameters with and without the head and proxies, and the backbone's size.

    Method modules in ``learner.extras`` (prompts, adapters' siblings, the proxy tower) count as
    trained method parameters; modules injected into the backbone (adapters, LoRA) count there.
    """
    def total(params, trainable_only=True):
        return sum(p.numel() for p in params if p.requires_grad or not trainable_only)

    model = learner.model
    head_and_proxies = total(model.head.parameters()) + total(learner.criterion.parameters())
    trainable = total(learner.parameters())
    # per class: one row (or one set of prompts) per training class, so the count grows with the
    # dataset (SOP's class prompts are 262M); shared: the rest, what a PEFT table should compare
    per_class = total(p for p in learner.parameters() if getattr(p, "per_class", False))
    return {
        "params_total": total(learner.parameters(), trainable_only=False),
        "params_backbone": total(model.backbone.parameters(), trainable_only=False),
        "params_trainable": trainable,
        "params_trainable_no_head": trainable - head_and_proxies,
        "params_shared": trainable - per_class,
        "params_per_class": per_class,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """CUDA: max allocated since the last reset. CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "cpu_peak_rss"


class StepTimer:
    """Wall time of training steps; the first ``warmup`` steps of every epoch are left out of the
    median (data loader start-up, allocator and autotuning warm-up)."""

    def __init__(self, device: torch.device, warmup: int = 3):
        self.device = device
        self.warmup = warmup
        self.step_seconds: list[float] = []
        self.images = 0
        self.train_seconds = 0.0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def step(self, index_in_epoch: int, batch_size: int):
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        elapsed = time.perf_counter() - start
        if index_in_epoch >= self.warmup:
            self.step_seconds.append(elapsed)

    def add_epoch(self, images: int, seconds: float) -> None:
        self.images += images
        self.train_seconds += seconds

    def summary(self) -> dict[str, float | None]:
        median = statistics.median(self.step_seconds) if self.step_seconds else None
        return {
            "step_latency_ms_median": None if median is None else median * 1000.0,
            "steady_steps": len(self.step_seconds),
            "throughput_img_s": self.images / self.train_seconds if self.train_seconds else None,
        }

    def state_dict(self) -> dict:
        return {"step_seconds": list(self.step_seconds), "images": self.images, "train_seconds": self.train_seconds}

    def load_state_dict(self, state: dict) -> None:
        self.step_seconds = list(state["step_seconds"])
        self.images = int(state["images"])
        self.train_seconds = float(state["train_seconds"])


class SavedTensorMeter:
    """Bytes autograd keeps for backward while inside ``with meter:``: the activation memory of
    a training step, counted identically on any device (so a CPU can predict how methods compare
    on a GPU). Each storage counts once, however many views of it are saved; storages of
    ``exclude`` (the parameters, counted separately) are not counted."""

    def __init__(self, exclude=(), active: bool = True):
        self.active = active  # inactive: a no-op (the training loop counts its first step only)
        self._excluded = {(t.device, t.untyped_storage().data_ptr()) for t in exclude} if active else set()
        self._storages: dict[tuple, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda saved: saved)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = (tensor.device, storage.data_ptr())
        if key not in self._excluded and key[1] != 0:
            self._storages[key] = storage.nbytes()
        # Returned as is, a saved *output* would hold its own grad_fn: a reference cycle through
        # C++ that keeps the whole graph alive. The detached alias shares storage, not history.
        return tensor.detach()

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def __enter__(self) -> "SavedTensorMeter":
        if self.active:
            self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self._hooks.__exit__(*exc)


def tensor_bytes(value) -> int:
    """Bytes of the tensors in a (nested) optimiser state."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def counted_training_memory(learner: MetricLearner, optimizers, saved_activation_bytes: int) -> int:
    """Training memory counted, the same on any device: every parameter, the gradients of the
    trained ones (a sparse table's batch rows only), the optimisers' state and what autograd
    saved for backward in one step (``SavedTensorMeter``). A lower bound of a GPU's peak: it
    leaves out backward's temporaries and the allocator's slack."""
    params = sum(p.numel() * p.element_size() for p in learner.parameters())
    grads = 0
    for p in learner.parameters():
        if p.grad is not None:
            grads += tensor_bytes(p.grad._values() if p.grad.is_sparse else p.grad)
        elif p.requires_grad:
            grads += p.numel() * p.element_size()
    sparse = {id(m.weight) for m in learner.modules() if isinstance(m, torch.nn.Embedding) and m.sparse}
    grads -= sum(p.numel() * p.element_size() for p in learner.parameters() if id(p) in sparse and p.grad is None)
    state = sum(tensor_bytes(o.state_dict()["state"]) for o in optimizers)
    return int(params + grads + state + saved_activation_bytes)
