"""`embed CELL_DIR IMAGES_DIR|--split S --out emb.npy` and `export CELL_DIR --out model.safetensors`."""
from __future__ import annotations

import shlex
from pathlib import Path

from bench.artifacts import npy_bytes
from bench.errors import UserError
from bench.cell_files import CellFiles
from bench.results import atomic_write_bytes
from peft_dml_cli.console import make_console


def check_out(out: Path, option: str = "--out") -> Path:
    """Refuse an output inside a cell folder (any folder holding a result.json, up the tree):
    writing there could overwrite the cell's result or weights, which no rerun brings back."""
    resolved = out.expanduser().resolve()
    for folder in [resolved.parent, *resolved.parent.parents]:
        if CellFiles(folder).result.is_file():
            raise UserError(f"{option} {out}: inside the cell folder {folder}, whose files (result.json, "
                            "trainable.safetensors, ...) it could overwrite; write it elsewhere")
    return out


def labels_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}_labels.npy")


def cmd_embed(args) -> int:
    from bench.reuse import embed

    check_out(Path(args.out))
    check_out(labels_path(Path(args.out)))
    embeddings, labels = embed(args.cell_dir, images=args.images, split=args.split, data_root=args.data_root,
                               device=args.device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, npy_bytes(embeddings))
    atomic_write_bytes(labels_path(out), npy_bytes(labels))
    console = make_console()
    source = f"split {args.split}" if args.split else args.images
    console.print(f"{out}: {embeddings.shape[0]} embeddings of dimension {embeddings.shape[1]} ({source}); "
                  f"labels in {labels_path(out)}", highlight=False)
    console.print("score them: run_suite.py evaluate " + " ".join(shlex.quote(str(p)) for p in (out, labels_path(out))),
                  highlight=False)
    return 0


def cmd_export(args) -> int:
    from bench.reuse import export_cell

    check_out(Path(args.out))
    out = export_cell(args.cell_dir, args.out)
    console = make_console()
    console.print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB, the whole embedding model", highlight=False)
    console.print(f"load it: from bench import load_exported; model = load_exported({str(out)!r})", highlight=False)
    return 0
