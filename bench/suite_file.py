"""Reading a suite file: safe YAML (size, aliases and expansion bounded), the parse of every
field with a message naming it, and the checks of method names, arguments and backbones that
make a typo fail the whole suite before anything runs. ``bench.suite.load_suite`` is the entry;
the format itself is described in ``bench/suite.py``. Torch-free: the method checks read the
registry (``methods.registry``); backbones are checked by timm where it can be imported.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from bench import catalog, metrics
from bench.catalog import closest
from bench.config import DATASETS, CellConfig
from bench.errors import UserError
from bench.results import check_name
from bench.suite import (CONFIG_FIELDS, KEY_FIELDS, METHOD_ENTRY_KEYS, PROTOCOL_FIELDS, RESOURCES, SUITES_DIR,
                         TOP_LEVEL, Cell, MethodEntry, Override, Suite, SuiteError, _describe)
from bench.tune import parse_tune


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


def read_suite(name_or_path: str | Path, *, check_methods: bool = True,
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
    k = metrics.find(suite.tune.metric)[1] if suite.tune is not None else None
    if k is not None:  # a per-K metric: every cell must compute that K
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
