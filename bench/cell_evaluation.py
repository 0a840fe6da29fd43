"""A cell's evaluations: one split embedded and scored, checked for collapse, and its per-query
records written. Training calls ``evaluate_split`` at each evaluated epoch; nothing here trains."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.artifacts import npz_bytes
from bench.cell_files import CellFiles
from bench.errors import CellFailure, UserError
from bench.embeddings import compute_embeddings
from bench.evaluate import PerQuery, retrieval_metrics, top1_ties
from bench.results import atomic_write_bytes


@dataclass
class SplitEvaluation:
    """One split evaluated: its metrics, each query's record, and the embeddings (In-Shop: the
    queries' in ``embeddings``, the gallery's in ``gallery``)."""
    metrics: dict[str, Any]
    per_query: PerQuery
    embeddings: np.ndarray
    labels: np.ndarray
    gallery: np.ndarray | None = None
    gallery_labels: np.ndarray | None = None


def check_embeddings(embeddings: np.ndarray, split: str) -> None:
    """A model whose embeddings are all (nearly) equal, zero or non-finite ranks by index order
    alone: its R@K would be the tie rule's, not the model's (a diverged tuning trial once won
    that way). Such a cell fails with the reason instead of reporting it."""
    if not np.isfinite(embeddings).all():
        raise CellFailure(f"the {split} embeddings hold non-finite values: the model diverged")
    scale = float(np.abs(embeddings).max(initial=0.0))
    spread = float(embeddings.std(axis=0).max(initial=0.0)) if len(embeddings) > 1 else scale
    if scale < 1e-12 or spread <= 1e-6 * scale:
        raise CellFailure(f"degenerate {split} embeddings: every image gets the same embedding (largest per-"
                          f"dimension SD {spread:.3g}, largest value {scale:.3g}); distances all tie, so R@K "
                          "would only reflect the order of the images. Either the images are all alike, or the "
                          "model collapsed (a lower learning rate usually helps)")


def evaluate_split(learner, loaders, name: str, ks, device, amp_dtype) -> SplitEvaluation | None:
    """R@K and MAP@R of one split; In-Shop (query/gallery) when ``name == 'test'`` and it has them."""
    parts = split_parts(loaders, name)
    if parts is None:
        return None
    return score_split(name, {part: compute_embeddings(learner.model, loaders[part], device, amp_dtype)
                              for part in parts}, ks)


def split_parts(loaders, name: str) -> tuple[str, ...] | None:
    """The loaders one split's evaluation embeds: In-Shop's test is its query and gallery."""
    if name == "test" and loaders.get("query") is not None:
        return ("query", "gallery")
    return (name,) if loaders.get(name) is not None else None


def score_split(name: str, embedded: dict[str, tuple[np.ndarray, np.ndarray]], ks) -> SplitEvaluation:
    """The metrics of one split from its embeddings (``split_parts``' (embeddings, labels))."""
    if "query" in embedded:
        (q, ql), (g, gl) = embedded["query"], embedded["gallery"]
        check_embeddings(q, "query")
        check_embeddings(g, "gallery")
        metrics, per_query = retrieval_metrics(q, ql, ks, gallery_embeddings=g, gallery_labels=gl,
                                               return_per_query=True)
        _record_ties(metrics, top1_ties(q, ql, gallery_embeddings=g, gallery_labels=gl))
        return SplitEvaluation(metrics, per_query, q, ql, g, gl)
    emb, labels = embedded[name]
    check_embeddings(emb, name)
    if name == "val":  # a small validation split cannot have SOP's R@1000: report the Ks it has
        ks = [k for k in ks if k < len(labels)] or [1]
    metrics, per_query = retrieval_metrics(emb, labels, ks, return_per_query=True)
    _record_ties(metrics, top1_ties(emb, labels))
    return SplitEvaluation(metrics, per_query, emb, labels)


def _record_ties(metrics: dict[str, Any], ties: dict[str, int]) -> None:
    """Says in the result how often the tie rule, not the model, decided R@1 (the reporter
    names cells where that is common): ``ties_top1`` of ``ties_checked`` queries."""
    metrics["ties_top1"] = ties["decided_by_tie"]
    metrics["ties_checked"] = ties["checked"]


def metrics_of(evaluation: SplitEvaluation | None) -> dict[str, Any] | None:
    return None if evaluation is None else evaluation.metrics


def write_per_query(cell_dir: Path, test: SplitEvaluation | None, val: SplitEvaluation | None) -> None:
    """``per_query.npz`` (the reported epoch's test queries: query_index, label, ks, hit_at_k,
    ap_at_r) and a compact ``val_per_query.npz`` (float32 AP) for the validation split."""
    if test is not None:
        atomic_write_bytes(CellFiles(cell_dir).per_query, npz_bytes(test.per_query.arrays()))
    if val is not None:
        arrays = val.per_query.arrays()
        arrays["ap_at_r"] = arrays["ap_at_r"].astype(np.float32)
        atomic_write_bytes(CellFiles(cell_dir).val_per_query, npz_bytes(arrays))


def check_recall_ks(ks: tuple[int, ...], splits, dataset: str) -> None:
    """Fail before training when a split cannot have the deepest R@K (a small SOP subset has no
    R@1000): every K needs that many other images to rank."""
    if splits.query is not None and splits.gallery is not None:
        split_name, candidates = "gallery", len(splits.gallery)
    elif splits.test is not None:
        split_name, candidates = "test", len(splits.test) - 1
    else:
        return
    if ks[-1] > candidates:
        possible = [k for k in ks if k <= candidates]
        raise UserError(f"recall@{ks[-1]} needs {ks[-1]} images to rank, but the {split_name} split of {dataset} "
                        f"has {candidates} (the largest possible K is {candidates}); set the cell field recall_ks, "
                        f"e.g. recall_ks: {possible or [1]}")
