"""Suite files: a named grid of cells (dataset x backbone x method x seed x ...) in YAML.

A suite file (``suites/NAME.yaml``)::

    name: table2                      # results go to results/<name>/ (default: the file name)
    description: one line
    grid:                             # axes, each a list; the cells are their product
      dataset: [cub200, cars196]
      backbone: [vit_s16]             # short names of BACKBONES, or a full timm name
      method:                         # a registry name, or {name, label, args}
        - full_ft
        - {name: vpt_deep+bitfit, label: "VPT (B)", args: {num_prompts: 10}}
      seed: [0, 1, 2]
      proxy_bias_ratio: [0.2, 0.5]    # any other config field or method argument
    # grid may also be a list of such mappings: the union of the sub-grids
    defaults: {epochs: 15, lr: 5e-3, num_prompts: 10}    # config fields and method arguments
    overrides:                        # applied in order to the cells that match `when`
      - when: {dataset: cars196, backbone: vit_s16}       # a value or a list of values
        set: {optimizer: adamw, lr: 5e-4}
    exclude:                          # partial keys: matching cells are dropped
      - {dataset: inaturalist, backbone: vit_s16}
    protocol: {val_fraction: 0.0, selection: last}
    resources: {gpus_per_node: 1, cpus_per_task: 8, mem_gb: 32, timeout_min: 1440}
    report: {table: table2}           # read by the reporter only

Precedence, least to most specific: CellConfig defaults, ``defaults``, ``protocol``, the
command line's ``--data-root``, matching ``overrides`` in order, then the cell's own grid
values (a method entry's ``args`` included). An override may not set a grid axis or a key field:
the cell's key would then no longer describe what it runs.

A name that is not a ``CellConfig`` field is a method argument (bare or under ``method_args``).
Loading checks method names and that every method argument is accepted by at least one of the
suite's methods; whether *this* cell's method accepts it is checked when the cell runs, and a
mismatch fails that cell only.

This module imports no torch: ``status`` loads suites with ``check_methods=False``.
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import catalog
from bench.catalog import closest
from bench.config import CellConfig
from bench.errors import UserError
from bench.results import make_cell_id
from bench.tune import TunePlan, winner

SUITES_DIR = Path(__file__).resolve().parent.parent / "suites"

TOP_LEVEL = ("name", "description", "grid", "defaults", "overrides", "exclude", "protocol",
             "resources", "report", "prepare", "tune")
# `prepare` names a registered hook (bench.catalog.PREPARE_HOOKS) that makes a data root ready
# (generated data); run once per data root before any cell. Suite files stay data, not code:
# nothing else can be called from one.
KEY_FIELDS = ("dataset", "backbone", "method", "label", "seed")  # always in a cell's key
PROTOCOL_FIELDS = ("val_fraction", "selection")
# resources -> (type, what submitit calls it); see bench.dispatch.make_executor
RESOURCES: dict[str, type | tuple[type, ...]] = {
    "partition": str, "gpus_per_node": int, "cpus_per_task": int, "mem_gb": (int, float),
    "timeout_min": int, "array_parallelism": int, "signal_delay_s": int, "max_num_timeout": int,
    "additional_parameters": dict, "setup": list, "nodes": int, "ranks_per_node": int,
}
METHOD_ENTRY_KEYS = ("name", "label", "args")
CONFIG_FIELDS = set(CellConfig.field_names())


class SuiteError(UserError, ValueError):
    """A suite file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class MethodEntry:
    name: str
    label: str | None = None
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class Override:
    when: dict[str, list[Any]]  # key name -> accepted values
    fields: dict[str, Any]  # config fields
    method_args: dict[str, Any]
    resources: dict[str, Any] = field(default_factory=dict)  # this cell's SLURM request (time, mem, ...)


@dataclass
class Cell:
    suite: str
    key: dict[str, Any]
    config: CellConfig
    cell_id: str
    resources: dict[str, Any] = field(default_factory=dict)  # the suite's, then matching overrides'


@dataclass
class SuitePlan:
    cells: list[Cell]  # what can run now
    waiting: list[dict[str, Any]] = field(default_factory=list)  # final cells waiting for their trials
    tuning: list[dict[str, Any]] = field(default_factory=list)  # per method: space, trials, winner
    failed: list[str] = field(default_factory=list)  # methods whose every trial failed: no final cell can run


