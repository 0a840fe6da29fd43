"""Synthetic metric-learning data with structure that transfers between disjoint classes.

Every class is one combination of structural factors taken from a *family* (``family_seed``):

- shape outline: 8 smooth star-like profiles, each filled or hollow (16 values);
- layout: how many shapes (1-4), where they sit and how big they are (12 values);
- stripe orientation inside the shapes (5 values between 0 and 90 degrees, so that a horizontal
  flip, a standard training augmentation, never turns one class's stripes into another's);
- stripe frequency (3 values).

Everything else is drawn per image: background and stripe colours, brightness and contrast,
background gradient and pixel noise, position, spread and size of the layout, a small rotation,
the stripe phase, and a few clutter dots. Mean colour therefore says almost nothing about the
class, while a network that has learnt to see outlines, counts and stripes does well.

The *far* variant (``variant="far"``) turns this around: a class is a pair of colours (the hue
of the shapes' stripes and the hue of the background, 12 hues, 132 ordered pairs), and every
factor above is drawn per image from the same family. A backbone pretrained on the near
classes has learnt to ignore colour and to see outlines, counts and stripes: on far classes its
features are weak until it is trained (the demo's shifted target domain; README, "The demo").

Classes ``class_offset .. class_offset + num_classes - 1`` pick which combinations are used, so
two datasets of one family with disjoint class ranges share a visual vocabulary but no class:
pretraining on one helps metric learning on the other. ``seed`` only changes the per-image
draws. Output is fully determined by the arguments.

CLI: ``python -m bench.data.synthetic ROOT --classes N --per-class M --size S``.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench.data.errors import DataError

GENERATOR_VERSION = 1
NUM_PROFILES = 8  # each filled and hollow: 16 shape values
NUM_LAYOUTS = 12
ORIENTATIONS_DEG = (0.0, 22.5, 45.0, 67.5, 90.0)
FREQUENCIES = (3.0, 5.0, 8.0)  # stripe cycles per image width
FAR_HUES = 12  # far classes: (stripe hue, background hue) pairs of different hues
VARIANTS = ("near", "far")
JPEG_QUALITY = 90
_FAMILY_TAG = 0x5EED  # keeps family draws apart from per-image draws of equal integers


@dataclass(frozen=True)
class Profile:
    """Radius as a function of angle: 1 + sum_k a_k cos(k * theta + phi_k), scaled to max 1."""

    harmonics: np.ndarray
    amplitudes: np.ndarray
    phases: np.ndarray
    scale: float

    def __call__(self, theta: np.ndarray) -> np.ndarray:
        waves = np.cos(self.harmonics[:, None, None] * theta[None] + self.phases[:, None, None])
        return (1.0 + np.tensordot(self.amplitudes, waves, axes=1)) * self.scale


@dataclass(frozen=True)
class ShapeLayout:
    centres: np.ndarray  # (n, 2) in image units, image spans [-0.5, 0.5]
    radius: float


@dataclass(frozen=True)
class Family:
    profiles: list[Profile]
    layouts: list[ShapeLayout]
    combinations: np.ndarray  # (num_combinations, 4): shape, layout, orientation, frequency
    seed: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.combinations)


@functools.lru_cache(maxsize=8)
def far_classes(family_seed: int) -> np.ndarray:
    """(132, 2): the far variant's classes, (stripe hue, background hue), shuffled."""
    pairs = np.array([(f, b) for f in range(FAR_HUES) for b in range(FAR_HUES) if f != b])
    rng = np.random.default_rng([_FAMILY_TAG, family_seed, 1])
    return pairs[rng.permutation(len(pairs))]


