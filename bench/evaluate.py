"""Retrieval evaluation: exact inner-product kNN, Recall@K and MAP@R (SPEC section 3).

This module knows nothing about methods or backbones: a model is anything that maps a batch of
images to a batch of embeddings. Scoring works on plain arrays so that saved embeddings can be
re-scored with ``run_suite.py evaluate`` without a model.

Conventions, fixed here once so that every number in the suite means the same thing:

* similarity is the inner product of L2-normalised embeddings (cosine);
* neighbours are ranked by similarity, descending, and exact ties by the lower gallery index,
  with every backend (faiss, torch) and every chunk size;
* R@K asks where a query's best positive ranks in that order; for deep K (SOP's R@1000) the
  CPU engines count the items ranked before it instead of keeping a top-K list per query;
* in self-retrieval mode (no gallery) the query itself is excluded *by index*, so that a
  duplicate embedding of the query still counts as a neighbour;
* a "lone" query (no other sample of its class to find) is left out of every metric and
  counted in ``num_lone_queries``; ``num_queries`` counts the queries that were scored. This
  is what pytorch-metric-learning's ``AccuracyCalculator`` does too.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench import metrics as metric_registry
from bench.embeddings import EmbeddingFileError, compute_embeddings, load_array
from bench.knn import (EvaluationError, _check_backend, _check_embeddings, _check_ks, _check_labels, _chunk_rows,
                       _counting_pays, _cuda_available, _encode_labels, _faiss_has_gpu, _faiss_or_none,
                       _iter_neighbours, _l2_normalise, _make_searcher, _resolve_backend, _torch_importable, knn)

# The scoring API, in one import: the metrics here, kNN from bench.knn, embeddings from bench.embeddings.
__all__ = ["EmbeddingFileError", "EvaluationError", "PerQuery", "compute_embeddings", "knn", "load_array",
           "retrieval_metrics", "top1_ties"]


@dataclass
class PerQuery:
    """One row per scored query (lone queries are left out, as in the metrics), with each
    registered metric's record (``bench.metrics``: ``hit_at_k`` bool [Q, len(K)], a same-class
    image among its K nearest; ``ap_at_r`` float64 [Q], its average precision at R)."""
    query_index: np.ndarray  # int64 [Q]: the query's index in its split
    label: np.ndarray  # [Q]: its label
    ks: np.ndarray  # int64 [len(K)]
    records: dict[str, np.ndarray]  # metric record name -> per-query values
    engine: str = ""  # the kNN engine that ranked them

    @property
    def hit_at_k(self) -> np.ndarray:
        return self.records["hit_at_k"]

    @property
    def ap_at_r(self) -> np.ndarray:
        return self.records["ap_at_r"]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"query_index": self.query_index, "label": self.label, "ks": self.ks, **self.records}


def _first_hit_ranks(same_class: np.ndarray) -> np.ndarray:
    """0-based rank of each row's first same-class neighbour; the row length when none."""
    found = same_class.any(axis=1)
    return np.where(found, same_class.argmax(axis=1), same_class.shape[1])


