"""Every component's arguments, torch-free (as peft keeps each tuner's config apart from its
layers): defaults, types, ranges and help texts, plus the checks that ranges cannot express.

A suite's YAML, ``run --dry-run`` and ``status`` validate method arguments from here without
importing torch; the component modules (``methods/lora.py``, ...) take their ``Args`` from here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from methods.args import MethodError, arg

ACCUMULATORS = ("gru_relu", "gru_tanh", "ema", "mean", "attention")
LOCATIONS = ("prepend", "add")
LORA_TARGETS = ("qkv", "proj")


@dataclass
class AdapterArgs:
    adapter_width: int = arg(64, "bottleneck width d", min=1)
    adapter_blocks: int = arg(12, "adapted blocks L, counted back from the last", min=1)
    adapter_scale: float = arg(1.0, "scale s of the adapter's (normalised) output", min=0.0)


@dataclass
class LoRAArgs:
    lora_rank: int = arg(8, "rank r of the update B A", min=1)
    lora_alpha: float = arg(16.0, "scale alpha: the update is (alpha / r) B A x", min=0.0)
    lora_targets: str = arg("qkv,proj", "attention projections that get an update (qkv and/or proj)")

    @staticmethod
    def check(values: dict[str, Any]) -> None:
        unknown = set(lora_targets(values["lora_targets"])) - set(LORA_TARGETS)
        if unknown:
            raise MethodError(f"method_args: lora_targets {sorted(unknown)} unknown; use qkv and/or proj")


def lora_targets(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


@dataclass
class FacTArgs:
    fact_rank: int = arg(16, "rank r of the shared factors U, V (width x r) and of each r x r core", min=1)
    fact_scale: float = arg(1.0, "scale s of the update s U Sigma V^T (the paper tunes it per dataset)", min=0.0)


@dataclass
class ShallowPromptArgs:
    num_prompts: int = arg(10, "prompt tokens inserted once, before block 1", min=1)
    prompt_location: str = arg("prepend", "prepend tokens, or add one prompt to each patch token (VPT's 'add')",
                               choices=LOCATIONS)


@dataclass
class DeepPromptArgs:
    num_prompts: int = arg(10, "prompt tokens N before each prompted block", min=0)
    prompt_depth: int = arg(12, "prompted blocks L, from the first", min=1)
    prompt_decrease: int = arg(0, "decrease step tau: block i gets N - tau * i tokens", min=0)
    prompt_location: str = arg("prepend", "prepend tokens, or add one prompt to each patch token (VPT's 'add'; "
                                          "then there are as many prompts as patches)", choices=LOCATIONS)


@dataclass
class GatedPromptArgs:
    num_prompts: int = arg(10, "prompt tokens N before each prompted block", min=1)
    prompt_depth: int = arg(12, "prompted blocks L, from the first", min=1)
    gate_init: float = arg(0.0, "initial gate logit a: every gate starts at sigmoid(a) (0: one half)")


@dataclass
class SemanticProxyArgs:
    num_class_prompts: int = arg(3, "class prompt tokens m per class before each prompted block", min=1)
    class_prompt_depth: int = arg(12, "blocks with class prompts, from the first", min=1)
    class_prompt_decrease: int = arg(0, "decrease step of the class prompts per block", min=0)
    proxy_bias_ratio: float = arg(0.5, "alpha: proxy = alpha * bias + (1 - alpha) * memory", min=0.0, max=1.0)
    accumulator: str = arg("gru_relu", "how the memory accumulates semantic vectors", choices=ACCUMULATORS)
    ema_keep: float = arg(0.8, "EMA: share of the old memory kept per update (lambda)", min=0.0, max=1.0)
    gru_dropout: float = arg(0.0, "GRU: dropout on the updated memory row", min=0.0, max=1.0)
    class_prompt_offload: str = arg("auto", "keep the class-prompt table in CPU memory (auto: above 256 MiB)",
                                    choices=("auto", "cpu", "device"))
    proxy_checkpointing: bool = arg(False, "recompute the proxy pass in backward instead of storing it")


PEFT_METHODS = ("lora", "dora", "vera", "loha", "lokr", "ia3", "oft", "boft")
PEFT_TARGETS = ("qkv", "proj", "fc1", "fc2")


@dataclass
class PeftArgs:
    peft_method: str = arg("lora", "the Hugging Face peft method applied to the backbone's linear layers",
                           choices=PEFT_METHODS)
    peft_rank: int = arg(8, "r (LoRA, DoRA, VeRA, LoHa, LoKr)", min=1)
    peft_alpha: float = arg(16.0, "alpha (LoRA, DoRA: the update is scaled by alpha / r; LoHa, LoKr)", min=0.0)
    peft_targets: str = arg("qkv,proj", "linear layers of every block that get the method (qkv, proj, fc1, fc2; "
                                        "timm's qkv is one fused layer)")
    peft_dropout: float = arg(0.0, "dropout on the method's input (LoRA, DoRA, VeRA) or module dropout "
                                   "(LoHa, LoKr, OFT)", min=0.0, max=1.0)
    peft_block_size: int = arg(32, "OFT/BOFT: the size of the orthogonal blocks", min=1)
    peft_options: str = arg("", "more fields of the peft config, as JSON (e.g. {\"d_initial\": 0.1})")

    @staticmethod
    def check(values: dict[str, Any]) -> None:
        unknown = set(peft_targets(values["peft_targets"])) - set(PEFT_TARGETS)
        if unknown or not peft_targets(values["peft_targets"]):
            raise MethodError(f"method_args: peft_targets {sorted(unknown) or 'empty'}: use some of "
                              f"{', '.join(PEFT_TARGETS)}")
        try:
            extra = json.loads(values["peft_options"] or "{}")
        except ValueError as e:
            raise MethodError(f"method_args: peft_options is not JSON ({e})") from None
        if not isinstance(extra, dict):
            raise MethodError("method_args: peft_options must be a JSON object of config fields")


def peft_targets(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]
