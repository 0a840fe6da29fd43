"""`make bench-gpu`: step latency, img/s and peak CUDA memory of every method on ViT-S/16 and
ViT-B/16 at 224, batch 32 and 64, bf16 autocast, next to the paper's Table 1 memory and Table 10
latency (measured by the authors on an RTX 3090: another card, compare ratios, not values).

Runs on any CUDA machine with torch and timm (no faiss, no submitit, no network: random-init
weights cost the same per step). `--compile` adds torch.compile'd runs to see whether it helps.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.step_latency import DEFAULT_METHODS, measure  # noqa: E402

# Paper Table 10 (ms per step, Cars, ViT-S/16, RTX 3090) and Table 1 memory (GB, CUB, ViT-S/16).
PAPER_LATENCY_MS = {"full_ft": (191, 345), "linear_probe": (115, 120), "bitfit": (130, 210), "adapter": (120, 190),
                    "vpt_deep": (140, 226), "vptsp_g+bitfit": (166, 260)}
PAPER_MEMORY_GB = {"full_ft": 6.0, "linear_probe": 1.7, "bitfit": 4.4, "adapter": 1.9, "adapter+bitfit": 2.4,
                   "vpt_deep": 2.2, "vpt_deep+bitfit": 2.2, "vptsp_e": 2.5, "vptsp_e+bitfit": 2.6, "vptsp_g": 2.5,
                   "vptsp_g+bitfit": 2.6}
BACKBONES = {"vit_s16": 384, "vit_b16": 512}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd steps")
    parser.add_argument("--json", default=None, help="write the raw rows here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench-gpu needs a CUDA device; none found (use `make bench` on CPU)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    rows = []
    for backbone in args.backbones:
        for batch in args.batch_sizes:
            for method in args.methods:
                for compiled in ([False, True] if args.compile else [False]):
                    row = measure(backbone, method, batch_size=batch, num_classes=100,
                                  embedding_size=BACKBONES.get(backbone, 384), device=device, amp=True,
                                  steps=args.steps, warmup=args.warmup, compile_model=compiled, image_size=224)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    torch.cuda.empty_cache()
    print(f"\n{dt.date.today()} {torch.cuda.get_device_name()} torch {torch.__version__}, bf16 autocast\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def table(rows) -> str:
    full = {(r["backbone"], r["batch_size"], r["compiled"]): r for r in rows if r["method"] == "full_ft"}
    lines = ["| backbone | batch | method | compiled | step ms | img/s | peak GiB | % of full FT mem | "
             "paper ms (3090) | paper GB (B=64?) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = full.get((r["backbone"], r["batch_size"], r["compiled"]))
        share = f"{100 * r['peak_memory_gib'] / f['peak_memory_gib']:.0f}" if f else "-"
        paper_ms = PAPER_LATENCY_MS.get(r["method"]) if r["backbone"] == "vit_s16" else None
        paper_ms = str(paper_ms[0 if r["batch_size"] == 32 else 1]) if paper_ms and r["batch_size"] in (32, 64) else "-"
        paper_gb = PAPER_MEMORY_GB.get(r["method"]) if r["backbone"] == "vit_s16" and r["batch_size"] == 64 else None
        lines.append(f"| {r['backbone']} | {r['batch_size']} | {r['method']} | {r['compiled']} | {r['step_ms']:.1f} | "
                     f"{r['img_s']:.0f} | {r['peak_memory_gib']:.2f} | {share} | {paper_ms} | "
                     f"{paper_gb if paper_gb is not None else '-'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
