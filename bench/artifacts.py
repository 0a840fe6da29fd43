"""What a cell learned, as small files beside ``result.json`` (written at the reported epoch):

- ``retrieval.npz``: a fixed sample of test queries (the same for every cell of a dataset) with
  their top neighbours, similarities, labels and image paths relative to the dataset folder;
- ``attention.npz``: the CLS token's attention to the patches for a few fixed test images, from
  the last block and as attention rollout (Abnar & Zuidema 2020) over all blocks; prompt tokens
  are left out and the rest renormalised;
- ``proxies.npz``: the proxies the loss used, for semantic proxies also the memory and the bias
  part, and the class-mean train embeddings of the final model (the mean of each class's first
  ``CLASS_MEAN_IMAGES`` training images, L2-normalised);
- ``test_embeddings.npy`` / ``test_labels.npy`` (float16 / int64, optional: ``save_embeddings``),
  which ``run_suite.py evaluate`` rescores.

Every file is written byte-for-byte deterministically (fixed zip timestamps), so that a rerun
with the same seed, or a resumed cell, gives identical files. The reporter reads them without
torch (report/pictures.py).
"""
from __future__ import annotations

import io
import os
import zipfile
import zlib
from pathlib import Path
import numpy as np
import torch

from bench.cell_files import CellFiles
from bench.embeddings import compute_embeddings
from bench.knn import knn
from bench.results import atomic_write_bytes

RETRIEVAL_QUERIES = 32
RETRIEVAL_NEIGHBOURS = 10
ATTENTION_IMAGES = 8
# proxies.npz's class means: the first images of each training class, in split order (a fixed,
# seed-free choice), enough for a mean direction without embedding every training image again
CLASS_MEAN_IMAGES = 8
# save_embeddings=None saves them up to this many test images (CUB, Cars, In-Shop; not SOP, iNat)
EMBEDDINGS_AUTO_LIMIT = 20_000


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``np.savez_compressed`` with a fixed timestamp on every member: the same arrays give the
    same bytes (numpy stamps the current time, so two identical runs would differ)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.asanyarray(array), allow_pickle=False)
    return buffer.getvalue()


def fixed_queries(dataset: str, scored: np.ndarray, count: int) -> np.ndarray:
    """``count`` of the scored query indices, seeded by the dataset's name only: every cell of a
    dataset (any method, seed or machine) shows the same queries."""
    rng = np.random.default_rng(zlib.crc32(dataset.encode()))
    scored = np.asarray(scored, dtype=np.int64)
    picked = rng.choice(len(scored), size=min(count, len(scored)), replace=False)
    return np.sort(scored[picked])


def _relative(paths: list[str], root: str) -> np.ndarray:
    return np.array([os.path.relpath(p, root) for p in paths], dtype=str)


def retrieval_arrays(dataset: str, root: str, evaluation, query_split, gallery_split) -> dict[str, np.ndarray]:
    """The fixed queries' top neighbours, from the reported epoch's embeddings."""
    scored = evaluation.per_query.query_index
    queries = fixed_queries(dataset, scored, RETRIEVAL_QUERIES)
    if evaluation.gallery is None:
        # the sampled rows against the whole split, one extra neighbour, then the query itself
        # dropped by index (as the metrics do): not a second search of every query
        k = min(RETRIEVAL_NEIGHBOURS, len(evaluation.embeddings) - 1)
        sims, idx = knn(evaluation.embeddings[queries], evaluation.embeddings, k=k + 1, exclude_self=False)
        others = idx != queries[:, None]
        others[others.sum(1) > k, -1] = False  # the query was not among them: keep the first k
        sims, idx = sims[others].reshape(len(queries), k), idx[others].reshape(len(queries), k)
        gallery_labels = evaluation.labels
    else:
        k = min(RETRIEVAL_NEIGHBOURS, len(evaluation.gallery))
        sims, idx = knn(evaluation.embeddings[queries], evaluation.gallery, k=k, exclude_self=False)
        gallery_labels = evaluation.gallery_labels
    query_paths = [query_split.paths[i] for i in queries]
    neighbour_paths = [[gallery_split.paths[j] for j in row] for row in idx]
    return {
        "query_index": queries, "query_label": evaluation.labels[queries].astype(np.int64),
        "query_path": _relative(query_paths, root),
        "neighbour_index": idx.astype(np.int64), "neighbour_similarity": sims.astype(np.float32),
        "neighbour_label": gallery_labels[idx].astype(np.int64),
        "neighbour_path": np.array([_relative(row, root) for row in neighbour_paths], dtype=str).reshape(idx.shape),
        "root": np.array(root),
    }


