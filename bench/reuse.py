"""A trained cell, reused: the embedding model back from its folder, embeddings of any images,
and a standalone export.

    from bench import load_cell
    model = load_cell("results/table1/<cell_id>")          # backbone + method + head, eval mode
    embeddings = model(images)                              # [B, D], L2-normalised

``load_cell`` rebuilds the cell's learner exactly as training did (same seed before the build,
so random-init parts match) from ``result.json``, then puts ``trainable.safetensors`` back on
it; the backbone's pretrained weights come from the cell's ``weights`` as in training.

``export_cell`` writes one ``model.safetensors`` holding every weight of the embedding model,
LoRA merged into its linear layers (``W + (alpha / r) B A``) and BitFit's biases in place, with
prompts; ``load_exported`` rebuilds it from the file alone (the architecture is in its
metadata, no pretrained download):

    from bench import load_exported
    model = load_exported("model.safetensors")
    embeddings = model(images)   # images normalised with model.export_info["mean"] / ["std"]
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.config import CellConfig
from bench.errors import UserError
from bench.cell_files import CellFiles
from bench.results import RESULT_FILE, atomic_write_bytes, read_result
EXPORT_FORMAT = "peft-dml-bench/export-1"


def training_only(learner) -> tuple[str, ...]:
    """State an embedding model does not use: the loss's proxies and what the method's components
    say only training needs (the semantic-proxy pass: class prompts, memory)."""
    return ("criterion.", *(prefix for c in learner.components for prefix in c.training_only))


class CellLoadError(UserError):
    """A cell folder that cannot give back its model; the message names the file."""


def _cell_record(cell_dir: Path) -> dict[str, Any]:
    files = CellFiles(cell_dir)
    result_path = files.result
    if not result_path.is_file():
        raise CellLoadError(f"{cell_dir}: no {RESULT_FILE}: not a finished cell folder")
    result = read_result(result_path)
    if result.get("status") != "ok":
        raise CellLoadError(f"{result_path}: the cell did not finish (status {result.get('status')!r}: "
                            f"{result.get('reason')}); nothing to load")
    if not files.weights.is_file():
        raise CellLoadError(f"{files.weights}: missing; the cell's trained weights are needed")
    return result


def cell_config(result: dict[str, Any], data_root: str | None = None) -> CellConfig:
    config = dict(result["config"])
    if data_root is not None:
        config["data_root"] = data_root
    return CellConfig.from_dict(config, where=f"{result.get('cell_id')}/result.json config")


def load_learner(cell_dir: str | Path, device: str | torch.device = "cpu"):
    """The cell's ``MetricLearner`` (model, loss proxies, method modules) with its trained state."""
    from safetensors import safe_open

    from bench.learner import build_learner
    from bench.train import seed_everything

    cell_dir = Path(cell_dir)
    result = _cell_record(cell_dir)
    config = cell_config(result)
    num_classes = int(result["data"]["splits"]["train"]["classes"])
    path = CellFiles(cell_dir).weights
    with safe_open(str(path), framework="pt") as weights:
        metadata = weights.metadata() or {}
        state = {key: weights.get_tensor(key) for key in weights.keys()}
    if metadata.get("identity_hash") not in (None, result.get("identity_hash")):
        raise CellLoadError(f"{path}: written for cell configuration {metadata['identity_hash']}, but "
                            f"{CellFiles(cell_dir).result} is {result.get('identity_hash')}: the folder mixes two runs")
    seed_everything(config.seed)  # as train_cell: the same random-init parts
    learner = build_learner(config, num_classes)
    try:
        learner.load_trainable_state_dict(state)
    except ValueError as e:
        raise CellLoadError(f"{path}: {e}") from None
    learner.to(device).eval()
    learner.cell_result = result
    return learner


