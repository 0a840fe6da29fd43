"""Retrieval metrics (bench/evaluate.py): kNN, Recall@K, MAP@R, embeddings, `evaluate` CLI.

References: a brute-force NumPy implementation written here (full similarity matrix, stable
argsort), pytorch-metric-learning's AccuracyCalculator, and tiny cases worked out by hand.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.errors import UserError
from peft_dml_cli.evaluate import cmd_evaluate
from bench.evaluate import (
    EmbeddingFileError,
    EvaluationError,
    compute_embeddings,
    knn,
    retrieval_metrics,
)

REPO = Path(__file__).resolve().parents[1]

try:
    import faiss  # noqa: F401

    BACKENDS = ["faiss", "torch"]
except ImportError:
    BACKENDS = ["torch"]


# --------------------------------------------------------------------------------------------
# Reference implementations and data
# --------------------------------------------------------------------------------------------

def normalised(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force_ranking(query, gallery=None):
    """Full similarity matrix in float64, self at -inf, stable argsort (ties: lower index)."""
    self_search = gallery is None
    gallery = query if self_search else gallery
    sims = query.astype(np.float64) @ gallery.astype(np.float64).T
    if self_search:
        np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")
    if self_search:
        order = order[:, :-1]  # self is last
    return np.take_along_axis(sims, order, axis=1), order


def brute_force_metrics(query, query_labels, ks, gallery=None, gallery_labels=None):
    """Recall@K and MAP@R straight from the definitions, one query at a time."""
    self_search = gallery is None
    if self_search:
        gallery, gallery_labels = query, query_labels
    _, order = brute_force_ranking(normalised(query), None if self_search else normalised(gallery))
    hits = {k: 0 for k in ks}
    ap_sum, scored = 0.0, 0
    for i, label in enumerate(query_labels):
        r = int((gallery_labels == label).sum()) - int(self_search)
        if r == 0:
            continue
        scored += 1
        relevant = gallery_labels[order[i]] == label
        for k in ks:
            hits[k] += bool(relevant[:k].any())
        precision_sum, found = 0.0, 0
        for rank in range(1, r + 1):
            if relevant[rank - 1]:
                found += 1
                precision_sum += found / rank
        ap_sum += precision_sum / r
    result = {f"recall@{k}": hits[k] / scored for k in ks}
    result.update({"map@r": ap_sum / scored, "num_queries": scored,
                   "num_lone_queries": len(query_labels) - scored})
    return result


def assert_no_near_ties(sims_sorted, width):
    """The premise of exact comparisons: no two of the first `width` + 1 neighbours nearly tie.

    A float32 inner product of unit vectors in 16-D is off by well under 1e-6, so a gap above
    2e-6 cannot be reordered by rounding in any backend. Random data has near-ties somewhere
    (about 1 in 10^4 gaps is this small), which is why the tests below use seeds that pass.
    """
    gaps = -np.diff(sims_sorted[:, : width + 1], axis=1)
    assert gaps.min() > 2e-6, "test data has near-ties; pick another seed"


def assert_best_positive_stands_clear(query, query_labels, gallery=None, gallery_labels=None):
    """The premise for deep R@K: nothing is within 2e-6 of a query's best positive similarity."""
    self_search = gallery is None
    if self_search:
        gallery, gallery_labels = query, query_labels
    sims = normalised(query).astype(np.float64) @ normalised(gallery).astype(np.float64).T
    if self_search:
        np.fill_diagonal(sims, -np.inf)
    positive = query_labels[:, None] == gallery_labels[None, :]
    if self_search:
        np.fill_diagonal(positive, False)
    scored = positive.any(axis=1)
    sims, positive = sims[scored], positive[scored]
    best = np.where(positive, sims, -np.inf).max(axis=1, keepdims=True)
    distance = np.abs(sims - best)
    distance[sims == best] = np.inf  # the best positive itself
    assert distance.min() > 2e-6, "test data has near-ties; pick another seed"


def search_width(labels, ks, gallery_labels=None):
    """How many neighbours the metrics look at: max(K, R)."""
    counts = np.unique(labels if gallery_labels is None else gallery_labels, return_counts=True)[1]
    return max(max(ks), int(counts.max()))


