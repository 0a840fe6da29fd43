"""`make bench-gpu`: step latency, img/s and peak CUDA memory of every method on ViT-S/16 and
ViT-B/16 at 224, batch 32 and 64, bf16 autocast, next to the paper's Table 1 memory and Table 10
latency (measured by the authors on an RTX 3090: another card, compare ratios, not values),
followed by the issue's targets computed from the rows.

Runs on any CUDA machine with torch and timm (no faiss, no submitit, no network: random-init
weights cost the same per step); takes a few minutes on one GPU. A method may carry options
(``benchmarks.step_latency.parse_variant``), e.g. ``vptsp_g+bitfit,proxy_checkpointing=true``.
``--compile`` adds torch.compile'd rows (``--compile-methods``, at the largest batch) to see
whether it helps. A run that does not fit in memory is recorded as such and the run goes on.
Every row is appended to ``--json`` as soon as it is measured, so a run cut short keeps them.

    python benchmarks/bench_gpu.py --json gpu.json --markdown gpu.md
    python benchmarks/bench_gpu.py --compile --loader-img-s 2600   # loader rate from bench_data.py
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.catalog import BACKBONES  # noqa: E402
from benchmarks.step_latency import DEFAULT_METHODS, measure  # noqa: E402

# Paper Table 10 (ms per step, Cars, ViT-S/16, RTX 3090, batch 32 / 64) and Table 1 memory (GB,
# CUB, ViT-S/16; batch not stated, the CUB config's is 64).
PAPER_LATENCY_MS = {"full_ft": (191, 345), "linear_probe": (115, 120), "bitfit": (130, 210), "adapter": (120, 190),
                    "vpt_deep": (140, 226), "vptsp_g+bitfit": (166, 260)}
PAPER_MEMORY_GB = {"full_ft": 6.0, "linear_probe": 1.7, "bitfit": 4.4, "adapter": 1.9, "adapter+bitfit": 2.4,
                   "vpt_deep": 2.2, "vpt_deep+bitfit": 2.2, "vptsp_e": 2.5, "vptsp_e+bitfit": 2.6, "vptsp_g": 2.5,
                   "vptsp_g+bitfit": 2.6}
GPU_METHODS = DEFAULT_METHODS + ["vptsp_g+bitfit,proxy_checkpointing=true", "vptsp_g+bitfit,grad_checkpointing=true"]
COMPILE_METHODS = ["full_ft", "vpt_deep", "vptsp_g+bitfit"]
PEFT_METHODS = [m for m in DEFAULT_METHODS if m != "full_ft"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["vit_s16", "vit_b16"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--methods", nargs="+", default=GPU_METHODS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd blocks")
    parser.add_argument("--compile-methods", nargs="+", default=COMPILE_METHODS)
    parser.add_argument("--loader-img-s", type=float, default=None,
                        help="measured data-loader rate on this node (benchmarks/bench_data.py) to compare "
                             "with the GPU's step rate")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no new measurement after this long; the tables cover what was measured "
                             "(order --backbones and --batch-sizes by importance)")
    parser.add_argument("--json", default=None, help="write the raw rows here (updated after every row)")
    parser.add_argument("--markdown", default=None, help="also write the tables here")
    parser.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)  # tests: dry run on CPU
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("bench-gpu needs a CUDA device; none found (use `make bench` on CPU)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # what training on the card uses for fp32 leftovers
    rows: list[dict[str, Any]] = []
    largest_batch = max(args.batch_sizes)
    plan = [(backbone, batch, method, compiled)
            for backbone in args.backbones for batch in args.batch_sizes for method in args.methods
            for compiled in ([False, True] if args.compile and batch == largest_batch
                             and method in args.compile_methods else [False])]
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else None
    for backbone, batch, method, compiled in plan:
        if deadline is not None and time.monotonic() > deadline:
            print(f"--max-minutes reached: {len(plan) - len(rows)} of {len(plan)} measurements not run",
                  file=sys.stderr)
            break
        rows.append(measure_row(backbone, method, batch, compiled, device, args))
        print(json.dumps(rows[-1]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
    header = (f"{dt.date.today()}, {rows[0]['device'] if rows else device}, torch {torch.__version__}, "
              f"{'bf16 autocast' if device.type == 'cuda' else 'fp32 (CPU dry run)'}, median of {args.steps} steps after {args.warmup} warm-up steps")
    if args.loader_img_s:
        header += f"; data loader on this node: {args.loader_img_s:.0f} img/s"
    report = "\n\n".join([header, table(rows), targets(rows, args.loader_img_s)])
    print("\n" + report)
    if args.markdown:
        Path(args.markdown).write_text(report + "\n")
    return 0


def measure_row(backbone: str, method: str, batch: int, compiled: bool, device: torch.device,
                args: argparse.Namespace) -> dict[str, Any]:
    try:
        return measure(backbone, method, batch_size=batch, num_classes=100, embedding_size=BACKBONES[backbone].embedding_size if backbone in BACKBONES else 384,
                       device=device, amp=True, steps=args.steps, warmup=args.warmup, compile_model=compiled,
                       image_size=224 if device.type == "cuda" else None)
    except torch.cuda.OutOfMemoryError as error:
        return {"backbone": backbone, "method": method, "batch_size": batch, "compiled": compiled,
                "error": f"out of memory: {str(error).splitlines()[0]}"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _ok(rows):
    return [r for r in rows if "error" not in r]


def table(rows: list[dict[str, Any]]) -> str:
    full = {(r["backbone"], r["batch_size"], r["compiled"]): r for r in _ok(rows) if r["method"] == "full_ft"}
    lines = ["| backbone | batch | method | compiled | step ms | img/s | peak GiB | x full FT step | "
             "% of full FT mem | paper ms (3090) | paper GB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper_ms = PAPER_LATENCY_MS.get(r["method"]) if r["backbone"] == "vit_s16" else None
        paper_ms = str(paper_ms[0 if r["batch_size"] == 32 else 1]) if paper_ms and r["batch_size"] in (32, 64) else "-"
        paper_gb = PAPER_MEMORY_GB.get(r["method"]) if r["backbone"] == "vit_s16" and r["batch_size"] == 64 else None
        paper_gb = "-" if paper_gb is None else str(paper_gb)
        if "error" in r:
            lines.append(f"| {r['backbone']} | {r['batch_size']} | {r['method']} | {r['compiled']} | "
                         f"{r['error'][:60]} | | | | | {paper_ms} | {paper_gb} |")
            continue
        f = full.get((r["backbone"], r["batch_size"], r["compiled"]))
        step_ratio = f"{r['step_ms'] / f['step_ms']:.2f}" if f else "-"
        share = f"{100 * r['peak_memory_gib'] / f['peak_memory_gib']:.0f}" if f else "-"
        lines.append(f"| {r['backbone']} | {r['batch_size']} | {r['method']} | {r['compiled']} | {r['step_ms']:.1f} | "
                     f"{r['img_s']:.0f} | {r['peak_memory_gib']:.2f} | {step_ratio} | {share} | {paper_ms} | "
                     f"{paper_gb} |")
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]], loader_img_s: float | None) -> str:
    """The performance issue's GPU targets, each with how far it is, from the measured rows."""
    by = {(r["backbone"], r["batch_size"], r["method"], r["compiled"]): r for r in _ok(rows)}
    lines = ["| target | backbone | batch | measured | verdict |", "|---|---|---|---|---|"]

    def add(target, backbone, batch, measured, met):
        lines.append(f"| {target} | {backbone} | {batch} | {measured} | {'met' if met else 'missed'} |")

    for backbone, batch in sorted({(r["backbone"], r["batch_size"]) for r in _ok(rows)}):
        get = lambda method: by.get((backbone, batch, method, False))  # noqa: E731
        for sp, vpt in (("vptsp_g", "vpt_deep"), ("vptsp_g+bitfit", "vpt_deep+bitfit")):
            if get(sp) and get(vpt):
                ratio = get(sp)["step_ms"] / get(vpt)["step_ms"]
                add(f"{sp} step <= 1.2x {vpt}", backbone, batch, f"{ratio:.2f}x", ratio <= 1.2)
        full = get("full_ft")
        if full:
            slower = [m for m in PEFT_METHODS if get(m) and get(m)["step_ms"] >= full["step_ms"]]
            measured = [m for m in PEFT_METHODS if get(m)]
            add("every PEFT method faster per step than full FT", backbone, batch,
                "slower or equal: " + (", ".join(slower) if slower else "none") + f" (of {len(measured)})",
                not slower)
            for sp in ("vptsp_g", "vptsp_g+bitfit", "vptsp_g+bitfit,proxy_checkpointing=true",
                       "vptsp_g+bitfit,grad_checkpointing=true"):
                if get(sp) and backbone == "vit_s16" and batch == 64:
                    share = get(sp)["peak_memory_gib"] / full["peak_memory_gib"]
                    add(f"{sp} peak memory <= 45 % of full FT", backbone, batch, f"{100 * share:.0f} %",
                        share <= 0.45)
        for method in COMPILE_METHODS:
            plain, compiled = get(method), by.get((backbone, batch, method, True))
            if plain and compiled:
                lines.append(f"| torch.compile speed-up, {method} | {backbone} | {batch} | "
                             f"{plain['step_ms'] / compiled['step_ms']:.2f}x | (information) |")
    vit_s = [r for r in _ok(rows) if r["backbone"] == "vit_s16" and not r["compiled"]]
    if vit_s:
        fastest = max(vit_s, key=lambda r: r["img_s"])
        need = f"GPU consumes up to {fastest['img_s']:.0f} img/s ({fastest['method']}, batch {fastest['batch_size']})"
        if loader_img_s:
            add("loader img/s >= ViT-S/16 step rate", "vit_s16", "all", f"loader {loader_img_s:.0f} img/s; {need}",
                loader_img_s >= fastest["img_s"])
        else:
            lines.append(f"| loader img/s >= ViT-S/16 step rate | vit_s16 | all | {need}; loader not measured "
                         f"(pass --loader-img-s from benchmarks/bench_data.py) | open |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