def load_cell(cell_dir: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The trained embedding model of a finished cell: backbone + method + head, in eval mode.
    ``model(images)`` gives L2-normalised embeddings; ``model.cell_result`` is its result.json."""
    learner = load_learner(cell_dir, device)
    model = learner.model
    model.cell_result = learner.cell_result
    return model.eval()


# --- embeddings ----------------------------------------------------------------------------

def image_folder_split(folder: str | Path):
    """The images of ``folder`` by the rule ``folder:NAME`` datasets use (bench.data.own): one
    folder per class, natural order, nested folders an error; a flat folder of images is one
    class (label 0). Symlinked class folders are followed, as in training."""
    from bench.data import DataError, Split
    from bench.data.own import folder_classes, image_extensions, natural_key

    folder = Path(folder)
    if not folder.is_dir():
        raise CellLoadError(f"{folder}: not a folder of images")
    extensions = image_extensions()
    flat = sorted(str(p) for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions
                  and not p.name.startswith("."))
    subfolders = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if flat and not subfolders:
        flat.sort(key=lambda p: natural_key(Path(p).name))
        return Split(flat, np.zeros(len(flat), dtype=np.int64), [folder.name])
    try:
        classes = folder_classes(folder)
    except DataError as e:
        raise CellLoadError(str(e)) from None
    if not classes:
        raise CellLoadError(f"{folder}: no images (extensions Pillow opens: {', '.join(extensions[:8])}, ...) found")
    paths = [path for _, images in classes for path in images]
    labels = np.concatenate([np.full(len(images), i, dtype=np.int64) for i, (_, images) in enumerate(classes)])
    return Split(paths, labels, [name for name, _ in classes])


def embed(cell_dir: str | Path, *, images: str | Path | None = None, split: str | None = None,
          data_root: str | None = None, device: str = "cpu", batch_size: int | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings float32 [N, D], labels int64 [N]) of a folder of images or of one split of the
    cell's dataset, with the cell's evaluation transforms, exactly as its evaluation computes them."""
    from torch.utils.data import DataLoader

    from bench import data as dml_data
    from bench.backbones import data_config
    from bench.embeddings import compute_embeddings
    from bench.train import eval_transforms, load_splits

    if (images is None) == (split is None):
        raise CellLoadError("embed: give a folder of images or --split, not both")
    learner = load_learner(cell_dir, device)
    config = cell_config(learner.cell_result, data_root)
    if split is not None:
        splits = load_splits(config)
        chosen = getattr(splits, split, None)
        if chosen is None:
            present = [n for n in ("train", "val", "test", "query", "gallery") if getattr(splits, n) is not None]
            raise CellLoadError(f"embed: {config.dataset} has no {split!r} split here; it has {', '.join(present)}")
    else:
        chosen = image_folder_split(images)
    image_cfg = data_config(learner.model.backbone, config.image_size)
    transform, draft = eval_transforms(config, image_cfg)
    loader = DataLoader(dml_data.ImageDataset(chosen, transform, draft), batch_size=batch_size or config.eval_batch_size,
                        shuffle=False, num_workers=dml_data.loader_workers(config.num_workers))
    return compute_embeddings(learner.model, loader, device, None)


# --- export --------------------------------------------------------------------------------

def export_cell(cell_dir: str | Path, out: str | Path) -> Path:
    """One safetensors file with the whole embedding model (LoRA merged, prompts included) and
    the architecture in its metadata; ``load_exported`` reads it back."""
    from safetensors.torch import save

    from bench.backbones import data_config
    from bench.learner import merged_for_export
    from bench.train import eval_interpolation

    learner = load_learner(cell_dir, "cpu")
    result = learner.cell_result
    config = cell_config(result)
    method, method_args = merged_for_export(learner, config.method, config.method_args)
    image_cfg = data_config(learner.model.backbone, config.image_size)
    # the model and the method modules it runs through (prompts live in ``extras``); not what only
    # training needs: the loss proxies and the semantic-proxy pass (class prompts, memory)
    state = {k: v.detach().contiguous().clone() for k, v in learner.state_dict().items()
             if not k.startswith(training_only(learner))}
    info = {"format": EXPORT_FORMAT, "cell_id": result["cell_id"], "suite": result["suite"],
            "backbone": getattr(learner.model.backbone, "resolved_name", config.backbone),
            "image_size": image_cfg.image_size, "mean": list(image_cfg.mean), "std": list(image_cfg.std),
            "embedding_size": config.embedding_size, "output": config.output, "trained_method": config.method,
            "method": method, "method_args": method_args, "num_classes": int(result["data"]["splits"]["train"]["classes"]),
            "init": config.init, "identity_hash": result["identity_hash"],
            # the evaluation transform the cell's numbers were computed with (``export_transform``)
            "preprocess": {"resize": round(image_cfg.image_size * 256 / 224), "center_crop": image_cfg.image_size,
                           "interpolation": eval_interpolation(config, image_cfg), "mean": list(image_cfg.mean),
                           "std": list(image_cfg.std), "jpeg_draft": config.jpeg_draft}}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, save(state, metadata={"export": json.dumps(info, sort_keys=True)}))
    return out


