"""Any Hugging Face ``peft`` method on the timm backbone: one component, ``peft``, that builds a
peft config from the method's arguments and injects it into the blocks' linear layers with
``peft.inject_adapter_in_model`` (peft's own layers, initialisation and forward). The registry
names each method ``peft:<name>`` with the paper's defaults as presets (``methods/registry.py``).

timm fuses q, k and v into one ``qkv`` linear layer: peft then adapts the whole fused layer (one
update for q, k and v together, of rank r), not q and v alone as "q,v only" recipes written for
separate projections do; ``peft_targets`` picks among qkv, proj, fc1 and fc2.
"""
from __future__ import annotations

import json

from torch import nn

from methods.base import Component
from methods.configs import peft_targets

LAYERS = {"qkv": r"attn\.qkv", "proj": r"attn\.proj", "fc1": r"mlp\.fc1", "fc2": r"mlp\.fc2"}


def target_pattern(names: list[str]) -> str:
    """A regular expression (peft matches it against full module names) for those layers of every block."""
    return rf"blocks\.\d+\.({'|'.join(LAYERS[n] for n in names)})"


def peft_config(values: dict):
    """The peft config of a method's checked argument values."""
    import peft

    targets = peft_targets(values["peft_targets"])
    common = {"target_modules": target_pattern(targets), **json.loads(values["peft_options"] or "{}")}
    method, rank, alpha, dropout = (values["peft_method"], values["peft_rank"], values["peft_alpha"],
                                    values["peft_dropout"])
    if method in ("lora", "dora"):
        return peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, use_dora=method == "dora", **common)
    if method == "vera":
        return peft.VeraConfig(r=rank, vera_dropout=dropout, **common)
    if method == "loha":
        return peft.LoHaConfig(r=rank, alpha=alpha, module_dropout=dropout, **common)
    if method == "lokr":
        return peft.LoKrConfig(r=rank, alpha=alpha, module_dropout=dropout, **common)
    if method == "ia3":  # (IA)^3 scales the keys/values' layer output and the MLP's hidden input (fc2)
        feedforward = [t for t in targets if t == "fc2"]
        return peft.IA3Config(feedforward_modules=target_pattern(feedforward) if feedforward else [], **common)
    if method == "oft":
        return peft.OFTConfig(r=0, oft_block_size=values["peft_block_size"], module_dropout=dropout, **common)
    if method == "boft":
        return peft.BOFTConfig(boft_block_size=values["peft_block_size"], boft_dropout=dropout, **common)
    raise ValueError(method)


def tuner_layers(module: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
            if isinstance(child, BaseTunerLayer)]


class PeftMethod(Component):
    name = "peft"

    def apply(self, learner):
        from peft import inject_adapter_in_model
        from peft.tuners.vera import VeraModel

        backbone = learner.model.backbone
        trained_before = [p for p in backbone.parameters() if p.requires_grad]
        config = peft_config(self.values)
        if self.peft_method == "vera":
            # VeRA's frozen A and B are shared by every layer and kept by its tuner, which injects in
            # place; the layers reference them, so the tuner object itself is not kept
            VeraModel(backbone, config, "default")
        else:
            inject_adapter_in_model(config, backbone)
        for p in trained_before:  # peft marks only its own parameters trainable: keep what others train
            p.requires_grad_(True)

    def merge(self, learner) -> bool:
        """peft's own merge of each adapted layer, then its base layer in its place."""
        layers = tuner_layers(learner.model.backbone)
        for parent, name, layer in layers:
            layer.merge()
            setattr(parent, name, layer.get_base_layer())
        return bool(layers)
