"""The command line: run a suite, one cell, status, report, evaluate saved embeddings, describe
methods. The only layer that prints: the engine (``bench/``) returns data and reports progress
as events, which ``peft_dml_cli.progress`` renders.

Each subcommand's module is imported only when used, so ``report`` and ``status`` start
without importing torch (results are often read on a laptop). Entry points: ``peft-dml``
(the package's console script) and ``run_suite.py``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> "module:function"; the function takes the parsed arguments, returns an exit code
COMMANDS = {
    "cell": "peft_dml_cli.cell:cmd_cell",
    "run": "peft_dml_cli.suite:cmd_run",
    "status": "peft_dml_cli.suite:cmd_status",
    "report": "peft_dml_cli.report:cmd_report",
    "plan": "peft_dml_cli.report:cmd_plan",
    "evaluate": "peft_dml_cli.evaluate:cmd_evaluate",
    "describe": "peft_dml_cli.describe:cmd_describe",
    "embed": "peft_dml_cli.reuse:cmd_embed",
    "export": "peft_dml_cli.reuse:cmd_export",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "peft-dml",
        description="PEFT for deep metric learning: benchmark suites, single cells, reports.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("cell", help="run one cell (dataset x backbone x method x seed)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--backbone", required=True)
    p.add_argument("--method", default="linear_probe", help="registry name; combine with '+', e.g. vpt_deep+bitfit")
    p.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="method hyperparameter, repeatable (e.g. num_prompts=10)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other config field, repeatable (e.g. lr=1e-4)")
    p.add_argument("--weights", default=None,
                   help="'hub', 'none' (random init) or a local weights file / HF cache dir")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results", help="results root (default: results/)")
    p.add_argument("--fresh", action="store_true", help="ignore a finished result and checkpoints")
    p.add_argument("--ranks", type=int, default=1, metavar="N",
                   help="run the cell as N processes, one per GPU (gloo on the CPU): the same training problem, "
                        "the global batch split across them (torch's elastic launcher; torchrun works too)")

    p = sub.add_parser("run", help="run a suite (SLURM through submitit, or locally)")
    p.add_argument("suite", help="suite name (suites/NAME.yaml) or path to a YAML file")
    p.add_argument("--executor", choices=["slurm", "local", "debug"], default=None,
                   help="default: slurm when sbatch is on PATH, else local")
    p.add_argument("--dry-run", action="store_true", help="print the resolved grid and exit")
    p.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                   help="keep cells whose grid key matches, repeatable")
    p.add_argument("--data-root", default=None)
    p.add_argument("--max-cells", type=int, default=None, metavar="N",
                   help="run (or submit) at most N cells in all, then stop; rerun to go on")
    p.add_argument("--rerun-failed", action="store_true")
    p.add_argument("--fresh", action="store_true", help="rerun finished cells too")
    p.add_argument("--out", default="results")
    p.add_argument("--wait", action="store_true", help="with slurm: wait for the jobs to finish")
    p.add_argument("--no-report", action="store_true", help="skip the report after a local run")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field for every cell of the suite, repeatable")
    p.add_argument("--jobs", type=int, default=1, help="local executor: cells run at once (default 1)")
    p.add_argument("--ranks", type=int, default=None, metavar="N",
                   help="run each cell as N processes on one node, one per GPU (default: the suite's "
                        "resources: gpus_per_node or ranks_per_node, times nodes)")
    p.add_argument("--no-data-check", action="store_true",
                   help="do not check the data roots here first (a login node that cannot see the data)")

    p = sub.add_parser("status", help="table of a suite's cells: done, running, failed, pending")
    p.add_argument("suite")
    p.add_argument("--out", default="results")

    p = sub.add_parser("report", help="LaTeX/Markdown/CSV tables and plots from results/")
    p.add_argument("suite")
    p.add_argument("--results", default="results", help="results root")
    p.add_argument("--out", default=None, help="output folder (default: results/SUITE/report)")
    p.add_argument("--table", default=None, help="table shape (default: from the suite name)")
    p.add_argument("--oracle", action="store_true", help="add the best-test-epoch column (optimistic)")
    p.add_argument("--population", choices=["split", "classes"], default=None,
                   help="what a difference generalises to: this test split (default) or test classes drawn "
                        "like these (adds the variance of a class resample)")
    p.add_argument("--margin", type=float, default=None,
                   help="equivalence margin in points (default: the suite's report.equivalence_margin, or 1.0)")

    p = sub.add_parser("plan", help="seeds needed per comparison at 80%% power, from finished cells or a pilot")
    p.add_argument("suite")
    p.add_argument("--results", default="results", help="results root")
    p.add_argument("--difference", type=float, default=1.0, help="the difference to detect, in points (default 1.0)")
    p.add_argument("--power", type=float, default=0.8, help="the power to reach (default 0.8)")
    p.add_argument("--pairs", action="store_true",
                   help="every comparison of the default and declared families, not one line per group")

    p = sub.add_parser("evaluate", help="score saved embeddings: R@K and MAP@R")
    p.add_argument("embeddings", help=".npy of shape (N, D)")
    p.add_argument("labels", help=".npy of shape (N,)")
    p.add_argument("--gallery-emb", default=None)
    p.add_argument("--gallery-labels", default=None)
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--backend", choices=["auto", "faiss", "torch"], default="auto")
    p.add_argument("--no-normalize", action="store_true", help="embeddings are already L2-normalised")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("describe", help="trainable parameters of each method (no download)")
    p.add_argument("--backbone", default="vit_small_patch16_224.augreg_in21k")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--embedding-size", type=int, default=384)
    p.add_argument("--method", nargs="+", default=None, help="default: every registered method")
    p.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("embed", help="embeddings of images or of a split from a trained cell (for `evaluate`)")
    p.add_argument("cell_dir", help="a finished cell folder (results/SUITE/CELL_ID)")
    p.add_argument("images", nargs="?", default=None,
                   help="a folder of images (labels: their subfolders), or use --split")
    p.add_argument("--split", choices=["train", "val", "test", "query", "gallery"], default=None,
                   help="a split of the cell's own dataset instead of a folder")
    p.add_argument("--data-root", default=None, help="where the cell's dataset is here (default: as trained)")
    p.add_argument("--out", required=True, help="embeddings .npy; labels go beside it as <name>_labels.npy")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("export", help="a trained cell as one standalone model.safetensors (LoRA merged)")
    p.add_argument("cell_dir", help="a finished cell folder (results/SUITE/CELL_ID)")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, func_name = COMMANDS[args.command].split(":")
    from bench.errors import UserError

    try:
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(args) or 0)
    except UserError as e:
        if args.debug or os.environ.get("BENCH_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
