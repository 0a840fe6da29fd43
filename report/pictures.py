"""What each method learned, drawn from the cells' artifacts (bench/artifacts.py writes them):
retrieval grids, attention overlays and the semantic-proxy analysis. Torch-free: numpy, PIL and
matplotlib read ``retrieval.npz``, ``attention.npz``, ``proxies.npz`` and ``test_embeddings.npy``.

One cell stands for each table row: its lowest seed. Images are read from the dataset folder the
cell recorded (``root`` in the artifact); when that folder is not reachable (results copied off
a cluster) the figure says so and draws the image indices instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from bench.cell_files import CellFiles, UnreadableFile
from report import names
from report.load import SuiteResults
from report.figure_style import STYLE, _in_table_order, row_labels

RETRIEVAL_ROWS = 8  # of the 32 fixed queries: the first 8 in every method's grid
TOP = 5
DISAGREE_ROWS = 8
MAX_ROWS = 12  # methods per figure; more and the rows are too thin to read
PICTURE_DPI = 110
PNG_COMPRESS_LEVEL = 3
THUMB = 96  # px: thumbnails are drawn at this size whatever the source
HIT, MISS = "#1a9850", "#d73027"  # green / red frames


@dataclass
class Representative:
    """The cell drawn for one table row."""
    label: str
    cell_dir: Path
    method: str


def representatives(results: SuiteResults, dataset: Any) -> list[Representative]:
    """Per table row of ``dataset``, its lowest-seed finished cell, in table order."""
    ok = results.ok
    if ok.empty:
        return []
    part = ok[ok["dataset"].astype(str) == str(dataset)]
    if part.empty:
        return []
    part = _in_table_order(part, results.grid_axes)
    part = part.assign(row_label=row_labels(part, results.grid_axes))
    chosen = []
    for label, group in part.groupby("row_label", sort=False):
        cell = group.sort_values("seed", key=lambda s: s.map(names.value_sort_key)).iloc[0]
        chosen.append(Representative(str(label), results.suite_dir / str(cell["cell_id"]), str(cell["method"])))
    return chosen[:MAX_ROWS]


def slug(text: str) -> str:
    """A file-name part of a row label, with underscores as the figure stems use them."""
    from report.table_model import slug as table_slug

    return table_slug(text).replace("-", "_")


def read_artifact(cell_dir: Path, key: str, array: bool = False):
    """A cell's artifact (``bench.cell_files``: "retrieval", "proxies", ...); None when it is
    missing or damaged: a damaged artifact draws nothing, and the cell's metrics stand."""
    files = CellFiles(cell_dir)
    try:
        return files.read_array(key) if array else files.read_arrays(key)
    except UnreadableFile:
        return None


class Thumbnails:
    """Images by relative path under a root, read once; ``missing`` counts what was not there."""

    def __init__(self, root: str):
        self.root = Path(root)
        self.reachable = self.root.is_dir()
        self.cache: dict[str, np.ndarray | None] = {}

    def get(self, relative: str) -> np.ndarray | None:
        if relative not in self.cache:
            self.cache[relative] = self._load(relative) if self.reachable else None
        return self.cache[relative]

    def _load(self, relative: str) -> np.ndarray | None:
        from PIL import Image

        try:
            with Image.open(self.root / relative) as image:
                image = image.convert("RGB")
                side = min(image.size)
                left, top = (image.width - side) // 2, (image.height - side) // 2
                image = image.crop((left, top, left + side, top + side)).resize((THUMB, THUMB), Image.BICUBIC)
                return np.asarray(image)
        except OSError:
            return None


FRAME = 5  # px of the green / red frame around a neighbour


