"""Building what trains: backbone + head + loss, then the method on top. The one place where the
engine reaches into ``methods/`` (tests check this), used by training, ``describe``, the
benchmarks and the tests.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from bench.backbones import create_backbone
from bench.config import CellConfig
from bench.losses import ProxyAnchorLoss
from bench.measure import parameter_counts
from bench.model import EmbeddingModel, MetricLearner


def validate_cell(config: CellConfig) -> None:
    """Everything about a cell that can be checked without data or weights: the method, its
    arguments and their values, and that timm knows the backbone (and its tag)."""
    from bench.backbones import resolve_name
    from bench.catalog import check_image_size
    from methods.registry import validate_method

    validate_method(config.method, config.method_args)
    resolve_name(config.backbone)
    check_image_size(config.backbone, config.image_size)


def build_learner(config: CellConfig, num_classes: int, backbone: nn.Module | None = None) -> MetricLearner:
    """The learner a cell trains. ``backbone``: an already built one to use instead of loading
    ``config.backbone`` with ``config.weights`` (``describe`` builds one and copies it)."""
    from methods import build_method
    from methods.init import init_head_, init_loss_proxies_

    method = build_method(config.method, config.method_args)  # bad names fail before loading weights
    if backbone is None:
        backbone = create_backbone(config.backbone, config.weights, config.image_size)
    model = EmbeddingModel(backbone, config.embedding_size)
    model.grad_checkpointing = config.grad_checkpointing
    model.output = config.output
    criterion = ProxyAnchorLoss(num_classes, config.embedding_size, config.loss_alpha, config.loss_delta,
                                config.loss_positive_average)
    init_head_(model.head, config.init)
    init_loss_proxies_(criterion.proxies, config.init)
    learner = method.apply(MetricLearner(model, criterion, init=config.init))
    if config.compile:  # after the method: adapters and LoRA change what the blocks contain
        model.compile_blocks()
    return learner


def count_parameters(backbone: str, num_classes: int, embedding_size: int, methods: list[str],
                     method_args: dict[str, Any]) -> list[dict[str, Any]]:
    """What each method trains, counted on a random-init backbone (counting needs the
    architecture only, never the weights, so nothing downloads)."""
    from methods.registry import method_arg_specs, method_arguments

    base = create_backbone(backbone, weights=None)  # built once: timm's init dominates the run time
    rows = []
    for name in methods:
        accepted = method_arguments(name)
        args = {k: v for k, v in method_args.items() if k in accepted}
        from methods.base import DepthError

        while True:  # a default depth deeper than a small backbone shrinks to fit it (said in the row)
            torch.manual_seed(0)
            config = CellConfig(backbone=backbone, weights=None, embedding_size=embedding_size, method=name,
                                method_args=args)
            try:
                learner = build_learner(config, num_classes, backbone=copy.deepcopy(base))
                break
            except DepthError as e:
                if e.argument in method_args:  # the user's own value: their error to see
                    raise
                args = {**args, e.argument: e.blocks}
        counts = parameter_counts(learner)
        values = {spec.name: args.get(spec.name, spec.default) for spec in method_arg_specs(name)}
        changed = {k: v for k, v in values.items() if v != accepted.get(k)}
        backbone_params = counts["params_backbone"]
        rows.append({"method": name, "args": values, "changed_args": changed, **counts,
                     "percent_trainable": 100.0 * counts["params_trainable"] / backbone_params,
                     "percent_trainable_no_head": 100.0 * counts["params_trainable_no_head"] / backbone_params})
    return rows


def merged_for_export(learner: MetricLearner, method: str, method_args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Fold what can be folded into the backbone in place (LoRA: ``W + (alpha / r) B A``; BitFit's
    biases already are the model's), and return the method whose structure the folded model
    still has, with the arguments it accepts: what ``bench.reuse.load_exported`` rebuilds."""
    from methods.registry import METHODS, split_name
    from methods.registry import method_arguments as arguments

    merged = {c.name for c in learner.components if c.merge(learner)}
    parts = [p for p in split_name(method) if not (METHODS[p].components and set(METHODS[p].components) <= merged)]
    name = "+".join(parts) or "linear_probe"  # all merged: the plain backbone and its head
    accepted = arguments(name)
    return name, {k: v for k, v in method_args.items() if k in accepted}