def render_far_image(family: Family, class_id: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """One image of far class ``class_id``: its two hues; outline, layout, stripes drawn per image."""
    import colorsys

    stripe_hue, background_hue = far_classes_for(family)[class_id]
    coords = (np.arange(size) + 0.5) / size - 0.5
    x, y = np.meshgrid(coords, coords)
    shape = int(rng.integers(2 * NUM_PROFILES))
    layout = family.layouts[int(rng.integers(NUM_LAYOUTS))]
    coverage = _layout_coverage(family, shape, layout, rng, x, y, size)
    stripes = _stripes(float(rng.uniform(0, 90)), float(rng.choice(FREQUENCIES)), rng, x, y)

    def colour(hue_index: int, value: float) -> np.ndarray:
        hue = (hue_index + rng.normal(0, 0.08)) / FAR_HUES % 1.0
        return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 0.95), value))

    dark, light = colour(stripe_hue, rng.uniform(0.3, 0.5)), colour(stripe_hue, rng.uniform(0.8, 1.0))
    if rng.random() < 0.5:
        dark, light = light, dark
    foreground = dark * (1 - stripes[..., None]) + light * stripes[..., None]
    gradient = rng.normal(0, 0.15, size=2)
    background = colour(background_hue, rng.uniform(0.5, 0.9)) + (x * gradient[0] + y * gradient[1])[..., None]
    image = background * (1 - coverage[..., None]) + foreground * coverage[..., None]
    image = _add_clutter(image, rng, x, y, size)
    image = image * rng.uniform(0.9, 1.1) + rng.uniform(-0.05, 0.05)
    image = image + rng.normal(0, 0.035, size=image.shape)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def far_classes_for(family: Family) -> np.ndarray:
    return far_classes(family.seed)


@functools.lru_cache(maxsize=8)
def make_family(family_seed: int) -> Family:
    rng = np.random.default_rng([_FAMILY_TAG, family_seed])
    profiles = [_random_profile(rng) for _ in range(NUM_PROFILES)]
    layouts = [_random_layout(rng, count=1 + i % 4) for i in range(NUM_LAYOUTS)]
    grids = np.meshgrid(
        np.arange(2 * NUM_PROFILES), np.arange(NUM_LAYOUTS),
        np.arange(len(ORIENTATIONS_DEG)), np.arange(len(FREQUENCIES)), indexing="ij",
    )
    combinations = np.stack([g.ravel() for g in grids], axis=1)
    # Shuffled so that a run of consecutive class ids covers the factor values evenly.
    return Family(profiles, layouts, combinations[rng.permutation(len(combinations))], family_seed)


def _random_profile(rng: np.random.Generator) -> Profile:
    harmonics = rng.choice(np.arange(2, 7), size=rng.integers(1, 3), replace=False)
    amplitudes = rng.uniform(0.12, 0.3, size=len(harmonics))
    phases = rng.uniform(0, 2 * np.pi, size=len(harmonics))
    theta = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    peak = (1 + amplitudes @ np.cos(np.outer(harmonics, theta) + phases[:, None])).max()
    return Profile(harmonics.astype(float), amplitudes, phases, scale=1.0 / peak)


def _random_layout(rng: np.random.Generator, count: int) -> ShapeLayout:
    if count == 1:
        # Single shapes differ by size and a small off-centre placement.
        return ShapeLayout(rng.uniform(-0.1, 0.1, size=(1, 2)), radius=rng.uniform(0.18, 0.3))
    radius = {2: 0.15, 3: 0.125, 4: 0.11}[count] * rng.uniform(0.9, 1.1)
    while True:  # rejection sampling: shapes of one layout should not overlap
        centres = rng.uniform(-0.3, 0.3, size=(count, 2))
        gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
        if gaps[np.triu_indices(count, 1)].min() > 2.1 * radius:
            return ShapeLayout(centres, radius)


