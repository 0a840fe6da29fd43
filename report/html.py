"""``index.html``: the report page a browser opens from disk. The same content as ``index.md``
(converted by Python-Markdown), with the figures shown inline and captioned, the CSS inline and
no font, script or image from the network: it reads the same from a laptop, a cluster's shared
folder or an archive.

A small inline script counts the images that failed to load into ``data-broken-images`` on the
``<body>``; ``report.browser`` reads it from a headless browser's DOM.
"""
from __future__ import annotations

import html
import re
from pathlib import Path

from bench.results import atomic_write_text

CSS = """
:root { --ink: #1f2328; --muted: #59636e; --line: #d1d9e0; --soft: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff; line-height: 1.5;
       font: 15px/1.5 -apple-system, "Segoe UI", "DejaVu Sans", "Liberation Sans", Arial, sans-serif; }
main { max-width: 1280px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 1.8em; border-bottom: 1px solid var(--line); padding-bottom: .3em; }
h2 { font-size: 1.4em; border-bottom: 1px solid var(--line); padding-bottom: .25em; margin-top: 2em; }
h3 { font-size: 1.1em; margin-top: 1.6em; }
a { color: var(--accent); }
code { background: var(--soft); padding: .1em .35em; border-radius: 4px; font-size: .9em;
       font-family: "DejaVu Sans Mono", "Liberation Mono", monospace; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; display: block; overflow-x: auto; }
th, td { border: 1px solid var(--line); padding: 4px 10px; }
th { background: var(--soft); }
tbody tr:nth-child(even) { background: #fbfcfd; }
figure { margin: 12px 0 20px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: .88em; margin-top: 4px; }
.gallery { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.gallery figure { flex: 0 1 300px; margin: 0; }
nav.toc { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: 8px 16px;
          font-size: .9em; }
nav.toc ul { margin: 4px 0; padding-left: 20px; }
footer { color: var(--muted); font-size: .85em; margin-top: 48px; border-top: 1px solid var(--line);
         padding-top: 8px; }
"""

CHECK_IMAGES = """
window.addEventListener("load", function () {
  var broken = [];
  for (var i = 0; i < document.images.length; i++) {
    var img = document.images[i];
    if (!(img.complete && img.naturalWidth > 0)) { broken.push(img.getAttribute("src")); }
  }
  document.body.setAttribute("data-images", String(document.images.length));
  document.body.setAttribute("data-broken-images", JSON.stringify(broken));
});
"""

# Figures shown side by side (narrow grids of one method each); the rest take the full width.
SIDE_BY_SIDE = re.compile(r"/retrieval_")
IMAGE_PARAGRAPH = re.compile(r'<p><img alt="([^"]*)" src="([^"]+)" ?/?></p>')


def figures_inline(body: str) -> str:
    """Each image paragraph becomes a captioned figure linking to the full-size file; runs of
    side-by-side figures share one flex row."""
    def figure(match: re.Match) -> str:
        alt, src = match.group(1), match.group(2)
        side = " data-side" if SIDE_BY_SIDE.search(src) else ""
        return (f'<figure{side}><a href="{src}"><img alt="{alt}" src="{src}" loading="eager"></a>'
                f"<figcaption>{alt}</figcaption></figure>")

    body = IMAGE_PARAGRAPH.sub(figure, body)
    # consecutive side-by-side figures (with only their links between) go into one gallery
    return re.sub(r"((?:<figure data-side>.*?</figure>\s*(?:<p>.*?</p>\s*)?){2,})",
                  lambda m: f'<div class="gallery">{m.group(1)}</div>', body, flags=re.S)


def csp_meta() -> str:
    """The page's Content-Security-Policy: nothing from the network, no script but the page's own
    image check (allowed by its hash), images and styles from the page and its folder only."""
    import base64
    import hashlib

    digest = base64.b64encode(hashlib.sha256(CHECK_IMAGES.encode()).digest()).decode()
    policy = (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; "
              "img-src 'self' file: data:; base-uri 'none'; form-action 'none'")
    return f'<meta http-equiv="Content-Security-Policy" content="{policy}">'


def page(title: str, body: str, footer: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"{csp_meta()}\n<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n<script>{CHECK_IMAGES}</script>\n"
        f"</head>\n<body>\n<main>\n{body}\n<footer>{footer}</footer>\n</main>\n</body>\n</html>\n"
    )


def write_html(out_dir: Path, markdown_text: str, title: str, footer: str) -> Path:
    """``index.html`` beside ``index.md``, from the same Markdown."""
    import markdown

    converter = markdown.Markdown(extensions=["tables", "toc", "sane_lists"], output_format="html")
    # no raw HTML from the Markdown into the page: every string from a suite, a result or a file
    # name is escaped where it is written (report.render.md); this catches anything missed
    converter.preprocessors.deregister("html_block")
    converter.inlinePatterns.deregister("html")
    body = figures_inline(converter.convert(markdown_text))
    toc = getattr(converter, "toc", "")
    if toc:
        body = body.replace("</h1>", f'</h1>\n<nav class="toc"><strong>Contents</strong>{toc}</nav>', 1)
    path = out_dir / "index.html"
    atomic_write_text(path, page(title, body, html.escape(footer)))
    return path
