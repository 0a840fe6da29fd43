"""Sparse optimisers for class-prompt tables kept in CPU memory (SOP, In-Shop, iNaturalist).

The reference implementation's "memory bank" keeps the class prompts and their optimiser state
on the CPU; every step it copies the batch's rows and their state into a small buffer on the
GPU, runs the ordinary dense optimiser (AdamW or SGD) on that buffer, and writes rows and state
back. Rows of classes absent from the batch therefore do not move at all: no weight decay, no
momentum, no Adam moments decaying. The step count is one global counter (it is copied in and
out with the state), so Adam's bias correction uses the total number of steps.

These two optimisers do exactly that on the rows of a sparse gradient, without the copies:

- ``SparseAdamW``: AdamW (decoupled weight decay, then the Adam update) on the gathered rows;
  torch's ``SparseAdam`` is the same without the weight decay.
- ``LazySGD``: SGD with momentum and coupled weight decay on the gathered rows; torch's SGD with
  sparse gradients instead decays every row's momentum buffer every step, which moves rows of
  absent classes (as dense SGD does, and as the reference does for tables on the device).

Tables that stay on the device are dense parameters of the dense optimiser, as in the reference
(bench.train.build_optimizers).
"""
from __future__ import annotations

import math

import torch


def _rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices and summed row gradients of a sparse (COO) gradient: duplicates (several
    images of one class) add up, as they do into the reference's buffer."""
    grad = grad.coalesce()
    return grad.indices()[0], grad.values()


class SparseAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        if not 0.0 <= lr or not 0.0 <= weight_decay:
            raise ValueError(f"invalid lr {lr} or weight_decay {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("SparseAdamW takes sparse gradients only (nn.Embedding(sparse=True))")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                rows, grad = _rows(p.grad)
                grad = grad.to(p.dtype)
                row_param = p[rows]
                if decay:
                    row_param.mul_(1 - lr * decay)
                exp_avg = state["exp_avg"][rows].lerp_(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bias_correction1 = 1 - beta1 ** state["step"]
                bias_correction2 = 1 - beta2 ** state["step"]
                denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
                row_param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
                p[rows] = row_param
                state["exp_avg"][rows] = exp_avg
                state["exp_avg_sq"][rows] = exp_avg_sq
        return loss


class LazySGD(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, weight_decay: float = 0.0):
        if not 0.0 <= lr or not 0.0 <= momentum or not 0.0 <= weight_decay:
            raise ValueError(f"invalid lr {lr}, momentum {momentum} or weight_decay {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("LazySGD takes sparse gradients only (nn.Embedding(sparse=True))")
                rows, grad = _rows(p.grad)
                row_param = p[rows]
                grad = grad.to(p.dtype)
                if decay:
                    grad = grad.add(row_param, alpha=decay)
                if momentum:
                    state = self.state[p]
                    if not state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buffer = state["momentum_buffer"][rows].mul_(momentum).add_(grad)
                    state["momentum_buffer"][rows] = buffer
                    grad = buffer
                p[rows] = row_param.sub_(grad, alpha=lr)
        return loss
