"""A suite's report: tables (LaTeX, Markdown, CSV), figures and an index page.

Reads result files only; imports neither torch nor any bench module besides bench.results and
bench.errors, so a laptop with pandas/matplotlib can report a cluster's results.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench.results import atomic_write_text, check_name, dir_mode
from report.load import NOT_CELLS, ReportError, SuiteResults, load_suite
from report import kinds
from report.kinds import KINDS, check_kind, default_kind
from report.tables import build_table

DEFAULT_OUT = "report"  # under the suite's results folder
SUITES_DIR = Path(__file__).resolve().parents[1] / "suites"


def suite_report_block(suite: str, suites_dir: Path | None = None) -> dict[str, Any]:
    """A shipped suite's ``report:`` block, when its file is here (results written before the
    dispatcher recorded the block in ``cells.json``).

    Only a default: ``run_suite.py run`` validates suite files, so an unreadable one is ignored.
    """
    path = (suites_dir or SUITES_DIR) / f"{suite}.yaml"
    if not path.is_file():
        return {}
    try:
        import yaml

        data = yaml.safe_load(path.read_text())
    except (ImportError, OSError, ValueError, yaml.YAMLError):
        return {}
    report = data.get("report") if isinstance(data, dict) else None
    return report if isinstance(report, dict) else {}


def suite_table(suite: str, suites_dir: Path | None = None) -> str | None:
    """The table kind a suite's YAML asks for (``report: {table: ...}``), when the file is here."""
    table = suite_report_block(suite, suites_dir).get("table")
    return table if table in KINDS else None


def report_settings(results: SuiteResults, population: str | None = None, margin: float | None = None):
    """The statistical settings: options given here, else the suite's ``report:`` block as
    recorded with the results, else the shipped suite file's, else the defaults."""
    from report.significance import POPULATIONS, Settings

    block = dict(results.report_settings or suite_report_block(results.suite))
    if population is not None:
        block["population"] = population
    if margin is not None:
        block["equivalence_margin"] = margin
    if block.get("population", "split") not in POPULATIONS:
        raise ReportError(f"population must be one of {', '.join(POPULATIONS)}, got {block['population']!r}")
    value = block.get("equivalence_margin", 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ReportError(f"equivalence_margin must be a number of points > 0, got {value!r}")
    return Settings.from_block(block)


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
                 table: str | None = None, oracle: bool = False, settings=None) -> dict[str, Path]:
    """Load a suite folder and write its report; returns the written files by relative name."""
    suite_dir = Path(suite_dir)
    out_dir = Path(out_dir) if out_dir is not None else suite_dir / DEFAULT_OUT
    results = load_suite(suite_dir, skip=skip_for(suite_dir, out_dir))
    return write_report(results, out_dir, table=table, oracle=oracle, settings=settings)


def write_report(results: SuiteResults, out_dir: Path, table: str | None = None,
                 oracle: bool = False, settings=None) -> dict[str, Path]:
    """Build the report in a fresh folder beside ``out_dir`` and swap it in: a reader (or a
    second report run with another ``--table``) sees one whole report, never a mix of two."""
    if results.cells.empty:
        raise ReportError(f"{results.suite_dir}: no cell folders and no cells.json: nothing to report")
    kind = check_kind(table) if table else (_table_of(results) or default_kind(results.suite, results.cells))
    settings = settings if settings is not None else report_settings(results)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".building", dir=out_dir.parent))
    try:
        os.chmod(staging, dir_mode())  # mkdtemp makes 0700: colleagues could not open the report
        written = _write_into(results, staging, kind, oracle, settings)
        swap_in(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {name: out_dir / name for name in written}


# What the reporter writes at the top of its folder; anything else there is the user's and stays.
OWNED_NAMES = {"tables", "figures", "index.md", "index.html", "cells.csv", "epochs.csv", "significance.csv",
               "seeds.csv", "tuning.csv", "assets"}


def swap_in(staging: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``staging``, keeping the entries of ``out_dir`` the report does not
    own; serialised by a lock beside it."""
    import fcntl

    with open(out_dir.parent / f".{out_dir.name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out_dir.is_dir():
            for entry in out_dir.iterdir():
                if entry.name not in OWNED_NAMES and not (staging / entry.name).exists():
                    os.replace(entry, staging / entry.name)
            retired = out_dir.with_name(f".{out_dir.name}.retired-{os.getpid()}")
            os.replace(out_dir, retired)
            os.replace(staging, out_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out_dir)


def _table_of(results: SuiteResults) -> str | None:
    table = results.report_settings.get("table") if results.report_settings else None
    return table if table in KINDS else suite_table(results.suite)


def _write_into(results: SuiteResults, out_dir: Path, kind: str, oracle: bool, settings) -> dict[str, Path]:
    from report import pictures, plots, render, summary  # matplotlib only when a report is written

    from report import tuning
    from report.significance import significance

    written: dict[str, Path] = {}
    # short timing runs (latency) say nothing about accuracy: no tests there
    sig = significance(results, settings) if kinds.kind(kind).accuracy else None
    built = build_table(results, kind, oracle=oracle, significance=sig)
    for ext, path in render.write_table(built, out_dir / "tables").items():
        written[f"table.{ext}"] = path
    written.update(_write_frames(results, out_dir))
    if sig is not None:
        written["significance.csv"] = out_dir / "significance.csv"
        atomic_write_text(written["significance.csv"], sig.frame.to_csv(index=False, float_format="%.6g"))
    if results.tuning:
        written["tuning.csv"] = out_dir / "tuning.csv"
        atomic_write_text(written["tuning.csv"], tuning.trials_frame(results.tuning).to_csv(index=False))

    figures: dict[str, list[Path]] = {}
    titles: dict[str, str] = {}
    made = plots.make_figures(results, kind)
    if sig is not None and not sig.empty:
        made["significance"] = plots.fig_significance(sig)
    drawn = pictures.make_pictures(results) if kinds.kind(kind).accuracy else {}
    for stem, fig in {**made, **drawn}.items():
        if fig is None:
            continue
        titles[stem] = fig.get_suptitle()
        save = pictures.save_picture if stem in drawn else plots.save_figure
        figures[stem] = save(fig, out_dir / "figures" / stem)
        fig.clear()  # a few hundred image axes otherwise stay in memory until the report ends
        for path in figures[stem]:
            written[f"figures/{path.name}"] = path
    written["index.md"] = summary.write_index(out_dir, results, built, written, figures, significance=sig,
                                              titles={k: v for k, v in titles.items() if k in drawn})
    return {_relative(name, path, out_dir): path for name, path in written.items()}


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
