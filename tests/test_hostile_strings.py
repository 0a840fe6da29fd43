"""Strings from a suite, a result or a file name are data, never markup: a report built from
hostile labels, failure reasons, data roots and provenance renders them as text in Markdown,
HTML and LaTeX, and its page runs no script of theirs and loads nothing from outside."""
from __future__ import annotations

import pytest

from report import browser
from tests.report_fixtures import VIT_S, result, write

SCRIPT = "<script>document.body.setAttribute('data-pwned','1')</script>"
IMAGE = "<img src=x onerror=\"document.body.setAttribute('data-pwned','2')\">"
REMOTE = "<img src=\"http://127.0.0.1:9/remote.png\">"
LINK = "[click](javascript:document.body.setAttribute('data-pwned','3'))"
HOSTILE = f"{SCRIPT}{IMAGE}{REMOTE}{LINK} *em* `code` | pipe [x"


def _hostile_suite(root):
    suite_dir = root / "hostile"
    for seed in range(2):
        for method, r1 in (("full_ft", 0.8), ("linear_probe", 0.7)):
            key = {"dataset": "cub200", "backbone": VIT_S, "method": method, "seed": seed,
                   "label": f"{HOSTILE} {method}"}
            data = result(key, r1 + 0.01 * seed, r1 - 0.2)
            data["cell_id"] = f"{method}-s{seed}"
            data["provenance"]["host"] = HOSTILE
            data["data"] = {"root": f"/data/{HOSTILE}", "dataset": "cub200"}
            write(suite_dir, data)
    failed = result({"dataset": "cub200", "backbone": VIT_S, "method": "bitfit", "seed": 0,
                     "label": f"[{HOSTILE}"}, None, None,
                    reason=f"image /data/{HOSTILE}.jpg cannot be decoded")
    failed["cell_id"] = "bitfit-s0"
    write(suite_dir, failed)
    return suite_dir


def test_hostile_strings_are_text_in_markdown_html_and_latex(tmp_path):
    from report.cli import build_report

    written = build_report(_hostile_suite(tmp_path))
    page = written["index.html"].read_text()
    assert "<script>document" not in page and "<img src=x" not in page and '<img src="http' not in page
    assert 'href="javascript' not in page  # no link made of it
    assert 'http-equiv="Content-Security-Policy"' in page and "default-src 'none'" in page
    assert "&lt;script&gt;" in page  # shown, as text
    index = written["index.md"].read_text()
    assert SCRIPT not in index and "&lt;script&gt;" in index
    tex = next(p for name, p in written.items() if name.endswith(".tex")).read_text()
    assert "{[}" in tex and "<script>" not in tex


@pytest.mark.skipif(browser.find_browser() is None, reason="headless Chromium not installed (Debian: apt-get "
                    "install chromium; scripts/ci-deps.sh installs it)")
def test_the_hostile_page_runs_no_script_and_loads_nothing_from_outside(tmp_path):
    import subprocess
    import tempfile

    from report.cli import build_report

    written = build_report(_hostile_suite(tmp_path))
    result = browser.check_page(written["index.html"])
    assert result.images >= 1 and result.broken_images == []  # the page's own check ran: its script is allowed
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([browser.find_browser(), "--headless", "--no-sandbox", "--disable-gpu",
                              f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom",
                              written["index.html"].as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert "data-pwned" not in dom.split("<body")[1].split(">")[0]
    assert "<body" in dom and '<img src="http' not in dom


def test_the_browser_check_gives_up_with_a_message_instead_of_hanging(tmp_path, monkeypatch):
    import subprocess

    def hang(*args, **kwargs):
        raise subprocess.TimeoutExpired(args[0], kwargs.get("timeout"))

    monkeypatch.setattr(subprocess, "run", hang)
    page = tmp_path / "index.html"
    page.write_text("<html><body></body></html>")
    with pytest.raises(RuntimeError, match="did not finish within"):
        browser.check_page(page, browser="/bin/true", timeout=1)


def test_long_labels_give_short_distinct_file_names():
    from report.table_model import slug

    long_a, long_b = "VPT " + "x" * 300 + " a", "VPT " + "x" * 300 + " b"
    assert len(slug(long_a)) <= 60 and slug(long_a) != slug(long_b)
    assert slug("VPTSP-G (GRU)") == "vptsp-g-gru"  # short names unchanged
