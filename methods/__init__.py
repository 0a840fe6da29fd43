"""PEFT methods, found by name: the registry that suites, the CLI and the tests enumerate.

``methods.registry`` is the registry itself (torch-free); this package's top level is torch-free
too, so that reading it (a suite check, ``status``, the reporter) never imports torch. Building a
method imports its components' modules. Names combine with '+' ("vptsp_g+bitfit"); arguments are
one flat mapping shared by the components.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from methods.args import MethodError
from methods.registry import (COMPONENTS, METHODS, method_arg_specs, method_arguments, method_names,
                              resolve_arguments, split_name, validate_method)

if TYPE_CHECKING:
    from methods.base import Component, Method


def component_class(name: str) -> type["Component"]:
    """A component's class, imported from its module now (the first torch import of a build)."""
    module, cls = COMPONENTS[name].cls.split(":")
    return getattr(importlib.import_module(f"methods.{module}"), cls)


def build_method(name: str, args: dict[str, Any] | None = None) -> "Method":
    """The method's components with their checked arguments, ready to ``apply`` to a learner."""
    from methods.base import Method

    resolved = resolve_arguments(name, args)
    return Method(name, [component_class(spec.name)(**values) for spec, values in resolved])


__all__ = ["COMPONENTS", "METHODS", "MethodError", "build_method", "component_class", "method_arg_specs",
           "method_arguments", "method_names", "split_name", "validate_method"]
