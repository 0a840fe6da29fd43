"""Read a suite's result files into tidy frames: one row per cell, one row per cell and epoch.

Only ``bench.results`` is used to read files (it imports nothing heavy), so reports run on a
laptop without torch. Failed cells stay in the frame with their reason; cells without a result
file (still pending, crashed before writing, or listed in ``cells.json`` but never started) are
``missing``. When ``cells.json`` (the dispatcher's list of every cell the suite now expects)
exists, folders it does not list are stale results of an earlier suite version: left out, and
named in ``SuiteResults.stale``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bench.errors import UserError
from bench.metrics import is_metric_key
from bench.cell_files import CellFiles
from bench.results import ResultError, foreign_reason, read_result
from report import names

EXPECTED_CELLS_FILE = "cells.json"
TUNING_FILE = "tuning.json"  # bench.tune.TUNING_FILE (the reporter never imports the engine's tuning)
STANDARD_AXES = ("dataset", "backbone", "method", "label", "seed")
# Config fields tables need even when the suite did not sweep them (latency is per batch size,
# table2's row names show the embedding size).
CONFIG_COLUMNS = ("batch_size", "embedding_size")
# Folders inside a suite folder that are not cells.
NOT_CELLS = frozenset({"report"})
KEY_NAMES = "__key_names__"  # a row's key columns, popped before the frame is built
PROVENANCE = "__provenance__"  # a result's provenance record, popped into SuiteResults.provenance


class ReportError(UserError):
    """A suite that cannot be reported: missing folder, bad cells.json, unknown table kind."""


@dataclass
class SuiteResults:
    suite: str
    suite_dir: Path
    cells: pd.DataFrame  # one row per cell, any status
    epochs: pd.DataFrame  # one row per finished epoch of every cell that has a result file
    axes: list[str] = field(default_factory=list)  # key fields, standard ones first
    stale: list[str] = field(default_factory=list)  # folders cells.json does not list: left out
    trials: pd.DataFrame = field(default_factory=pd.DataFrame)  # tuning trials (stage 1), kept apart
    tuning: dict[str, Any] | None = None  # tuning.json: the plan, each method's trials, the winners
    provenance: dict[str, dict[str, Any]] = field(default_factory=dict)  # cell id -> result.json provenance
    report_settings: dict[str, Any] = field(default_factory=dict)  # the suite's `report:` block (cells.json)

    @property
    def grid_axes(self) -> list[str]:
        """Axes beyond dataset/backbone/method/label/seed (e.g. proxy_bias_ratio)."""
        return [a for a in self.axes if a not in STANDARD_AXES]

    @property
    def ok(self) -> pd.DataFrame:
        return self.cells[self.cells["status"] == "ok"]


def load_suite(suite_dir: str | Path, skip: frozenset[str] = NOT_CELLS) -> SuiteResults:
    """Every ``<suite_dir>/*/result.json`` plus the cells ``cells.json`` expects."""
    suite_dir = Path(suite_dir)
    if not suite_dir.is_dir():
        raise ReportError(f"no results folder {suite_dir}: it does not exist or is not a folder")
    expected, expected_hashes = read_expected_cells(suite_dir / EXPECTED_CELLS_FILE)

    rows: list[dict[str, Any]] = []
    epoch_rows: list[dict[str, Any]] = []
    key_lists: list[list[str]] = []
    seen: set[str] = set()
    stale: list[str] = []
    provenance: dict[str, dict[str, Any]] = {}
    for cell_dir in sorted(p for p in suite_dir.iterdir() if p.is_dir()):
        if cell_dir.name.startswith(".") or cell_dir.name in skip:
            continue
        row, epochs = read_cell(cell_dir, expected, expected_hashes)
        if expected and row["cell_id"] not in expected and cell_dir.name not in expected:
            # from an earlier version of the suite (its config, hence its id, changed): averaging
            # it with the current cells of the same key would mix two setups
            stale.append(cell_dir.name)
            continue
        record = row.pop(PROVENANCE, None)
        if record:
            provenance[row["cell_id"]] = record
        rows.append(row)
        key_lists.append(row.pop(KEY_NAMES))
        epoch_rows.extend(epochs)
        seen.update({row["cell_id"], cell_dir.name})
    for cell_id, key in expected.items():
        if cell_id not in seen:
            rows.append(missing_row(cell_id, key, "no folder: never started, or its folder was deleted"))
            key_lists.append(rows[-1].pop(KEY_NAMES))

    # Tuning: trial cells (stage 1) are reported apart; the tables hold the final cells.
    trial_ids = {r["cell_id"] for r in rows if r.get("stage") == "trial"}
    trial_rows = [r for r in rows if r["cell_id"] in trial_ids]
    kept = [(r, k) for r, k in zip(rows, key_lists) if r["cell_id"] not in trial_ids]
    rows, key_lists = [r for r, _ in kept], [[n for n in k if n not in ("stage", "trial")] for _, k in kept]
    epoch_rows = [e for e in epoch_rows if e["cell_id"] not in trial_ids]
    for row in rows:
        row.pop("stage", None), row.pop("trial", None)
    for row in epoch_rows:
        row.pop("stage", None), row.pop("trial", None)
    axes = collect_axes(key_lists)
    cells = pd.DataFrame(rows, columns=cell_columns(rows, axes))
    add_display_columns(cells)
    epochs = pd.DataFrame(epoch_rows, columns=epoch_columns(epoch_rows, axes))
    add_display_columns(epochs)
    trials = pd.DataFrame(trial_rows)
    if not trials.empty:
        add_display_columns(trials)
    return SuiteResults(suite=suite_dir.name, suite_dir=suite_dir, cells=cells, epochs=epochs, axes=axes,
                        stale=stale, trials=trials, tuning=read_tuning(suite_dir / TUNING_FILE),
                        provenance=provenance, report_settings=read_report_settings(suite_dir / EXPECTED_CELLS_FILE))


def read_report_settings(path: Path) -> dict[str, Any]:
    """The suite's ``report:`` block as the dispatcher recorded it in ``cells.json``: the
    results carry their own report settings when they are copied off a cluster."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    block = data.get("report") if isinstance(data, dict) else None
    return block if isinstance(block, dict) else {}


def read_tuning(path: Path) -> dict[str, Any] | None:
    """``tuning.json`` written by the dispatcher (bench.tune), or None."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: cannot read the tuning record: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("methods"), list):
        raise ReportError(f"{path}: not a tuning record (expected 'plan' and 'methods')")
    return data


def read_expected_cells(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """``cells.json`` (optional): the cells the dispatcher planned, ``{"cell_id", "key",
    "identity_hash"}`` each; returns their keys and configuration hashes by cell id."""
    if not path.exists():
        return {}, {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: cannot read the expected cell list: {e}") from e
    if isinstance(data, dict) and "cells" in data:
        data = data["cells"]
    if not isinstance(data, list):
        raise ReportError(f"{path}: expected a JSON list of {{\"cell_id\": ..., \"key\": {{...}}}}")
    expected, hashes = {}, {}
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("cell_id"), str):
            raise ReportError(f"{path}: entry {i} has no string 'cell_id'")
        key = entry.get("key") or {}
        if not isinstance(key, dict):
            raise ReportError(f"{path}: entry {i} ({entry['cell_id']}): 'key' must be a mapping")
        expected[entry["cell_id"]] = key
        if isinstance(entry.get("identity_hash"), str):
            hashes[entry["cell_id"]] = entry["identity_hash"]
    return expected, hashes


def read_cell(cell_dir: Path, expected: dict[str, dict], expected_hashes: dict[str, str] | None = None
              ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A cell's row and epoch rows. Rows of a corrupt result file (status ``corrupt``) or of a
    result that is not this folder's cell (``foreign``: copied from another cell or suite, or a
    symlinked folder) are kept with their reason and never counted."""
    path = CellFiles(cell_dir).result
    key = expected.get(cell_dir.name, {})
    expected_hashes = expected_hashes or {}
    if cell_dir.is_symlink():
        return problem_row(cell_dir.name, key, "foreign", f"{cell_dir} is a symlink to {os.readlink(cell_dir)}"), []
    if not path.exists():
        return missing_row(cell_dir.name, key, "no result.json yet"), []
    try:
        result = read_result(path)
    except ResultError as e:
        return problem_row(cell_dir.name, key, "corrupt", str(e)), []
    reason = foreign_reason(result, cell_dir, None, expected_hashes.get(cell_dir.name))
    if reason is not None:
        return problem_row(cell_dir.name, key, "foreign", f"{path}: {reason}"), []
    if key:  # the suite's current key: a renamed label shows without rerunning the cell
        result = {**result, "key": {**(result.get("key") or {}), **key}}
    return cell_row(result, cell_dir), epoch_rows(result, cell_dir)


def problem_row(cell_id: str, key: dict[str, Any], status: str, reason: str) -> dict[str, Any]:
    row = missing_row(cell_id, key, reason)
    row["status"] = status
    return row


def flatten_key(key: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested key entries become dotted columns; lists become JSON strings (hashable)."""
    flat: dict[str, Any] = {}
    for name, value in (key or {}).items():
        column = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(flatten_key(value, column + "."))
        elif isinstance(value, (list, tuple)):
            flat[column] = json.dumps(value)
        else:
            flat[column] = value
    return flat


def missing_row(cell_id: str, key: dict[str, Any], reason: str) -> dict[str, Any]:
    flat = flatten_key(key)
    return {"cell_id": cell_id, "status": "missing", "reason": reason, **flat, KEY_NAMES: list(flat)}


def metric_items(metrics: dict[str, Any] | None) -> dict[str, float]:
    """The registered metrics' entries of a metrics dict (bench.metrics: R@K, MAP@R, ...); query
    and tie counts and the like are left out."""
    return {k: v for k, v in (metrics or {}).items() if is_metric_key(k) and isinstance(v, (int, float))}


def cell_row(result: dict[str, Any], cell_dir: Path) -> dict[str, Any]:
    key = flatten_key(result.get("key") or {})
    row: dict[str, Any] = {
        "cell_id": result.get("cell_id") or cell_dir.name,
        "status": result["status"],
        "reason": result.get("reason"),
        **key,
        KEY_NAMES: list(key),
    }
    config = result.get("config") or {}
    for name in CONFIG_COLUMNS:
        if name not in row and name in config:
            row[name] = config[name]
    # method arguments (accumulator, proxy_bias_ratio, ...) tell which paper row a cell matches
    # even when the suite did not make them grid axes
    for name, value in flatten_key(config.get("method_args") or {}, "method_args.").items():
        row.setdefault(name, value)
    final = result.get("final") or {}
    row["selection"] = final.get("selection")
    row["final_epoch"] = final.get("epoch")
    row.update(metric_items(final.get("test")))
    row["num_queries"] = (final.get("test") or {}).get("num_queries")
    row["ties_top1"] = (final.get("test") or {}).get("ties_top1")
    row["ties_checked"] = (final.get("test") or {}).get("ties_checked")
    row["data_root"] = (result.get("data") or {}).get("root")
    row.update({f"val/{k}": v for k, v in metric_items(final.get("val")).items()})
    oracle = result.get("oracle") or {}
    row["oracle_epoch"] = oracle.get("epoch")
    row.update({f"oracle/{k}": v for k, v in metric_items(oracle.get("test")).items()})
    for name, value in (result.get("measurements") or {}).items():
        if isinstance(value, (int, float, str, bool)) or value is None:
            row.setdefault(name, value)
    row["epochs_done"] = len(result.get("epochs") or [])
    row[PROVENANCE] = result.get("provenance")
    return row


def epoch_rows(result: dict[str, Any], cell_dir: Path) -> list[dict[str, Any]]:
    key = flatten_key(result.get("key") or {})
    cell_id = result.get("cell_id") or cell_dir.name
    rows = []
    for entry in result.get("epochs") or []:
        row = {"cell_id": cell_id, "status": result["status"], **key}
        row["epoch"] = entry.get("epoch")
        # per-epoch values under "epoch/": a swept config field (lr) keeps its own column
        for name in ("train_loss", "lr", "time_s"):
            row[f"epoch/{name}"] = entry.get(name)
        row.update({f"test/{k}": v for k, v in metric_items(entry.get("test")).items()})
        row.update({f"val/{k}": v for k, v in metric_items(entry.get("val")).items()})
        rows.append(row)
    return rows


def collect_axes(key_lists: list[list[str]]) -> list[str]:
    """Key columns in a stable order: the standard ones, then others as first seen."""
    seen: list[str] = []
    for key_names in key_lists:
        seen.extend(k for k in key_names if k not in seen)
    return [a for a in STANDARD_AXES if a in seen] + [k for k in seen if k not in STANDARD_AXES]


def cell_columns(rows: list[dict[str, Any]], axes: list[str]) -> list[str]:
    head = ["cell_id", "status", "reason", *axes]
    rest: list[str] = []
    for row in rows:
        rest.extend(c for c in row if c not in head and c not in rest)
    # key-derived config columns right after the key, metrics before measurements
    for must in ("batch_size", "embedding_size", "selection", "final_epoch"):
        if must not in head and must not in rest:
            rest.append(must)
    return head + rest


def epoch_columns(rows: list[dict[str, Any]], axes: list[str]) -> list[str]:
    head = ["cell_id", "status", *axes, "epoch", "epoch/train_loss", "epoch/lr", "epoch/time_s"]
    rest: list[str] = []
    for row in rows:
        rest.extend(c for c in row if c not in head and c not in rest)
    return head + rest


def add_display_columns(cells: pd.DataFrame) -> None:
    """Names the tables print, computed once so every table and plot agrees on them."""
    for column in ("dataset", "backbone", "method", "label", "seed"):
        if column not in cells:
            cells[column] = None
    cells["method_name"] = [names.method_display(m, lab) for m, lab in zip(cells["method"], cells["label"])]
    cells["backbone_name"] = [names.backbone_display(b) for b in cells["backbone"]]
    cells["dataset_name"] = [names.dataset_display(d) for d in cells["dataset"]]
