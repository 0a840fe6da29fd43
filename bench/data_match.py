"""Is a finished result's data the data this run would read? A result is reused only for the
data it was computed on: the same dataset folder and the same image list (a fingerprint of
every listed image's split, path, class and size, recorded in ``result.json``'s ``data``).

``data_root`` is a runtime field (moving the data must not rerun a suite), so it is not part of
a cell's identity; this check is what keeps a result of one folder from being reported as
another's: flowers under ``--data-root own2`` must never print the birds of ``own1``.
"""
from __future__ import annotations

import functools
import os
from typing import Any

from bench.config import CellConfig


@functools.lru_cache(maxsize=64)
def _current(dataset: str, data_root: str | None) -> tuple[str | None, str | None]:
    """(the dataset folder this config reads, its fingerprint); (None, None) when the data is
    not visible here (a login node without the data: then nothing can be compared)."""
    from bench.data.datasets import dataset_root, fingerprint_entries
    from bench.data.errors import DataError

    if data_root is None:
        return None, None
    try:
        root, layout = dataset_root(dataset, data_root)
        return os.path.realpath(root), fingerprint_entries(layout.parse(root), root)
    except (DataError, OSError):
        return None, None


def clear_cache() -> None:
    _current.cache_clear()


def data_mismatch(result: dict[str, Any], config: CellConfig, *, content: bool = True) -> str | None:
    """Why ``result`` was computed on other data than ``config`` reads, or None. ``content``
    False compares the folders only (no listing: ``--no-data-check``)."""
    recorded = result.get("data") or {}
    old_root = recorded.get("root")
    if content:
        new_root, fingerprint = _current(config.dataset, config.data_root)
    else:
        folder = config.dataset.partition(":")[2] or config.dataset  # folder:NAME reads NAME/
        new_root, fingerprint = (os.path.realpath(os.path.join(config.data_root, folder))
                                 if config.data_root else None), None
    if old_root and new_root and os.path.realpath(old_root) != new_root and not (
            not content and os.path.realpath(old_root) == os.path.realpath(config.data_root or "")):
        return f"it was computed on the data in {old_root}, and this run reads {new_root}"
    old_print = recorded.get("fingerprint")
    if old_print and fingerprint and old_print != fingerprint:
        return (f"the data in {new_root} changed since it was computed (image list fingerprint {old_print}, "
                f"now {fingerprint})")
    return None


def reuse_text(result: dict[str, Any]) -> str:
    """'reused finished result of 2026-12-06 21:30 UTC (data /data/cub200)'."""
    finished = ((result.get("provenance") or {}).get("finished") or "")[:16].replace("T", " ")
    root = (result.get("data") or {}).get("root") or "?"
    return f"reused finished result of {finished or 'an unknown date'} UTC (data {root})"
