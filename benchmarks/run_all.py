"""`make bench`: the CPU benchmarks, in one go, printed as Markdown for BENCHMARKS.md.

1. training step latency of every method on a small ViT, relative to linear probing;
2. training memory of every method on ViT-S/16 at batch 64, predicted by counting the bytes
   autograd saves (``activation_memory.py``: the paper's memory target, without a GPU);
3. evaluation cost (R@K up to 1000 + MAP@R) at SOP and iNaturalist sizes vs pytorch-metric-learning;
4. data pipeline throughput per loader worker;
5. checkpoint save time, size and resume memory at SOP scale (11,318 classes of class prompts).
`--quick` shrinks each part (a smoke check, not figures to record).
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(title: str, args: list[str]) -> str:
    print(f"\n## {title}\n`python {' '.join(args)}`\n", flush=True)
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{title} failed")
    table = "\n".join(line for line in proc.stdout.splitlines() if line.startswith("|"))
    print(table, flush=True)
    return f"## {title}\n\n`python {' '.join(args)}`\n\n{table}\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "latest.md"))
    args = parser.parse_args(argv)
    cpu = subprocess.run(["sh", "-c", "lscpu | sed -n 's/^Model name: *//p'"], capture_output=True, text=True).stdout.strip()
    header = f"# make bench, {dt.date.today()}, {cpu or platform.processor()}, {len(__import__('os').sched_getaffinity(0))} cores\n"
    steps = ["--steps", "3", "--warmup", "1"] if args.quick else ["--steps", "15", "--warmup", "3"]
    parts = [header,
             run("Training step latency (CPU, demo_vit, batch 32)", ["-m", "benchmarks.step_latency", *steps]),
             run("Training memory, predicted (ViT-S/16 at 224, bf16)",
                 ["benchmarks/activation_memory.py",
                  *(["--batch-size", "8", "--methods", "full_ft", "vpt_deep", "vptsp_g+bitfit"] if args.quick else [])]),
             run("Evaluation cost", ["benchmarks/bench_eval.py", "--tools", "ours-auto", "pml",
                                     *(["--quick"] if args.quick else []),
                                     "--out", str(Path(args.out).with_suffix(".eval.md"))]),
             run("Data pipeline (decode + augment to 224)",
                 ["benchmarks/bench_data.py", *(["--batches", "3"] if args.quick else [])]),
             run("Checkpoints at SOP scale (VPTSP-G (B), ViT-S/16)",
                 ["benchmarks/bench_checkpoint.py", *(["--classes", "500"] if args.quick else [])])]
    Path(args.out).write_text("\n".join(parts))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
