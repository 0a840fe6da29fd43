"""`run_suite.py describe`: what each method trains, counted on a random-init backbone.

Counting needs the architecture only, never the weights, so nothing is downloaded.
"""
from __future__ import annotations

import copy
import json
from typing import Any

import torch

from bench.backbones import create_backbone
from bench.losses import ProxyAnchorLoss
from bench.measure import parameter_counts
from bench.model import EmbeddingModel, MetricLearner
from methods import build_method, method_arguments, method_names


def describe(backbone: str, num_classes: int, embedding_size: int, methods: list[str],
             method_args: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    base = create_backbone(backbone, weights=None)  # built once: timm's init dominates the run time
    for name in methods:
        accepted = method_arguments(name)
        args = {k: v for k, v in method_args.items() if k in accepted}
        torch.manual_seed(0)
        learner = MetricLearner(EmbeddingModel(copy.deepcopy(base), embedding_size),
                                ProxyAnchorLoss(num_classes, embedding_size))
        method = build_method(name, args)
        method.apply(learner)
        counts = parameter_counts(learner)
        changed = {k: v for k, v in method.values.items() if v != _defaults(name).get(k)}
        rows.append({"method": name, "args": method.values, "changed_args": changed, **counts,
                     "percent_trainable": 100.0 * counts["params_trainable"] / counts["params_backbone"],
                     "percent_trainable_no_head": 100.0 * counts["params_trainable_no_head"] / counts["params_backbone"]})
    return rows


def _defaults(name: str) -> dict[str, Any]:
    return method_arguments(name)


def cmd_describe(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from bench.runner import parse_assignments

    names = args.method or method_names()
    for name in names:
        method_arguments(name)  # unknown names fail before any model is built
    rows = describe(args.backbone, args.num_classes, args.embedding_size, names,
                    parse_assignments(args.method_arg, "--method-arg"))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"Trainable parameters: {args.backbone}, {args.num_classes} classes, "
                        f"embedding {args.embedding_size} (backbone {rows[0]['params_backbone']:,} params)")
    for column in ("method", "trainable", "% of backbone", "without head+proxies", "% of backbone", "non-default arguments"):
        table.add_column(column, justify="left" if column in ("method", "non-default arguments") else "right")
    for r in rows:
        table.add_row(r["method"], f"{r['params_trainable']:,}", f"{r['percent_trainable']:.2f}",
                      f"{r['params_trainable_no_head']:,}", f"{r['percent_trainable_no_head']:.2f}",
                      ", ".join(f"{k}={v}" for k, v in r["changed_args"].items()))
    Console().print(table)
    print("Every method also trains the head (LayerNorm + Linear) and the proxies; `--json` lists all arguments.")
    return 0
