"""Data pipeline throughput: JPEG decode + RandomResizedCrop(224) + flip + normalise, in img/s,
through the real loader (ImageDataset + class-balanced sampler + DataLoader) per worker count."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch.utils.data import DataLoader  # noqa: E402

from bench.data import (ClassBalancedBatchSampler, ImageDataset, build_transforms, load_dataset,  # noqa: E402
                        make_synthetic_dataset)


def throughput(data_root: Path, workers: int, batches: int, batch_size: int = 64, image_size: int = 224,
               draft: float | None = None) -> float:
    splits = load_dataset("synthetic", data_root)
    transform = build_transforms(image_size, (0.5,) * 3, (0.5,) * 3, train=True)
    sampler = ClassBalancedBatchSampler(splits.train.labels, batch_size, 2, seed=0, num_batches=batches)
    dataset = ImageDataset(splits.train, transform, None if draft is None else int(draft * image_size + 0.999))
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers)
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    start = time.perf_counter()
    count = sum(len(labels) for _, labels in iterator)
    return count / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--images-per-class", type=int, default=12,
                        help="generated images per class (64 classes; the sampler needs at least 2)")
    parser.add_argument("--source-sizes", type=int, nargs="+", default=[320, 500, 800],
                        help="JPEG sides: CUB's photos are ~300-500 px, iNaturalist's ~800")
    parser.add_argument("--drafts", type=float, nargs="+", default=[0.0, 1.0],
                        help="jpeg_draft values to compare (0: full decode)")
    parser.add_argument("--resized", type=int, default=288,
                        help="also measure a copy resized to this shorter side (bench.data.resize); 0: no")
    args = parser.parse_args(argv)
    print("| source px | jpeg_draft | workers | img/s | img/s per worker |\n|---|---|---|---|---|")
    for size in args.source_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            make_synthetic_dataset(root / "synthetic", num_classes=64, images_per_class=args.images_per_class,
                                   image_size=size)
            for draft in args.drafts:
                for workers in args.workers:
                    rate = throughput(root, workers, args.batches, draft=draft or None)
                    print(f"| {size} | {draft or 'off'} | {workers} | {rate:.0f} | {rate / max(workers, 1):.0f} |",
                          flush=True)
            if args.resized and size > args.resized:
                from bench.data.resize import resize_dataset

                resize_dataset("synthetic", root, root / "resized", short_side=args.resized)
                for workers in args.workers:
                    rate = throughput(root / "resized", workers, args.batches)
                    print(f"| {size} resized to {args.resized} | off | {workers} | {rate:.0f} | "
                          f"{rate / max(workers, 1):.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
