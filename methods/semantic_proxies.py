"""Semantic proxies from class prompts (VPTSP, Ren et al., ICLR 2024), SPEC §6.

Training step, on top of the ordinary sample branch:
1. each image of the batch goes through the backbone a second time with its *class's* prompts
   (``num_class_prompts`` tokens before each of the first ``class_prompt_depth`` blocks, VPT-deep
   style, no dataset prompts), then through a separate LayerNorm + Linear head: one semantic
   vector per image;
2. a per-class memory (a buffer, not a parameter, rows on the unit sphere) accumulates these
   vectors, class by class in batch order, by EMA (``m <- keep m + (1 - keep) mean(v)``), by a
   GRU cell whose candidate activation is ReLU (the paper's choice) or tanh (``gru_dropout`` on
   its output, as the reference), by the exact running class mean (``mean``, an ablation), or by
   attention of the row over itself and the class's batch vectors (``attention``, an ablation;
   ``AttentionAccumulator`` has the equations); the updated rows are L2-normalised, as the
   reference does;
3. proxies = ``proxy_bias_ratio * bias + (1 - proxy_bias_ratio) * memory``, with ``bias`` the
   loss's own learnable proxies (re-initialised Xavier-uniform / 8). In-batch classes use the
   freshly updated memory, so gradients reach the class prompts, the proxy head and the GRU;
   the memory keeps only the detached values.

Memory: the proxy pass keeps a second set of activations for backward, as large as the sample
pass's. ``proxy_checkpointing`` recomputes the proxy pass block by block in backward instead
(one more forward of it per step; same gradients): at ViT-S/16, batch 64, VPTSP-G then keeps
1.75 GiB of activations instead of 2.89, against VPT-deep's 1.45 (BENCHMARKS.md).

Scale: class prompts are one row per class of an ``nn.Embedding``; only the batch's rows are
gathered. When the table is large (SOP: 11,318 classes x 5 x 12 x 384 floats = 1.0 GiB) it
stays in CPU memory with its optimiser state (``class_prompt_offload``), its gradients are
sparse and only the batch's rows are updated (bench.optim: SparseAdamW, LazySGD), as the
reference's memory bank does; a table on the device is a dense parameter, as in the reference.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.model import set_reference
from methods.base import Component, require_blocks
from methods.init import init_bias_proxies_, init_head_, init_prompts_, initial_memory
from methods.prompts import prompt_counts

OFFLOAD_THRESHOLD_BYTES = 256 * 2 ** 20


class ClassPromptBank(nn.Module):
    """Per-class prompt tokens: row c holds class c's tokens of every prompted block."""

    def __init__(self, num_classes: int, counts: list[int], backbone: nn.Module, scheme: str, offload: bool):
        super().__init__()
        self.counts = counts
        self.width = backbone.embed_dim
        self.offload = offload
        # Sparse gradients only for an offloaded table: its rows are updated lazily by the
        # sparse optimisers (bench.optim), as the reference's memory bank does. A table on the
        # device is an ordinary dense parameter of the dense optimiser, as in the reference.
        self.table = nn.Embedding(num_classes, sum(counts) * self.width, sparse=offload)
        self.table.weight.per_class = True  # grows with the class count: counted apart
        init_prompts_(self.table.weight, scheme, backbone, length=num_classes, num=max(counts))

    def _apply(self, fn, recurse=True):
        # An offloaded table ignores .to(device): it and its optimiser state stay in CPU memory.
        if self.offload:
            return self
        return super()._apply(fn, recurse)

    def gather(self, labels: torch.Tensor) -> list[torch.Tensor]:
        """Each image's class prompts, per block: a list of ``[B, n_i, width]``."""
        index = labels.to(self.table.weight.device)
        rows = self.table(index).to(labels.device, non_blocking=True)
        rows = rows.view(labels.shape[0], sum(self.counts), self.width)
        return list(torch.split(rows, self.counts, dim=1))


class PerImagePrompts:
    """``Prompts`` for the proxy pass: a different set of tokens for every image."""

    def __init__(self, blocks: list[torch.Tensor]):
        self.blocks = blocks

    def for_block(self, index: int, batch_size: int) -> torch.Tensor | None:
        if index < len(self.blocks):
            return self.blocks[index]
        if index == len(self.blocks):  # past the depth the class prompts' outputs are dropped
            return self.blocks[0][:, :0]
        return None