def render_image(family: Family, class_id: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """One (size, size, 3) uint8 image of class ``class_id`` with fresh nuisance draws."""
    shape, layout_index, orientation, frequency = family.combinations[class_id]
    coords = (np.arange(size) + 0.5) / size - 0.5
    x, y = np.meshgrid(coords, coords)

    coverage = _layout_coverage(family, shape, family.layouts[layout_index], rng, x, y, size)
    stripes = _stripes(ORIENTATIONS_DEG[orientation], FREQUENCIES[frequency], rng, x, y)
    dark, light = _contrasting_colours(rng)
    foreground = dark * (1 - stripes[..., None]) + light * stripes[..., None]

    image = _background(rng, x, y) * (1 - coverage[..., None]) + foreground * coverage[..., None]
    image = _add_clutter(image, rng, x, y, size)
    image = image * rng.uniform(0.75, 1.15) + rng.uniform(-0.1, 0.1)
    image = image + rng.normal(0, 0.035, size=image.shape)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def _layout_coverage(family, shape, layout, rng, x, y, size) -> np.ndarray:
    profile = family.profiles[shape // 2]
    hollow = shape % 2 == 1
    shift = rng.uniform(-0.07, 0.07, size=2)
    spread = rng.uniform(0.85, 1.15)
    radius = layout.radius * rng.uniform(0.85, 1.15)
    rotation = rng.normal(0, 0.2)
    coverage = np.zeros_like(x)
    for centre in layout.centres:
        cx, cy = centre * spread + shift + rng.normal(0, 0.015, size=2)
        dx, dy = x - cx, y - cy
        r = np.hypot(dx, dy)
        outline = radius * rng.uniform(0.93, 1.07) * profile(np.arctan2(dy, dx) - rotation)
        # One-pixel soft edges keep outlines recognisable at 32-48 px.
        shape_mask = np.clip((outline - r) * size + 0.5, 0, 1)
        if hollow:
            shape_mask *= np.clip((r - 0.55 * outline) * size + 0.5, 0, 1)
        coverage = np.maximum(coverage, shape_mask)
    return coverage


def _stripes(orientation_deg, frequency, rng, x, y) -> np.ndarray:
    angle = np.deg2rad(orientation_deg) + rng.normal(0, 0.05)
    cycles = frequency * rng.uniform(0.93, 1.07)
    along = x * np.cos(angle) + y * np.sin(angle)
    wave = np.sin(2 * np.pi * cycles * along + rng.uniform(0, 2 * np.pi))
    return 0.5 + 0.5 * np.tanh(2.5 * wave) / np.tanh(2.5)


def _contrasting_colours(rng) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours whose brightness differs enough for the stripes to show."""
    dark_level = rng.uniform(0.0, 0.55)
    light_level = rng.uniform(dark_level + 0.3, 1.0)
    dark = np.clip(dark_level + rng.normal(0, 0.15, size=3), 0, 1)
    light = np.clip(light_level + rng.normal(0, 0.15, size=3), 0, 1)
    return (dark, light) if rng.random() < 0.5 else (light, dark)


def _background(rng, x, y) -> np.ndarray:
    colour = rng.uniform(0, 1, size=3)
    gradient = rng.normal(0, 0.25, size=2)
    return colour + (x * gradient[0] + y * gradient[1])[..., None]


def _add_clutter(image, rng, x, y, size) -> np.ndarray:
    for _ in range(rng.integers(0, 4)):
        cx, cy = rng.uniform(-0.45, 0.45, size=2)
        dot = np.clip((rng.uniform(0.025, 0.05) - np.hypot(x - cx, y - cy)) * size + 0.5, 0, 1)
        image = image * (1 - dot[..., None]) + rng.uniform(0, 1, size=3) * dot[..., None]
    return image


def make_synthetic_dataset(
    root,
    *,
    num_classes: int,
    images_per_class: int,
    image_size: int = 48,
    seed: int = 0,
    class_offset: int = 0,
    family_seed: int = 0,
    variant: str = "near",
) -> Path:
    """Write ``root/images/NNN.class_XXXX/*.jpg`` and ``root/README.txt``; return ``root``.

    ``README.txt`` is written last and records the arguments: a folder that already holds a
    complete dataset with the same arguments is reused as it is, one with other arguments is
    an error rather than being mixed with new classes.
    """
    root = Path(root)
    family = make_family(family_seed)
    if variant not in VARIANTS:
        raise DataError(f"synthetic dataset: variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    _check_arguments(num_classes, images_per_class, image_size, class_offset,
                     len(far_classes(family_seed)) if variant == "far" else family.num_classes)
    readme = _readme(num_classes, images_per_class, image_size, seed, class_offset, family_seed, variant)
    if _already_written(root, readme):
        return root

    jobs = [(root, index, num_classes, images_per_class, image_size, seed, class_offset, family_seed, variant)
            for index in range(num_classes)]
    # Every image has its own seed, so classes can be drawn in any order, in parallel, with
    # the same bytes: 16,000 demo source images took 27 s in one process on 2 cores. Threads
    # were slower still (the drawing holds the GIL). Spawned processes re-import __main__,
    # which a script piped to python does not have: then one process draws them all.
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    spawnable = main_file is None or Path(main_file).is_file()
    workers = min(len(os.sched_getaffinity(0)), 4) if spawnable and len(jobs) * images_per_class >= 2000 else 1
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_write_class, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    else:
        for job in jobs:
            _write_class(job)
    (root / "README.txt").write_text(readme)
    return root


def _write_class(job) -> None:
    root, index, num_classes, images_per_class, image_size, seed, class_offset, family_seed, variant = job
    render = render_far_image if variant == "far" else render_image
    family = make_family(family_seed)  # cached per process
    index_width = max(3, len(str(num_classes)))
    id_width = max(4, len(str(class_offset + num_classes - 1)))
    class_id = class_offset + index
    folder = root / "images" / f"{index + 1:0{index_width}d}.class_{class_id:0{id_width}d}"
    folder.mkdir(parents=True, exist_ok=True)
    for image_index in range(images_per_class):
        # the far variant's draws are kept apart from the near variant's of equal integers
        rng = np.random.default_rng([seed, family_seed, class_id, image_index] + ([2] if variant == "far" else []))
        pixels = render(family, class_id, rng, image_size)
        path = folder / f"{class_id:0{id_width}d}_{image_index:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=JPEG_QUALITY)


def _check_arguments(num_classes, images_per_class, image_size, class_offset, available: int) -> None:
    if num_classes < 1 or images_per_class < 1:
        raise DataError(f"synthetic dataset: num_classes ({num_classes}) and images_per_class "
                        f"({images_per_class}) must be at least 1")
    if image_size < 16:
        raise DataError(f"synthetic dataset: image_size {image_size} is too small to draw shapes; "
                        "use at least 16")
    if class_offset < 0 or class_offset + num_classes > available:
        raise DataError(f"synthetic dataset: classes {class_offset}..{class_offset + num_classes - 1} "
                        f"requested, but this variant of a family has {available} classes (ids 0.."
                        f"{available - 1})")


def _readme(num_classes, images_per_class, image_size, seed, class_offset, family_seed, variant="near") -> str:
    far = ("variant: far (a class is a pair of hues: stripes and background; outline, layout and\n"
           "stripes are drawn per image)\n\n") if variant == "far" else ""
    return far + (
        "Synthetic metric-learning dataset written by bench.data.synthetic "
        "(python -m bench.data.synthetic --help).\n\n"
        f"generator_version: {GENERATOR_VERSION}\n"
        f"num_classes: {num_classes}\nimages_per_class: {images_per_class}\n"
        f"image_size: {image_size}\nseed: {seed}\nclass_offset: {class_offset}\n"
        f"family_seed: {family_seed}\n\n"
        "Each class is one combination of structural factors of the family chosen by family_seed:\n"
        "shape outline (8 profiles, filled or hollow), layout (1-4 shapes, placement, size),\n"
        "stripe orientation (5) and stripe frequency (3). Colours, brightness, position, scale,\n"
        "rotation, stripe phase, background gradient, noise and clutter dots are drawn per image,\n"
        "so the class cannot be read from mean colour. Class ids class_offset.. pick the\n"
        "combinations; seed only changes the per-image draws.\n\n"
        "Layout as cub200: images/NNN.class_XXXX/*.jpg. load_dataset('synthetic', ...) trains on\n"
        "the first half of the class folders (sorted) and tests on the second half.\n"
    )


def _already_written(root: Path, readme: str) -> bool:
    readme_path = root / "README.txt"
    if readme_path.is_file():
        if readme_path.read_text() == readme:
            return True
        raise DataError(f"{readme_path}: a synthetic dataset with other arguments is already "
                        "there; choose an empty folder or delete this one")
    images = root / "images"
    if images.is_dir() and any(images.iterdir()):
        raise DataError(f"{images}: folder is not empty and has no README.txt of a finished "
                        "synthetic dataset; choose an empty folder or delete this one")
    return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.data.synthetic",
                                     description="Write a synthetic dataset in the cub200 layout.")
    parser.add_argument("root", help="output folder (gets images/ and README.txt)")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--size", type=int, default=48, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="per-image nuisance draws")
    parser.add_argument("--class-offset", type=int, default=0, help="first class id of the family")
    parser.add_argument("--family-seed", type=int, default=0, help="the shared visual vocabulary")
    parser.add_argument("--variant", choices=VARIANTS, default="near",
                        help="near: classes by outline, layout and stripes; far: classes by colour")
    args = parser.parse_args(argv)
    try:
        root = make_synthetic_dataset(
            args.root, num_classes=args.classes, images_per_class=args.per_class,
            image_size=args.size, seed=args.seed, class_offset=args.class_offset,
            family_seed=args.family_seed, variant=args.variant,
        )
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{root}: {args.classes} classes x {args.per_class} images of {args.size} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
