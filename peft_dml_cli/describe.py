"""`run_suite.py describe`: what each method trains, counted on a random-init backbone."""
from __future__ import annotations

import json

from rich.table import Table

from bench.config import ConfigError, parse_assignments
from peft_dml_cli.console import make_console, print_table


def cmd_describe(args) -> int:
    from bench.learner import count_parameters
    from methods.registry import method_arg_specs, method_arguments, method_names

    for option, value in (("--num-classes", args.num_classes), ("--embedding-size", args.embedding_size)):
        if value < 1:
            raise ConfigError(f"{option} must be a positive integer, got {value}")
    names = args.method or method_names()
    for name in names:
        method_arguments(name)  # unknown names fail before any model is built
    rows = count_parameters(args.backbone, args.num_classes, args.embedding_size, names,
                            parse_assignments(args.method_arg, "--method-arg"))
    if args.json:
        for row in rows:
            row["arguments"] = [spec.describe() for spec in method_arg_specs(row["method"])]
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"Trainable parameters: {args.backbone}, {args.num_classes} classes, "
                        f"embedding {args.embedding_size} (backbone {rows[0]['params_backbone']:,} params)")
    for column in ("method", "trainable", "shared", "% of backbone", "per class", "without head+proxies",
                   "non-default arguments"):
        table.add_column(column, justify="left" if column in ("method", "non-default arguments") else "right")
    for r in rows:
        table.add_row(r["method"], f"{r['params_trainable']:,}", f"{r['params_shared']:,}",
                      f"{100 * r['params_shared'] / r['params_backbone']:.2f}", f"{r['params_per_class']:,}",
                      f"{r['params_trainable_no_head']:,}", ", ".join(f"{k}={v}" for k, v in r["changed_args"].items()))
    console = make_console()
    print_table(console, table)
    console.print("trainable = shared + per class. Per class: the proxies and class prompts, one set per "
                  "training class (they grow with the dataset); shared: everything else, whose % of the backbone "
                  "is the paper's PEFT figure. Every method also trains the head (LayerNorm + Linear) and the "
                  "proxies; `--json` lists every argument with its type, default, range and help.", highlight=False)
    return 0
