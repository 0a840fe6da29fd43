"""Training memory of each method, predicted on any machine (CPU included) by counting bytes.

For one training step of a method variant (``benchmarks.step_latency.parse_variant``):
activations = the tensors autograd saves for backward during the forward pass (measured with
``bench.measure.SavedTensorMeter`` under bf16 autocast, as training runs on a GPU), plus the
parameters, the gradients of the trained ones and AdamW's two moments. Their sum is a lower
bound of ``torch.cuda.max_memory_allocated`` (no temporary buffers of the backward pass, no
allocator rounding), and the ratios between methods are what the paper's memory target is about
(VPTSP-G <= 45 % of full fine-tuning at batch 64 on ViT-S/16). Only forward passes run, so
ViT-S/16 at batch 64 takes about a minute on two CPU cores; `make bench-gpu` measures the real
peak on a card.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.measure import SavedTensorMeter  # noqa: E402
from benchmarks.step_latency import DEFAULT_METHODS, build, example_batch  # noqa: E402

VARIANTS = ["vptsp_g+bitfit,proxy_checkpointing=true", "vptsp_g+bitfit,grad_checkpointing=true",
            "full_ft,grad_checkpointing=true"]
GIB = 2 ** 30


def predict(spec: str, backbone: str, batch_size: int, num_classes: int = 100,
            embedding_size: int = 384) -> dict[str, Any]:
    learner = build(spec, backbone, num_classes=num_classes, embedding_size=embedding_size).train()
    images, labels = example_batch(learner, batch_size, num_classes, torch.device("cpu"))
    params = list(learner.parameters())
    with SavedTensorMeter(exclude=params) as meter, torch.autocast("cpu", dtype=torch.bfloat16):
        learner.training_loss(images, labels)
    weights = sum(p.numel() * p.element_size() for p in params)
    trained = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    activations = meter.bytes
    return {"backbone": backbone, "method": spec, "batch_size": batch_size, "activations_gib": activations / GIB,
            "weights_gib": weights / GIB, "grads_and_adamw_gib": 3 * trained / GIB,
            "total_gib": (activations + weights + 3 * trained) / GIB}


def markdown(rows: list[dict[str, Any]]) -> str:
    full = {(r["backbone"], r["batch_size"]): r["total_gib"] for r in rows if r["method"] == "full_ft"}
    lines = ["| backbone | batch | method | activations GiB | weights GiB | grads + AdamW GiB | total GiB | "
             "% of full FT |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = full.get((r["backbone"], r["batch_size"]))
        share = f"{100 * r['total_gib'] / ref:.0f}" if ref else "-"
        lines.append(f"| {r['backbone']} | {r['batch_size']} | {r['method']} | {r['activations_gib']:.2f} | "
                     f"{r['weights_gib']:.3f} | {r['grads_and_adamw_gib']:.3f} | {r['total_gib']:.2f} | {share} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_s16")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS + VARIANTS)
    args = parser.parse_args(argv)
    rows = []
    for spec in args.methods:
        rows.append(predict(spec, args.backbone, args.batch_size))
        print(f"{spec}: {rows[-1]['total_gib']:.2f} GiB", file=sys.stderr, flush=True)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