class AttentionRecorder:
    """Forward pre-hooks on every block's ``attn`` that recompute its softmax(q k^T / sqrt(d))
    from the block input (timm's fused attention never materialises it), averaged over heads."""

    def __init__(self, blocks):
        self.maps: list[torch.Tensor] = []
        self.handles = []
        for block in blocks:
            attn = getattr(block, "attn", None)
            if attn is None or getattr(attn, "qkv", None) is None:
                raise ValueError(f"{type(block).__name__}: no attn.qkv to read attention from")
            self.handles.append(attn.register_forward_pre_hook(self._hook))

    def _hook(self, attn, args):
        x = args[0]
        b, n, _ = x.shape
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        weights = torch.softmax((q.float() * attn.scale) @ k.float().transpose(-2, -1), dim=-1)
        self.maps.append(weights.mean(dim=1))  # [B, N, N]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def cls_attention(maps: list[torch.Tensor], prefix: int, num_patches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(last block's CLS -> patch attention, rollout's CLS -> patch attention), each ``[B, P]``
    summing to 1. Prompt tokens sit between the prefix tokens and the patches; they are dropped
    from every block's matrix and its rows renormalised before the rollout
    ``R = prod_l normalise(0.5 A_l + 0.5 I)``."""
    kept = []
    for a in maps:
        keep = torch.cat([torch.arange(prefix), torch.arange(a.shape[-1] - num_patches, a.shape[-1])])
        a = a[:, keep][:, :, keep]
        kept.append(a / a.sum(dim=-1, keepdim=True))
    last = kept[-1][:, 0, prefix:]
    eye = torch.eye(kept[0].shape[-1])
    rollout = eye.expand_as(kept[0]).clone()
    for a in kept:
        step = 0.5 * a + 0.5 * eye
        rollout = (step / step.sum(dim=-1, keepdim=True)) @ rollout
    rolled = rollout[:, 0, prefix:]
    return last / last.sum(-1, keepdim=True), rolled / rolled.sum(-1, keepdim=True)


def attention_arrays(learner, dataset, indices: np.ndarray, device) -> dict[str, np.ndarray]:
    model = learner.model
    vit = model.backbone
    images = torch.stack([dataset[int(i)][0] for i in indices]).to(device)
    recorder = AttentionRecorder(vit.blocks)
    previous = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(images)
    finally:
        recorder.close()
        for module, mode in previous:
            module.train(mode)
    maps = [m.cpu() for m in recorder.maps]
    if len(maps) != len(vit.blocks):  # e.g. a compiled block that ran without its hooks
        raise ValueError(f"attention read from {len(maps)} of {len(vit.blocks)} blocks")
    grid = tuple(int(g) for g in vit.patch_embed.grid_size)
    last, rollout = cls_attention(maps, vit.num_prefix_tokens, grid[0] * grid[1])
    return {"image_index": np.asarray(indices, dtype=np.int64),
            "last_block": last.reshape(-1, *grid).numpy().astype(np.float32),
            "rollout": rollout.reshape(-1, *grid).numpy().astype(np.float32)}


def proxies_arrays(learner, train_embeddings: np.ndarray, train_labels: np.ndarray) -> dict[str, np.ndarray]:
    """The proxies of the loss (semantic proxies: the alpha mix of bias and memory) and the
    class-mean train embeddings of the final model (L2-normalised, as the proxies are compared)."""
    bias = learner.criterion.proxies.detach().float().cpu()
    arrays: dict[str, np.ndarray] = {}
    proxies = bias
    for component in learner.components:  # a method that makes the proxies says what they are
        extra = component.proxy_arrays(learner, bias)
        if extra:
            proxies = extra.pop("proxies")
            arrays.update(extra)
    num_classes = proxies.shape[0]
    sums = np.zeros((num_classes, train_embeddings.shape[1]), dtype=np.float64)
    np.add.at(sums, train_labels, train_embeddings.astype(np.float64))
    counts = np.bincount(train_labels, minlength=num_classes)
    means = sums / np.maximum(counts, 1)[:, None]
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    arrays.update(proxies=proxies.numpy(), class_mean=means.astype(np.float32), class_count=counts.astype(np.int64))
    return arrays


def class_sample(split, per_class: int = CLASS_MEAN_IMAGES):
    """The first ``per_class`` images of every class of ``split`` (labels unchanged)."""
    from bench.data import Split

    labels = np.asarray(split.labels)
    order = np.argsort(labels, kind="stable")
    rank = np.empty(len(labels), dtype=np.int64)
    starts = np.searchsorted(labels[order], labels[order])
    rank[order] = np.arange(len(labels)) - starts
    keep = np.flatnonzero(rank < per_class)
    return Split([split.paths[i] for i in keep], labels[keep], split.class_names)


def wants_embeddings(setting: bool | None, num_test: int) -> bool:
    return bool(setting) if setting is not None else num_test <= EMBEDDINGS_AUTO_LIMIT


def write_artifacts(cell_dir: Path, config, learner, splits, loaders, evaluation, device, amp_dtype,
                    trained: bool) -> list[str]:
    """Write the cell's artifacts for the reported epoch's ``evaluation`` (test split); returns
    the file names written. Nothing here changes a weight or a metric."""
    cell_dir = Path(cell_dir)
    test = evaluation.get("test") if evaluation else None
    if test is None:  # tuning trials never look at the test split
        return []
    files = CellFiles(cell_dir)
    written = []
    query_split = splits.query if splits.query is not None else splits.test
    gallery_split = splits.gallery if splits.gallery is not None else splits.test
    retrieval = retrieval_arrays(config.dataset, splits.root, test, query_split, gallery_split)
    atomic_write_bytes(files.retrieval, npz_bytes(retrieval))
    written.append(files.retrieval.name)

    query_loader = loaders.get("query") or loaders.get("test")
    try:
        attention = attention_arrays(learner, query_loader.dataset, retrieval["query_index"][:ATTENTION_IMAGES],
                                     device)
    except ValueError:
        attention = None  # a backbone without timm's attention layout: no maps, nothing else changes
    if attention is not None:
        attention["image_path"] = retrieval["query_path"][:ATTENTION_IMAGES]
        attention["image_label"] = retrieval["query_label"][:ATTENTION_IMAGES]
        attention["root"] = retrieval["root"]
        atomic_write_bytes(files.attention, npz_bytes(attention))
        written.append(files.attention.name)

    if trained and loaders.get("train_eval") is not None:
        train_embeddings, train_labels = compute_embeddings(learner.model, loaders["train_eval"], device, amp_dtype)
        atomic_write_bytes(files.proxies, npz_bytes(proxies_arrays(learner, train_embeddings, train_labels)))
        written.append(files.proxies.name)

    if wants_embeddings(config.save_embeddings, len(test.embeddings)):
        atomic_write_bytes(files.test_embeddings, npy_bytes(test.embeddings.astype(np.float16)))
        atomic_write_bytes(files.test_labels, npy_bytes(test.labels.astype(np.int64)))
        written += [files.test_embeddings.name, files.test_labels.name]
        if test.gallery is not None:  # In-Shop: the queries above, the gallery beside them
            atomic_write_bytes(files.gallery_embeddings, npy_bytes(test.gallery.astype(np.float16)))
            atomic_write_bytes(files.gallery_labels, npy_bytes(test.gallery_labels.astype(np.int64)))
            written += [files.gallery_embeddings.name, files.gallery_labels.name]
    return written