def clustered_data(seed, n, dim=16, classes=40, lone=3):
    """Clustered embeddings with uneven classes and `lone` singleton classes at the end."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([rng.integers(0, classes, n - lone), classes + np.arange(lone)])
    rng.shuffle(labels)
    centres = rng.standard_normal((classes + lone, dim))
    x = centres[labels] + 1.2 * rng.standard_normal((n, dim))
    return x.astype(np.float32), labels


def integer_data(seed, n, dim=4):
    """Small-integer embeddings: every inner product is exact in float32, with many exact ties."""
    return np.random.default_rng(seed).integers(-2, 3, size=(n, dim)).astype(np.float32)


def assert_metrics_equal(actual, expected, tol=1e-12):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=tol, rel=0), key


# --------------------------------------------------------------------------------------------
# kNN
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_self_search_matches_brute_force(backend):
    x = normalised(clustered_data(0, 300)[0])
    ref_sims, ref_idx = brute_force_ranking(x)
    assert_no_near_ties(ref_sims, 10)
    sims, idx = knn(x, k=10, exclude_self=True, backend=backend)
    assert sims.dtype == np.float32 and idx.dtype == np.int64 and idx.shape == (300, 10)
    np.testing.assert_array_equal(idx, ref_idx[:, :10])
    np.testing.assert_allclose(sims, ref_sims[:, :10], atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_query_vs_gallery_matches_brute_force(backend):
    x = normalised(clustered_data(5, 400)[0])
    query, gallery = x[:150], x[150:]
    ref_sims, ref_idx = brute_force_ranking(query, gallery)
    assert_no_near_ties(ref_sims, 12)
    sims, idx = knn(query, gallery, k=12, exclude_self=False, backend=backend)
    np.testing.assert_array_equal(idx, ref_idx[:, :12])
    np.testing.assert_allclose(sims, ref_sims[:, :12], atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [None, 1, 37])
def test_knn_ties_are_broken_by_lower_index(backend, chunk_size):
    # 5^4 = 625 possible vectors for 400 rows: duplicates and tied similarities everywhere,
    # including ties that straddle rank k, where a backend's own top-k picks arbitrarily.
    x = integer_data(2, 400)
    ref_sims, ref_idx = brute_force_ranking(x)
    sims, idx = knn(x, k=15, exclude_self=True, backend=backend, chunk_size=chunk_size)
    np.testing.assert_array_equal(idx, ref_idx[:, :15])
    np.testing.assert_array_equal(sims, ref_sims[:, :15])

    ref_sims, ref_idx = brute_force_ranking(x[:60], x[60:])
    sims, idx = knn(x[:60], x[60:], k=15, exclude_self=False, backend=backend, chunk_size=chunk_size)
    np.testing.assert_array_equal(idx, ref_idx[:, :15])


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_excludes_self_by_index_not_by_similarity(backend):
    # rows 0, 1, 2 are the same vector: each must find the other two, lower index first
    x = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [-1, 0]], dtype=np.float32)
    _, idx = knn(x, k=2, exclude_self=True, backend=backend)
    np.testing.assert_array_equal(idx[:3], [[1, 2], [0, 2], [0, 1]])
    _, idx = knn(x, k=4, exclude_self=False, backend=backend)
    np.testing.assert_array_equal(idx[0], [0, 1, 2, 3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_chunked_equals_single_chunk(backend):
    x = normalised(clustered_data(3, 500)[0])
    whole = knn(x, k=20, exclude_self=True, backend=backend, chunk_size=len(x))
    for chunk_size in (1, 13, None):
        sims, idx = knn(x, k=20, exclude_self=True, backend=backend, chunk_size=chunk_size)
        np.testing.assert_array_equal(idx, whole[1])
        np.testing.assert_allclose(sims, whole[0], atol=1e-6)


def test_knn_k_can_be_the_whole_gallery():
    x = integer_data(4, 30)
    for backend in BACKENDS:
        _, idx = knn(x, k=29, exclude_self=True, backend=backend)
        np.testing.assert_array_equal(np.sort(idx, axis=1)[0], np.arange(1, 30))
        np.testing.assert_array_equal(idx, brute_force_ranking(x)[1])


def test_auto_backend_works_without_faiss(monkeypatch):
    x = normalised(clustered_data(16, 100)[0])
    expected = knn(x, k=5, exclude_self=True, backend="torch")
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    result = knn(x, k=5, exclude_self=True, backend="auto")
    np.testing.assert_array_equal(result[1], expected[1])
    with pytest.raises(EvaluationError, match="faiss is not installed"):
        knn(x, k=5, exclude_self=True, backend="faiss")


@pytest.mark.parametrize("faiss_gpu, cuda, k, expected", [
    # (faiss has GPU support, CUDA available, neighbours searched) -> auto, faiss, torch
    (True, True, 100, ("faiss-gpu", "faiss-gpu", "torch-cuda")),
    (True, True, 5000, ("torch-cuda", "faiss-cpu", "torch-cuda")),  # over faiss's GPU k limit
    (False, True, 100, ("torch-cuda", "faiss-cpu", "torch-cuda")),  # faiss-cpu on a GPU box
    (False, False, 100, ("faiss-cpu", "faiss-cpu", "torch-cpu")),
])
def test_backend_resolution(monkeypatch, faiss_gpu, cuda, k, expected):
    """Which search runs where; the GPU paths themselves need a GPU machine to run."""
    import types

    import bench.knn as evaluate  # backend resolution lives in bench.knn

    fake_faiss = types.SimpleNamespace(get_num_gpus=lambda: int(faiss_gpu))
    if faiss_gpu:
        fake_faiss.StandardGpuResources = object
    monkeypatch.setattr(evaluate, "_faiss_or_none", lambda: fake_faiss)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert tuple(evaluate._resolve_backend(b, k) for b in ("auto", "faiss", "torch")) == expected
    # deep R@K on the CPU: auto counts on NumPy blocks; GPUs and explicit backends are unchanged
    counting = tuple(evaluate._resolve_backend(b, k, prefer_counting=True) for b in ("auto", "faiss", "torch"))
    assert counting == (expected[0] if cuda else "blas-cpu",) + expected[1:]


@pytest.mark.parametrize("call, message", [
    (lambda x: knn(x, k=20, exclude_self=True), "only 19"),
    (lambda x: knn(x, k=0, exclude_self=True), "positive integer"),
    (lambda x: knn(x, x, k=2, exclude_self=True), "gallery=None"),
    (lambda x: knn(x, x[:, :3], k=2, exclude_self=False), "dimension"),
    (lambda x: knn(x, k=2, exclude_self=True, backend="annoy"), "annoy"),
    (lambda x: knn(x[0], k=1, exclude_self=False), "shape"),
    (lambda x: knn(x, k=2, exclude_self=True, chunk_size=0), "chunk_size"),
])
def test_knn_rejects_bad_input(call, message):
    with pytest.raises(EvaluationError, match=message):
        call(integer_data(5, 20))


# --------------------------------------------------------------------------------------------
# Metrics against the brute-force reference
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_self_retrieval_match_brute_force(backend):
    x, labels = clustered_data(25, 400, lone=4)
    ks = (1, 2, 4, 8, 16)
    assert_no_near_ties(brute_force_ranking(normalised(x))[0], search_width(labels, ks))
    result = retrieval_metrics(x, labels, ks, backend=backend)
    expected = brute_force_metrics(x, labels, ks)
    assert expected["num_lone_queries"] == 4
    assert_metrics_equal(result, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_query_vs_gallery_match_brute_force(backend):
    x, labels = clustered_data(9, 500, lone=0)
    query, query_labels = x[:120], labels[:120]
    gallery, gallery_labels = x[120:], labels[120:]
    query_labels = query_labels.copy()
    query_labels[:5] = 1000 + np.arange(5)  # classes absent from the gallery: lone queries
    ks = (1, 10, 20, 30)
    assert_no_near_ties(brute_force_ranking(normalised(query), normalised(gallery))[0],
                        search_width(query_labels, ks, gallery_labels))
    result = retrieval_metrics(query, query_labels, ks, gallery_embeddings=gallery,
                               gallery_labels=gallery_labels, backend=backend)
    expected = brute_force_metrics(query, query_labels, ks, gallery, gallery_labels)
    assert expected["num_lone_queries"] == 5
    assert_metrics_equal(result, expected)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_deep_recall_by_counting_matches_brute_force(backend):
    """R@100 with classes of <= 8 images: CPU block engines count where the best positive
    ranks instead of keeping a top-100 list (bench.knn._counting_pays)."""
    import bench.knn as evaluate

    x, labels = clustered_data(20, 400, classes=100, lone=5)
    ks = (1, 10, 100)
    assert evaluate._counting_pays(max(ks), int(np.bincount(labels).max()))
    assert_no_near_ties(brute_force_ranking(normalised(x))[0], search_width(labels, (1,)))
    assert_best_positive_stands_clear(x, labels)
    assert_best_positive_stands_clear(x[:100], labels[:100], x[100:], labels[100:])
    expected = brute_force_metrics(x, labels, ks)
    assert_metrics_equal(retrieval_metrics(x, labels, ks, backend=backend, chunk_size=37), expected)

    query_labels = labels[:100].copy()
    query_labels[:3] = 5000 + np.arange(3)
    expected = brute_force_metrics(x[:100], query_labels, ks, x[100:], labels[100:])
    result = retrieval_metrics(x[:100], query_labels, ks, gallery_embeddings=x[100:],
                               gallery_labels=labels[100:], backend=backend)
    assert_metrics_equal(result, expected)


def test_counted_ranks_follow_the_tie_rule():
    # integer data: exact ties everywhere, so counted and listed ranks agree only if both
    # put equally similar items in index order
    x = integer_data(21, 500)
    labels = np.random.default_rng(21).integers(0, 150, 500)
    listed = retrieval_metrics(x, labels, (1, 5, 80), backend="faiss" if "faiss" in BACKENDS else "torch",
                               normalize=False, chunk_size=1000)
    for backend, chunk_size in (("auto", None), ("torch", 33)):
        counted = retrieval_metrics(x, labels, (1, 5, 80), backend=backend, normalize=False,
                                    chunk_size=chunk_size)
        assert counted == listed


def test_metrics_with_ties_agree_across_backends_and_chunks():
    # Integer data without normalisation: exact ties, so only a shared tie rule gives equality.
    x = integer_data(8, 600)
    labels = np.random.default_rng(8).integers(0, 50, 600)
    results = [retrieval_metrics(x, labels, (1, 4, 16), backend=b, normalize=False, chunk_size=c)
               for b in BACKENDS for c in (None, 45)]
    for result in results[1:]:
        assert result == results[0]
    # duplicated rows with normalisation (ties up to rounding)
    y, y_labels = clustered_data(9, 300)
    y = np.concatenate([y, y[:100]])
    y_labels = np.concatenate([y_labels, y_labels[:100]])
    results = [retrieval_metrics(y, y_labels, (1, 2, 4), backend=b) for b in BACKENDS]
    for result in results[1:]:
        assert_metrics_equal(result, results[0])


def test_metrics_chunked_equals_single_chunk():
    x, labels = clustered_data(10, 300)
    whole = retrieval_metrics(x, labels, (1, 2, 4, 8), chunk_size=len(x))
    for chunk_size in (1, 17):
        assert_metrics_equal(retrieval_metrics(x, labels, (1, 2, 4, 8), chunk_size=chunk_size), whole)


def test_metrics_accept_torch_tensors_and_string_labels():
    x, labels = clustered_data(11, 200)
    expected = retrieval_metrics(x, labels, (1, 2))
    assert retrieval_metrics(torch.from_numpy(x), torch.from_numpy(labels), (1, 2)) == expected
    assert retrieval_metrics(x, np.array([f"class{l}" for l in labels]), (1, 2)) == expected


# --------------------------------------------------------------------------------------------
# Metrics against pytorch-metric-learning
# --------------------------------------------------------------------------------------------

def pml_accuracy(query, query_labels, reference=None, reference_labels=None):
    """AccuracyCalculator with its defaults for lone queries (see the test docstring)."""
    accuracy_calculator = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    calculator = accuracy_calculator.AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count",
        device=torch.device("cpu"))
    if reference is None:
        return calculator.get_accuracy(query, query_labels, query, query_labels, ref_includes_query=True)
    return calculator.get_accuracy(query, query_labels, reference, reference_labels, ref_includes_query=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_match_pytorch_metric_learning(backend):
    """R@1 = PML's precision_at_1 and MAP@R = its mean_average_precision_at_r, within 1e-6.

    PML treats lone queries as we do: `get_lone_query_labels` marks a query lone when no other
    reference has its label (with ref_includes_query=True the query's own copy does not count),
    and both metrics average over the other queries only (avg_of_avgs=False: a plain mean over
    queries). k="max_bin_count" is PML's documented setting for MAP@R: enough neighbours for the
    largest class. PML ranks by L2 distance; on L2-normalised input that is the same order as
    the inner product, so normalised embeddings are passed to it.
    """
    x, labels = clustered_data(31, 500, lone=6)
    x = normalised(x)
    assert_no_near_ties(brute_force_ranking(x)[0], search_width(labels, (1,)))
    assert_no_near_ties(brute_force_ranking(x[:150], x[150:])[0],
                        search_width(labels[:150], (1,), labels[150:]))
    ours = retrieval_metrics(x, labels, (1,), backend=backend)
    theirs = pml_accuracy(x, labels)
    assert ours["num_lone_queries"] == 6
    assert ours["recall@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)

    query, query_labels = x[:150], labels[:150].copy()
    gallery, gallery_labels = x[150:], labels[150:]
    query_labels[:4] = 2000 + np.arange(4)  # not in the gallery
    ours = retrieval_metrics(query, query_labels, (1,), gallery_embeddings=gallery,
                             gallery_labels=gallery_labels, backend=backend)
    theirs = pml_accuracy(query, query_labels, gallery, gallery_labels)
    assert ours["num_lone_queries"] >= 4
    assert ours["recall@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)


# --------------------------------------------------------------------------------------------
# Hand-computed cases
# --------------------------------------------------------------------------------------------

def on_circle(degrees):
    radians = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_self_retrieval(backend):
    """Six points on the unit circle; cosine order = order of angular distance.

    point  angle label  neighbours (nearest first)  R  first hit  AP@R
    A        0    0     B C D E F                   1     4       0
    B       10    1     A C D E F                   2     2       (1/2)/2 = 0.25
    C       25    1     B A D E F                   2     1       (1/1)/2 = 0.5
    D       90    1     E C B A F                   2     2       (1/2)/2 = 0.25
    E      100    0     D C B A F                   1     4       0
    F      210    2     lone (no other class-2 point): not scored
    R@1 = 1/5, R@2 = 3/5, R@4 = 5/5; MAP@R = (0 + .25 + .5 + .25 + 0)/5 = 0.2
    """
    x = on_circle([0, 10, 25, 90, 100, 210])
    labels = np.array([0, 1, 1, 1, 0, 2])
    result = retrieval_metrics(x, labels, (1, 2, 4), backend=backend)
    assert_metrics_equal(result, {"recall@1": 0.2, "recall@2": 0.6, "recall@4": 1.0,
                                  "map@r": 0.2, "num_queries": 5, "num_lone_queries": 1})


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_query_vs_gallery(backend):
    """Gallery g0..g4 at 0, 20, 40, 60, 180 degrees with labels 0, 1, 0, 0, 1.

    query angle label  gallery order      R  first hit  AP@R
    q0       5    0    g0 g1 g2 g3 g4     3     1       (1 + 2/3)/3 = 5/9
    q1     170    1    g4 g3 g2 g1 g0     2     1       (1)/2 = 1/2
    q2      48    1    g2 g3 g1 g0 g4     2     3       0
    q3      90    7    lone (class 7 not in the gallery)
    R@1 = R@2 = 2/3, R@4 = 1; MAP@R = (5/9 + 1/2 + 0)/3 = 19/54
    """
    gallery = on_circle([0, 20, 40, 60, 180])
    gallery_labels = np.array([0, 1, 0, 0, 1])
    query = on_circle([5, 170, 48, 90])
    query_labels = np.array([0, 1, 1, 7])
    result = retrieval_metrics(query, query_labels, (1, 2, 4), gallery_embeddings=gallery,
                               gallery_labels=gallery_labels, backend=backend)
    assert_metrics_equal(result, {"recall@1": 2 / 3, "recall@2": 2 / 3, "recall@4": 1.0,
                                  "map@r": 19 / 54, "num_queries": 3, "num_lone_queries": 1})


def test_normalisation_is_applied_unless_disabled():
    """A (0 deg) and B (17.5 deg) are class 0; L = (5, 5) and D (90 deg) are class 1.

    Normalised (cosine): A->B hit, B->A hit, L->B miss, D->L hit: R@1 = 3/4.
    Raw inner product: the long vector L is nearest to A, B and D, and B to L: R@1 = 1/4.
    """
    x = np.array([[1, 0], [0.95, 0.3], [5, 5], [0, 1]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1])
    assert retrieval_metrics(x, labels, (1,))["recall@1"] == 0.75
    assert retrieval_metrics(x, labels, (1,), normalize=False)["recall@1"] == 0.25


# --------------------------------------------------------------------------------------------
# Input errors
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"ks": (1, 40)}, r"recall@40 .* only 29"),
    ({"ks": (0,)}, "positive integer"),
    ({"labels": np.zeros(29)}, "29 entries but embeddings has 30"),
    ({"labels": np.zeros((30, 2))}, r"shape \(N,\)"),
    ({"gallery_embeddings": np.ones((5, 4))}, "without gallery labels"),
    ({"gallery_labels": np.ones(5)}, "without gallery embeddings"),
    ({"gallery_embeddings": np.ones((5, 3)), "gallery_labels": np.ones(5)}, "dimension"),
    ({"gallery_embeddings": np.ones((5, 4)), "gallery_labels": np.ones(4)}, "gallery labels has 4"),
    ({"labels": np.arange(30)}, "nothing to score"),
    ({"backend": "gpu"}, "unknown kNN backend"),
])
def test_metrics_reject_bad_input(kwargs, message):
    arguments = {"embeddings": integer_data(13, 30), "labels": np.arange(30) % 3, "ks": (1,)}
    arguments.update(kwargs)
    with pytest.raises(EvaluationError, match=message):
        retrieval_metrics(arguments.pop("embeddings"), arguments.pop("labels"), arguments.pop("ks"),
                          **arguments)


def test_non_finite_embeddings_name_the_row():
    x = integer_data(14, 10)
    x[7, 1] = np.nan
    with pytest.raises(EvaluationError, match="row 7"):
        retrieval_metrics(x, np.arange(10) % 2, (1,))


def test_errors_are_user_errors():
    assert issubclass(EvaluationError, UserError) and issubclass(EmbeddingFileError, UserError)


def test_dataset_ks():
    from bench import catalog

    assert catalog.dataset("sop").eval_ks == (1, 10, 100, 1000)
    assert catalog.dataset("inshop").eval_ks == (1, 10, 20, 30, 40, 50)
    assert set(catalog.DATASETS) == {"cub200", "cars196", "synthetic", "synthetic_far", "sop", "inshop", "inaturalist"}


# --------------------------------------------------------------------------------------------
# compute_embeddings
# --------------------------------------------------------------------------------------------

def make_loader(n=10, batch_size=4):
    images = torch.randn(n, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % 3
    dataset = torch.utils.data.TensorDataset(images, labels)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size), images, labels


def test_compute_embeddings_runs_in_eval_mode_and_restores_modes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(12, 5))
    model.train()
    model[2].eval()  # mixed modes, as when a frozen part stays in eval mode during training
    loader, images, labels = make_loader()
    embeddings, out_labels = compute_embeddings(model, loader, "cpu")
    assert embeddings.dtype == np.float32 and embeddings.shape == (10, 5)
    assert out_labels.dtype == np.int64
    np.testing.assert_array_equal(out_labels, labels.numpy())
    with torch.no_grad():  # dropout off in eval mode: the exact deterministic output
        expected = model[2](images.flatten(1)).numpy()
    np.testing.assert_allclose(embeddings, expected, rtol=1e-6, atol=1e-6)
    assert [m.training for m in model.modules()] == [True, True, True, False]
    assert all(p.grad is None for p in model.parameters())


def test_compute_embeddings_with_amp_returns_float32():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    loader, _, _ = make_loader()
    embeddings, _ = compute_embeddings(model, loader, torch.device("cpu"), amp_dtype=torch.bfloat16)
    assert embeddings.dtype == np.float32 and embeddings.shape == (10, 5)


def test_compute_embeddings_restores_mode_after_an_error():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(7, 5))  # wrong input size
    model.train()
    loader, _, _ = make_loader()
    with pytest.raises(RuntimeError):
        compute_embeddings(model, loader, "cpu")
    assert model.training and model[1].training


def test_compute_embeddings_empty_loader():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(EvaluationError, match="no batches"):
        compute_embeddings(model, [], "cpu")


# --------------------------------------------------------------------------------------------
# `run_suite.py evaluate`
# --------------------------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "run_suite.py"), "evaluate", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.fixture
def saved_embeddings(tmp_path):
    x, labels = clustered_data(15, 200)
    np.save(tmp_path / "emb.npy", x)
    np.save(tmp_path / "labels.npy", labels)
    return tmp_path, x, labels


def test_cli_prints_json(saved_embeddings):
    folder, x, labels = saved_embeddings
    done = run_cli(folder / "emb.npy", folder / "labels.npy", "--k", "1", "2", "--json")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert set(printed) == {"recall@1", "recall@2", "map@r", "num_queries", "num_lone_queries"}
    expected = retrieval_metrics(x, labels, (1, 2))
    assert printed == pytest.approx(expected, abs=1e-12)


def test_cli_missing_file_is_a_one_line_error(saved_embeddings):
    folder, _, _ = saved_embeddings
    missing = folder / "nope.npy"
    done = run_cli(folder / "emb.npy", missing, "--json")
    assert done.returncode != 0
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0], done.stderr


def cli_args(*argv):
    sys.path.insert(0, str(REPO))
    try:
        from peft_dml_cli import build_parser
    finally:
        sys.path.remove(str(REPO))
    return build_parser().parse_args(["evaluate", *map(str, argv)])


def test_cmd_evaluate_gallery_mode_and_table(saved_embeddings, capsys):
    folder, x, labels = saved_embeddings
    np.save(folder / "g.npy", x[50:])
    np.save(folder / "gl.npy", labels[50:])
    np.save(folder / "q.npy", x[:50])
    np.save(folder / "ql.npy", labels[:50])
    args = cli_args(folder / "q.npy", folder / "ql.npy", "--gallery-emb", folder / "g.npy",
                    "--gallery-labels", folder / "gl.npy", "--k", "1", "4", "--backend", "torch")
    assert cmd_evaluate(args) == 0
    table = capsys.readouterr().out
    expected = retrieval_metrics(x[:50], labels[:50], (1, 4), gallery_embeddings=x[50:],
                                 gallery_labels=labels[50:])
    assert "R@4" in table and "MAP@R" in table and "in %" in table  # as the rest of the suite prints
    assert f"{100 * expected['recall@1']:.2f}" in table and f"{100 * expected['map@r']:.2f}" in table


def test_cmd_evaluate_file_errors(saved_embeddings):
    folder, _, _ = saved_embeddings
    (folder / "broken.npy").write_text("not an array")
    np.save(folder / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(EmbeddingFileError, match="broken.npy"):
        cmd_evaluate(cli_args(folder / "emb.npy", folder / "broken.npy"))
    with pytest.raises(EmbeddingFileError, match="obj.npy"):
        cmd_evaluate(cli_args(folder / "obj.npy", folder / "labels.npy"))
    np.save(folder / "short.npy", np.zeros(3, dtype=np.int64))
    with pytest.raises(EvaluationError, match=r"3 entries but embeddings has 200 rows .*short\.npy"):
        cmd_evaluate(cli_args(folder / "emb.npy", folder / "short.npy"))
    with pytest.raises(EvaluationError, match="together"):
        cmd_evaluate(cli_args(folder / "emb.npy", folder / "labels.npy", "--gallery-emb", folder / "emb.npy"))


# --------------------------------------------------------------------------------------------
# The half-matrix engine (bench.evaluate_symmetric): "auto" self-retrieval on a CPU machine
# --------------------------------------------------------------------------------------------

def _records(x, labels, ks, backend, **kwargs):
    return retrieval_metrics(x, labels, ks, backend=backend, return_per_query=True, **kwargs)


def assert_records_equal(actual, expected):
    assert np.array_equal(actual.query_index, expected.query_index)
    assert np.array_equal(actual.hit_at_k, expected.hit_at_k)
    np.testing.assert_allclose(actual.ap_at_r, expected.ap_at_r, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 1, 23, 150])
def test_half_matrix_engine_matches_brute_force(chunk_size):
    """Small blocks put most pairs in off-diagonal blocks, read along both axes."""
    x, labels = clustered_data(2, 600, dim=32, classes=60, lone=4)
    ks = (1, 3, 10, 100)
    assert_no_near_ties(brute_force_ranking(normalised(x))[0], search_width(labels, (1,)))
    assert_best_positive_stands_clear(x, labels)
    metrics, records = _records(x, labels, ks, "auto", chunk_size=chunk_size)
    assert records.engine == "blas-sym"
    assert_metrics_equal(metrics, brute_force_metrics(x, labels, ks))
    assert_records_equal(records, _records(x, labels, ks, "torch")[1])


def test_half_matrix_engine_with_large_classes_reads_ranks_from_its_gaps():
    """Every R at least the deepest K (as in iNaturalist): no counting, ranks from the gaps."""
    x, labels = clustered_data(0, 200, dim=32, classes=8, lone=0)
    ks = (1, 2, 4, 8)
    assert np.bincount(labels).min() - 1 >= max(ks)
    assert_no_near_ties(brute_force_ranking(normalised(x))[0], search_width(labels, ks))
    metrics, records = _records(x, labels, ks, "auto", chunk_size=40)
    assert records.engine == "blas-sym"
    assert_metrics_equal(metrics, brute_force_metrics(x, labels, ks))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_half_matrix_engine_follows_the_tie_rule(seed):
    # integer data: exact ties everywhere, between positives, negatives and both
    x = integer_data(seed, 400)
    labels = np.random.default_rng(seed).integers(0, 60, 400)
    for chunk_size in (None, 9, 64):
        half = _records(x, labels, (1, 4, 50), "auto", normalize=False, chunk_size=chunk_size)
        whole = _records(x, labels, (1, 4, 50), "torch", normalize=False, chunk_size=chunk_size)
        assert half[1].engine == "blas-sym"
        assert half[0] == whole[0]
        assert_records_equal(half[1], whole[1])


def test_duplicate_embeddings_of_different_classes_are_ranked_by_index():
    """Identical embeddings tie exactly; the queries such a tie decides are searched again."""
    from bench.evaluate_symmetric import queries_with_mixed_duplicates

    x, labels = clustered_data(1, 400, classes=50, lone=0)
    x[:60] = x[100:160]  # 60 duplicated images, mostly under another label
    assert_best_positive_stands_clear(x, labels)
    mixed = queries_with_mixed_duplicates(normalised(x).astype(np.float32), labels)
    assert 0 < len(mixed) < len(x)
    metrics, records = _records(x, labels, (1, 2, 8), "auto", chunk_size=30)
    assert records.engine == "blas-sym"
    assert_metrics_equal(metrics, brute_force_metrics(x, labels, (1, 2, 8)))


def test_mixed_duplicates_are_found_exactly():
    from bench.evaluate_symmetric import queries_with_mixed_duplicates

    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    codes = np.array([0, 0, 1, 1, 2, 2])
    assert len(queries_with_mixed_duplicates(x, codes)) == 0
    x[5] = x[0]  # class 2 shares an embedding with class 0
    assert queries_with_mixed_duplicates(x, codes).tolist() == [0, 1, 4, 5]
    x[5] = x[4]  # a duplicate within one class changes no rank
    assert len(queries_with_mixed_duplicates(x, codes)) == 0


def test_blocks_are_cut_at_class_boundaries():
    from bench.evaluate_symmetric import _group_rows

    labels = np.random.default_rng(0).integers(0, 30, 500)
    order, spans = _group_rows(labels, 37)
    assert spans[0][0] == 0 and spans[-1][1] == 500
    assert all(a < b for a, b in spans) and all(b == c for (_, b), (c, _) in zip(spans, spans[1:]))
    block_of = np.empty(500, dtype=int)
    for number, (a, b) in enumerate(spans):
        block_of[order[a:b]] = number
        assert b - a >= 37 or b == 500
    for label in np.unique(labels):  # every positive pair lies in a diagonal block
        assert len(np.unique(block_of[labels == label])) == 1
