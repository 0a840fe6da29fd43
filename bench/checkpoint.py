"""Checkpoints that scale to SOP's class-prompt tables.

A checkpoint is two files in the cell folder:

- ``checkpoint.tables.<hash>.safetensors``: every tensor of at least ``TABLE_BYTES`` (the class
  prompts and their optimiser state: 1 GiB each at SOP, ViT-S), in safetensors (no pickling,
  written straight from the tensors' memory, read back with ``readinto`` straight into the
  tensor that keeps it: the model's own table when the caller passes it as ``into``, so a
  resume holds each table once, never a loaded copy beside the model's);
- ``checkpoint.pt``: everything else (weights of the small modules, optimiser and scheduler
  state, RNG, history), with each big tensor replaced by a reference into the tables file,
  which it names by the hash of its content.

Order: the tables file first (a new name), then ``checkpoint.pt`` by atomic rename, then the
older tables files go. A crash between the two writes leaves the previous ``checkpoint.pt`` and
the tables file it references: the previous checkpoint still loads.
"""
from __future__ import annotations

import errno
import hashlib
import io
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from bench.cell_files import CellFiles
from bench.errors import CellFailure
from bench.results import atomic_write_bytes, disk_full, move_aside

TABLE_BYTES = 64 * 2**20
_REF = "__checkpoint_table__"


