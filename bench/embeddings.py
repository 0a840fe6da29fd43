"""Embeddings: computed from a model over a loader, or read from a saved ``.npy`` / ``.npz`` file
(never unpickled; a header that promises more data than the file holds is refused first)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bench.errors import UserError
from bench.knn import EvaluationError

if TYPE_CHECKING:  # torch is imported only where needed: `evaluate` on .npy files can skip it
    import torch


class EmbeddingFileError(UserError):
    """A saved embeddings or labels file that is missing or unreadable; the message names it."""


def compute_embeddings(
    model: "torch.nn.Module",
    loader,
    device: "str | torch.device",
    amp_dtype: "torch.dtype | None" = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Runs ``model(images)`` over ``loader`` (batches of (images, labels)) in eval mode.

    Returns (embeddings float32 [N, D], labels int64 [N]) on the CPU. Each submodule's
    train/eval flag is restored afterwards: PEFT methods often keep a frozen backbone in eval
    mode while training, and a blanket ``model.train()`` would undo that.
    """
    import torch

    device = torch.device(device)
    previous_modes = [(module, module.training) for module in model.modules()]
    embeddings, labels = [], []
    model.eval()
    try:
        with torch.no_grad():
            for images, batch_labels in loader:
                images = images.to(device, non_blocking=True)
                if amp_dtype is None:
                    output = model(images)
                else:
                    with torch.autocast(device_type=device.type, dtype=amp_dtype):
                        output = model(images)
                if not isinstance(output, torch.Tensor) or output.ndim != 2:
                    raise TypeError(
                        f"model(images) must return a (batch, dim) tensor of embeddings, got "
                        f"{type(output).__name__}{tuple(output.shape) if hasattr(output, 'shape') else ''}"
                    )
                embeddings.append(output.float().cpu())
                labels.append(torch.as_tensor(batch_labels).reshape(-1).cpu())
    finally:
        for module, was_training in previous_modes:
            module.training = was_training
    if not embeddings:
        raise EvaluationError("the evaluation loader yielded no batches (empty split?)")
    return (torch.cat(embeddings).numpy().astype(np.float32, copy=False),
            torch.cat(labels).numpy().astype(np.int64, copy=False))


def load_array(path: str, what: str) -> np.ndarray:
    """A ``.npy`` file, or one array of a ``.npz`` (``file.npz`` holding one array, or
    ``file.npz:name``); never unpickled. A missing, unreadable or inconsistent file (a header
    that promises more data than the file holds) is an error naming it, before any allocation."""
    text = str(path)
    name = None
    if ".npz:" in text:
        text, name = text.rsplit(":", 1)
    file = Path(text)
    if not file.is_file():
        raise EmbeddingFileError(f"{what} file not found: {text}")
    if file.suffix == ".npz" or name is not None:
        return _load_npz_member(file, name, what)
    try:
        with open(file, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)  # 3.0 differs only in encoding
            shape, _, dtype = read_header(handle)
            offset = handle.tell()
        if dtype.hasobject:
            raise ValueError("it holds Python objects (pickled), which are never loaded")
        needed = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        available = file.stat().st_size - offset
        if needed > available:
            raise ValueError(f"its header says shape {shape} of {dtype} ({needed:,} bytes) but the file holds "
                             f"{available:,} bytes: truncated or not a .npy file")
        return np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise EmbeddingFileError(f"cannot read {what} file {file} as a .npy array: {e}") from None


def _load_npz_member(file: Path, name: str | None, what: str) -> np.ndarray:
    import zipfile

    try:
        with np.load(file, allow_pickle=False) as archive:
            names = list(archive.files)
            if name is None:
                if len(names) != 1:
                    raise ValueError(f"it holds {len(names)} arrays ({', '.join(names) or 'none'}); name one as "
                                     f"{file}:NAME")
                name = names[0]
            if name not in names:
                raise ValueError(f"it has no array {name!r}; arrays: {', '.join(names)}")
            return archive[name]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise EmbeddingFileError(f"cannot read {what} file {file} as a .npz archive: {e}") from None