class GRUAccumulatorCell(nn.Module):
    """``z = s(v Wiz + h Whz + bz); r = s(v Wir + h Whr + br); n = act(v Win + r (h Whn) + bn);
    h' = (1 - z) n + z h``: the SPEC's GRU, with input biases only and ReLU or tanh candidate."""

    def __init__(self, size: int, activation: str):
        super().__init__()
        self.weight_input = nn.Parameter(torch.empty(3, size, size))  # z, r, n
        self.weight_hidden = nn.Parameter(torch.empty(3, size, size))
        self.bias = nn.Parameter(torch.zeros(3, size))
        for w in (*self.weight_input, *self.weight_hidden):
            nn.init.xavier_uniform_(w)
        self.activation = torch.relu if activation == "relu" else torch.tanh

    def forward(self, v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        wi, wh, b = self.weight_input, self.weight_hidden, self.bias
        z = torch.sigmoid(v @ wi[0] + h @ wh[0] + b[0])
        r = torch.sigmoid(v @ wi[1] + h @ wh[1] + b[1])
        n = self.activation(v @ wi[2] + r * (h @ wh[2]) + b[2])
        return (1 - z) * n + z * h


class MeanAccumulator(nn.Module):
    """The running mean of every semantic vector a class has produced:
    ``m <- (n m + sum_j v_j) / (n + k)`` for the batch's ``k`` vectors of the class, ``n`` the
    count so far (a buffer); ``total = n m`` is kept, so the mean is exact (not a decayed
    average), and the memory row is ``m`` re-normalised."""

    def __init__(self, num_classes: int, size: int):
        super().__init__()
        self.register_buffer("count", torch.zeros(num_classes))
        self.register_buffer("total", torch.zeros(num_classes, size))

    def forward(self, classes: torch.Tensor, membership: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        batch_sum = membership.T.to(vectors.dtype) @ vectors  # [U, E]
        k = membership.sum(0).to(vectors.dtype)[:, None]
        n = self.count[classes].to(vectors.dtype)[:, None]
        mean = (self.total[classes].to(vectors.dtype) + batch_sum) / (n + k)
        with torch.no_grad():  # the running state keeps the detached values
            self.total[classes] += batch_sum.detach().to(self.total.dtype)
            self.count[classes] += k.squeeze(1).to(self.count.dtype)
        return mean


class AttentionAccumulator(nn.Module):
    """The memory row attends over itself and the batch's vectors of its class. With ``h`` the
    row and ``T = [h; v_1; ...; v_k]``::

        q = h W_q,   K = T W_k,   V = T W_v,   a = softmax(K q / sqrt(E)),   h' = h + a V

    and the memory row is ``h'`` re-normalised. ``W_q``, ``W_k``, ``W_v`` are learned (E x E,
    Xavier-uniform); the residual ``h +`` keeps the memory at its old value when ``a V`` is small.
    """

    def __init__(self, size: int):
        super().__init__()
        self.query = nn.Linear(size, size, bias=False)
        self.key = nn.Linear(size, size, bias=False)
        self.value = nn.Linear(size, size, bias=False)
        for layer in (self.query, self.key, self.value):
            nn.init.xavier_uniform_(layer.weight)

    def forward(self, h: torch.Tensor, vectors: torch.Tensor, inverse: torch.Tensor,
                membership: torch.Tensor) -> torch.Tensor:
        classes, size = h.shape
        rank = (membership.cumsum(0) - 1).gather(1, inverse[:, None]).squeeze(1)  # position within class
        slots = int(rank.max()) + 1
        tokens = h.new_zeros(classes, 1 + slots, size)
        tokens = tokens.index_put((inverse, rank + 1), vectors)  # [U, 1 + k_max, E]: row, then vectors
        tokens = torch.cat([h[:, None], tokens[:, 1:]], dim=1)
        present = torch.zeros(classes, 1 + slots, dtype=torch.bool, device=h.device)
        present[:, 0] = True
        present[inverse, rank + 1] = True
        scores = (self.key(tokens) @ self.query(h)[:, :, None]).squeeze(2) / size ** 0.5
        weights = torch.softmax(scores.masked_fill(~present, float("-inf")), dim=1)
        return h + (weights[:, :, None] * self.value(tokens)).sum(1)


class SemanticProxyModule(nn.Module):
    def __init__(self, num_classes: int, backbone: nn.Module, embedding_size: int, counts: list[int], scheme: str,
                 accumulator: str, ema_keep: float, proxy_bias_ratio: float, dropout: float, offload: bool,
                 checkpointing: bool = False):
        super().__init__()
        width = backbone.embed_dim
        self.checkpointing = checkpointing
        self.class_prompts = ClassPromptBank(num_classes, counts, backbone, scheme, offload)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, embedding_size))
        init_head_(self.head, scheme)
        self.accumulator = accumulator
        self.gru = GRUAccumulatorCell(embedding_size, accumulator.split("_")[1]) if accumulator.startswith("gru") else None
        self.mean = MeanAccumulator(num_classes, embedding_size) if accumulator == "mean" else None
        self.attention = AttentionAccumulator(embedding_size) if accumulator == "attention" else None
        self.dropout = nn.Dropout(dropout)
        self.ema_keep = ema_keep
        self.proxy_bias_ratio = proxy_bias_ratio
        self.register_buffer("memory", initial_memory(num_classes, embedding_size, scheme))

    def semantic_vectors(self, learner, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        prompts = PerImagePrompts(self.class_prompts.gather(labels))
        # None, not False: without proxy checkpointing the model's grad_checkpointing still applies
        features = learner.model.features(images, prompts=prompts, checkpointing=self.checkpointing or None)
        return F.normalize(self.head(features), dim=-1)

    def accumulate(self, vectors: torch.Tensor, labels: torch.Tensor,
                   same_on_every_rank=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Updated, L2-normalised memory rows of the batch's classes: ``(classes, rows)``, with
        autograd. The memory stays on the unit sphere, as in the reference implementation.
        ``same_on_every_rank`` (several ranks: rank 0's tensor on every rank) makes the GRU's
        dropout draw one mask for all ranks, so their memories stay equal."""
        classes, inverse = torch.unique(labels, return_inverse=True)
        membership = F.one_hot(inverse, classes.shape[0])  # [B, U]
        h = self.memory[classes].to(vectors.dtype)
        if self.mean is not None:
            return classes, F.normalize(self.mean(classes, membership, vectors), dim=1)
        if self.attention is not None:
            return classes, F.normalize(self.attention(h, vectors, inverse, membership), dim=1)
        if self.gru is None:
            counts = membership.sum(0, keepdim=True).T.to(vectors.dtype)
            mean = (membership.T.to(vectors.dtype) @ vectors) / counts
            return classes, F.normalize(self.ema_keep * h + (1 - self.ema_keep) * mean, dim=1)
        rank = (membership.cumsum(0) - 1).gather(1, inverse[:, None]).squeeze(1)  # order within class
        for step in range(int(rank.max()) + 1):
            at_step = rank == step
            owners = inverse[at_step]
            inputs = torch.zeros_like(h).index_copy(0, owners, vectors[at_step])
            active = torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)
            active[owners] = True
            h = torch.where(active[:, None], self._dropout(self.gru(inputs, h), same_on_every_rank), h)
        return classes, F.normalize(h, dim=1)

    def _dropout(self, x: torch.Tensor, same_on_every_rank) -> torch.Tensor:
        """``nn.Dropout`` (the same draws and arithmetic as its CPU kernel), with the mask made
        the same on every rank when there are several."""
        p = self.dropout.p
        if not self.training or p == 0:
            return x
        if p == 1:
            return torch.zeros_like(x)
        scale = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
        if same_on_every_rank is not None:
            scale = same_on_every_rank(scale)
        return x * scale

    def forward(self, learner, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        vectors = self.semantic_vectors(learner, images, labels).float()
        vectors, labels = learner.gather_batch(vectors, labels)  # several ranks: the global batch's
        classes, rows = self.accumulate(vectors, labels, learner.same_on_every_rank)
        memory = self.memory.index_put((classes,), rows)  # out of place: grads flow to `rows`
        with torch.no_grad():
            self.memory[classes] = rows.detach()
        bias = learner.criterion.proxies
        return self.proxy_bias_ratio * bias + (1 - self.proxy_bias_ratio) * memory


class SemanticProxies(Component):
    name = "semantic_proxies"
    training_only = ("extras.semantic_proxies.",)  # class prompts, memory: the proxies' pass only

    def apply(self, learner):
        backbone = learner.model.backbone
        require_blocks(backbone, "class_prompt_depth", self.class_prompt_depth)
        counts = prompt_counts(self.num_class_prompts, self.class_prompt_depth, self.class_prompt_decrease)
        table_bytes = learner.num_classes * sum(counts) * backbone.embed_dim * 4
        offload = {"cpu": True, "device": False}.get(self.class_prompt_offload,
                                                      table_bytes > OFFLOAD_THRESHOLD_BYTES)
        module = SemanticProxyModule(
            learner.num_classes, backbone, learner.embedding_size, counts, learner.init,
            self.accumulator, self.ema_keep, self.proxy_bias_ratio, self.gru_dropout, offload,
            bool(self.proxy_checkpointing))
        learner.extras["semantic_proxies"] = module
        set_reference(learner, "proxy_source", module)
        init_bias_proxies_(learner.criterion.proxies)  # the bias proxies, as the reference does

    def proxy_arrays(self, learner, bias):
        """The loss compares with alpha * bias + (1 - alpha) * memory: both parts and the mix."""
        module = learner.extras["semantic_proxies"]
        memory = module.memory.detach().float().cpu()
        ratio = float(module.proxy_bias_ratio)
        return {"memory": memory.numpy(), "bias": bias.numpy(), "proxy_bias_ratio": np.float32(ratio),
                "proxies": ratio * bias + (1 - ratio) * memory}
