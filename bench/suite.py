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

import yaml

from bench import catalog
from bench.catalog import closest
from bench.config import DATASETS, CellConfig
from bench.errors import UserError
from bench.results import check_name, make_cell_id
from bench.tune import TunePlan, parse_tune, winner

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
    "additional_parameters": dict, "setup": list,
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
            cells.setdefault(cell_id, Cell(self.name, key, config, cell_id, resources))  # sub-grids may overlap
        if not cells:
            raise self.fail("exclude", "removes every cell of the grid")
        return list(cells.values())

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


def _describe(key: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in key.items()) + "}"


# ---------------------------------------------------------------------------------------------
# loading and validation


def suite_path(name_or_path: str | Path) -> Path:
    """A path to a YAML file, or the name of a shipped suite (suites/NAME.yaml)."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or "/" in text:
        path = Path(text)
        if not path.is_file():
            raise SuiteError(f"{path}: no such suite file")
        return path
    check_name(text, "suite name")
    path = SUITES_DIR / f"{text}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))
        raise SuiteError(f"unknown suite {text!r}{closest(text, shipped)}; shipped suites: "
                         f"{', '.join(shipped)} (or give a path to a YAML file)")
    return path


def load_suite(name_or_path: str | Path, *, check_methods: bool = True,
               overrides: dict[str, Any] | None = None) -> Suite:
    """Parse and validate a suite; every cell is resolved once so that errors surface here.
    ``overrides`` (``run --set FIELD=VALUE``) set config fields on every cell, above everything."""
    path = suite_path(name_or_path)
    suite = _parse(path, _read_yaml(path))
    for name in overrides or {}:
        if name not in CONFIG_FIELDS:
            raise SuiteError(f"--set {name}: not a config field{closest(name, sorted(CONFIG_FIELDS))}")
        if name in KEY_FIELDS or name in ("suite", "method_args") or any(name in g for g in suite.grids):
            raise SuiteError(f"--set {name}: {name} is a key field or a grid axis of {suite.name}; it cannot be "
                             "set for every cell")
    if suite.tune is not None:
        tuned = {p.name for params in suite.tune.space.values() for p in params}
        both = sorted(tuned & set(overrides or {}))
        if both:
            raise SuiteError(f"--set {both[0]}: {suite.name} tunes {both[0]} (tune.space); the tuned value would "
                             "replace yours in the final cells. Remove it from tune.space to fix it, or drop --set")
    suite.set_fields = dict(overrides or {})
    if check_methods:
        _check_methods(suite)
    cells = suite.cells()
    if check_methods:
        _check_backbones(suite, cells)
    if suite.tune is not None and suite.tune.metric != "map@r":
        k = int(suite.tune.metric.split("@")[1]) if suite.tune.metric.split("@")[1].isdigit() else None
        for cell in cells:
            ks = cell.config.recall_ks or catalog.dataset(cell.config.dataset).eval_ks
            if k not in ks:
                raise SuiteError(f"{path}: tune.metric: {suite.tune.metric} is not computed for {cell.config.dataset} "
                                 f"(its R@K: {', '.join(map(str, ks))}); choose one of those or map@r")
    return suite


MAX_SUITE_BYTES = 1 * 2**20  # the shipped suites are a few kB
MAX_ALIASES = 100  # anchors make suites short; more aliases than this is not a suite
MAX_EXPANDED_NODES = 100_000  # nested aliases ("billion laughs") expand exponentially


class SuiteLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys (naming both lines) and documents whose
    anchors and aliases expand beyond any real suite."""

    aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise yaml.composer.ComposerError(None, None, f"more than {MAX_ALIASES} aliases (*name)",
                                                  self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_document(self, node):
        _check_expansion(node)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<: *anchor' keys may be overridden by explicit ones, by design
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # unhashable keys are refused by the base class
            line = key_node.start_mark.line + 1
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first}, again on line {line})",
                    key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep)


