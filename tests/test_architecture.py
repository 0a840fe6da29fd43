"""The layering rules of ARCHITECTURE.md, and a failing test for every "where to add" step.

Import rules are read from the source (ast), so a lazy import inside a function counts too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from bench import catalog

ROOT = Path(__file__).resolve().parent.parent


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def top(module: str) -> str:
    return module.split(".")[0]


def test_engine_never_prints_through_rich_nor_imports_the_reporter():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imports_of(p) if top(m) in ("rich", "report", "peft_dml_cli"))
                 for p in package_files("bench")}
    assert not {k: v for k, v in offenders.items() if v}


def test_only_the_cli_and_script_entry_points_print():
    """The engine, the methods and the reporter return data and emit events; a ``print`` there is
    allowed only in the ``main()`` of a ``python -m`` script (a command of its own)."""
    offenders = []
    for package in ("bench", "methods", "report"):
        for path in package_files(package):
            tree = ast.parse(path.read_text())
            prints = {id(n): n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"}
            for main in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "main"]:
                for node in ast.walk(main):
                    prints.pop(id(node), None)
            offenders += [f"{path.relative_to(ROOT)}:{n.lineno}" for n in prints.values()]
    assert offenders == []


def test_reporter_runs_without_torch_and_reads_only_result_files():
    heavy = ("torch", "torchvision", "timm", "faiss", "submitit")
    allowed_bench = {"bench", "bench.results", "bench.errors", "bench.catalog", "bench.metrics", "bench.cell_files"}
    for path in package_files("report"):
        modules = imports_of(path)
        assert not [m for m in modules if top(m) in heavy], path
        assert {m for m in modules if top(m) == "bench"} <= allowed_bench, path
        assert {m for m in modules if top(m) == "methods"} <= {"methods", "methods.registry"}, path


def test_methods_are_built_by_the_engine_only_through_build_learner():
    """The engine reads the torch-free registry anywhere; it builds methods in learner.py only."""
    importers = [str(p.relative_to(ROOT)) for p in package_files("bench")
                 if any(top(m) == "methods" and m not in ("methods.registry",) for m in imports_of(p))]
    assert importers == ["bench/learner.py"]


def test_the_method_registry_and_the_package_top_are_torch_free():
    for path in (ROOT / "methods" / "__init__.py", ROOT / "methods" / "registry.py", ROOT / "methods" / "configs.py",
                 ROOT / "methods" / "args.py"):
        assert not [m for m in imports_of(path) if top(m) in ("torch", "timm", "numpy")], path


def test_catalog_is_torch_free():
    assert not [m for m in imports_of(ROOT / "bench" / "catalog.py") if top(m) in ("torch", "timm", "numpy")]


# --- where to add a dataset ------------------------------------------------------------------

def test_every_dataset_layout_has_a_catalog_row_and_back():
    from bench.data.layouts import LAYOUTS

    assert set(LAYOUTS) == set(catalog.DATASETS)


def test_every_dataset_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert [name for name in catalog.DATASETS if f"`{name}`" not in readme] == []


# --- where to add a method -------------------------------------------------------------------

def test_every_registered_method_names_registered_components_that_import_and_build():
    from methods import COMPONENTS, METHODS, build_method, component_class

    for name, spec in METHODS.items():
        assert set(spec.components) <= set(COMPONENTS), name
        assert [c.name for c in build_method(name).components] == list(spec.components), name
    for name in COMPONENTS:
        assert component_class(name).name == name


def test_every_accumulator_has_a_display_name():
    from methods.configs import ACCUMULATORS

    assert set(ACCUMULATORS) == set(catalog.ACCUMULATORS)


def test_every_small_vit_has_a_catalog_row():
    from bench.backbones import SMALL_VITS

    assert set(SMALL_VITS) == set(catalog.SMALL_BACKBONES)


def test_every_catalog_backbone_builds_offline():
    from bench.backbones import resolve_name

    for info in catalog.BACKBONES.values():
        assert resolve_name(info.alias) == info.timm_name


# --- where to add a metric ------------------------------------------------------------------

def test_every_metric_the_engine_reports_is_registered_and_displayed():
    import numpy as np

    from bench import metrics
    from bench.evaluate import retrieval_metrics

    rng = np.random.default_rng(0)
    found = retrieval_metrics(rng.normal(size=(40, 4)), np.repeat(np.arange(10), 4), (1, 2, 4, 8))
    assert [k for k in found if metrics.is_metric_key(k)] == metrics.result_keys((1, 2, 4, 8))
    assert set(found) - set(metrics.result_keys((1, 2, 4, 8))) == {"num_queries", "num_lone_queries"}
    for key in metrics.result_keys((1, 2, 4, 8)):
        assert metrics.display(key)
    with pytest.raises(metrics.MetricError, match="ndcg@10"):
        metrics.display("ndcg@10")


def test_the_metric_registry_is_torch_free_and_the_engines_do_not_import_each_other():
    assert not [m for m in imports_of(ROOT / "bench" / "metrics.py") if top(m) in ("torch", "timm", "faiss")]
    assert "bench.evaluate" not in imports_of(ROOT / "bench" / "evaluate_symmetric.py")


# --- where to add a table kind or a figure -------------------------------------------------

@pytest.fixture(scope="module")
def fixture_suites(tmp_path_factory):
    from report.load import load_suite
    from tests import report_fixtures as fx

    root = tmp_path_factory.mktemp("results")
    makers = (fx.make_table1_suite, fx.make_table2_suite, fx.make_ablation_suite, fx.make_latency_suite,
              fx.make_accumulator_suite, fx.make_prompts_suite)
    return [load_suite(make(root)) for make in makers]


def test_every_table_kind_has_a_layout_and_builds(fixture_suites):
    from report import tables
    from report.kinds import REPORT_KINDS

    for kind in REPORT_KINDS.values():
        assert kind.layout in tables.LAYOUTS, kind.name
        assert all(axis in names_axes() for axis in kind.axes), kind.name
        for results in fixture_suites:
            assert tables.build_table(results, kind.name).rows, (kind.name, results.suite)


def names_axes():
    from report import names

    return set(names.AXES) | {"backbone"}


def test_report_kinds_are_looked_up_never_compared_as_strings():
    """A kind's name appears as a string in report/kinds.py only (the suite-name heuristics of
    default_kind included): everywhere else a kind's properties are read from REPORT_KINDS."""
    from report.kinds import KINDS

    offenders = []
    for path in package_files("report"):
        if path.name == "kinds.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                for side in [node.left, *node.comparators]:
                    if isinstance(side, ast.Constant) and side.value in KINDS:
                        offenders.append(f"{path.name}:{node.lineno} {side.value!r}")
    assert offenders == []


