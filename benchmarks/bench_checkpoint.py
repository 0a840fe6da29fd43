#!/usr/bin/env python3
"""Checkpoint cost at SOP scale: VPTSP-G (B) on ViT-S/16 with SOP's 11,318 training classes
(class prompts 5 x 12 tokens of 384: 1.04 GiB, kept in CPU memory with their AdamW state).

Three ways, each timed on the same trained state:
- ``single-file`` (round 1's code path, reproduced here): ``torch.save`` of everything into one
  ``checkpoint.pt``; resume = ``torch.load`` and apply, keeping the loaded state referenced as
  round 1 did;
- ``tables-copy`` (the first version of ``bench.checkpoint``): the big tables in a safetensors
  file beside a small checkpoint; resume reads each table into a tensor of its own, copies it
  into the model and releases the loaded copy;
- ``tables`` (now, what ``bench.train`` does): the same files; resume reads the model's table
  straight into the model's own tensor (``load_checkpoint(..., into=...)``), so no second copy.

Each resume runs in a fresh process (its peak RSS is its own). Random weights: the cost of a
checkpoint does not depend on their values.

    python benchmarks/bench_checkpoint.py [--classes 11318] [--backbone vit_s16]
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

MODES = ("single-file", "tables-copy", "tables")
ARGS = {"num_prompts": 90, "prompt_depth": 12, "num_class_prompts": 5, "class_prompt_depth": 12,
        "class_prompt_offload": "cpu", "proxy_bias_ratio": 0.2}


@functools.lru_cache(maxsize=None)
def _blocks(backbone: str) -> int:
    """How many blocks the backbone has (it is built to count them: once per process)."""
    from bench.backbones import create_backbone

    return len(create_backbone(backbone, weights=None).blocks)


def method_args(backbone: str) -> dict:
    """``ARGS`` with both prompt depths cut to the backbone's blocks (a small test ViT has 3)."""
    depth = min(12, _blocks(backbone))
    return {**ARGS, "prompt_depth": depth, "class_prompt_depth": depth}


def build(backbone: str, classes: int):
    from bench.config import CellConfig
    from bench.learner import build_learner
    from bench.train import build_optimizers

    config = CellConfig(backbone=backbone, weights=None, embedding_size=384, method="vptsp_g+bitfit",
                        method_args=method_args(backbone), optimizer="adamw", lr=1e-4, weight_decay=1e-4)
    torch.manual_seed(0)
    learner = build_learner(config, classes)
    return learner, build_optimizers(learner, config)


def trained_state(backbone: str, classes: int, batch: int) -> dict:
    from bench.train import train_step

    learner, optimizers = build(backbone, classes)
    learner.train()
    size = int(learner.model.backbone.pretrained_cfg["input_size"][-1])
    for step in range(2):  # populate the optimisers' state (AdamW moments of every table row touched)
        images = torch.randn(batch, 3, size, size)
        labels = torch.arange(batch) + step * batch
        train_step(learner, images, labels, optimizers)
    return {"identity": "bench", "epoch": 1, "step": 0, "partial": None, "learner": learner.trainable_state_dict(),
            "optimizers": [o.state_dict() for o in optimizers], "schedulers": [], "scaler": None,
            "timer": {"step_seconds": [], "images": 0, "train_seconds": 0.0}, "history": [], "eval_seconds": 0.0,
            "rng": {}}


def save(mode: str, state: dict, folder: Path) -> tuple[float, int]:
    from bench import checkpoint
    from bench.results import atomic_write_bytes

    start = time.perf_counter()
    if mode == "single-file":
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(folder / "checkpoint.pt", buffer.getvalue())
    else:
        checkpoint.save_checkpoint(folder, state)
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in folder.glob("checkpoint*"))
    return seconds, size


def resume_child(mode: str, folder: Path, backbone: str, classes: int) -> dict:
    learner, optimizers = build(backbone, classes)
    before = current_rss()
    reset_peak_rss()  # the peak of loading, not of building the model
    start = time.perf_counter()
    if mode == "single-file":
        state = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
    else:
        from bench import checkpoint

        into = {"learner": learner.trainable_state_dict()} if mode == "tables" else None
        state = checkpoint.load_checkpoint(folder, "bench", lambda e: None, into=into)
    learner.load_trainable_state_dict(state["learner"])
    for optimizer, saved in zip(optimizers, state["optimizers"]):
        optimizer.load_state_dict(saved)
    if mode != "single-file":
        state = None  # released once applied (bench.train does this)
    seconds = time.perf_counter() - start
    peak = peak_rss()
    return {"load_s": seconds, "peak_rss_gib": peak / 2**30, "built_rss_gib": before / 2**30,
            "after_rss_gib": current_rss() / 2**30}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def current_rss() -> int:
    return _status("VmRSS")


def peak_rss() -> int:
    return _status("VmHWM")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS


def checkpoint_table_mib() -> float:
    from bench import checkpoint

    return checkpoint.TABLE_BYTES / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_s16")
    parser.add_argument("--classes", type=int, default=11_318)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--table-mib", type=float, default=checkpoint_table_mib(),
                        help="tensors of at least this size go to the tables file (bench.checkpoint.TABLE_BYTES; "
                             "smaller for a quick run with a small model)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    if args.child:
        print(json.dumps(resume_child(args.child, Path(args.folder), args.backbone, args.classes)))
        return 0
    from bench import checkpoint

    checkpoint.TABLE_BYTES = int(args.table_mib * 2**20)
    state = trained_state(args.backbone, args.classes, args.batch)
    rows = []
    with tempfile.TemporaryDirectory(dir=str(Path(__file__).resolve().parent.parent / "results")
                                     if (Path(__file__).resolve().parent.parent / "results").is_dir() else None) as tmp:
        for mode in MODES:
            folder = Path(tmp) / mode
            folder.mkdir()
            seconds, size = save(mode, state, folder)
            child = subprocess.run([sys.executable, __file__, "--child", mode, "--folder", str(folder),
                                    "--backbone", args.backbone, "--classes", str(args.classes)],
                                   capture_output=True, text=True, check=True)
            resumed = json.loads(child.stdout.strip().splitlines()[-1])
            rows.append({"mode": mode, "save_s": seconds, "size_gib": size / 2**30, **resumed})
    depth = method_args(args.backbone)["class_prompt_depth"]
    print(f"SOP-scale checkpoint: {args.backbone}, {args.classes} classes, VPTSP-G (B), class prompts "
          f"{ARGS['num_class_prompts']} x {depth} in CPU memory, AdamW; tables: tensors of >= {args.table_mib:g} MiB\n")
    print("| checkpoint | save s | size GiB | resume s | RSS before loading GiB | peak RSS while loading GiB | "
          "RSS after GiB |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        print(f"| {r['mode']} | {r['save_s']:.1f} | {r['size_gib']:.2f} | {r['load_s']:.1f} | "
              f"{r['built_rss_gib']:.2f} | {r['peak_rss_gib']:.2f} | {r['after_rss_gib']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
