"""A split evaluated by several ranks: each embeds its shard, rank 0 scores the whole split.

Each rank embeds its contiguous shard of the split (``Ranks.shard``): the forward passes, the
cost of an evaluation, are shared out. Rank 0 alone receives the shards (in rank order: the
split in its own order) and scores them with the one-process code (``score_split``), so the
metrics and ``per_query.npz`` are one process's, bit for bit; the other ranks never hold the
split's embeddings and get rank 0's metrics, or its failure, which they raise too.

Why rank 0 scores, rather than exact top-k per gallery shard merged across ranks: the float32
similarity of a pair depends on the shape of the product it is computed in, so two identical
gallery images in different shards stop tying exactly, and the lower-index rule no longer
decides between them. On 90 embeddings of 30 distinct vectors, 2 shards moved 96 of 1,080
neighbour entries and R@1 from 8.99 to 11.24 (measured with ``bench.knn.knn`` per shard and an
exact merge). The search itself is not the cost (SOP's 60k test images are scored in seconds),
and rank 0 holds what one process holds.
"""
from __future__ import annotations

import numpy as np

from bench.cell_evaluation import SplitEvaluation, score_split, split_parts
from bench.embeddings import compute_embeddings
from bench.errors import CellFailure
from bench.knn import EvaluationError


def evaluate_on_ranks(learner, shard_loaders, name: str, ks, device, amp_dtype, ranks) -> SplitEvaluation | None:
    """``cell_evaluation.evaluate_split`` on several ranks: the same metrics on every rank; the
    per-query records and the embeddings on rank 0."""
    parts = split_parts(shard_loaders, name)
    if parts is None:
        return None
    mine = {part: compute_embeddings(learner.model, shard_loaders[part], device, amp_dtype) for part in parts}
    return score_on_main(name, mine, ks, ranks)


def score_on_main(name: str, mine: dict[str, tuple[np.ndarray, np.ndarray]], ks, ranks) -> SplitEvaluation:
    """The split's evaluation from every rank's shard (``{part: (embeddings, labels)}``), scored
    on rank 0; the other ranks get its metrics (for the best-epoch bookkeeping) or its failure."""
    from bench import distributed

    gathered = distributed.to_main(mine, f"{name} embeddings")
    evaluation, verdict = None, None
    if ranks.main:
        whole = {part: (np.concatenate([g[part][0] for g in gathered]), np.concatenate([g[part][1] for g in gathered]))
                 for part in mine}
        try:
            evaluation = score_split(name, whole, ks)
            verdict = ("ok", evaluation.metrics)
        except (CellFailure, EvaluationError) as e:
            verdict = ("failed", str(e))
    status, payload = distributed.from_main(verdict, f"{name} metrics")
    if status == "failed":
        raise CellFailure(payload)
    return evaluation if ranks.main else SplitEvaluation(payload, None, None, None)
