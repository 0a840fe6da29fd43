"""Open a report page in headless Chromium, as a reader's browser would: every image must load
and every local link must name a file that exists. Also takes a screenshot.

    python -m report.browser results/demo/report/index.html --screenshot page.png

Exit 0 when the page is whole, 1 with one line per problem, 2 when no Chromium is installed
(Debian: ``apt-get install chromium``; ``scripts/ci-deps.sh`` installs it).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageCheck:
    images: int = 0
    broken_images: list[str] = field(default_factory=list)
    missing_links: list[str] = field(default_factory=list)
    screenshot: Path | None = None

    @property
    def problems(self) -> list[str]:
        return ([f"image did not load: {src}" for src in self.broken_images]
                + [f"link to a missing file: {href}" for href in self.missing_links])


def _run(browser: str, args: list[str], profile: str, timeout: float) -> subprocess.CompletedProcess:
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-dev-shm-usage", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", f"--user-data-dir={profile}", *args]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{browser} did not finish within {timeout:.0f} s ({' '.join(args[-1:])}): a page that "
                           "waits (a dialog, a script that never ends) or a browser that hangs; nothing checked") from None


def check_page(index: str | Path, screenshot: str | Path | None = None, browser: str | None = None,
               timeout: float = 120.0) -> PageCheck:
    """Load ``index`` from disk in headless Chromium; read the page's own image check from the
    DOM it leaves (``data-broken-images``, set on load by report/html.py's script)."""
    index = Path(index).resolve()
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium found (chromium, chromium-browser, google-chrome)")
    url = index.as_uri()
    with tempfile.TemporaryDirectory(prefix="peft-dml-browser-") as profile:
        dom = _run(browser, ["--virtual-time-budget=10000", "--dump-dom", url], profile, timeout)
        if dom.returncode != 0 or "<body" not in dom.stdout:
            raise RuntimeError(f"{browser} could not open {url}: {dom.stderr.strip()[-500:]}")
        result = PageCheck()
        match = re.search(r'<body[^>]*data-broken-images="([^"]*)"', dom.stdout)
        count = re.search(r'<body[^>]*data-images="(\d+)"', dom.stdout)
        if match is None or count is None:
            raise RuntimeError(f"{url}: the page's image check did not run (no data-broken-images on <body>)")
        result.images = int(count.group(1))
        result.broken_images = json.loads(match.group(1).replace("&quot;", '"'))
        result.missing_links = missing_local_links(dom.stdout, index.parent)
        if screenshot is not None:
            screenshot = Path(screenshot).resolve()
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            shot = _run(browser, ["--hide-scrollbars", "--window-size=1400,2400", "--virtual-time-budget=10000",
                                  f"--screenshot={screenshot}", url], profile, timeout)
            if shot.returncode != 0 or not screenshot.is_file():
                raise RuntimeError(f"{browser} took no screenshot of {url}: {shot.stderr.strip()[-500:]}")
            result.screenshot = screenshot
    return result


def missing_local_links(dom: str, base: Path) -> list[str]:
    """``href``/``src`` targets without a scheme (files beside the page) that do not exist."""
    missing = []
    for target in re.findall(r'(?:href|src)="([^"#]+)', dom):
        parsed = urlparse(target)
        if parsed.scheme and parsed.scheme != "file":
            continue
        path = Path(unquote(parsed.path)) if parsed.scheme == "file" else base / unquote(parsed.path)
        if not path.exists():
            missing.append(target)
    return sorted(set(missing))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("index", help="the report page, e.g. results/demo/report/index.html")
    parser.add_argument("--screenshot", default=None, help="write a PNG of the page here")
    args = parser.parse_args(argv)
    if not Path(args.index).is_file():
        print(f"error: {args.index}: no such file (run `run_suite.py report SUITE` first)", file=sys.stderr)
        return 1
    if find_browser() is None:
        print("error: no Chromium found; Debian: apt-get install chromium", file=sys.stderr)
        return 2
    result = check_page(args.index, args.screenshot)
    for problem in result.problems:
        print(f"{args.index}: {problem}")
    if result.problems:
        return 1
    shot = f"; screenshot {result.screenshot}" if result.screenshot else ""
    print(f"{args.index}: {result.images} images loaded, every local link resolves{shot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
