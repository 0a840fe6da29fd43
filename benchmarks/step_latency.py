"""Training-step latency, throughput and peak memory of each method on one backbone.

Shared by `make bench` (CPU, small ViT) and `make bench-gpu` (ViT-S/16 and ViT-B/16 at 224).
Needs torch and timm only: no faiss, no submitit, no network (random-init weights: the cost of a
step does not depend on the weights' values).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from bench.config import CellConfig, parse_assignments
from bench.learner import build_learner
from methods.registry import method_arguments
from bench.measure import device_name, peak_memory, reset_peak_memory
from bench.model import MetricLearner
from bench.train import build_optimizers, train_step

# The paper's Table 1 / Table 10 configurations, scaled down where the backbone is shallower.
PAPER_ARGS = {"num_prompts": 10, "prompt_depth": 12, "num_class_prompts": 3, "class_prompt_depth": 12,
              "adapter_blocks": 7, "adapter_width": 256}
DEFAULT_METHODS = ["full_ft", "linear_probe", "bitfit", "adapter", "vpt_shallow", "vpt_deep", "vpt_deep+bitfit",
                   "vptsp_e", "vptsp_g", "vptsp_g+bitfit", "lora"]


def method_args_for(name: str, depth: int) -> dict[str, Any]:
    accepted = method_arguments(name)
    args = {k: v for k, v in PAPER_ARGS.items() if k in accepted}
    for key in ("prompt_depth", "class_prompt_depth", "adapter_blocks"):
        if key in args:
            args[key] = min(args[key], depth)
    return args


MODEL_OPTIONS = ("grad_checkpointing", "compile")


def parse_variant(spec: str) -> tuple[str, dict[str, Any], dict[str, bool]]:
    """``"vptsp_g+bitfit,proxy_checkpointing=true,compile=true"`` -> method, method arguments on
    top of the paper's, model options (``grad_checkpointing``, ``compile``)."""
    method, *pairs = spec.split(",")
    method_args, options = {}, {}
    for key, value in parse_assignments(pairs, f"method variant {spec!r}").items():
        if key in MODEL_OPTIONS:
            options[key] = value is True or str(value).lower() in ("1", "true", "yes")
        else:
            method_args[key] = value
    return method, method_args, options


def build(spec: str, backbone: str, *, num_classes: int, embedding_size: int,
          image_size: int | None = None) -> MetricLearner:
    """A learner as training builds it, with random weights (a step costs the same either way)."""
    method, extra_args, options = parse_variant(spec)
    torch.manual_seed(0)
    from bench.backbones import create_backbone

    base = create_backbone(backbone, weights=None, image_size=image_size)
    config = CellConfig(backbone=backbone, weights=None, image_size=image_size, embedding_size=embedding_size,
                        method=method, method_args={**method_args_for(method, len(base.blocks)), **extra_args},
                        grad_checkpointing=options.get("grad_checkpointing", False),
                        compile=options.get("compile", False))
    return build_learner(config, num_classes, backbone=base)


def example_batch(learner: MetricLearner, batch_size: int, num_classes: int, device: torch.device):
    size = learner.model.backbone.patch_embed.img_size[0]
    images = torch.randn(batch_size, 3, size, size, device=device)
    labels = torch.arange(batch_size, device=device) // 2 % num_classes  # 2 per class, like the paper
    return images, labels


def measure(backbone: str, method: str, *, batch_size: int, num_classes: int, embedding_size: int,
            device: torch.device, amp: bool, steps: int, warmup: int, compile_model: bool = False,
            image_size: int | None = None, grad_checkpointing: bool = False) -> dict[str, Any]:
    """Median step time over ``steps`` steps after ``warmup`` (compilation happens there),
    img/s and peak memory of one method variant (see ``parse_variant``)."""
    spec = method + (",compile=true" if compile_model else "") + (
        ",grad_checkpointing=true" if grad_checkpointing else "")
    learner = build(spec, backbone, num_classes=num_classes, embedding_size=embedding_size, image_size=image_size)
    learner.to(device).train()
    optimizers = build_optimizers(learner, CellConfig(optimizer="adamw", lr=1e-4, proxy_lr=1e-2))
    images, labels = example_batch(learner, batch_size, num_classes, device)
    dtype = torch.bfloat16 if amp and device.type == "cuda" else None

    def step() -> None:
        train_step(learner, images, labels, optimizers, amp_dtype=dtype)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - start
    reset_peak_memory(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    memory, kind = peak_memory(device)
    median = statistics.median(times)
    trainable = sum(p.numel() for p in learner.parameters() if p.requires_grad)
    return {"backbone": backbone, "method": method, "batch_size": batch_size, "device": device_name(device),
            "step_ms": 1000 * median, "img_s": batch_size / median, "peak_memory_gib": memory / 2 ** 30,
            "memory_kind": kind, "trainable_params": trainable,
            "compiled": parse_variant(spec)[2].get("compile", False),
            "warmup_s": warmup_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="demo_vit")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd blocks")
    args = parser.parse_args(argv)
    rows = [measure(args.backbone, m, batch_size=args.batch_size, num_classes=100, embedding_size=128,
                    device=torch.device("cpu"), amp=False, steps=args.steps, warmup=args.warmup,
                    compile_model=compiled)
            for m in args.methods for compiled in ([False, True] if args.compile else [False])]
    print(markdown(rows))
    return 0


def markdown(rows: list[dict[str, Any]]) -> str:
    base = {(r["backbone"], r["batch_size"]): r["step_ms"] for r in rows
            if r["method"] == "linear_probe" and not r["compiled"]}
    lines = ["| backbone | method | compiled | batch | step ms | x linear probe | img/s | peak mem GiB | trainable |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = base.get((r["backbone"], r["batch_size"]))
        ratio = f"{r['step_ms'] / ref:.2f}" if ref else "-"
        # on CPU the only peak is the whole process's RSS, which says nothing about one method
        memory = f"{r['peak_memory_gib']:.2f}" if r["memory_kind"] == "cuda_max_allocated" else "-"
        compiled = "yes" if r["compiled"] else "no"
        lines.append(f"| {r['backbone']} | {r['method']} | {compiled} | {r['batch_size']} | {r['step_ms']:.1f} | {ratio} | "
                     f"{r['img_s']:.0f} | {memory} | {r['trainable_params']:,} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