class Board:
    """A grid of thumbnails composed into one image and drawn with a single ``imshow``: a figure
    of a hundred image axes takes seconds to lay out and save, this takes a fraction. Positions
    are pixels of the composed image (saved 1:1 at ``PICTURE_DPI``); texts are placed on them."""

    def __init__(self, rows: int, cols: int, *, left: int = 12, right: int = 12, top: int = 56,
                 bottom: int = 40, gap: int = 10, title_room: int = 0):
        self.rows, self.cols = rows, cols
        self.cell = THUMB + 2 * FRAME
        self.left, self.top, self.gap, self.title_room = left, top, gap, title_room
        self.width = left + cols * self.cell + (cols - 1) * gap + right
        self.height = top + rows * (self.cell + title_room) + (rows - 1) * gap + bottom
        self.canvas = np.full((self.height, self.width, 3), 255, dtype=np.uint8)
        self.texts: list[tuple[float, float, str, dict[str, Any]]] = []

    def origin(self, row: int, col: int) -> tuple[int, int]:
        """Top-left pixel (x, y) of a cell's frame."""
        return (self.left + col * (self.cell + self.gap),
                self.top + row * (self.cell + self.gap + self.title_room) + self.title_room)

    def put(self, row: int, col: int, image: np.ndarray | None, *, frame: str | None = None,
            index: int | None = None, title: str = "") -> None:
        x, y = self.origin(row, col)
        if frame is not None:
            self.canvas[y:y + self.cell, x:x + self.cell] = (np.array(mpl.colors.to_rgb(frame)) * 255).astype(np.uint8)
        inner = (slice(y + FRAME, y + FRAME + THUMB), slice(x + FRAME, x + FRAME + THUMB))
        if image is not None:
            self.canvas[inner] = image
        else:
            self.canvas[inner] = 238
            self.text(x + self.cell / 2, y + self.cell / 2, f"#{index}", ha="center", va="center", fontsize=8)
        if title:
            self.text(x + self.cell / 2, y - 2, title, ha="center", va="bottom", fontsize=7, fontweight="bold")

    def text(self, x: float, y: float, text: str, **style: Any) -> None:
        self.texts.append((x, y, text, style))

    def row_label(self, row: int, text: str) -> None:
        x, y = self.origin(row, 0)
        self.text(x - 8, y + self.cell / 2, text, ha="right", va="center", fontsize=8)

    def figure(self, title: str) -> Figure:
        fig = Figure(figsize=(self.width / PICTURE_DPI, self.height / PICTURE_DPI), dpi=PICTURE_DPI)
        ax = fig.add_axes((0, 0, 1, 1))
        ax.imshow(self.canvas, interpolation="nearest")
        ax.set_axis_off()
        for x, y, text, style in self.texts:
            ax.text(x, y, text, **style)
        fig.suptitle(title, fontsize=9, y=1 - 6 / self.height, va="top")
        return fig


def _unreachable_note(fig: Figure, thumbs: Thumbnails) -> None:
    if not thumbs.reachable:
        fig.text(0.5, 0.02 / fig.get_figheight(), f"images not found under {thumbs.root}: image indices drawn "
                 "instead", ha="center", va="bottom", fontsize=7, color="#a50026")


def _hit_legend(fig: Figure) -> None:
    fig.legend(handles=[Patch(facecolor="white", edgecolor=HIT, linewidth=2.5, label="same class as the query"),
                        Patch(facecolor="white", edgecolor=MISS, linewidth=2.5, label="another class")],
               loc="lower center", bbox_to_anchor=(0.5, 0.14 / fig.get_figheight()), ncols=2, fontsize=8,
               frameon=False)


# --- retrieval -----------------------------------------------------------------------------

