"""Exact inner-product kNN with one tie rule on every engine (faiss, torch blocks, CPU/GPU).

Neighbours are ranked by similarity, descending, and exact ties by the lower gallery index, with
every backend and every chunk size: a backend's own top-k may pick any members of a tie that
straddles the cut, so those rows are searched again exactly. Deep K (SOP's R@1000) on the CPU
counts the items ranked before each query's best positive instead of keeping a top-K list.
The input checks shared by scoring (``bench.evaluate``) live here too.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from bench.errors import UserError


BACKENDS = ("auto", "faiss", "torch")


# Memory for one chunk of queries: a chunk x gallery float32 block (block engines) or the
# chunk's neighbour lists (faiss) stays under this many bytes.
CHUNK_BYTES = 256 * 2**20


# faiss GPU indexes cannot return more neighbours than this (GPU k-selection limit).
FAISS_GPU_MAX_K = 2048


class EvaluationError(UserError, ValueError):
    """Embeddings, labels or K values that cannot be scored; the message says which and why."""


def _as_numpy(array: Any) -> np.ndarray:
    """Accepts NumPy arrays, torch tensors (any device) and nested lists."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _check_embeddings(array: Any, name: str) -> np.ndarray:
    """A C-contiguous float32 (N, D) array with finite values, or an EvaluationError."""
    array = _as_numpy(array)
    if array.ndim != 2:
        raise EvaluationError(f"{name} must have shape (N, D), got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise EvaluationError(f"{name} is empty (shape {array.shape})")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise EvaluationError(f"{name} must be real numbers, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise EvaluationError(
            f"{name} has {len(bad)} row(s) with NaN or infinite values (first: row {bad[0]}); "
            "the model probably diverged"
        )
    return array


def _check_labels(array: Any, name: str, expected_length: int, embeddings_name: str) -> np.ndarray:
    array = _as_numpy(array)
    if array.ndim == 2 and array.shape[1] == 1:  # a column vector, as many tools save labels
        array = array[:, 0]
    if array.ndim != 1:
        raise EvaluationError(f"{name} must have shape (N,), got shape {array.shape}")
    if len(array) != expected_length:
        raise EvaluationError(
            f"{name} has {len(array)} entries but {embeddings_name} has {expected_length} rows"
        )
    return array


def _check_ks(ks: Sequence[int] | int) -> tuple[int, ...]:
    ks = (ks,) if isinstance(ks, (int, np.integer)) else tuple(ks)
    if not ks:
        raise EvaluationError("no K given for recall@K")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise EvaluationError(f"K for recall@K must be a positive integer, got {k!r}")
    return tuple(sorted({int(k) for k in ks}))


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise EvaluationError(f"unknown kNN backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _l2_normalise(embeddings: np.ndarray) -> np.ndarray:
    # A zero vector stays zero (similarity 0 to everything) rather than becoming NaN. Rows with
    # huge finite values (near float32's 3.4e38) would overflow their squared norm: they are
    # scaled by their largest magnitude first, which leaves their direction unchanged.
    huge = np.abs(embeddings).max(axis=1) > np.float32(1e18)
    if huge.any():
        embeddings = embeddings.copy()
        embeddings[huge] /= np.abs(embeddings[huge]).max(axis=1, keepdims=True)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, np.float32(1e-12))


def _encode_labels(query_labels: np.ndarray, gallery_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels of any dtype (ints, strings) -> dense int64 codes shared by query and gallery."""
    try:
        _, codes = np.unique(np.concatenate([query_labels, gallery_labels]), return_inverse=True)
    except TypeError as e:
        raise EvaluationError(
            f"query labels ({query_labels.dtype}) and gallery labels ({gallery_labels.dtype}) "
            f"cannot be compared: {e}"
        ) from None
    codes = codes.reshape(-1).astype(np.int64)
    return codes[: len(query_labels)], codes[len(query_labels):]


def _faiss_or_none():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _faiss_has_gpu(faiss) -> bool:
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return False
    import torch

    return torch.cuda.is_available()


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _torch_importable() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(backend: str, k_search: int, prefer_counting: bool = False) -> str:
    """Which engine runs this search: 'faiss-gpu', 'faiss-cpu', 'torch-cuda', 'torch-cpu', 'blas-cpu'.

    "auto" takes the fastest exact search available: faiss on the GPU, else torch on the GPU
    (a CUDA machine with faiss-cpu would otherwise search on the CPU), else on the CPU faiss,
    or NumPy's BLAS when ``prefer_counting`` (see ``_counting_pays``), else torch.
    """
    _check_backend(backend)
    faiss = _faiss_or_none() if backend in ("auto", "faiss") else None
    if backend == "faiss" and faiss is None:
        raise EvaluationError("kNN backend 'faiss' requested but faiss is not installed "
                              "(pip install faiss-cpu, or use backend 'torch')")
    gpu_faiss = faiss is not None and _faiss_has_gpu(faiss) and k_search <= FAISS_GPU_MAX_K
    if backend == "faiss":
        return "faiss-gpu" if gpu_faiss else "faiss-cpu"
    if backend == "torch":
        return "torch-cuda" if _cuda_available() else "torch-cpu"
    if gpu_faiss:
        return "faiss-gpu"
    if _cuda_available():
        return "torch-cuda"
    if prefer_counting and _torch_importable():
        return "blas-cpu"
    return "faiss-cpu" if faiss is not None else "torch-cpu"


def _counting_pays(deepest_k: int, list_length_for_map: int) -> bool:
    """Whether R@K should come from counting (a CPU block engine) rather than a top-K list.

    Keeping the top 1000 of every row (SOP's R@1000) costs about a third of the matrix product
    itself, while counting the gallery items that beat the best positive costs two cheap
    passes over the block. It pays when K is deep and far beyond the R that MAP@R needs.
    """
    return deepest_k >= 64 and deepest_k > 2 * list_length_for_map


def _lowest_index_topk(similarities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of full rows where a tie at the k-th value keeps the lowest indices.

    Used only for rows where a backend's own top-k may have picked arbitrary members of a tie
    that straddles rank k, so its cost (a few passes over each row) does not matter.
    """
    kth_value = -np.partition(-similarities, k - 1, axis=1)[:, k - 1 : k]
    above = similarities > kth_value
    at = similarities == kth_value
    slots_left = k - above.sum(axis=1, keepdims=True)
    keep = above | (at & (np.cumsum(at, axis=1) <= slots_left))
    indices = np.nonzero(keep)[1].reshape(len(similarities), k)  # ascending within each row
    return np.take_along_axis(similarities, indices, axis=1), indices


def _order_by_similarity_then_index(similarities: np.ndarray, indices: np.ndarray):
    order = np.lexsort((indices, -similarities), axis=1)
    return np.take_along_axis(similarities, order, axis=1), np.take_along_axis(indices, order, axis=1)


def _drop_self(similarities: np.ndarray, indices: np.ndarray, self_indices: np.ndarray):
    """Removes each row's own index, or its last neighbour when the own index was not found.

    Self is missing when it ties with neighbours of lower index at the end of the list.
    """
    is_self = indices == self_indices[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    rows, width = indices.shape
    return (similarities[~is_self].reshape(rows, width - 1),
            indices[~is_self].reshape(rows, width - 1))


def _repair_straddling_ties(similarities, indices, k, exact_rows):
    """Keeps k columns; rows whose value at rank k equals the one at rank k+1 are recomputed.

    ``similarities``/``indices`` hold the top k+1 candidates (any order within ties) or exactly
    k columns when the gallery has no more. Only a tie across the cut can make the *set* of k
    neighbours depend on the backend; ``exact_rows(rows)`` returns those rows' full similarity
    rows (self at -inf) to settle it by lowest index.
    """
    straddling = np.empty(0, dtype=np.int64)
    if similarities.shape[1] > k:
        straddling = np.flatnonzero(similarities[:, k - 1] == similarities[:, k])
    similarities = similarities[:, :k].astype(np.float32)  # copies: the inputs may be views
    indices = indices[:, :k].astype(np.int64)
    # Rows arrive sorted by similarity; only rows with equal neighbours (and the repaired rows,
    # which come in index order) need sorting, which saves a full sort of every row.
    has_equal_neighbours = (similarities[:, 1:] == similarities[:, :-1]).any(axis=1)
    if len(straddling):
        similarities[straddling], indices[straddling] = _lowest_index_topk(exact_rows(straddling), k)
        has_equal_neighbours[straddling] = True
    rows = np.flatnonzero(has_equal_neighbours)
    if len(rows):
        similarities[rows], indices[rows] = _order_by_similarity_then_index(similarities[rows], indices[rows])
    return similarities, indices


def _first_positive_ranks(block: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """0-based rank of each row's best positive in the (similarity desc, index asc) order.

    ``block`` holds full similarity rows with self at -inf; ``positives`` the columns of each
    row's class, padded with -1. The rank is the number of columns that come first: those more
    similar, and those exactly as similar with a lower index.
    """
    padding = positives < 0
    values = np.take_along_axis(block, np.where(padding, 0, positives), axis=1)
    values[padding] = -np.inf
    best = values.max(axis=1, keepdims=True)
    best_column = np.where(values == best, positives, block.shape[1]).min(axis=1)
    ranks = np.count_nonzero(block > best, axis=1)
    at_or_above = np.count_nonzero(block >= best, axis=1)
    tied = np.flatnonzero(at_or_above - ranks > 1)  # more than the best positive itself
    if len(tied):
        lower_index = np.arange(block.shape[1]) < best_column[tied, None]
        ranks[tied] += np.count_nonzero((block[tied] == best[tied]) & lower_index, axis=1)
    return ranks


class _FaissSearcher:
    """faiss's exact inner-product index; returns top-k lists only."""

    can_count = False

    @staticmethod
    def default_chunk_rows(gallery_size: int, k: int) -> int:
        # faiss never holds a chunk x gallery block, and each call re-reads the whole gallery:
        # calls of 470 queries were 3x slower than 4096 at iNaturalist size, so size chunks by
        # their neighbour lists instead (12 bytes per neighbour, about 4x that with copies).
        return max(1, CHUNK_BYTES // (48 * (k + 2)))

    def __init__(self, gallery: np.ndarray, use_gpu: bool):
        import faiss

        self.kind = "faiss-gpu" if use_gpu else "faiss-cpu"
        self.gallery = gallery
        index = faiss.IndexFlatIP(gallery.shape[1])
        if use_gpu:
            index = faiss.index_cpu_to_gpu(_faiss_gpu_resources(), 0, index)
        index.add(gallery)
        self.index = index

    def search(self, queries: np.ndarray, self_indices: np.ndarray | None, k: int, positives=None):
        gallery_size = len(self.gallery)
        extra = 0 if self_indices is None else 1
        # one candidate beyond k (and beyond self) shows whether a tie crosses the cut
        width = min(k + 1 + extra, gallery_size)
        similarities, indices = self.index.search(queries, width)
        if self_indices is not None:
            similarities, indices = _drop_self(similarities, indices, self_indices)

        def exact_rows(rows):
            full = queries[rows] @ self.gallery.T
            if self_indices is not None:
                full[np.arange(len(rows)), self_indices[rows]] = -np.inf
            return full

        return _repair_straddling_ties(similarities, indices, k, exact_rows), None


_FAISS_GPU_RESOURCES = None


def _faiss_gpu_resources():
    # Creating GPU resources reserves scratch memory: do it once per process.
    global _FAISS_GPU_RESOURCES
    if _FAISS_GPU_RESOURCES is None:
        import faiss

        _FAISS_GPU_RESOURCES = faiss.StandardGpuResources()
    return _FAISS_GPU_RESOURCES


class _BlockSearcher:
    """Materialises one chunk x gallery similarity block at a time, then selects top-k.

    The product runs in torch (CPU or CUDA) or, for 'blas-cpu', in NumPy, whose BLAS was
    measurably faster than torch's on the AMD CPUs this suite was benchmarked on. Blocks on the
    CPU can also answer "where does the best positive rank?" by counting.
    """

    def __init__(self, gallery: np.ndarray, kind: str):
        import torch

        self.torch = torch
        self.kind = kind
        self.use_numpy = kind == "blas-cpu"
        self.device = torch.device("cuda" if kind == "torch-cuda" else "cpu")
        self.can_count = self.device.type == "cpu"
        self.gallery = gallery if self.use_numpy else torch.from_numpy(gallery).to(self.device)
        self._buffer = None  # reused product output: fresh pages per chunk cost time

    @staticmethod
    def default_chunk_rows(gallery_size: int, k: int) -> int:
        return max(1, CHUNK_BYTES // (4 * gallery_size))

    def _block(self, queries: np.ndarray, self_indices: np.ndarray | None):
        torch = self.torch
        if self.use_numpy:
            shape = (len(queries), len(self.gallery))
            if self._buffer is None or self._buffer.shape[0] < shape[0]:
                self._buffer = np.empty(shape, dtype=np.float32)
            block = torch.from_numpy(np.matmul(queries, self.gallery.T, out=self._buffer[: shape[0]]))
        else:
            block = torch.from_numpy(queries).to(self.device) @ self.gallery.T
        if self_indices is not None:
            rows = torch.arange(len(queries), device=self.device)
            block[rows, torch.from_numpy(self_indices).to(self.device)] = -torch.inf
        return block

    def search(self, queries: np.ndarray, self_indices: np.ndarray | None, k: int, positives=None):
        torch = self.torch
        with torch.no_grad():
            block = self._block(queries, self_indices)
            # a masked self (-inf) can never tie with the finite k-th value, so it never
            # looks like a tie across the cut
            similarities, indices = block.topk(min(k + 1, block.shape[1]), dim=1)
            neighbours = _repair_straddling_ties(
                similarities.cpu().numpy(), indices.cpu().numpy(), k,
                lambda rows: block[torch.from_numpy(rows).to(self.device)].cpu().numpy(),
            )
            ranks = None if positives is None else _first_positive_ranks(block.numpy(), positives)
        return neighbours, ranks


def _make_searcher(kind: str, gallery: np.ndarray):
    if kind.startswith("faiss"):
        return _FaissSearcher(gallery, use_gpu=kind == "faiss-gpu")
    return _BlockSearcher(gallery, kind)


def _chunk_rows(chunk_size: int | None, searcher, gallery_size: int, k: int) -> int:
    if chunk_size is None:
        return searcher.default_chunk_rows(gallery_size, k)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise EvaluationError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return int(chunk_size)


def _iter_neighbours(
    searcher,
    query: np.ndarray,
    query_rows: np.ndarray,
    k: int,
    *,
    self_search: bool,
    chunk_size: int,
    positives_of=None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]:
    """Yields (rows, similarities [c, k], indices [c, k], best-positive ranks or None) in order.

    In self-search mode the searcher's gallery is ``query`` and each row is excluded from its
    own neighbours. Only one chunk of rows x the gallery exists at a time, never N x N.
    ``positives_of(rows)`` (padded gallery columns of each row's class) asks for ranks.
    """
    for start in range(0, len(query_rows), chunk_size):
        rows = query_rows[start : start + chunk_size]
        positives = None if positives_of is None else positives_of(rows)
        (similarities, indices), ranks = searcher.search(
            query[rows], rows if self_search else None, k, positives
        )
        yield rows, similarities, indices, ranks


def knn(
    query: Any,
    gallery: Any = None,
    k: int = 10,
    *,
    exclude_self: bool,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by inner product (no normalisation is applied here).

    Returns (similarities float32 [Nq, k], indices int64 [Nq, k]), best first; exact ties are
    ordered by lower gallery index with every backend. With ``gallery=None`` the query set is its
    own gallery and ``exclude_self=True`` removes each query's own row by index. ``chunk_size``
    is the number of queries searched at once (default: about 256 MB of working memory).
    """
    _check_backend(backend)
    query = _check_embeddings(query, "query embeddings")
    if gallery is None:
        gallery_array = query
    else:
        if exclude_self:
            raise EvaluationError("exclude_self=True needs gallery=None (the query set searching itself)")
        gallery_array = _check_embeddings(gallery, "gallery embeddings")
        if gallery_array.shape[1] != query.shape[1]:
            raise EvaluationError(
                f"query embeddings have dimension {query.shape[1]} but gallery embeddings have "
                f"dimension {gallery_array.shape[1]}"
            )
    available = len(gallery_array) - int(exclude_self)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise EvaluationError(f"k must be a positive integer, got {k!r}")
    if k > available:
        raise EvaluationError(f"k={k} neighbours requested but the gallery has only {available} candidates")
    similarities = np.empty((len(query), k), dtype=np.float32)
    indices = np.empty((len(query), k), dtype=np.int64)
    searcher = _make_searcher(_resolve_backend(backend, k + 2), gallery_array)
    rows_per_chunk = _chunk_rows(chunk_size, searcher, len(gallery_array), k)
    chunks = _iter_neighbours(searcher, query, np.arange(len(query)), int(k),
                              self_search=exclude_self, chunk_size=rows_per_chunk)
    for rows, chunk_similarities, chunk_indices, _ in chunks:
        similarities[rows], indices[rows] = chunk_similarities, chunk_indices
    return similarities, indices