def _trial_score(results_dir: Path | None, cell: Cell, metric: str):
    """A trial's validation score; None when it failed; "pending" while it has no result (or
    only one that is not this trial's: copied from another cell or suite)."""
    from bench.cell_files import CellFiles
    from bench.results import ResultError, config_hash, foreign_reason, read_result

    if results_dir is None:
        return "pending"
    cell_dir = Path(results_dir) / cell.cell_id
    try:
        result = read_result(CellFiles(cell_dir).result)
    except (ResultError, FileNotFoundError):
        return "pending"
    if foreign_reason(result, cell_dir, cell.suite, config_hash(cell.config.identity())) is not None:
        return "pending"  # the runner moves it aside and runs the trial
    if result["status"] != "ok":
        return None
    value = ((result.get("final") or {}).get("val") or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) else None


@dataclass
class Suite:
    name: str
    path: Path
    description: str
    grids: list[dict[str, list[Any]]]  # axis -> values; the method axis holds MethodEntry
    defaults: dict[str, Any]  # config fields, method_args merged in under "method_args"
    overrides: list[Override]
    exclude: list[dict[str, list[Any]]]
    protocol: dict[str, Any]
    resources: dict[str, Any]
    report: dict[str, Any]
    prepare: str | None = None  # "module:function", called with each data root before running
    tune: TunePlan | None = None  # equal-budget tuning (bench.tune): trial cells, then the winners
    set_fields: dict[str, Any] = field(default_factory=dict)  # run --set: on every cell, above all

    def fail(self, where: str, message: str) -> SuiteError:
        return SuiteError(f"{self.path}: {where}: {message}")

    def cells(self, data_root: str | None = None, only: list[str] | None = None,
              results_dir: Path | None = None) -> list[Cell]:
        """Every cell of the suite that can be resolved now, validated; `only` keeps cells
        matching KEY=VALUE. With ``tune``, the trial cells, and the final cells of every method
        whose trials have all ended in ``results_dir`` (``plan`` also says which wait)."""
        return self.plan(data_root, only, results_dir).cells

    def plan(self, data_root: str | None = None, only: list[str] | None = None,
             results_dir: Path | None = None) -> "SuitePlan":
        cells = self._grid_cells(data_root)
        waiting: list[dict[str, Any]] = []
        tuning: list[dict[str, Any]] = []
        failed: list[str] = []
        if self.tune is not None:
            cells, waiting, tuning, failed = self._tuned(cells, data_root, results_dir)
        return SuitePlan(self.select(cells, only) if only else cells, waiting, failed=failed, tuning=tuning)

    def _tuned(self, grid_cells: list[Cell], data_root, results_dir):
        """Stage 1 (trials) and stage 2 (winners) of equal-budget tuning, from the grid's cells."""
        from bench.results import config_hash

        plan = self.tune
        groups: dict[str, list[Cell]] = {}
        for cell in grid_cells:
            group = {k: v for k, v in cell.key.items() if k != "seed"}
            groups.setdefault(json.dumps(group, sort_keys=True, default=str), []).append(cell)
        cells: list[Cell] = []
        waiting: list[dict[str, Any]] = []
        tuning: list[dict[str, Any]] = []
        failed: list[str] = []

        def group_key_of(cell: Cell) -> dict[str, Any]:
            return {k: v for k, v in cell.key.items() if k != "seed"}

        for members in groups.values():
            base = members[0]
            params = plan.space_for(base.config.method, base.key.get("label"), None)
            points = plan.trials(params)
            trial_records = []
            for t, point in enumerate(points):
                scores: list[float | None] | None = []
                # a trial is named by its values, not its position: a space that grows by one value
                # (which reshuffles the sampler's order) reruns no trial already done
                trial_id = "p" + config_hash(point)
                for seed in plan.seeds:
                    key = {**{k: v for k, v in base.key.items() if k != "seed"}, "seed": seed, "stage": "trial",
                           "trial": trial_id}
                    config = self._with(base, {**point, "seed": seed, "val_fraction": plan.val_fraction,
                                               "selection": "last", "evaluate_test": False})
                    cell = Cell(self.name, key, config, make_cell_id(key, config.identity()), base.resources)
                    cells.append(cell)
                    if scores is not None:
                        score = _trial_score(results_dir, cell, plan.metric)
                        scores = None if score == "pending" else scores + [score]
                trial_records.append({"trial": t, "id": trial_id, "params": point, "scores": scores})
            group_key = {k: v for k, v in base.key.items() if k != "seed"}
            best = winner(trial_records, plan.metric) if points else {"trial": None, "params": {}}
            if best is None and all(t["scores"] is not None for t in trial_records):
                failed.append(f"{_describe(group_key_of(base))}: every trial failed (or scored no {plan.metric}); "
                              "its final cells cannot run: see the trials' reasons with `status`")
            tuning.append({"key": group_key, "space": {p.name: p.describe() for p in params},
                           "trials": trial_records, "winner": best})
            for member in members:
                key = {**member.key, "stage": "final"}
                if best is None:
                    if not (failed and failed[-1].startswith(_describe(group_key_of(base)) + ":")):
                        waiting.append(key)
                    continue
                config = self._with(member, best["params"])
                cells.append(Cell(self.name, key, config, make_cell_id(key, config.identity()), member.resources))
        return cells, waiting, tuning, failed

    def _with(self, cell: Cell, fields: dict[str, Any]) -> CellConfig:
        """A cell's config with tuned values: config fields as they are, the rest method args."""
        data = cell.config.to_dict()
        for name, value in fields.items():
            if name in CONFIG_FIELDS:
                data[name] = value
            else:
                data["method_args"] = {**data["method_args"], name: value}
        return CellConfig.from_dict(data, where=f"{self.path}: tune")

    def _grid_cells(self, data_root: str | None) -> list[Cell]:
        cells: dict[str, Cell] = {}
        for key, axis_values in self._keys():
            if any(_matches(rule, key) for rule in self.exclude):
                continue
            config = self._resolve(key, axis_values, data_root)
            cell_id = make_cell_id(key, config.identity())
            earlier = cells.get(cell_id)
            if earlier is not None and earlier.key != key:
                raise self.fail("grid.method", f"{_describe(earlier.key)} and {_describe(key)} are the same cell "
                                               "(a label is only a display name): give them different arguments "
                                               "or drop one")
            resources = dict(self.resources)
            for override in self.overrides:
                if _matches(override.when, key):
                    resources.update(override.resources)
            self._check_ranks(key, config, resources)
            cells.setdefault(cell_id, Cell(self.name, key, config, cell_id, resources))  # sub-grids may overlap
        if not cells:
            raise self.fail("exclude", "removes every cell of the grid")
        return list(cells.values())

    def _check_ranks(self, key: dict[str, Any], config: CellConfig, resources: dict[str, Any]) -> None:
        """A cell on several ranks splits its batch into equal rank parts: refused here, before
        anything is queued, when it cannot."""
        for name in ("nodes", "ranks_per_node"):
            if name in resources and resources[name] < 1:
                raise self.fail(f"resources.{name}", f"must be at least 1, got {resources[name]}")
        nodes, per_node = cell_ranks(resources)
        ranks = nodes * per_node
        if ranks > 1 and config.batch_size % ranks:
            raise self.fail("resources", f"{_describe(key)}: batch_size {config.batch_size} does not split into "
                                         f"{ranks} equal rank batches (nodes x ranks per node in resources, or "
                                         f"run --ranks); "
                                         f"use a batch_size that is a multiple of {ranks}")

    def _keys(self):
        """(key, {axis: value}) for every point of every sub-grid, in file order."""
        base = {name: self.defaults.get(name, getattr(CellConfig, name, None))
                for name in ("dataset", "backbone", "method", "seed")}
        for grid in self.grids:
            axes = list(grid)
            for values in itertools.product(*(grid[a] for a in axes)):
                axis_values = dict(zip(axes, values))
                key = dict(base)
                for axis, value in axis_values.items():
                    if isinstance(value, MethodEntry):
                        key["method"] = value.name
                        if value.label:
                            key["label"] = value.label
                    else:
                        key[axis] = value
                ordered = {k: key[k] for k in KEY_FIELDS if k in key}
                ordered.update({k: v for k, v in key.items() if k not in KEY_FIELDS})
                yield ordered, axis_values

    def _resolve(self, key: dict[str, Any], axis_values: dict[str, Any], data_root: str | None) -> CellConfig:
        merged = {k: v for k, v in self.defaults.items() if k != "method_args"}
        method_args = dict(self.defaults.get("method_args", {}))
        merged.update(self.protocol)
        if data_root is not None:
            merged["data_root"] = str(data_root)
        for override in self.overrides:
            if _matches(override.when, key):
                merged.update(override.fields)
                method_args.update(override.method_args)
        for axis, value in axis_values.items():
            if isinstance(value, MethodEntry):
                merged["method"] = value.name
                merged["label"] = value.label
                method_args.update(value.args)
            elif axis in CONFIG_FIELDS:
                merged[axis] = value
            else:
                method_args[axis] = value
        backbone = merged.get("backbone")
        if backbone in catalog.BACKBONES:  # an alias: its timm name and the paper's embedding size
            merged["backbone"] = catalog.BACKBONES[backbone].timm_name
            merged.setdefault("embedding_size", catalog.BACKBONES[backbone].embedding_size)
        merged.update(self.set_fields)
        merged["method_args"] = method_args
        merged["suite"] = self.name
        # absolute: SLURM tasks and later shells may run elsewhere (not part of the cell id)
        merged["data_root"] = os.path.abspath(str(merged.get("data_root", CellConfig.data_root)))
        where = f"{self.path}: cell {_describe(key)}"
        try:
            return CellConfig.from_dict(merged, where=where)
        except UserError as e:
            message = str(e)
            raise SuiteError(message if message.startswith(where) else f"{where}: {message}") from None

    def select(self, cells: list[Cell], only: list[str]) -> list[Cell]:
        """--only KEY=VALUE: values of one key are alternatives, different keys must all match."""
        wanted: dict[str, list[str]] = {}
        for item in only:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise SuiteError(f"--only {item!r}: expected KEY=VALUE, e.g. dataset=cub200")
            names = list(dict.fromkeys(k for c in cells for k in c.key))
            if name not in names:
                raise SuiteError(f"--only {item!r}: {self.name} has no key {name!r}{closest(name, names)}; "
                                 f"keys: {', '.join(names)}")
            wanted.setdefault(name, []).append(value)
        kept = [c for c in cells
                if all(_key_text(c.key, name) & set(values) for name, values in wanted.items())]
        if not kept:
            choices = {name: sorted({t for c in cells for t in _key_text(c.key, name)}) for name in wanted}
            detail = "; ".join(f"{n}: {', '.join(v)}" for n, v in choices.items())
            raise SuiteError(f"--only {' '.join(only)} matches no cell of {self.name} ({detail})")
        return kept


