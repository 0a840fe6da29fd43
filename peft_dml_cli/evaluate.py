"""`run_suite.py evaluate EMB.npy LABELS.npy [--gallery-emb G --gallery-labels GL]`."""
from __future__ import annotations

import json
import sys

from rich.table import Table

from bench.metrics import display as metric_display, is_metric_key
from bench.evaluate import EvaluationError, load_array, retrieval_metrics
from peft_dml_cli.console import make_console, print_table


def cmd_evaluate(args) -> int:
    if (args.gallery_emb is None) != (args.gallery_labels is None):
        raise EvaluationError("--gallery-emb and --gallery-labels must be given together")
    embeddings = load_array(args.embeddings, "embeddings")
    labels = load_array(args.labels, "labels")
    gallery = gallery_labels = None
    if args.gallery_emb is not None:
        gallery = load_array(args.gallery_emb, "gallery embeddings")
        gallery_labels = load_array(args.gallery_labels, "gallery labels")
    try:
        metrics = retrieval_metrics(embeddings, labels, args.k, gallery_embeddings=gallery,
                                    gallery_labels=gallery_labels, backend=args.backend,
                                    normalize=not args.no_normalize)
    except EvaluationError as e:
        files = [args.embeddings, args.labels]
        if gallery is not None:
            files += [args.gallery_emb, args.gallery_labels]
        raise EvaluationError(f"{e} (files: {', '.join(files)})") from None
    if args.json:
        json.dump(metrics, sys.stdout)
        sys.stdout.write("\n")
        return 0
    mode = "queries vs gallery" if gallery is not None else "each embedding vs all others"
    console = make_console()
    console.print(f"{args.embeddings}: {mode}; R@K and MAP@R in % (--json gives fractions)", highlight=False)
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        shown = f"{100 * value:.2f}" if is_metric_key(name) else str(value)
        table.add_row(metric_display(name) if is_metric_key(name) else name, shown)
    print_table(console, table)
    return 0
