"""`run_suite.py cell`: one cell from the command line, with a progress bar and its result."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rich.markup import escape
from bench.config import CellConfig, ConfigError, parse_assignments
from bench.cell_files import CellFiles
from bench.ranks import Ranks
from bench.results import check_name, make_cell_id
from peft_dml_cli.console import make_console
from peft_dml_cli.progress import ProgressView


def cmd_cell(args) -> int:
    from bench.learner import validate_cell
    from bench.runner import run_cell

    console = make_console()
    fields = parse_assignments(args.set, "--set")
    owned = {"dataset": "--dataset", "data_root": "--data-root", "backbone": "--backbone", "method": "--method",
             "seed": "--seed", "method_args": "--method-arg KEY=VALUE", "weights": "--weights", "epochs": "--epochs"}
    for name in fields:
        if name in owned:
            raise ConfigError(f"--set {name}=...: {name} is set by its own option; use {owned[name]}")
    fields.update(dataset=args.dataset, data_root=os.path.abspath(args.data_root), backbone=args.backbone,
                  method=args.method, seed=args.seed,
                  method_args=parse_assignments(args.method_arg, "--method-arg"))
    if args.weights is not None:
        fields["weights"] = args.weights
    if args.epochs is not None:
        fields["epochs"] = args.epochs
    config = CellConfig.from_dict(fields, where="cell")
    validate_cell(config)  # a typo in a name fails here, before any folder is made
    suite_dir = Path(args.out) / check_name(config.suite, "suite name")
    key = {"dataset": config.dataset, "backbone": config.backbone, "method": config.method, "seed": config.seed}
    cell_dir = suite_dir / make_cell_id(key, config.identity())
    ranks = Ranks.from_env()
    if ranks.several:  # started by torchrun: this process is one rank of the cell
        from bench.events import log_event
        from bench.launch import rank_main

        result = rank_main(config.to_dict(), str(cell_dir), key, args.fresh, progress=log_event)
        if not ranks.main:
            return 0
    elif args.ranks > 1:
        from bench.launch import run_on_ranks

        check_ranks(config, args.ranks)
        console.print(f"{cell_dir.name}: on {args.ranks} ranks (batch {config.batch_size // args.ranks} per rank)",
                      highlight=False)
        result = run_on_ranks(config, cell_dir, key=key, fresh=args.fresh, nprocs=args.ranks)
    else:
        with ProgressView(console, transient=True) as on_event:
            result = run_cell(config, cell_dir, key=key, fresh=args.fresh, progress=on_event)
    if result is None:
        console.print(f"[yellow]{cell_dir} is running in another process; nothing done[/]")
        return 1
    print_result(console, result, cell_dir)
    return 0 if result["status"] == "ok" else 1


def check_ranks(config: CellConfig, ranks: int) -> None:
    """Refuse, before any process starts, what several ranks cannot run."""
    if ranks < 1:
        raise ConfigError(f"--ranks {ranks}: give at least 1")
    if config.batch_size % ranks:
        raise ConfigError(f"--ranks {ranks}: batch_size {config.batch_size} does not split into {ranks} equal rank "
                          f"batches; use a batch_size that is a multiple of {ranks}")


def print_result(console, result: dict[str, Any], cell_dir: Path) -> None:
    if result["status"] != "ok":
        console.print(f"[red]failed[/]: {escape(str(result['reason']))}", highlight=False)
        console.print(f"result: {CellFiles(cell_dir).result}", highlight=False)
        return
    test = result["final"]["test"] or result["final"]["val"] or {}
    metrics = "  ".join(f"{k} {100 * v:.2f}" for k, v in test.items() if k.startswith(("recall@", "map@")))
    m = result["measurements"]
    console.print(f"[green]ok[/] epoch {result['final']['epoch']} ({result['final']['selection']}): {metrics}")
    step = m.get("step_latency_ms_median")
    console.print(f"trainable {m['params_trainable']:,} params ({m['params_trainable_no_head']:,} without head "
                  f"and proxies); step {step if step is not None else float('nan'):.1f} ms; "
                  f"peak memory {m['peak_memory_bytes'] / 2 ** 30:.2f} GiB ({m['memory_kind']})")
    console.print(f"result: {CellFiles(cell_dir).result}", highlight=False)


__all__ = ["cmd_cell", "print_result", "ConfigError"]