def _key_text(key: dict[str, Any], name: str) -> set[str]:
    """A key value as the command line spells it; the method also answers to its label."""
    texts = {str(key.get(name))}
    if name == "method" and key.get("label"):
        texts.add(str(key["label"]))
    return texts


def _matches(rule: dict[str, list[Any]], key: dict[str, Any]) -> bool:
    for name, values in rule.items():
        if name == "method" and key.get("label") in values:
            continue
        if key.get(name) not in values:
            return False
    return True


def cell_ranks(resources: dict[str, Any]) -> tuple[int, int]:
    """(nodes, ranks per node) of one cell: one rank per GPU (``gpus_per_node``), or
    ``ranks_per_node`` processes (CPU ranks, or fewer ranks than GPUs), on ``nodes`` nodes."""
    per_node = resources.get("ranks_per_node") or max(resources.get("gpus_per_node") or 1, 1)
    return max(resources.get("nodes") or 1, 1), per_node


def _describe(key: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in key.items()) + "}"


def load_suite(name_or_path: str | Path, *, check_methods: bool = True,
               overrides: dict[str, Any] | None = None) -> "Suite":
    """Parse and validate a suite (``bench.suite_file``); every cell is resolved once so that
    errors surface here. ``overrides`` (``run --set FIELD=VALUE``) set config fields on every
    cell, above everything."""
    from bench.suite_file import read_suite

    return read_suite(name_or_path, check_methods=check_methods, overrides=overrides)