def test_every_figure_has_a_title(fixture_suites):
    import matplotlib

    matplotlib.use("Agg")
    from report import kinds, plots, summary

    stems = set()
    for results in fixture_suites:
        stems.update(plots.make_figures(results, kinds.default_kind(results.suite, results.cells)))
    assert len(stems) > 4
    assert [s for s in stems if summary.figure_title(s) == s] == []


# --- cell ids: the same config keeps its id across refactors ---------------------------------

# Written down before the redesign; a change here renames finished cells on every cluster.
STABLE_IDS = [
    ({"dataset": "cub200", "backbone": "vit_small_patch16_224.augreg_in21k", "method": "vpt_deep+bitfit", "seed": 0},
     {"dataset": "cub200", "backbone": "vit_small_patch16_224.augreg_in21k", "method": "vpt_deep+bitfit",
      "method_args": {"num_prompts": 10, "prompt_depth": 12}, "seed": 0, "batch_size": 64, "lr": 5e-3},
     "cub200-vit_small_patch16_224.augreg_in21k-vpt_deep_bitfit-s0-0ad7080b"),
    ({"dataset": "synthetic", "backbone": "vit_test", "method": "linear_probe", "seed": 1},
     {"dataset": "synthetic", "backbone": "vit_test", "weights": None, "method": "linear_probe", "seed": 1,
      "epochs": 2, "embedding_size": 16},
     "synthetic-vit_test-linear_probe-s1-b46b693e"),
]


@pytest.mark.parametrize("key, fields, expected", STABLE_IDS)
def test_cell_ids_do_not_change_for_the_same_config(key, fields, expected):
    from bench.config import CellConfig
    from bench.results import make_cell_id

    assert make_cell_id(key, CellConfig.from_dict(fields).identity()) == expected


# --- ARCHITECTURE.md is true --------------------------------------------------------------------

def _architecture_table(heading: str) -> list[list[str]]:
    text = (ROOT / "ARCHITECTURE.md").read_text().split(heading, 1)[1]
    rows = []
    for line in text.splitlines()[1:]:
        if line.startswith("## "):
            break
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows[1:]  # without the header row


def _defined_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def test_the_where_to_add_table_names_what_exists():
    """Row by row: each `file` or `file:NAME` the "where to add" table names exists (NAME defined
    in that file), each test it names is a test function, and the concepts it must cover are there."""
    import re

    rows = _architecture_table("## Where to add ...")
    assert {"a dataset", "a method", "a metric", "a file in the cell folder", "a report kind", "a figure",
            "a CLI subcommand", "a prepare hook"} <= {row[0] for row in rows}
    tests = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        tests |= {n for n in _defined_names(path) if n.startswith("test_")}
    for concept, steps, checks in rows:
        for ref in re.findall(r"`([\w/<>.]+\.py)(?::(\w+))?`", steps + " " + checks):
            file, name = ref
            if "<" in file:
                continue
            assert (ROOT / file).is_file(), (concept, file)
            if name:
                assert name in _defined_names(ROOT / file), (concept, f"{file}:{name}")
        named_tests = re.findall(r"`(test_\w+)`", checks) + re.findall(r"::(test_\w+)", checks)
        assert named_tests, concept
        assert [t for t in named_tests if t not in tests] == [], concept


def test_every_subcommand_is_in_the_architecture_table_and_back():
    from peft_dml_cli import COMMANDS

    listed = {row[0].strip("`") for row in _architecture_table("## Subcommands")}
    assert listed == set(COMMANDS)