def fig_retrieval(rep: Representative, dataset: Any) -> Figure | None:
    """The first fixed queries (rows) and their top 5 (columns), framed green or red."""
    data = read_artifact(rep.cell_dir, "retrieval")
    if data is None:
        return None
    thumbs = Thumbnails(str(data["root"]))
    rows = min(RETRIEVAL_ROWS, len(data["query_index"]))
    top = min(TOP, data["neighbour_index"].shape[1])
    hits = data["neighbour_label"][:rows, :1] == data["query_label"][:rows, None]
    board = Board(rows, top + 1, title_room=14, top=48, bottom=52)
    for r in range(rows):
        board.put(r, 0, thumbs.get(str(data["query_path"][r])), index=int(data["query_index"][r]),
                  title="query" if r == 0 else "")
        for c in range(top):
            same = data["neighbour_label"][r, c] == data["query_label"][r]
            board.put(r, c + 1, thumbs.get(str(data["neighbour_path"][r, c])), index=int(data["neighbour_index"][r, c]),
                      frame=HIT if same else MISS, title=f"{c + 1}: {data['neighbour_similarity'][r, c]:.2f}")
    with mpl.rc_context(STYLE):
        fig = board.figure(f"{rep.label} on {names.dataset_display(dataset)}: top {top} of the same {rows} queries\n"
                           f"(rank: cosine similarity; R@1 on these {rows}: {int(hits.sum())}/{rows})")
        _hit_legend(fig)
        _unreachable_note(fig, thumbs)
    return fig


def disagreement(records: dict[str, dict[str, np.ndarray]]) -> np.ndarray:
    """Positions (in the 32 fixed queries) ordered by how much the methods disagree on the top-1
    hit: p (1 - p) with p the share of methods whose first neighbour is of the query's class;
    ties keep the fixed order."""
    hits = np.stack([r["neighbour_label"][:, 0] == r["query_label"] for r in records.values()])
    share = hits.mean(axis=0)
    return np.argsort(-(share * (1 - share)), kind="stable")


def fig_disagreement(reps: list[Representative], dataset: Any) -> Figure | None:
    """The queries where methods disagree most: each method's first neighbour, side by side."""
    records = {rep.label: r for rep in reps if (r := read_artifact(rep.cell_dir, "retrieval")) is not None}
    if len(records) < 2:
        return None
    first = next(iter(records.values()))
    if any(not np.array_equal(r["query_index"], first["query_index"]) for r in records.values()):
        return None  # cells of different test splits: nothing to line up
    ranking = disagreement(records)
    hits = np.stack([r["neighbour_label"][:, 0] == r["query_label"] for r in records.values()])
    disputed = int((hits.any(axis=0) & ~hits.all(axis=0)).sum())
    order = ranking[:DISAGREE_ROWS]
    thumbs = Thumbnails(str(first["root"]))
    labels = list(records)
    board = Board(len(order), len(labels) + 1, top=84, bottom=52)
    for c, label in enumerate(["query", *labels]):
        x, _ = board.origin(0, c)
        board.text(x + board.cell / 2, board.top - 4, _wrap(label), ha="center", va="bottom", fontsize=7,
                   fontweight="bold")
    for r, q in enumerate(order):
        board.put(r, 0, thumbs.get(str(first["query_path"][q])), index=int(first["query_index"][q]))
        for c, label in enumerate(labels):
            data = records[label]
            same = data["neighbour_label"][q, 0] == data["query_label"][q]
            board.put(r, c + 1, thumbs.get(str(data["neighbour_path"][q, 0])), index=int(data["neighbour_index"][q, 0]),
                      frame=HIT if same else MISS)
    with mpl.rc_context(STYLE):
        fig = board.figure(f"Where the methods disagree on {names.dataset_display(dataset)}: each method's first "
                           f"neighbour\nfor the {len(order)} most disputed of the {len(first['query_index'])} fixed "
                           f"queries (methods differ on {disputed} of them)")
        _hit_legend(fig)
        _unreachable_note(fig, thumbs)
    return fig


def _wrap(label: str, width: int = 14) -> str:
    words, lines = label.split(), [""]
    for word in words:
        if lines[-1] and len(lines[-1]) + 1 + len(word) > width:
            lines.append(word)
        else:
            lines[-1] = f"{lines[-1]} {word}".strip()
    return "\n".join(lines)


# --- attention -----------------------------------------------------------------------------