def export_transform(model_or_info):
    """The evaluation transform of an exported model (``load_exported(...)`` or its
    ``export_info``): resize the short side to ``round(size * 256 / 224)``, centre-crop ``size``,
    the cell's interpolation, then normalise with its mean and std. Embeddings of images prepared
    any other way differ from the ones the cell was scored with (cosine about 0.97 with a plain
    resize)."""
    from bench.data.transforms import build_transforms

    info = getattr(model_or_info, "export_info", model_or_info)
    pre = info.get("preprocess")
    if pre is None:  # an export of an older version: the default the engine used
        return build_transforms(info["image_size"], info["mean"], info["std"], train=False)
    return build_transforms(pre["center_crop"], pre["mean"], pre["std"], train=False,
                            interpolation=pre["interpolation"])


def _check_export_info(path: Path, info: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """The metadata's sizes, checked against the file's own tensors before anything is built: a
    damaged or hand-edited file must not make the loader allocate what it asks for."""
    needed = {"backbone": str, "image_size": int, "embedding_size": int, "num_classes": int, "method": str,
              "method_args": dict, "output": str, "init": str}
    for name, kind in needed.items():
        if not isinstance(info.get(name), kind) or isinstance(info.get(name), bool):
            raise CellLoadError(f"{path}: export metadata {name!r} is missing or not a {kind.__name__}")
    head = [t for k, t in state.items() if k.endswith("head.weight") or k.endswith("head.linear.weight")]
    if not 0 < info["embedding_size"] <= 65536 or (head and head[0].shape[0] != info["embedding_size"]):
        raise CellLoadError(f"{path}: embedding_size {info['embedding_size']} does not match the file's head")
    if not 0 < info["image_size"] <= 4096 or not 0 < info["num_classes"] <= 10_000_000:
        raise CellLoadError(f"{path}: image_size {info['image_size']} or num_classes {info['num_classes']} is out of "
                            "range for any model")


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The embedding model of an ``export`` file, in eval mode; ``model.export_info`` holds its
    metadata (backbone, image size, mean/std, the method it was trained with)."""
    from safetensors import safe_open

    from bench.learner import build_learner

    path = Path(path)
    if not path.is_file():
        raise CellLoadError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("export")
            state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise CellLoadError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    try:
        info = json.loads(raw) if raw else {}
    except ValueError:
        info = {}
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT:
        raise CellLoadError(f"{path}: not a peft-dml-bench export (no '{EXPORT_FORMAT}' metadata)")
    _check_export_info(path, info, state)
    try:
        config = CellConfig(backbone=info["backbone"], weights="none", image_size=info["image_size"],
                            embedding_size=info["embedding_size"], output=info["output"], method=info["method"],
                            method_args=info["method_args"], init=info["init"])
        # the training-only parts (proxies, class prompts) are not in an export: built for 2
        # classes, whatever the metadata says, so that loading never allocates per-class tables
        learner = build_learner(config, 2)
    except (UserError, KeyError, TypeError, ValueError) as e:
        raise CellLoadError(f"{path}: its metadata does not describe a model this version builds ({e})") from None
    missing, unexpected = learner.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(training_only(learner))]
    if missing or unexpected:
        raise CellLoadError(f"{path}: weights do not fit {info['backbone']} + {info['method']}: "
                            f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model = learner.model
    model.export_info = info
    return model.to(device).eval()
