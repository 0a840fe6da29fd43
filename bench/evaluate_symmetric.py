"""Self-retrieval Recall@K and MAP@R from half of the similarity matrix (CPU, NumPy only).

When every sample is a query against all the others (CUB, Cars, SOP, iNaturalist), the
similarity matrix is symmetric: block (i, j) of it is block (j, i) transposed. The product is
most of the cost of evaluation, so this engine computes each pair of samples once, in the
blocks on and above the diagonal, and reads each block twice: once for its rows' queries and
once, along the other axis, for its columns' queries. Nothing here keeps a top-K list:

* **R@K** needs the rank of a query's best positive. It is counted: the negatives more similar
  than it, plus the equally similar ones with a lower index (the suite's tie rule).
* **MAP@R** needs the rank of each of the R positives that land in the top R. With the
  positives sorted, positive i sits at rank (i - 1) + n_i, where n_i is the number of
  negatives ahead of it. Each query keeps a histogram of its negatives over the R + 1 gaps
  between its positives, and only the negatives ahead of a positive that can still count.
  Positive i counts while (i - 1) + n_i < R; once it cannot, the negatives behind positive
  i - 1 no longer matter, so each query's threshold rises as its histogram fills and almost
  every block is dismissed by one pass of column or row maxima.

To find a query's positives before any of its negatives, samples are grouped by class and the
blocks are cut at class boundaries: every positive pair lies in a diagonal block, and the
diagonal blocks are computed first. Similarities are the engine's own float32 products, each
computed once, so ties between them follow the tie rule (lower index first). One kind of tie
depends on where a product is computed: identical embeddings (duplicate images) meet a query
in different blocks, where rounding may part their similarities. ``bench.evaluate`` searches
the queries such a tie can decide again, whole rows at a time (``queries_with_mixed_duplicates``).

Reading a block costs about a quarter of computing it (one pass of maxima per axis, then
only the queries it can change). Reading in a second thread was slower on 2 cores: BLAS's
threads keep spinning after a product.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.metrics import average_precision_at_r

ENGINE = "blas-sym"

# Rows per block: 4096 x 4096 float32 is 64 MiB, which ran the product at full speed (139
# GFLOP/s on 2 cores, same as 8192) with less of the diagonal blocks' lower half wasted.
DEFAULT_BLOCK_ROWS = 4096

# Blocks of at most 8192 rows (256 MiB), plus the class that crosses the cut, whatever
# chunk_size asks: counts per block then fit uint16 (see _count).
MAX_BLOCK_ROWS = 8192

# A class larger than this would make one block too large; such data goes to the other engines.
MAX_CLASS_SIZE = 16384

_ROW_SHIFT = np.int64(2**32)

# Gathering strided columns cost 2.2 ns per block element, a compare over the whole block 0.4.
_FEW_COLUMNS = 64

# Diagonal blocks are read in this many column slices (see _diagonal_slices).
_DIAGONAL_SLICES = 8


def usable(codes: np.ndarray) -> bool:
    return int(np.bincount(codes).max()) <= MAX_CLASS_SIZE


def queries_with_mixed_duplicates(x: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Indices of the queries whose ranking an exact tie between identical embeddings of
    different classes decides: every member of a class that shares an embedding with another
    class. (Real datasets hold duplicate images; identical embeddings of one class only, or
    of negatives only, leave every rank unchanged.)"""
    # A wrapping integer hash of each row's bits finds the candidates (sorting whole rows took
    # 1 s at SOP size); only rows that share a hash are compared whole.
    bits = np.ascontiguousarray(x).view(np.uint32).astype(np.uint64)
    multipliers = np.random.default_rng(0).integers(1, 2**63, bits.shape[1], dtype=np.uint64) | np.uint64(1)
    with np.errstate(over="ignore"):
        hashes = (bits * multipliers).sum(axis=1)
    _, hash_group, hash_size = np.unique(hashes, return_inverse=True, return_counts=True)
    candidates = np.flatnonzero(hash_size[hash_group.reshape(-1)] > 1)
    if not len(candidates):
        return np.empty(0, dtype=np.int64)
    rows = np.ascontiguousarray(x[candidates]).view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel()
    _, group, size = np.unique(rows, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    shared = size[group] > 1
    if not shared.any():
        return np.empty(0, dtype=np.int64)
    group, shared_codes = group[shared], codes[candidates[shared]]
    pairs = np.unique(np.stack([group, shared_codes], axis=1), axis=0)  # (group, class)
    classes_per_group = np.bincount(pairs[:, 0], minlength=len(size))
    mixed_classes = np.unique(pairs[classes_per_group[pairs[:, 0]] > 1, 1])
    return np.flatnonzero(np.isin(codes, mixed_classes))


def _descending_key(values: np.ndarray) -> np.ndarray:
    """int64 keys of float32 values that sort as the values do, descending (no NaN here)."""
    bits = (values + np.float32(0.0)).view(np.uint32).astype(np.int64)  # -0.0 becomes +0.0
    ascending = np.where(bits >= 2**31, 2**32 - 1 - bits, bits + 2**31)
    return 2**32 - 1 - ascending


@dataclass
class _Chunk:
    """The queries of one block of rows: their positives and what has been counted so far."""
    start: int  # first row in the class-grouped order
    stop: int
    original: np.ndarray  # int64 [m]: each row's index in the caller's order
    r: np.ndarray  # int64 [m]: positives per query (0: a lone query)
    positive_offset: np.ndarray  # int64 [m + 1]: each row's positives in the flat arrays below
    positive_value: np.ndarray  # float32 [sum r]: sorted by (value desc, index asc) per row
    positive_index: np.ndarray  # int64 [sum r]
    positive_key: np.ndarray  # int64 [sum r]: row << 32 | descending value key, sorted
    count_rank: bool  # whether R@K needs counting here (some query has R below the deepest K)
    best: np.ndarray  # float32 [m]: the best positive's value (+inf: not counted)
    best_index: np.ndarray  # int64 [m]
    rank: np.ndarray  # int64 [m]: negatives ahead of the best positive, counted
    gaps: np.ndarray  # int64 [m, width + 1]: negatives per gap between sorted positives
    threshold: np.ndarray  # float32 [m]: negatives below this value cannot matter (+inf: none)

    def contributing(self, rows: np.ndarray) -> np.ndarray:
        """How many of each row's sorted positives still land in its top R."""
        width = self.gaps.shape[1] - 1
        if width == 0:
            return np.zeros(len(rows), dtype=np.int64)
        ahead = np.cumsum(self.gaps[rows, :width], axis=1)  # n_i for i = 1..width
        positions = np.arange(width)
        r = self.r[rows, None]
        return np.count_nonzero((positions + ahead < r) & (positions < r), axis=1)

    def raise_thresholds(self, rows: np.ndarray) -> None:
        counting = self.contributing(rows)
        last = self.positive_value[np.maximum(self.positive_offset[rows] + counting - 1, 0)]
        self.threshold[rows] = np.where(counting > 0, last, np.float32(np.inf))

    def add_negatives(self, rows: np.ndarray, values: np.ndarray, indices: np.ndarray) -> None:
        """Files each negative (row, value, original index) into the gap it falls in."""
        if len(rows) == 0:
            return
        keys = rows * _ROW_SHIFT + _descending_key(values)
        order = np.argsort(keys)  # sorted needles search 2x faster (the positives stay cached)
        keys, rows, indices = keys[order], rows[order], indices[order]
        left = np.searchsorted(self.positive_key, keys, side="left")
        gap = left - self.positive_offset[rows]
        tied = np.flatnonzero(self.positive_key[np.minimum(left, len(self.positive_key) - 1)] == keys)
        if len(tied):  # as similar as some positives: the index decides
            right = np.searchsorted(self.positive_key, keys[tied], side="right")
            for k, stop in zip(tied, right):
                gap[k] += np.searchsorted(self.positive_index[left[k]:stop], indices[k])
        np.add.at(self.gaps, (rows, gap), 1)
        self.raise_thresholds(np.unique(rows))


def _group_rows(codes: np.ndarray, block_rows: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """An order with each class contiguous (smallest classes first) and blocks cut at class
    boundaries, each at least ``block_rows`` long unless it is the last."""
    sizes = np.bincount(codes)
    order = np.lexsort((np.arange(len(codes)), codes, sizes[codes]))
    grouped = codes[order]
    class_starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    cuts = [0]
    while cuts[-1] < len(codes):
        at = np.searchsorted(class_starts, cuts[-1] + block_rows)
        cuts.append(int(class_starts[at]) if at < len(class_starts) else len(codes))
    return order, list(zip(cuts[:-1], cuts[1:]))


def _new_chunk(start, stop, order, r_all, deepest_k) -> _Chunk:
    m = stop - start
    r = r_all[order[start:stop]]
    width = int(r.max()) if m else 0
    offset = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(r, out=offset[1:])
    return _Chunk(
        start=start, stop=stop, original=order[start:stop], r=r, positive_offset=offset,
        positive_value=np.empty(0, np.float32), positive_index=np.empty(0, np.int64),
        positive_key=np.empty(0, np.int64), count_rank=bool(((r > 0) & (r < deepest_k)).any()),
        best=np.full(m, np.inf, np.float32), best_index=np.zeros(m, np.int64),
        rank=np.zeros(m, np.int64), gaps=np.zeros((m, width + 1), np.int64),
        threshold=np.full(m, np.inf, np.float32),
    )


def _read_diagonal_block(chunk: _Chunk, block: np.ndarray, codes_grouped: np.ndarray) -> None:
    """Takes the chunk's positives out of its own block (then -inf there), sorts them."""
    m = len(chunk.r)
    local_codes = codes_grouped[chunk.start:chunk.stop]
    class_start = np.flatnonzero(np.r_[True, local_codes[1:] != local_codes[:-1]])
    class_size = np.diff(np.r_[class_start, m])
    first_member = np.repeat(class_start, class_size)  # per row: where its class begins
    members = np.repeat(class_size, class_size)
    pair_row = np.repeat(np.arange(m), members)
    within = np.arange(len(pair_row)) - np.repeat(np.cumsum(members) - members, members)
    pair_col = first_member[pair_row] + within
    keep = pair_col != pair_row
    pair_row, pair_col = pair_row[keep], pair_col[keep]
    values = block[pair_row, pair_col]
    indices = chunk.original[pair_col]
    # pairs come in (row, index) order: a stable sort by (row, value desc) keeps the index order
    keys = pair_row * _ROW_SHIFT + _descending_key(values)
    order = np.argsort(keys, kind="stable")
    chunk.positive_value, chunk.positive_index, chunk.positive_key = values[order], indices[order], keys[order]
    block[pair_row, pair_col] = -np.inf
    scored = np.flatnonzero(chunk.r > 0)
    first = chunk.positive_offset[scored]
    if chunk.count_rank:
        chunk.best[scored] = chunk.positive_value[first]
        chunk.best_index[scored] = chunk.positive_index[first]
    chunk.raise_thresholds(scored)
    # The positives' threshold starts at the R-th positive, which for a poor query lets most of
    # its block through. A negative behind R other negatives has rank R or more, as has every
    # positive behind it, so it can never matter: the R-th best negative of the block's first
    # column slice is a safe floor while that slice is read (its R negatives are filed then).
    first_slice = block[scored, : _diagonal_slices(block.shape[1])[0][1]]
    r = chunk.r[scored]
    if len(scored) and first_slice.shape[1] >= r.min():
        deep = np.minimum(r, first_slice.shape[1]) - 1
        floor = -np.take_along_axis(np.partition(-first_slice, np.unique(deep), axis=1), deep[:, None], axis=1)[:, 0]
        floor[r > first_slice.shape[1]] = -np.inf
        chunk.threshold[scored] = np.maximum(chunk.threshold[scored], floor)


def _diagonal_slices(width: int) -> list[tuple[int, int]]:
    """Column slices in which a diagonal block is read, each one raising the thresholds for
    the next: one read of the whole block let 7x more negatives through at iNaturalist size."""
    cuts = np.linspace(0, width, _DIAGONAL_SLICES + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def _read(chunk: _Chunk, block: np.ndarray, other_original: np.ndarray, axis: int, scratch: np.ndarray) -> None:
    """Counts and files the negatives of ``block`` for ``chunk``'s queries, which are the
    block's rows (axis 1) or its columns (axis 0); ``other_original`` indexes the other axis."""
    # One pass of maxima finds the queries this block can change; only they are read further.
    maxima = block.max(axis=axis)
    if chunk.count_rank:
        _count_ahead(chunk, block, np.flatnonzero(maxima >= chunk.best), other_original, axis, scratch)
    reached = np.flatnonzero(maxima >= chunk.threshold)
    if len(reached) == 0:
        return
    if axis == 1 or len(reached) <= _FEW_COLUMNS:  # rows are cheap to gather, columns are not
        candidates, reached = _queries_of(block, reached, axis)
        flat = np.flatnonzero(candidates >= chunk.threshold[reached, None])
        query, other = np.divmod(flat, candidates.shape[1])
        values = candidates[query, other]
        query = reached[query]
    else:
        flat = np.flatnonzero(np.greater_equal(block, chunk.threshold[None, :], out=scratch))
        other, query = np.divmod(flat, block.shape[1])
        values = block[other, query]
    chunk.add_negatives(query, values, other_original[other])


def _count(mask: np.ndarray, axis: int) -> np.ndarray:
    # bytes summed into uint16 ran 2.7x faster than np.count_nonzero; blocks have < 65,536 rows
    return np.add.reduce(mask.view(np.uint8), axis=axis, dtype=np.uint16)


def _queries_of(block: np.ndarray, selected: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(the selected queries' similarities, one row per query; the selection). Rows are
    gathered only when at most half are selected: otherwise the block is read whole."""
    if axis == 0:
        return block[:, selected].T, selected
    if 2 * len(selected) > block.shape[0]:
        return block, np.arange(block.shape[0])
    return block[selected], selected


def _count_ahead(chunk: _Chunk, block: np.ndarray, over: np.ndarray, other_original: np.ndarray, axis: int,
                 scratch: np.ndarray) -> None:
    """Adds, for each query in ``over``, the negatives ranked before its best positive: more
    similar, or as similar with a lower index (the tie rule)."""
    if len(over) == 0:
        return
    if axis == 1 or len(over) <= _FEW_COLUMNS:
        similar, over = _queries_of(block, over, axis)
        best = chunk.best[over, None]
        chunk.rank[over] += _count(similar > best, 1)
        tied = np.flatnonzero(_count(similar == best, 1))
        tied_similar = similar[tied]
    else:
        best = chunk.best[None, :]
        chunk.rank += _count(np.greater(block, best, out=scratch), 0)
        tied = np.flatnonzero(_count(np.equal(block, best, out=scratch), 0))
        over = np.arange(block.shape[1])
        tied_similar = _queries_of(block, tied, axis)[0]
    if len(tied):
        queries = over[tied]
        at_best = tied_similar == chunk.best[queries, None]
        chunk.rank[queries] += np.count_nonzero(at_best & (other_original < chunk.best_index[queries, None]), axis=1)


def _same_class_rows(chunk: _Chunk, rows: np.ndarray, width: int) -> np.ndarray:
    """The ``same_class`` rows of the top ``width`` neighbours, rebuilt from the gaps."""
    same_class = np.zeros((len(rows), width), dtype=bool)
    counting = chunk.contributing(rows)
    ahead = np.cumsum(chunk.gaps[rows, : chunk.gaps.shape[1] - 1], axis=1)
    for i in range(int(counting.max()) if len(rows) else 0):
        hit = np.flatnonzero(counting > i)
        same_class[hit, i + ahead[hit, i]] = True
    return same_class


def self_retrieval_records(x: np.ndarray, codes: np.ndarray, ks: tuple[int, ...],
                           block_rows: int | None = None):
    """(0-based rank of each one's best positive, its MAP@R) for every query with at least one
    positive, in the caller's order. ``x``: float32 (N, D), C-contiguous;
    ``codes``: dense int class codes; ``ks`` sorted. A rank at or beyond the deepest K may be
    reported as N (it is a miss for every K either way)."""
    block_rows = min(int(block_rows or DEFAULT_BLOCK_ROWS), MAX_BLOCK_ROWS)
    n = len(x)
    r_all = np.bincount(codes)[codes] - 1
    order, spans = _group_rows(codes, block_rows)
    grouped = np.ascontiguousarray(x[order])
    codes_grouped = codes[order]
    chunks = [_new_chunk(a, b, order, r_all, ks[-1]) for a, b in spans]
    largest = max(b - a for a, b in spans)
    buffer = np.empty(largest * largest, dtype=np.float32)
    scratch = np.empty(largest * largest, dtype=bool)

    def product(i, j):
        a, b = chunks[i], chunks[j]
        out = buffer[: (a.stop - a.start) * (b.stop - b.start)].reshape(a.stop - a.start, b.stop - b.start)
        right = grouped[b.start:b.stop]
        if i == j:  # a distinct operand: NumPy would take x @ x.T to SYRK, another kernel
            right = right.copy()
        return np.matmul(grouped[a.start:a.stop], right.T, out=out)

    def view(flat, shape):
        return flat[: shape[0] * shape[1]].reshape(shape)

    for i, chunk in enumerate(chunks):
        block = product(i, i)
        np.fill_diagonal(block, -np.inf)
        _read_diagonal_block(chunk, block, codes_grouped)
        for a, b in _diagonal_slices(block.shape[1]):
            _read(chunk, block[:, a:b], chunk.original[a:b], 1, scratch)

    for i in range(len(chunks)):
        for j in range(i + 1, len(chunks)):
            block = product(i, j)
            _read(chunks[i], block, chunks[j].original, 1, view(scratch, block.shape))
            _read(chunks[j], block, chunks[i].original, 0, view(scratch, block.shape))

    first_rank = np.full(n, n, dtype=np.int64)
    average_precision = np.zeros(n, dtype=np.float64)
    for chunk in chunks:
        scored = np.flatnonzero(chunk.r > 0)
        if not len(scored):
            continue
        if chunk.count_rank:
            first_rank[chunk.original[scored]] = chunk.rank[scored]
        else:  # every R here reaches the deepest K: the best positive's rank is in the gaps
            listed = chunk.contributing(scored) > 0
            first_rank[chunk.original[scored[listed]]] = chunk.gaps[scored[listed], 0]
        same_class = _same_class_rows(chunk, scored, int(chunk.r.max()))
        average_precision[chunk.original[scored]] = average_precision_at_r(same_class, chunk.r[scored])
    scored = r_all > 0
    return first_rank[scored], average_precision[scored]