def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    scaled = (grid - grid.min()) / max(float(grid.max() - grid.min()), 1e-12)
    return np.asarray(Image.fromarray((scaled * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)) / 255.0


def fig_attention(reps: list[Representative], dataset: Any, kind: str = "rollout") -> Figure | None:
    """The same test images (columns), one row per method: the CLS token's attention to the
    patches (``rollout`` over all blocks, or the ``last_block``), over the image."""
    records = [(rep, r) for rep in reps if (r := read_artifact(rep.cell_dir, "attention")) is not None]
    if not records:
        return None
    first = records[0][1]
    thumbs = Thumbnails(str(first["root"]))
    columns = len(first["image_index"])
    cmap = mpl.colormaps["inferno"]
    board = Board(len(records) + 1, columns, left=120, right=90, top=40, bottom=24, gap=6)
    for c in range(columns):
        board.put(0, c, thumbs.get(str(first["image_path"][c])), index=int(first["image_index"][c]))
    board.row_label(0, "image")
    for r, (rep, data) in enumerate(records, start=1):
        for c in range(columns):
            heat = cmap(_upsample(data[kind][c], THUMB))[..., :3]
            image = thumbs.get(str(data["image_path"][c]))
            if image is not None:  # the heat map over the image in grey
                grey = image.mean(axis=2, keepdims=True) / 255.0
                heat = 0.4 * grey + 0.6 * heat
            board.put(r, c, (heat * 255).astype(np.uint8))
        board.row_label(r, _wrap(rep.label))
    what = "attention rollout over all blocks" if kind == "rollout" else "last block's attention"
    with mpl.rc_context(STYLE):
        fig = board.figure(f"CLS-to-patch attention on {names.dataset_display(dataset)} ({what}; prompts left out)")
        x0, y0 = board.origin(1, columns - 1)
        left = (x0 + board.cell + 24) / board.width
        bar_axes = fig.add_axes((left, 24 / board.height, 12 / board.width,
                                 (board.height - 24 - y0) / board.height))
        bar = fig.colorbar(mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(0, 1), cmap=cmap), cax=bar_axes)
        bar.set_label("attention, scaled per image", fontsize=8)
        bar.ax.tick_params(labelsize=7)
        _unreachable_note(fig, thumbs)
    return fig


# --- semantic proxies ----------------------------------------------------------------------

def proxy_alignment(data: dict[str, np.ndarray], which: str = "proxies") -> np.ndarray:
    """cos(proxy_c, class mean_c) for every class with training images."""
    proxies = data[which].astype(np.float64)
    proxies = proxies / np.maximum(np.linalg.norm(proxies, axis=1, keepdims=True), 1e-12)
    present = data["class_count"] > 0
    return np.sum(proxies * data["class_mean"].astype(np.float64), axis=1)[present]


def fig_proxy_alignment(reps: list[Representative], dataset: Any) -> Figure | None:
    """Per method, the cosine of each class's proxy to the class-mean train embedding of the
    final model (semantic proxies: the mixed proxy, and its memory part alone)."""
    rows: list[tuple[str, np.ndarray]] = []
    for rep in reps:
        data = read_artifact(rep.cell_dir, "proxies")
        if data is None:
            continue
        rows.append((rep.label, proxy_alignment(data)))
        if "memory" in data:
            rows.append((f"{rep.label}: memory part", proxy_alignment(data, "memory")))
    if not rows:
        return None
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(8.0, 0.42 * len(rows) + 1.8), layout="constrained")
        ax = fig.subplots()
        ax.boxplot([values for _, values in rows][::-1], orientation="horizontal", widths=0.6,
                   tick_labels=[label for label, _ in rows][::-1], flierprops={"markersize": 3})
        ax.axvline(0, color="#888888", linewidth=0.8)
        ax.set_xlim(-1.05, 1.05)
        ax.set_xlabel("cos(class proxy, class-mean train embedding)")
        ax.set_title(f"Do the proxies sit on their classes?\n{names.dataset_display(dataset)}: one box per method, "
                     "one value per training class", fontsize=10)
    return fig


