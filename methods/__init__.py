"""PEFT methods, found by name: the registry that suites, the CLI and the tests enumerate.

A method is a list of components with preset arguments. Adding one: write its component in a
file of this package, then add one line to ``METHODS``. Names combine with '+'
("vptsp_g+bitfit"); arguments are one flat mapping shared by the components.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from bench.catalog import closest
from methods.adapter import Adapter
from methods.args import ArgSpec, MethodError
from methods.base import Component, Method
from methods.bitfit import BitFit
from methods.full_ft import FullFineTune
from methods.lora import LoRA
from methods.prompts import DeepPrompts, ShallowPrompts
from methods.semantic_proxies import SemanticProxies
from methods.zero_shot import ZeroShot

# name -> (components, preset arguments)
METHODS: dict[str, tuple[tuple[type[Component], ...], dict[str, Any]]] = {
    "zero_shot": ((ZeroShot,), {}),
    "full_ft": ((FullFineTune,), {}),
    "linear_probe": ((), {}),
    "bitfit": ((BitFit,), {}),
    "adapter": ((Adapter,), {}),
    "vpt_shallow": ((ShallowPrompts,), {}),
    "vpt_deep": ((DeepPrompts,), {}),
    "vptsp_e": ((DeepPrompts, SemanticProxies), {"accumulator": "ema"}),
    "vptsp_g": ((DeepPrompts, SemanticProxies), {"accumulator": "gru_relu"}),
    "lora": ((LoRA,), {}),
}


def method_names() -> list[str]:
    return list(METHODS)


def split_name(name: str) -> list[str]:
    parts = [p.strip() for p in str(name).split("+") if p.strip()]
    if not parts:
        raise MethodError("method: empty method name")
    for part in parts:
        if part not in METHODS:
            raise MethodError(f"method: unknown method {part!r}{closest(part, METHODS)}; "
                              f"registered: {', '.join(METHODS)}")
    if len(set(parts)) != len(parts):
        raise MethodError(f"method: {name!r} names a method twice")
    if "zero_shot" in parts and len(parts) > 1:
        raise MethodError(f"method: {name!r}: zero_shot trains nothing, so it combines with nothing")
    return parts


def method_arguments(name: str) -> dict[str, Any]:
    """Every argument the (combined) method accepts, with its default."""
    merged: dict[str, Any] = {}
    for part in split_name(name):
        components, presets = METHODS[part]
        for component in components:
            merged.update(component.args)
        merged.update(presets)
    return merged


def method_arg_specs(name: str) -> list[ArgSpec]:
    """The declared arguments of a (combined) method, with the preset defaults applied."""
    merged: dict[str, ArgSpec] = {}
    for part in split_name(name):
        components, presets = METHODS[part]
        for component in components:
            for spec in component.arg_specs():
                merged[spec.name] = spec
        for key, value in presets.items():
            merged[key] = dataclasses.replace(merged[key], default=value)
    return list(merged.values())


def build_method(name: str, args: dict[str, Any] | None = None) -> Method:
    args = dict(args or {})
    accepted = method_arguments(name)
    unknown = [k for k in args if k not in accepted]
    if unknown:
        k = unknown[0]
        valid = ", ".join(sorted(accepted)) or "none"
        raise MethodError(f"method_args: {name} has no argument {k!r}{closest(k, accepted)}; valid: {valid}")
    components: list[Component] = []
    for part in split_name(name):
        classes, presets = METHODS[part]
        for cls in classes:
            if any(type(c) is cls for c in components):
                continue  # e.g. vptsp_g+vpt_deep: one set of deep prompts
            values = {**presets, **args}
            components.append(cls(**{k: v for k, v in values.items() if k in cls.args}))
    return Method(name, components)


def validate_method(name: str, args: dict[str, Any] | None = None) -> None:
    """Raise MethodError for an unknown name or argument; builds nothing heavy."""
    build_method(name, args)


__all__ = ["METHODS", "Method", "MethodError", "build_method", "method_arg_specs", "method_arguments", "method_names",
           "validate_method"]
