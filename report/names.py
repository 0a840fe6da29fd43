"""Display names and orderings: registry names in result files -> what a paper table prints."""
from __future__ import annotations

import difflib
import re
from typing import Any, Iterable

import pandas as pd

from bench import catalog, metrics
from methods import registry

# Names other sessions might reasonably use for the same method.
METHOD_ALIASES = {"full_finetune": "full_ft", "full": "full_ft", "linear": "linear_probe", "vpt": "vpt_deep"}

# The recall triple each dataset reports in the paper's Table 2 / Table 3.
RECALL_KS = {name: info.paper_ks for name, info in catalog.DATASETS.items()}

# Accumulators of the paper's Table 7 that the suite does not implement keep their printed names.
ACCUMULATOR_NAMES = {**catalog.ACCUMULATORS, "lstm": "LSTM", "rnn": "Vanilla RNN",
                     "cross_attention": "Cross-attention (within batch)"}
ACCUMULATOR_ALIASES = {"gru": "gru_tanh", "vanilla_rnn": "rnn", "cross_attn": "cross_attention",
                       "crossattention": "cross_attention"}

# Grid axes the report knows, with the names a suite might give them (suffix-matched, so a
# flattened "method_args.num_prompts" is found too) and an axis label with its meaning.
AXES = {
    "proxy_bias_ratio": (("proxy_bias_ratio", "alpha", "bias_ratio"), "proxy-bias ratio α"),
    "num_prompts": (("num_prompts", "prompts"), "prompts per layer N"),
    "prompt_depth": (("prompt_depth", "depth"), "layers with prompts L"),
    "accumulator": (("accumulator", "proxy_accumulator", "rnn_type"), "accumulator"),
    "num_p_prompt": (("num_p_prompt", "num_class_prompts"), "class prompts per class m"),
    "p_prompt_depth": (("p_prompt_depth", "class_prompt_depth"), "layers with class prompts"),
    "batch_size": (("batch_size",), "batch size"),
    "train_fraction": (("train_fraction",), "share of each class's training images"),
    "train_classes_fraction": (("train_classes_fraction",), "share of the training classes"),
    "prompt_location": (("prompt_location",), "prompt location"),
    "output": (("output",), "embedding read from (output)"),
    "lr": (("lr",), "learning rate"),
    "embedding_size": (("embedding_size",), "embedding dimension"),
}

MEMORY_KINDS = {
    "counted_training": "training memory counted: parameters, gradients, optimiser state and saved activations",
    "cuda_max_allocated": "peak CUDA memory allocated",
    "cpu_peak_rss": "peak CPU RSS of the process",
}


def closest(name: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for a mistyped name, or ''."""
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def is_missing(value: Any) -> bool:
    """None, NaN, pandas' NA or an empty string (how an absent axis reaches a frame)."""
    if isinstance(value, str):
        return value == ""
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def method_components(method: Any) -> tuple[str, ...]:
    if is_missing(method):
        return ()
    parts = [p.strip().lower() for p in str(method).split("+") if p.strip()]
    return tuple(METHOD_ALIASES.get(p, p) for p in parts)


def canonical_method(method: Any) -> frozenset[str]:
    """The set of components a method combines, for matching against the paper's rows.

    BitFit is a component of its own: ``vptsp_g`` is the paper's "VPTSP-G (GRU)" and
    ``vptsp_g+bitfit`` its "VPTSP-G (B)" (methods/__init__.py).
    """
    return frozenset(method_components(method))


def default_accumulator(method: Any) -> str | None:
    """The accumulator a method uses when its arguments do not name one (the registry's presets)."""
    for part in method_components(method):
        value = registry.default_argument(part, "accumulator")
        if value is not None:
            return value
    return None


def method_display(method: Any, label: Any = None) -> str:
    """``key.label`` when the suite gave one, else a name built from the registry name."""
    if not is_missing(label):
        return str(label)
    parts = method_components(method)
    return registry.method_display("+".join(parts)) if parts else "?"


def method_rank(method: Any) -> tuple[int, int]:
    """Sort key: catalog order of the main component; a '+bitfit' variant right after its base."""
    return registry.method_rank("+".join(method_components(method)))


def backbone_family(backbone: Any) -> str | None:
    """The catalog alias of a backbone ('vit_s16' for vit_small_patch16_224.augreg_in21k): what
    the paper's rows are keyed by; a backbone outside the catalog is its own family."""
    if is_missing(backbone):
        return None
    info = catalog.backbone_by_name(str(backbone))
    return info.alias if info else str(backbone)


def backbone_rank(backbone: Any) -> tuple[int, int, str]:
    return catalog.backbone_rank(str(backbone))


def backbone_display(backbone: Any) -> str:
    return "?" if is_missing(backbone) else catalog.backbone_display(str(backbone))


def family_display(family: str) -> str:
    """'vit_s16' -> 'ViT-S/16'."""
    return catalog.backbone_display(family)


def dataset_display(dataset: Any) -> str:
    if is_missing(dataset):
        return "?"
    info = catalog.DATASETS.get(str(dataset))
    if info is None and catalog.own_dataset(str(dataset)):
        return catalog.own_dataset(str(dataset))[1]  # your own: the name you gave it
    return info.display if info else str(dataset)


def dataset_rank(dataset: Any) -> tuple[int, str]:
    order = list(catalog.DATASETS)
    d = str(dataset)
    return (order.index(d) if d in order else len(order), d)


def metric_display(metric: str) -> str:
    """'recall@4' -> 'R@4', 'map@r' -> 'MAP@R'."""
    try:
        return metrics.display(metric)
    except metrics.MetricError:
        return metric


def recall_k(metric: str) -> int | None:
    m = re.fullmatch(r"recall@(\d+)", metric)
    return int(m.group(1)) if m else None


def canonical_accumulator(value: Any) -> str:
    v = re.sub(r"[\s\-+]+", "_", str(value).strip().lower())
    return ACCUMULATOR_ALIASES.get(v, v)


def accumulator_display(value: Any) -> str:
    return ACCUMULATOR_NAMES.get(canonical_accumulator(value), str(value))


def find_axis(columns: Iterable[str], axis: str) -> str | None:
    """The column holding a known axis: exact name first, then a flattened 'x.name' suffix."""
    columns = list(columns)
    aliases = AXES[axis][0] if axis in AXES else (axis,)
    for alias in aliases:
        if alias in columns:
            return alias
    for alias in aliases:
        for col in columns:
            if col.endswith("." + alias):
                return col
    return None


def axis_canonical(column: str) -> str:
    """Inverse of find_axis: 'method_args.alpha' -> 'proxy_bias_ratio' (or the name itself)."""
    leaf = column.rsplit(".", 1)[-1]
    for axis, (aliases, _) in AXES.items():
        if leaf in aliases:
            return axis
    return column


def axis_display(column: str) -> str:
    axis = axis_canonical(column)
    return AXES[axis][1] if axis in AXES else column


def value_display(column: str, value: Any) -> str:
    if is_missing(value):
        return "-"
    if axis_canonical(column) == "accumulator":
        return accumulator_display(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def value_sort_key(value: Any) -> tuple[int, float, str]:
    """Numbers in numeric order before strings; missing last."""
    if is_missing(value):
        return (2, 0.0, "")
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))
