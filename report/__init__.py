"""Reports from result files: tables (LaTeX, Markdown, CSV), figures and a summary page.

Public API (imported lazily, so ``import report`` stays cheap):

- ``build_report(suite_dir, out_dir=None, table=None, oracle=False) -> dict[str, Path]``
- ``load_suite(suite_dir) -> SuiteResults`` (``.cells``, ``.epochs``: tidy DataFrames)
- ``build_table(results, kind, oracle=False) -> Table``; ``KINDS`` and ``REPORT_KINDS`` (what each kind shows)
- ``make_figures(results, kind) -> dict[str, Figure]``
- ``summary_rows(results)``: the best rows per dataset, for a terminal summary

Never imports torch, timm or faiss: results are often read on a laptop.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "build_report": "report.cli",
    "load_suite": "report.load",
    "SuiteResults": "report.load",
    "ReportError": "report.load",
    "build_table": "report.tables",
    "KINDS": "report.kinds",
    "REPORT_KINDS": "report.kinds",
    "make_figures": "report.plots",
    "summary_rows": "report.summary",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'report' has no attribute {name!r}")