def _check_expansion(root) -> None:
    sizes: dict[int, int] = {}

    def size(node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # a node that contains itself counts once
        children = node.value if isinstance(node.value, list) else []
        total = 1
        for child in children:
            for part in (child if isinstance(child, tuple) else (child,)):
                total += size(part)
                if total > MAX_EXPANDED_NODES:
                    raise yaml.composer.ComposerError(
                        None, None, f"the anchors and aliases expand to more than {MAX_EXPANDED_NODES:,} values",
                        node.start_mark)
        sizes[id(node)] = total
        return total

    size(root)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise SuiteError(f"{path}: cannot read suite file: {e}") from None
    if size > MAX_SUITE_BYTES:
        raise SuiteError(f"{path}: {size / 2**20:.1f} MiB is too large for a suite file "
                         f"(at most {MAX_SUITE_BYTES // 2**20} MiB)")
    try:
        data = yaml.load(path.read_text(), Loader=SuiteLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise SuiteError(f"{where}: not valid YAML: {problem}") from None
    except OSError as e:
        raise SuiteError(f"{path}: cannot read suite file: {e}") from None
    if not isinstance(data, dict):
        raise SuiteError(f"{path}: a suite file is a mapping with keys {', '.join(TOP_LEVEL)}; "
                         f"got {type(data).__name__}")
    return data


def _parse(path: Path, data: dict[str, Any]) -> Suite:
    def fail(where: str, message: str) -> SuiteError:
        return SuiteError(f"{path}: {where}: {message}")

    for name in data:
        if name not in TOP_LEVEL:
            raise fail(str(name), f"unknown key{closest(name, TOP_LEVEL)}; allowed: {', '.join(TOP_LEVEL)}")

    name = data.get("name", path.stem)
    try:
        check_name(name, "suite name")
    except UserError as e:
        raise fail("name", str(e)) from None
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise fail("description", f"must be a string, got {type(description).__name__}")

    defaults = _settings(_mapping(data, "defaults", fail), "defaults", fail)
    protocol = _mapping(data, "protocol", fail)
    for k in protocol:
        if k not in PROTOCOL_FIELDS:
            raise fail(f"protocol.{k}", f"unknown key{closest(k, PROTOCOL_FIELDS)}; "
                                        f"allowed: {', '.join(PROTOCOL_FIELDS)}")
    resources = _resources(_mapping(data, "resources", fail), fail)
    report = _report_block(_mapping(data, "report", fail), fail)

    grids = _grids(data.get("grid"), fail)
    axes = list(dict.fromkeys(a for g in grids for a in g))
    key_values = _key_values(grids, defaults)

    overrides = []
    for i, item in enumerate(_list(data, "overrides", fail)):
        where = f"overrides[{i}]"
        if (not isinstance(item, dict) or set(item) - {"when", "set", "resources"}
                or not ({"set", "resources"} & set(item))):
            raise fail(where, "must be a mapping {when: {...}, set: {...}, resources: {...}}")
        # no `when`: every cell (rarely useful beside `defaults`, but not wrong)
        when = _rule(item["when"], f"{where}.when", key_values, fail) if item.get("when") else {}
        settings = _settings(item.get("set") or {}, f"{where}.set", fail)
        cell_resources = _resources(item.get("resources") or {}, fail, f"{where}.resources")
        for k in settings:
            if k in axes or k in KEY_FIELDS:
                raise fail(f"{where}.set.{k}", f"{k!r} is a grid axis or key field; the cell's own "
                                               "value would be overwritten: make it an axis value instead")
        method_args = settings.pop("method_args", {})
        overrides.append(Override(when, settings, method_args, cell_resources))

    exclude = [_rule(item, f"exclude[{i}]", key_values, fail)
               for i, item in enumerate(_list(data, "exclude", fail))]

    prepare = data.get("prepare")
    if prepare is not None:
        try:
            prepare = catalog.prepare_hook(prepare)
        except UserError as e:
            raise fail("prepare", str(e)) from None

    tune = parse_tune(data.get("tune"), fail)
    if tune is not None:
        from bench.config import RUNTIME_FIELDS

        for name_ in (p.name for p in tune.space.get("default", [])):
            if name_ not in CONFIG_FIELDS:
                raise fail(f"tune.space.default.{name_}", "default holds config fields only (lr, proxy_lr, ...); "
                                                          "put a method argument under its method's entry")
        # what a trial may vary: training hyperparameters, never what defines the cell or the protocol
        untunable = set(KEY_FIELDS) | set(RUNTIME_FIELDS) | set(PROTOCOL_FIELDS) | {
            "method_args", "evaluate_test", "epochs_eval", "recall_ks", "train_fraction", "train_classes_fraction",
            "data_root", "weights", "image_size", "embedding_size"}
        owners = _space_owners(grids, defaults)
        for owner, params in tune.space.items():
            if owner != "default" and owner not in owners:
                raise fail(f"tune.space.{owner}", f"names no method of the grid (labels and registry names: "
                                                  f"{', '.join(sorted(owners))}); a typo would tune nothing")
            for param in params:
                if param.name in untunable:
                    raise fail(f"tune.space.{owner}.{param.name}", f"{param.name} defines the cell or the protocol; "
                                                                   "a search space holds training hyperparameters "
                                                                   "(lr, proxy_lr, method arguments, ...)")
    return Suite(tune=tune, name=name, path=path, description=description, grids=grids, defaults=defaults,
                 overrides=overrides, exclude=exclude, protocol=protocol, resources=resources,
                 report=report, prepare=prepare)


def _space_owners(grids: list[dict[str, list[Any]]], defaults: dict[str, Any]) -> set[str]:
    """The names a ``tune.space`` entry may use: every method's label and registry name."""
    owners = {str(defaults["method"])} if defaults.get("method") else set()
    for entry in (e for g in grids for e in g.get("method", [])):
        owners.update(str(v) for v in (entry.name, entry.label) if v)
    return owners


REPORT_FIELDS = ("table", "contrasts", "equivalence_margin", "population", "controls", "about")


def _report_block(report: dict[str, Any], fail) -> dict[str, Any]:
    """``report:``: read by the reporter only, checked here so that a typo fails before any cell."""
    for k in report:
        if k not in REPORT_FIELDS:
            raise fail(f"report.{k}", f"unknown key{closest(k, REPORT_FIELDS)}; allowed: {', '.join(REPORT_FIELDS)}")
    if "table" in report and not isinstance(report["table"], str):
        raise fail("report.table", f"must be a table kind name, got {report['table']!r}")
    margin = report.get("equivalence_margin", 1.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin > 0:
        raise fail("report.equivalence_margin", f"must be a number of points > 0, got {margin!r}")
    if report.get("population", "split") not in ("split", "classes"):
        raise fail("report.population", f"must be 'split' or 'classes', got {report['population']!r}")
    contrasts = report.get("contrasts", [])
    if not isinstance(contrasts, list) or not all(
            isinstance(c, list) and len(c) == 2 and all(isinstance(x, str) and x for x in c) and c[0] != c[1]
            for c in contrasts):
        raise fail("report.contrasts", "must be a list of [row A, row B] pairs of two different row names "
                                       "(method display names or labels), e.g. [[VPTSP-G (B), VPT (B)]]")
    if "about" in report and not isinstance(report["about"], str):
        raise fail("report.about", "must be a text (a paragraph for the report page)")
    controls = report.get("controls", [])
    if not isinstance(controls, list):
        raise fail("report.controls", "must be a list of {kind: negative|positive, a: ROW, b: ROW, dataset: NAME}")
    for i, control in enumerate(controls):
        where = f"report.controls[{i}]"
        if not isinstance(control, dict) or set(control) - {"kind", "a", "b", "dataset"}:
            raise fail(where, "must be a mapping {kind: negative|positive, a: ROW, b: ROW, dataset: NAME (optional)}")
        if control.get("kind") not in ("negative", "positive"):
            raise fail(f"{where}.kind", f"must be 'negative' (an A/A pair) or 'positive', got {control.get('kind')!r}")
        for side in ("a", "b"):
            if not isinstance(control.get(side), str) or not control[side]:
                raise fail(f"{where}.{side}", "must name a row (a method display name or label)")
        if control.get("dataset") is not None and not isinstance(control["dataset"], str):
            raise fail(f"{where}.dataset", f"must be a dataset name, got {control['dataset']!r}")
    return report


def _mapping(data: dict[str, Any], name: str, fail) -> dict[str, Any]:
    value = data.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise fail(name, f"must be a mapping, got {type(value).__name__}")
    return dict(value)


def _list(data: dict[str, Any], name: str, fail) -> list[Any]:
    value = data.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise fail(name, f"must be a list, got {type(value).__name__}")
    return value


def _settings(raw: Any, where: str, fail) -> dict[str, Any]:
    """Config fields as they are, bare method arguments gathered under 'method_args'."""
    if not isinstance(raw, dict):
        raise fail(where, f"must be a mapping, got {type(raw).__name__}")
    fields: dict[str, Any] = {}
    method_args: dict[str, Any] = {}
    for k, v in raw.items():
        if k == "method_args":
            if not isinstance(v, dict):
                raise fail(f"{where}.method_args", f"must be a mapping, got {type(v).__name__}")
            method_args.update(v)
        elif k in ("suite", "label"):
            raise fail(f"{where}.{k}", "is set by the suite (its name, the method entry's label)")
        elif k in CONFIG_FIELDS:
            _check_value(k, v, f"{where}.{k}", fail)
            fields[k] = v
        else:
            method_args[k] = v
    if method_args:
        fields["method_args"] = method_args
    return fields


def _check_value(name: str, value: Any, where: str, fail) -> None:
    """Names the file and field for a bad dataset or backbone; types are CellConfig's job."""
    if name == "dataset" and not (isinstance(value, str) and catalog.is_dataset(value)):
        raise fail(where, f"unknown dataset {value!r}{closest(str(value), DATASETS)}; "
                          f"choose one of {', '.join(DATASETS)}, or your own images as folder:NAME or csv:NAME")
    if name == "backbone" and (not isinstance(value, str) or not value.strip()):
        # any timm name is accepted here; whether timm knows it is checked with the methods
        # (run, --dry-run), where torch is loaded anyway
        raise fail(where, f"must be a backbone name (an alias such as {', '.join(catalog.BACKBONES)}, "
                          f"or a timm model name), got {value!r}")


def _resources(raw: dict[str, Any], fail, where: str = "resources") -> dict[str, Any]:
    for k, v in raw.items():
        if k not in RESOURCES:
            raise fail(f"{where}.{k}", f"unknown key{closest(k, RESOURCES)}; allowed: {', '.join(RESOURCES)}")
        expected = RESOURCES[k]
        if isinstance(v, bool) or not isinstance(v, expected):
            names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
            raise fail(f"{where}.{k}", f"must be {names}, got {v!r} ({type(v).__name__})")
    if not all(isinstance(line, str) for line in raw.get("setup", [])):
        raise fail(f"{where}.setup", "must be a list of shell lines (strings)")
    return raw


def _grids(raw: Any, fail) -> list[dict[str, list[Any]]]:
    if raw is None or raw == {} or raw == []:
        raise fail("grid", "is empty: a suite needs at least one cell")
    items = raw if isinstance(raw, list) else [raw]
    grids = []
    for i, item in enumerate(items):
        where = f"grid[{i}]" if isinstance(raw, list) else "grid"
        if not isinstance(item, dict) or not item:
            raise fail(where, "must be a non-empty mapping of axis -> list of values")
        grid = {}
        for axis, values in item.items():
            axis_where = f"{where}.{axis}"
            if not isinstance(values, list):
                raise fail(axis_where, f"must be a list of values, got {values!r} ({type(values).__name__})")
            if not values:
                raise fail(axis_where, "is an empty list: the grid has no cells")
            if axis in ("suite", "label", "method_args"):
                raise fail(axis_where, "cannot be a grid axis (use method entries {name, label, args})")
            if axis == "method":
                values = [_method_entry(v, f"{axis_where}[{j}]", fail) for j, v in enumerate(values)]
            elif axis in CONFIG_FIELDS:
                for j, v in enumerate(values):
                    _check_value(axis, v, f"{axis_where}[{j}]", fail)
            grid[axis] = values
        grids.append(grid)
    return grids


def _method_entry(value: Any, where: str, fail) -> MethodEntry:
    if isinstance(value, str):
        return MethodEntry(value)
    if not isinstance(value, dict):
        raise fail(where, f"must be a method name or {{name, label, args}}, got {type(value).__name__}")
    for k in value:
        if k not in METHOD_ENTRY_KEYS:
            raise fail(f"{where}.{k}", f"unknown key{closest(k, METHOD_ENTRY_KEYS)}; "
                                       f"allowed: {', '.join(METHOD_ENTRY_KEYS)}")
    name, label, args = value.get("name"), value.get("label"), value.get("args") or {}
    if not isinstance(name, str) or not name:
        raise fail(f"{where}.name", "a method entry needs a name (e.g. vpt_deep+bitfit)")
    if label is not None and not isinstance(label, str):
        raise fail(f"{where}.label", f"must be a string, got {type(label).__name__}")
    if not isinstance(args, dict):
        raise fail(f"{where}.args", f"must be a mapping of method arguments, got {type(args).__name__}")
    return MethodEntry(name, label, dict(args))


def _key_values(grids: list[dict[str, list[Any]]], defaults: dict[str, Any]) -> dict[str, list[Any]]:
    """Every value each key name can take: what `when`, `exclude` and --only may refer to."""
    values: dict[str, list[Any]] = {}
    for name in ("dataset", "backbone", "method", "seed"):
        if not all(name in grid for grid in grids):  # some cells take it from the defaults
            values[name] = [defaults.get(name, getattr(CellConfig, name))]
    for grid in grids:
        for axis, axis_values in grid.items():
            if axis == "method":
                values.setdefault("method", []).extend(e.name for e in axis_values)
                values.setdefault("label", []).extend(e.label for e in axis_values if e.label)
            else:
                values.setdefault(axis, []).extend(axis_values)
    return values


def _rule(raw: Any, where: str, key_values: dict[str, list[Any]], fail) -> dict[str, list[Any]]:
    """A partial key ({dataset: cub200, backbone: [vit_s16, vit_b16]}) whose values must exist."""
    if not isinstance(raw, dict) or not raw:
        raise fail(where, "must be a non-empty mapping of key -> value (or list of values)")
    rule = {}
    for name, value in raw.items():
        if name not in key_values:
            raise fail(f"{where}.{name}", f"not a key of this suite{closest(name, key_values)}; "
                                          f"keys: {', '.join(key_values)}")
        wanted = value if isinstance(value, list) else [value]
        known = key_values[name] + (key_values.get("label", []) if name == "method" else [])
        for v in wanted:
            if v not in known:
                shown = ", ".join(str(k) for k in dict.fromkeys(known))
                raise fail(f"{where}.{name}", f"{v!r} is not a value of the grid{closest(v, known)}; "
                                              f"values: {shown}")
        rule[name] = wanted
    return rule


def _check_methods(suite: Suite) -> None:
    """Method names exist; each method argument is accepted by at least one of the methods."""
    import methods.registry as registry  # torch-free: names, arguments and their values

    names = {e.name for g in suite.grids for e in g.get("method", [])}
    if not all("method" in g for g in suite.grids):
        names.add(suite.defaults.get("method", CellConfig.method))
    accepted: set[str] = set()
    for name in sorted(names):
        try:
            registry.validate_method(name)
        except UserError as e:
            where = "grid.method" if any("method" in g for g in suite.grids) else "defaults.method"
            raise suite.fail(where, str(e)) from None
        accepted.update(registry.method_arguments(name))

    def check(args: dict[str, Any], where: str) -> None:
        for arg in args:
            if arg not in accepted:
                raise suite.fail(f"{where}.{arg}", f"neither a config field nor an argument of the suite's "
                                                   f"methods{closest(arg, sorted(accepted | CONFIG_FIELDS))}")

    check(suite.defaults.get("method_args", {}), "defaults")
    for i, override in enumerate(suite.overrides):
        check(override.method_args, f"overrides[{i}].set")
    for i, grid in enumerate(suite.grids):
        where = f"grid[{i}]" if len(suite.grids) > 1 else "grid"
        check({a: None for a in grid if a not in CONFIG_FIELDS and a != "method"}, where)
        for j, entry in enumerate(grid.get("method", [])):
            check(entry.args, f"{where}.method[{j}].args")


def _check_backbones(suite: Suite, cells: list[Cell]) -> None:
    """Every backbone is a timm model (and tag) or one of the project's small ViTs, and every
    cell's method takes every argument the cell gives it, with a valid value: a typo fails the
    whole suite here (exit 2), before anything runs or any folder is made."""
    from methods.registry import validate_method

    try:
        from bench.backbones import resolve_name
    except ImportError:  # no torch here (a laptop reading a suite): the catalog's names only
        resolve_name = catalog.known_backbone

    for name in sorted({c.config.backbone for c in cells}):
        try:
            resolve_name(name)
        except UserError as e:
            raise suite.fail(_where_set(suite, "backbone", name), str(e).removeprefix("backbone: ")) from None
    for name, size in sorted({(c.config.backbone, c.config.image_size or 0) for c in cells}):
        try:
            catalog.check_image_size(name, size)
        except UserError as e:
            raise suite.fail(_where_set(suite, "image_size", size), str(e).removeprefix("image_size: ")) from None
    checked: set[str] = set()
    for cell in cells:
        signature = json.dumps([cell.config.method, cell.config.method_args], sort_keys=True, default=str)
        if signature in checked:
            continue
        checked.add(signature)
        try:
            validate_method(cell.config.method, cell.config.method_args)
        except UserError as e:
            raise suite.fail(f"cell {_describe(cell.key)}", str(e)) from None


def _where_set(suite: Suite, field_name: str, value: Any) -> str:
    """The suite field that gave a cell this value, for error messages."""
    for i, grid in enumerate(suite.grids):
        values = grid.get(field_name, [])
        aliases = {v: catalog.resolve_backbone_alias(v) if field_name == "backbone" else v for v in values}
        for j, v in enumerate(values):
            if value in (v, aliases[v]):
                return f"grid[{i}].{field_name}[{j}]" if len(suite.grids) > 1 else f"grid.{field_name}[{j}]"
    for i, override in enumerate(suite.overrides):
        if field_name in override.fields:
            return f"overrides[{i}].set.{field_name}"
    return f"defaults.{field_name}"
