"""Reading images: one place that turns a bad file into a ``DataError`` naming it."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch.utils.data
from PIL import Image

from bench.data.errors import DataError

# What PIL raises for files that are not images or are cut short (UnidentifiedImageError and
# "image file is truncated" are OSErrors; some broken headers surface as SyntaxError or
# ValueError), and for images too large to be a photo (a 20000 x 20000 PNG: more than twice
# PIL's MAX_IMAGE_PIXELS, a decompression bomb).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# 16- and 32-bit greyscale: PIL's convert("RGB") clips them to white; scale them to 8 bits.
_WIDE_GREY = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0}


def load_image(path: str, draft: int | None = None) -> Image.Image:
    """The decoded image in RGB. ``draft``: a JPEG is decoded at the smallest of the scales
    1, 1/2, 1/4, 1/8 (PIL's draft mode: downscaling in the DCT, before the pixels exist) that
    keeps its shorter side >= ``draft`` pixels; several times cheaper for large photos."""
    try:
        with Image.open(path) as image:
            if draft and image.format == "JPEG":
                image.draft("RGB", (draft, draft))
            return to_rgb(image, path)
    except _DECODE_ERRORS as error:
        raise DataError(f"{path}: cannot read image ({type(error).__name__}: {error}); delete or replace "
                        "the file, or leave such files out with --set skip_corrupt_images=true "
                        "(in a suite: defaults: {skip_corrupt_images: true})") from error


def to_rgb(image: Image.Image, path: str) -> Image.Image:
    if image.mode in _WIDE_GREY:
        import numpy as np

        values = np.asarray(image, dtype=np.float64)
        if image.mode == "I" and values.max(initial=0) > 65535:
            raise ValueError(f"32-bit greyscale values up to {values.max():.0f}: not a 16-bit image")
        scaled = np.clip(values / _WIDE_GREY[image.mode] * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if image.mode == "F":
        raise ValueError("floating-point image mode F; convert it to 8-bit RGB first")
    return image.convert("RGB")


def is_readable_image(path: str) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
            to_rgb(image, path)
        return True
    except _DECODE_ERRORS:
        return False


def verify_images(paths, num_threads: int | None = None) -> list[str]:
    """The paths that do not decode, in input order (full decode of every image: slow)."""
    paths = list(paths)
    # Decoding releases the GIL, so threads give real parallelism without worker processes.
    num_threads = num_threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        readable = list(pool.map(is_readable_image, paths))
    return [path for path, ok in zip(paths, readable) if not ok]


class ImageDataset(torch.utils.data.Dataset):
    """``(transform(image), label)`` for each image of a ``Split``.

    Without a transform the item is the PIL image itself.
    """

    def __init__(self, split, transform=None, draft: int | None = None):
        self.split = split
        self.transform = transform
        self.draft = draft  # JPEG draft decoding to this shorter side (load_image)

    def __len__(self) -> int:
        return len(self.split.paths)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        if seed is not None:  # an augmentation seeded per image (sampler.AugmentationSeeds)
            # the CPU generator the transforms draw from; torch.manual_seed would also queue a
            # CUDA seeding with a captured stack trace (1.5 ms an image, a fifth of a demo cell)
            torch.default_generator.manual_seed(seed)
        image = load_image(self.split.paths[index], self.draft)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.split.labels[index])