def _class_members(codes: np.ndarray, num_classes: int) -> np.ndarray:
    """Gallery indices of each class, one row per class, padded with -1 to the largest class."""
    sizes = np.bincount(codes, minlength=num_classes)
    order = np.argsort(codes, kind="stable")
    position_in_class = np.arange(len(codes)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    members = np.full((num_classes, max(int(sizes.max()), 1)), -1, dtype=np.int64)
    members[codes[order], position_in_class] = order
    return members


def _prepared(embeddings, labels, gallery_embeddings, gallery_labels, normalize: bool):
    """What every scoring starts from: (self_search, query, query labels, gallery, query and
    gallery class codes, R per query: the other samples of its class in the gallery)."""
    self_search = gallery_embeddings is None
    query, query_labels, gallery, gallery_labels = _checked_query_and_gallery(
        embeddings, labels, gallery_embeddings, gallery_labels)
    if normalize:
        query = _l2_normalise(query)
        gallery = query if self_search else _l2_normalise(gallery)
    query_codes, gallery_codes = _encode_labels(query_labels, gallery_labels)
    class_sizes = np.bincount(gallery_codes, minlength=int(query_codes.max()) + 1)
    r_per_query = class_sizes[query_codes] - int(self_search)
    return self_search, query, query_labels, gallery, query_codes, gallery_codes, r_per_query


def _checked_query_and_gallery(embeddings, labels, gallery_embeddings, gallery_labels):
    """(query, query labels, gallery, gallery labels); the gallery is the query set when absent."""
    query = _check_embeddings(embeddings, "embeddings")
    query_labels = _check_labels(labels, "labels", len(query), "embeddings")
    if gallery_embeddings is None:
        if gallery_labels is not None:
            raise EvaluationError("gallery labels given without gallery embeddings")
        return query, query_labels, query, query_labels
    if gallery_labels is None:
        raise EvaluationError("gallery embeddings given without gallery labels")
    gallery = _check_embeddings(gallery_embeddings, "gallery embeddings")
    gallery_labels = _check_labels(gallery_labels, "gallery labels", len(gallery), "gallery embeddings")
    if gallery.shape[1] != query.shape[1]:
        raise EvaluationError(
            f"embeddings have dimension {query.shape[1]} but gallery embeddings have "
            f"dimension {gallery.shape[1]}"
        )
    return query, query_labels, gallery, gallery_labels


def retrieval_metrics(
    embeddings: Any,
    labels: Any,
    ks: Sequence[int] = (1, 2, 4, 8),
    *,
    gallery_embeddings: Any = None,
    gallery_labels: Any = None,
    backend: str = "auto",
    normalize: bool = True,
    chunk_size: int | None = None,
    return_per_query: bool = False,
):
    """Recall@K for each K and MAP@R (SPEC section 3).

    Without a gallery every embedding is a query against all the others (CUB, Cars, SOP,
    iNaturalist); with one, queries search the gallery only (In-Shop). R is the number of
    *other* samples of the query's class in the gallery. Queries with R = 0 are left out and
    counted in ``num_lone_queries``; ``num_queries`` is the number of queries scored.
    ``chunk_size`` is the number of queries searched at once (default: about 256 MB of
    working memory).

    Returns ``{"recall@K": ..., "map@r": ..., "num_queries": ..., "num_lone_queries": ...}``;
    with ``return_per_query``, also each scored query's record (``PerQuery``), whose means are
    these metrics exactly (the paired significance tests of the reporter resample them).
    """
    _check_backend(backend)
    ks = _check_ks(ks)
    self_search, query, query_labels, gallery, query_codes, gallery_codes, r_per_query = _prepared(
        embeddings, labels, gallery_embeddings, gallery_labels, normalize)
    candidates = len(gallery) - int(self_search)
    if ks[-1] > candidates:
        where = "other embeddings" if self_search else "gallery embeddings"
        raise EvaluationError(f"recall@{ks[-1]} asked for, but there are only {candidates} {where}")

    scored = np.flatnonzero(r_per_query > 0)
    if len(scored) == 0:
        raise EvaluationError(
            f"none of the {len(query)} queries has another sample of its class "
            f"{'in the set' if self_search else 'in the gallery'}: nothing to score"
        )

    if self_search and _symmetric_pays(backend, query_codes):
        from bench import evaluate_symmetric

        first_hit, ap_at_r = evaluate_symmetric.self_retrieval_records(query, query_codes, ks, chunk_size)
        # Identical embeddings of different classes tie exactly; the half-matrix engine computes
        # their similarities in different blocks, where rounding may part them. The queries
        # whose ranking such a tie decides are searched again, each row in one product.
        redo = np.flatnonzero(np.isin(scored, evaluate_symmetric.queries_with_mixed_duplicates(query, query_codes)))
        if len(redo):
            first_hit[redo], ap_at_r[redo], _ = _records_by_search(
                query, gallery, query_codes, gallery_codes, r_per_query, scored[redo], ks, "torch" if _torch_importable() else "auto", chunk_size,
                self_search)
        return _metrics_and_records(first_hit, ap_at_r, ks, scored, query_labels, len(query),
                                    evaluate_symmetric.ENGINE, return_per_query)

    first_hit, ap_at_r, engine = _records_by_search(query, gallery, query_codes, gallery_codes, r_per_query,
                                                    scored, ks, backend, chunk_size, self_search)
    return _metrics_and_records(first_hit, ap_at_r, ks, scored, query_labels, len(query), engine,
                                return_per_query)


def _records_by_search(query, gallery, query_codes, gallery_codes, r_per_query, scored, ks, backend, chunk_size,
                       self_search):
    """(first_hit, ap_at_r, engine) of the ``scored`` queries, searched a chunk of rows at a time:
    the 0-based rank of each one's best positive (at or beyond the deepest K: a miss for every K,
    reported as the list length) and its AP@R."""
    # MAP@R needs each query's top R; R@K needs where its first positive ranks, read from a
    # top-K list or, for deep K on the CPU, counted (see _counting_pays).
    candidates = len(gallery) - int(self_search)
    r_max = int(r_per_query[scored].max())
    prefer_counting = _counting_pays(ks[-1], r_max)
    list_length = min(max(ks[-1], r_max), candidates)
    searcher = _make_searcher(_resolve_backend(backend, list_length + 2, prefer_counting), gallery)
    positives_of = None
    if prefer_counting and searcher.can_count:
        list_length = min(r_max, candidates)
        members = _class_members(gallery_codes, int(max(query_codes.max(), gallery_codes.max())) + 1)
        positives_of = lambda rows: members[query_codes[rows]]  # noqa: E731

    first_hit = np.zeros(len(scored), dtype=np.int64)
    ap_at_r = np.zeros(len(scored), dtype=np.float64)
    done = 0
    chunks = _iter_neighbours(searcher, query, scored, list_length, self_search=self_search,
                              chunk_size=_chunk_rows(chunk_size, searcher, len(gallery), list_length),
                              positives_of=positives_of)
    for rows, _, neighbours, counted_ranks in chunks:
        same_class = gallery_codes[neighbours] == query_codes[rows, None]
        first_hit[done:done + len(rows)] = _first_hit_ranks(same_class) if counted_ranks is None else counted_ranks
        ap_at_r[done:done + len(rows)] = metric_registry.average_precision_at_r(same_class, r_per_query[rows])
        done += len(rows)
    return first_hit, ap_at_r, searcher.kind


def _metrics_and_records(first_hit, ap_at_r, ks, scored, query_labels, num_queries, engine, return_per_query):
    # Each registered metric's per-query record, and its mean computed once from it: a
    # per_query.npz's means equal these metrics exactly.
    records = metric_registry.records({"first_hit": first_hit, "ap_at_r": ap_at_r}, ks)
    metrics: dict[str, float | int] = metric_registry.means(records, ks)
    metrics["num_queries"] = len(scored)
    metrics["num_lone_queries"] = num_queries - len(scored)
    if return_per_query:
        return metrics, PerQuery(query_index=scored.astype(np.int64), label=np.asarray(query_labels)[scored],
                                 ks=np.asarray(ks, dtype=np.int64), records=records, engine=engine)
    return metrics


TIE_SAMPLE = 2000  # queries checked for ties: exact below this, a fixed sample above


def top1_ties(embeddings: Any, labels: Any, *, gallery_embeddings: Any = None, gallery_labels: Any = None,
              normalize: bool = True, max_queries: int = TIE_SAMPLE) -> dict[str, int]:
    """How many queries' R@1 the tie rule decided rather than the model.

    A query's R@1 is *decided by a tie* when its greatest similarity is shared exactly by an item
    of its class and an item of another class: then only the lower-index rule makes it a hit or
    a miss. A near-constant embedding makes this common, and its R@K then measures the order of
    the images. Checked exactly on every query up to ``max_queries`` and on a fixed, evenly
    spaced sample of that many above (a statement of rate, not of which queries).

    Returns ``{"checked": n, "decided_by_tie": m}`` over scored (non-lone) queries.
    """
    self_search, query, _, gallery, query_codes, gallery_codes, r_per_query = _prepared(
        embeddings, labels, gallery_embeddings, gallery_labels, normalize)
    scored = np.flatnonzero(r_per_query > 0)
    if len(scored) > max_queries:
        scored = scored[np.linspace(0, len(scored) - 1, max_queries).round().astype(np.int64)]
    decided = 0
    gallery64 = gallery.astype(np.float64)
    for start in range(0, len(scored), 256):
        rows = scored[start:start + 256]
        # float64 products: an exact tie of the float32 embeddings stays one, and rounding does
        # not invent ties between different vectors
        similarities = query[rows].astype(np.float64) @ gallery64.T
        if self_search:
            similarities[np.arange(len(rows)), rows] = -np.inf
        at_best = similarities >= similarities.max(axis=1, keepdims=True) - 1e-12
        same = gallery_codes[None, :] == query_codes[rows, None]
        decided += int(((at_best & same).any(axis=1) & (at_best & ~same).any(axis=1)).sum())
    return {"checked": int(len(scored)), "decided_by_tie": decided}


def _symmetric_pays(backend: str, codes: np.ndarray) -> bool:
    """Whether "auto" self-retrieval runs on the symmetric CPU engine (bench.evaluate_symmetric):
    on a machine without a GPU engine, it computes half the products of any block engine."""
    from bench import evaluate_symmetric

    if backend != "auto" or _cuda_available():
        return False
    faiss = _faiss_or_none()
    if faiss is not None and _faiss_has_gpu(faiss):
        return False
    return evaluate_symmetric.usable(codes)
