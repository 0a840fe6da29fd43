"""A suite's report: tables (LaTeX, Markdown, CSV), figures and an index page.

Reads result files only; imports neither torch nor any bench module besides bench.results and
bench.errors, so a laptop with pandas/matplotlib can report a cluster's results.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.results import atomic_write_text, check_name
from report.load import NOT_CELLS, ReportError, SuiteResults, load_suite
from report.tables import KINDS, build_table, check_kind, default_kind

DEFAULT_OUT = "report"  # under the suite's results folder
SUITES_DIR = Path(__file__).resolve().parents[1] / "suites"


def suite_table(suite: str, suites_dir: Path | None = None) -> str | None:
    """The table kind a suite's YAML asks for (``report: {table: ...}``), when the file is here.

    Only a default: ``run_suite.py run`` validates suite files, so an unreadable one is ignored.
    """
    path = (suites_dir or SUITES_DIR) / f"{suite}.yaml"
    if not path.is_file():
        return None
    try:
        import yaml

        data = yaml.safe_load(path.read_text())
    except (ImportError, OSError, ValueError, yaml.YAMLError):
        return None
    report = data.get("report") if isinstance(data, dict) else None
    table = report.get("table") if isinstance(report, dict) else None
    return table if table in KINDS else None


def resolve_suite_dir(suite: str, results_root: str | os.PathLike) -> Path:
    """``<results>/<suite>``; an unknown suite names the folder it looked for and the ones there."""
    check_name(suite, "suite name")
    root = Path(results_root)
    suite_dir = root / suite
    if suite_dir.is_dir():
        return suite_dir
    known = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    hint = f" (suites there: {', '.join(known)})" if known else ""
    raise ReportError(f"no results for suite {suite!r}: folder {suite_dir} does not exist{hint}")


def skip_for(suite_dir: Path, out_dir: Path) -> frozenset[str]:
    """An output folder inside the suite folder is not a cell."""
    try:
        inside = out_dir.resolve().parent == suite_dir.resolve()
    except OSError:
        inside = False
    return NOT_CELLS | ({out_dir.name} if inside else set())


def build_report(suite_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 table: str | None = None, oracle: bool = False) -> dict[str, Path]:
    """Load a suite folder and write its report; returns the written files by relative name."""
    suite_dir = Path(suite_dir)
    out_dir = Path(out_dir) if out_dir is not None else suite_dir / DEFAULT_OUT
    results = load_suite(suite_dir, skip=skip_for(suite_dir, out_dir))
    return write_report(results, out_dir, table=table, oracle=oracle)


def write_report(results: SuiteResults, out_dir: Path, table: str | None = None,
                 oracle: bool = False) -> dict[str, Path]:
    from report import plots, render, summary  # matplotlib only when a report is written

    if results.cells.empty:
        raise ReportError(f"{results.suite_dir}: no cell folders and no cells.json: nothing to report")
    kind = check_kind(table) if table else (suite_table(results.suite) or default_kind(results.suite, results.cells))
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    built = build_table(results, kind, oracle=oracle)
    for ext, path in render.write_table(built, out_dir / "tables").items():
        written[f"table.{ext}"] = path
    written.update(_write_frames(results, out_dir))

    figures: dict[str, list[Path]] = {}
    for stem, fig in plots.make_figures(results, kind).items():
        figures[stem] = plots.save_figure(fig, out_dir / "figures" / stem)
        for path in figures[stem]:
            written[f"figures/{path.name}"] = path
    written["index.md"] = summary.write_index(out_dir, results, built, written, figures)
    remove_stale_outputs(out_dir, set(written.values()))
    return {_relative(name, path, out_dir): path for name, path in written.items()}


OWNED = {"tables": (".tex", ".md", ".csv"), "figures": (".png", ".pdf")}


def remove_stale_outputs(out_dir: Path, written: set[Path]) -> None:
    """A figure the data no longer supports (or another --table) must not linger beside the
    new report; only our own subfolders and file types are touched."""
    for folder, suffixes in OWNED.items():
        if not (out_dir / folder).is_dir():
            continue
        for path in (out_dir / folder).iterdir():
            if path.is_file() and path.suffix in suffixes and path not in written:
                path.unlink()


def _relative(name: str, path: Path, out_dir: Path) -> str:
    try:
        return path.relative_to(out_dir).as_posix()
    except ValueError:
        return name


def _write_frames(results: SuiteResults, out_dir: Path) -> dict[str, Path]:
    paths = {"cells.csv": out_dir / "cells.csv", "epochs.csv": out_dir / "epochs.csv"}
    atomic_write_text(paths["cells.csv"], results.cells.to_csv(index=False))
    atomic_write_text(paths["epochs.csv"], results.epochs.to_csv(index=False))
    return paths
