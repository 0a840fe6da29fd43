"""The method interface: a method is a list of components applied to a ``MetricLearner``.

A component (like a peft config + injector) declares its arguments with defaults and, in
``apply``, injects modules and marks what it trains. Before any component runs, the whole
backbone is frozen and the head and proxies are trainable, so a component only says what it
adds. Components compose: "vpt_deep+bitfit" applies both; a method name in the registry is
itself a list of components with preset arguments (vptsp_g = deep prompts + semantic proxies).
"""
from __future__ import annotations

from typing import Any, ClassVar

from bench.model import MetricLearner
from methods.args import ArgSpec, MethodError, coerce, specs


class Component:
    """One PEFT ingredient. Subclasses set ``Args`` (a dataclass of ``arg`` fields: defaults,
    types, ranges and help text) and implement ``apply``."""

    name: ClassVar[str] = "component"
    Args: ClassVar[type | None] = None
    args: ClassVar[dict[str, Any]] = {}  # name -> default, derived from Args
    # Components that set the model's prompts (or its proxy source) exclude each other.
    sets_prompts: ClassVar[bool] = False
    sets_proxies: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.args = {spec.name: spec.default for spec in specs(cls.Args)}

    @classmethod
    def arg_specs(cls) -> list[ArgSpec]:
        return specs(cls.Args)

    def __init__(self, **kwargs: Any):
        declared = {spec.name: spec for spec in self.arg_specs()}
        values = dict(self.args)
        for key, value in kwargs.items():
            if key not in declared:
                raise MethodError(f"method_args: {self.name} has no argument {key!r}")
            values[key] = coerce(self.name, declared[key], value)
        self.values = values
        self.validate()

    def __getattr__(self, key: str) -> Any:
        values = self.__dict__.get("values", {})
        if key in values:
            return values[key]
        raise AttributeError(key)

    def validate(self) -> None:
        """Raise MethodError for combinations of values that ranges cannot express."""

    def apply(self, learner: MetricLearner) -> None:
        raise NotImplementedError


class DepthError(MethodError):
    """A depth-like argument larger than the backbone: ``describe`` shrinks defaults to fit."""

    def __init__(self, argument: str, value: int, blocks: int):
        super().__init__(f"method_args: {argument}={value} but the backbone has {blocks} blocks")
        self.argument, self.blocks = argument, blocks


def require_blocks(backbone, argument: str, value: int) -> None:
    """A depth-like argument (counted in blocks) must fit the backbone."""
    if value > len(backbone.blocks):
        raise DepthError(argument, value, len(backbone.blocks))


class Method:
    """Components applied in order; what a suite cell names with e.g. ``vptsp_g+bitfit``."""

    def __init__(self, name: str, components: list[Component]):
        self.name = name
        self.components = components
        for flag in ("sets_prompts", "sets_proxies"):
            owners = [c.name for c in components if getattr(c, flag)]
            if len(owners) > 1:
                raise MethodError(f"method: {name} combines {owners}, which cannot be used together")

    def apply(self, learner: MetricLearner) -> MetricLearner:
        for p in learner.model.backbone.parameters():
            p.requires_grad_(False)
        for module in (learner.model.head, learner.criterion):
            for p in module.parameters():
                p.requires_grad_(True)
        for component in self.components:
            component.apply(learner)
        return learner

    @property
    def values(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for c in self.components:
            merged.update(c.values)
        return merged

    def __repr__(self) -> str:
        return f"Method({self.name!r}, {self.values})"
