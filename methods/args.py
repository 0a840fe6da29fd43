"""Typed method arguments: one declaration per component gives defaults, types, ranges, help text
and the error messages (as peft's config dataclasses do).

A component declares its arguments as a dataclass whose fields are made with ``arg``::

    @dataclass
    class PromptArgs:
        num_prompts: int = arg(10, "prompt tokens before each prompted block", min=0)

``parse_args(component_name, ArgsClass, values)`` coerces command-line and YAML values to the
declared types and checks the ranges, naming the argument in every error.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from bench.errors import UserError

_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


class MethodError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class ArgSpec:
    name: str
    type: type
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None

    def describe(self) -> dict[str, Any]:
        out = {"name": self.name, "type": self.type.__name__, "default": self.default, "help": self.help}
        for key in ("min", "max", "choices"):
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if key == "choices" else value
        return out

    def range_text(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        if self.min is not None and self.max is not None:
            return f"in [{self.min:g}, {self.max:g}]"
        if self.min is not None:
            return f">= {self.min:g}"
        if self.max is not None:
            return f"<= {self.max:g}"
        return "any value"


def arg(default: Any, help: str, *, min: float | None = None, max: float | None = None,
        choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field carrying the argument's help text and valid range."""
    return dataclasses.field(default=default, metadata={"help": help, "min": min, "max": max,
                                                        "choices": choices})


def specs(args_class: type | None) -> list[ArgSpec]:
    if args_class is None:
        return []
    out = []
    for f in dataclasses.fields(args_class):
        kind = _TYPES[f.type] if isinstance(f.type, str) else f.type
        out.append(ArgSpec(f.name, kind, f.default, f.metadata.get("help", ""), f.metadata.get("min"),
                           f.metadata.get("max"), f.metadata.get("choices")))
    return out


def coerce(component: str, spec: ArgSpec, value: Any) -> Any:
    """YAML and ``--method-arg`` values to the declared type, then the range check."""
    kind = spec.type
    converted: Any = _MISSING
    if kind is bool:
        if isinstance(value, bool):
            converted = value
        elif isinstance(value, str) and value.lower() in ("true", "false"):
            converted = value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            converted = value
        elif isinstance(value, float) and value.is_integer():
            converted = int(value)
        elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
            converted = int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            converted = float(value)
        elif isinstance(value, str):
            try:
                converted = float(value)
            except ValueError:
                pass
    elif kind is str and isinstance(value, str):
        converted = value
    if converted is _MISSING:
        raise MethodError(f"method_args: {component}.{spec.name} must be {kind.__name__}, got {value!r}")
    check_range(component, spec, converted)
    return converted


def check_range(component: str, spec: ArgSpec, value: Any) -> None:
    where = f"method_args: {component}.{spec.name}"
    if spec.choices is not None and value not in spec.choices:
        raise MethodError(f"{where} must be {spec.range_text()}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise MethodError(f"{where} must be a finite number, got {value!r}")
    if spec.min is not None and value < spec.min:
        raise MethodError(f"{where} must be {spec.range_text()}, got {value!r}")
    if spec.max is not None and value > spec.max:
        raise MethodError(f"{where} must be {spec.range_text()}, got {value!r}")


_MISSING = object()
