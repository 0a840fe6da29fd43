"""A resized copy of a dataset: every image with its shorter side shrunk to ``short_side`` px
(JPEG quality 95), the same layout and the same index files, for suites to point at.

Why: the loader's cost grows with the source's pixels (decode, crop, resize), and the
training crop of a 224 px model never needs an 800 px photo. With the default 288 px, a
RandomResizedCrop of scale >= 0.6 still reads full-resolution pixels and the evaluation
(resize to 256, centre crop 224) loses nothing; smaller crops are upsampled from fewer pixels,
which changes results slightly: a resized copy is a different dataset (give it its own data
root and say so in a paper). Images already small enough are copied as they are.

    python -m bench.data.resize cub200 /data /data-288 [--short-side 288] [--threads 8]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from bench.data.errors import DataError
from bench.data.layouts import LAYOUTS

QUALITY = 95


def resize_dataset(name: str, data_root, out_root, *, short_side: int = 288, threads: int | None = None) -> Path:
    """Write ``<out_root>/<name>/`` (the dataset folder ``data_root`` holds, resized); returns it."""
    from bench.data.datasets import dataset_root

    if short_side < 32:
        raise DataError(f"--short-side {short_side}: too small for any backbone")
    source, layout = dataset_root(name, data_root)
    target = Path(out_root) / source.name
    real_source, real_target = source.resolve(), target.resolve()
    if real_target == real_source or real_source in real_target.parents or real_target in real_source.parents:
        raise DataError(f"{target}: the copy would lie inside its source {source} (or hold it); choose an out root "
                        "outside the dataset")
    if target.exists():
        raise DataError(f"{target}: already exists; its files would mix with the new copy's. Remove it, or choose "
                        "another out root")
    images = sorted({path for split in layout.parse(source).values() for path, _ in split})
    listed = set(images)
    # written beside the target and renamed into place at the end: a copy that failed half-way
    # never looks like a dataset
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        for dirpath, _, files in os.walk(source):  # index and annotation files, unchanged
            for file in files:
                path = os.path.join(dirpath, file)
                if path not in listed and not file.lower().endswith((".jpg", ".jpeg", ".png")):
                    destination = partial / os.path.relpath(path, source)
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, destination)
        with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
            list(pool.map(lambda p: _resize(Path(p), partial / os.path.relpath(p, source), short_side), images))
        os.replace(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


def _resize(source: Path, destination: Path, short_side: int) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        _resize_image(source, destination, short_side)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{source}: cannot read image ({type(e).__name__}: {e}); replace or delete it, then "
                        "resize again (nothing was written)") from None


def _resize_image(source: Path, destination: Path, short_side: int) -> None:
    with Image.open(source) as image:
        if min(image.size) <= short_side:
            shutil.copy2(source, destination)
            return
        scale = short_side / min(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        if image.format == "JPEG":
            image.draft("RGB", size)  # DCT-domain reduction first, then the exact resize
        resized = image.convert("RGB").resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
    resized.save(destination, "JPEG", quality=QUALITY)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.data.resize", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=sorted(LAYOUTS))
    parser.add_argument("data_root")
    parser.add_argument("out_root")
    parser.add_argument("--short-side", type=int, default=288)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        target = resize_dataset(args.dataset, args.data_root, args.out_root, short_side=args.short_side,
                                threads=args.threads)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{target}: shorter sides at most {args.short_side} px; point --data-root at {Path(args.out_root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