def _split(value: Any, tables: dict[str, torch.Tensor], path: str) -> Any:
    """The state with big tensors moved into ``tables`` (keyed by their path in the state)."""
    if isinstance(value, torch.Tensor) and value.numel() * value.element_size() >= TABLE_BYTES:
        tables[path] = value.detach().cpu().contiguous()
        return {_REF: path}
    if isinstance(value, dict):
        return {k: _split(v, tables, f"{path}/{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_split(v, tables, f"{path}/{i}") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(_split(v, tables, f"{path}/{i}") for i, v in enumerate(value))
    return value


def _join(value: Any, tables, into: Any = None) -> Any:
    """The state with references replaced by ``tables(key, destination)``; ``into`` is a mapping
    shaped like the state whose tensors are the destinations (None where there is none)."""
    if isinstance(value, dict):
        if set(value) == {_REF}:
            return tables(value[_REF], into if isinstance(into, torch.Tensor) else None)
        return {k: _join(v, tables, into.get(k) if isinstance(into, dict) else None) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tables) for v in value]
    if isinstance(value, tuple):
        return tuple(_join(v, tables) for v in value)
    return value


def _references(value: Any) -> list[str]:
    if isinstance(value, dict):
        if set(value) == {_REF}:
            return [value[_REF]]
        return [key for v in value.values() for key in _references(v)]
    if isinstance(value, (list, tuple)):
        return [key for v in value for key in _references(v)]
    return []


def file_hash(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=12)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(8 * 2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(cell_dir: Path, state: dict[str, Any]) -> None:
    """Atomic, tables beside; a full disk is one clear message (the previous checkpoint stays)."""
    cell_dir = Path(cell_dir)
    tables: dict[str, torch.Tensor] = {}
    small = _split(state, tables, "")
    if tables:
        from safetensors.torch import save_file

        partial = CellFiles(cell_dir).checkpoint_partial(str(os.getpid()))
        try:
            save_file(tables, str(partial))
            digest = file_hash(partial)
            name = CellFiles(cell_dir).checkpoint_tables(digest).name
            os.replace(partial, cell_dir / name)
        except BaseException as e:
            partial.unlink(missing_ok=True)
            needed = sum(t.numel() * t.element_size() for t in tables.values())
            if isinstance(e, Exception) and shutil.disk_usage(cell_dir).free < needed:  # safetensors' own error type
                raise disk_full(partial, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from None
            raise
        small["__tables__"] = {"file": name, "hash": digest}
    buffer = io.BytesIO()
    torch.save(small, buffer)
    atomic_write_bytes(CellFiles(cell_dir).checkpoint, buffer.getvalue())
    keep = small.get("__tables__", {}).get("file")
    for old in CellFiles(cell_dir).all_checkpoint_tables():
        if old.name != keep:
            old.unlink(missing_ok=True)


class ResumeFailure(CellFailure):
    """A tables file failed while being read into the model's own tensors: the model is no
    longer its initial state, so the cell cannot silently restart from epoch 0 in this process;
    it is marked failed, and a rerun starts it from epoch 0 (the checkpoint is moved aside)."""


def load_checkpoint(cell_dir: Path, identity_hash: str, emit, *,
                    into: dict[str, Any] | None = None, reader_only: bool = False) -> dict[str, Any] | None:
    """The checkpoint's state, or None to start from epoch 0: when there is none, when it is of
    another configuration, or when it (or its tables file) does not load: then it is moved aside
    and said, never deleted.

    ``into``: tensors shaped like parts of the state, e.g. ``{"learner":
    learner.trainable_state_dict()}``. A big table whose destination is a contiguous CPU tensor
    of its shape and dtype is read straight into it (and the state holds that very tensor), so
    resuming never holds a second copy of it. The tables file is checked whole (header, every
    reference, its length) before the first byte goes into a destination; should reading still
    fail after that (an I/O error), ``ResumeFailure`` says so instead of restarting from a
    half-overwritten model.

    ``reader_only``: a rank other than the main one, which loads what the main rank loaded: a
    file that does not load is an error (``ResumeFailure``), never moved aside by this rank.
    """
    cell_dir = Path(cell_dir)
    path = CellFiles(cell_dir).checkpoint
    if not path.exists():
        return None
    written: list[str] = []  # tables already read into a destination
    try:
        small = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(small, dict) or "epoch" not in small:
            raise ValueError("not a checkpoint of this suite")
        reference = small.pop("__tables__", None)
        if small.get("identity") != identity_hash:
            return None
        if reference is None:
            return small
        tables_path = cell_dir / reference["file"]
        if not tables_path.is_file():
            raise FileNotFoundError(f"its tables file {tables_path.name} is missing")
        with open(tables_path, "rb") as handle:
            header, start = read_safetensors_header(handle)
            check_tables(header, start, os.fstat(handle.fileno()).st_size, _references(small), tables_path.name)

            def fits(key: str, destination: torch.Tensor | None) -> None:
                if destination is not None and not _fits(destination, header[key]):
                    raise ValueError(f"{tables_path.name}: table {key!r} is {header[key]['dtype']} "
                                     f"{header[key]['shape']}, but the model's tensor is {destination.dtype} "
                                     f"{list(destination.shape)} (a checkpoint of another model)")

            _join(small, fits, into)  # every destination checked before a byte is written
            # the file's own hash, as its name records it, before any byte goes into the model:
            # a tables file of another seed or cell (same shapes, other numbers) must not resume
            if reference.get("hash") and file_hash(tables_path) != reference["hash"]:
                raise ValueError(f"{tables_path.name}: its content does not match the hash {reference['hash']} "
                                 "its checkpoint names (a tables file copied from another run?)")

            def table(key: str, destination: torch.Tensor | None) -> torch.Tensor:
                if destination is not None and _fits(destination, header[key]):
                    written.append(key)
                    return read_tensor(handle, header[key], start, out=destination)
                return read_tensor(handle, header[key], start)

            return _join(small, table, into)
    except Exception as e:  # truncated, corrupt or foreign: torch raises many kinds
        if reader_only:
            raise ResumeFailure(f"{path}: the main rank resumed from it, but it does not load here "
                                f"({type(e).__name__}: {e})") from e
        moved = move_aside(path, "corrupt")
        if written:
            raise ResumeFailure(f"{path}: its tables file failed while being read into the model ({type(e).__name__}: "
                                f"{e}); moved aside to {moved.name}: rerun the cell to start it from epoch 0") from e
        emit({"event": "note", "text": f"{path} does not load ({type(e).__name__}: {e}); moved aside to "
                                       f"{moved.name}, restarting the cell from epoch 0"})
        return None


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_safetensors_header(handle) -> tuple[dict[str, Any], int]:
    """The safetensors header (name -> dtype, shape, data offsets) and where the data starts."""
    import json
    import struct

    (length,) = struct.unpack("<Q", handle.read(8))
    header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def check_tables(header: dict[str, Any], start: int, size: int, keys: list[str], name: str) -> None:
    """Every referenced table is in the header with a known dtype, as many bytes as its shape
    needs, inside a file that is long enough: what can be known before reading any of them."""
    for key in keys:
        entry = header.get(key)
        if entry is None:
            raise ValueError(f"{name} has no table {key!r}")
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise ValueError(f"{name}: table {key!r} has an unknown dtype {entry.get('dtype')!r}")
        begin, end = entry["data_offsets"]
        if end - begin != math.prod(entry["shape"]) * dtype.itemsize or begin < 0:
            raise ValueError(f"{name}: table {key!r} has {end - begin} bytes for shape {entry['shape']}")
        if start + end > size:
            raise ValueError(f"{name} is cut short ({size} bytes, table {key!r} ends at {start + end})")


def _fits(destination: torch.Tensor, entry: dict[str, Any]) -> bool:
    return (destination.device.type == "cpu" and destination.is_contiguous()
            and destination.dtype == _DTYPES[entry["dtype"]] and list(destination.shape) == list(entry["shape"]))


def read_tensor(handle, entry: dict[str, Any], start: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor read straight into memory that keeps it: ``out`` (a contiguous CPU tensor of
    its shape and dtype) or a new tensor. No memory map, whose pages would count as resident
    beside the copy: at SOP scale the resume then holds each table once."""
    begin, end = entry["data_offsets"]
    tensor = out if out is not None else torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(bytearray())
    handle.seek(start + begin)
    if end - begin and handle.readinto(view) != end - begin:
        raise ValueError(f"tensor data cut short in {getattr(handle, 'name', 'the tables file')}")
    return tensor


def remove_checkpoint(cell_dir: Path) -> None:
    cell_dir = Path(cell_dir)
    CellFiles(cell_dir).checkpoint.unlink(missing_ok=True)
    for tables in CellFiles(cell_dir).all_checkpoint_tables():
        tables.unlink(missing_ok=True)