def pca_2d(points: np.ndarray, *extra: np.ndarray) -> tuple[np.ndarray, ...]:
    """Project ``points`` (and ``extra`` arrays) on the two leading principal axes of ``points``."""
    centre = points.mean(axis=0)
    _, _, vt = np.linalg.svd(points - centre, full_matrices=False)
    axes = vt[:2].T
    # the sign of a singular vector is arbitrary: fix it so that reruns draw the same picture
    axes *= np.where(axes[np.abs(axes).argmax(axis=0), range(axes.shape[1])] < 0, -1.0, 1.0)
    return tuple((a - centre) @ axes for a in (points, *extra))


def fig_proxy_pca(reps: list[Representative], dataset: Any) -> Figure | None:
    """Per method, the test embeddings in 2-D (PCA, coloured by class) with the training
    classes' proxies overlaid: where the learned proxies sit in the embedding space."""
    panels = []
    for rep in reps:
        data = read_artifact(rep.cell_dir, "proxies")
        embeddings = read_artifact(rep.cell_dir, "test_embeddings", array=True)
        labels = read_artifact(rep.cell_dir, "test_labels", array=True)
        if data is None or embeddings is None or labels is None or len(labels) != len(embeddings):
            continue
        embeddings = embeddings.astype(np.float64)
        proxies = data["proxies"].astype(np.float64)
        proxies /= np.maximum(np.linalg.norm(proxies, axis=1, keepdims=True), 1e-12)
        panels.append((rep.label, *pca_2d(embeddings, proxies), labels))
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(3.3 * cols, 3.2 * rows + 0.8), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        for ax, (label, points, proxy_points, labels) in zip(axes, panels):
            ax.scatter(points[:, 0], points[:, 1], c=labels % 20, cmap="tab20", s=5, alpha=0.6, linewidths=0)
            ax.scatter(proxy_points[:, 0], proxy_points[:, 1], marker="x", c="black", s=18, linewidths=1.0)
            ax.set_title(label, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"Test embeddings of {names.dataset_display(dataset)} (PCA, colour = test class) and the "
                     "training classes' proxies (black x)", fontsize=10)
    return fig


def save_picture(fig: Figure, stem: Path) -> list[Path]:
    """``stem.png`` only: these are photographs and heat maps, which a PDF would only wrap (at
    several MB each); 110 dpi keeps a 96 px thumbnail sharp. zlib level 3 instead of PIL's 6
    halves the encoding of these noisy images (the demo report: 3.7 s of PNG encoding at level
    6, report 12.1 -> 10.4-11.2 s) for files about 10 % larger."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    path = stem.with_suffix(".png")
    with mpl.rc_context(STYLE):
        fig.savefig(path, dpi=PICTURE_DPI, pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})
    return [path]


# --- all of them ---------------------------------------------------------------------------

def make_pictures(results: SuiteResults) -> dict[str, Figure]:
    """Every picture the cells' artifacts support, by file stem (grouped by dataset)."""
    figures: dict[str, Figure | None] = {}
    if results.ok.empty:
        return {}
    for dataset in sorted(results.ok["dataset"].dropna().unique(), key=names.dataset_rank):
        reps = representatives(results, dataset)
        for rep in reps:
            figures[f"retrieval_{dataset}_{slug(rep.label)}"] = fig_retrieval(rep, dataset)
        figures[f"disagreement_{dataset}"] = fig_disagreement(reps, dataset)
        figures[f"attention_{dataset}"] = fig_attention(reps, dataset, "rollout")
        figures[f"attention_last_{dataset}"] = fig_attention(reps, dataset, "last_block")
        figures[f"proxies_{dataset}"] = fig_proxy_alignment(reps, dataset)
        figures[f"proxies_pca_{dataset}"] = fig_proxy_pca(reps, dataset)
    return {name: fig for name, fig in figures.items() if fig is not None}
