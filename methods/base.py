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
from methods.args import MethodError
from methods.registry import COMPONENTS


class Component:
    """One PEFT ingredient, registered by ``name`` in ``methods.registry.COMPONENTS`` (which names
    its ``Args`` in ``methods/configs.py``). Subclasses implement ``apply``, and the hooks that
    concern them: ``merge`` (fold into the backbone for export), ``training_only`` (state an
    embedding model does not need) and ``proxy_arrays`` (what the proxies artifact shows)."""

    name: ClassVar[str] = "component"
    # state_dict prefixes of the learner that only training uses (left out of exports)
    training_only: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **kwargs: Any):
        spec = COMPONENTS[self.name]
        declared = {s.name for s in spec.arg_specs()}
        for key in kwargs:
            if key not in declared:
                raise MethodError(f"method_args: {self.name} has no argument {key!r}")
        self.values = spec.check(kwargs)

    def __getattr__(self, key: str) -> Any:
        values = self.__dict__.get("values", {})
        if key in values:
            return values[key]
        raise AttributeError(key)

    def apply(self, learner: MetricLearner) -> None:
        raise NotImplementedError

    def merge(self, learner: MetricLearner) -> bool:
        """Fold what this component added into the backbone's own weights, in place, so that the
        plain architecture computes the same embeddings (and drop what it kept beside them); True
        when it did (LoRA, SSF, FacT), False when it cannot (prompts, adapters) or has nothing to fold."""
        return False

    def proxy_arrays(self, learner: MetricLearner, bias) -> dict[str, Any] | None:
        """Arrays for the proxies artifact when this component makes the loss's proxies (the
        ``proxies`` entry: what the loss compares with); None otherwise."""
        return None


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

    def apply(self, learner: MetricLearner) -> MetricLearner:
        for p in learner.model.backbone.parameters():
            p.requires_grad_(False)
        for module in (learner.model.head, learner.criterion):
            for p in module.parameters():
                p.requires_grad_(True)
        for component in self.components:
            component.apply(learner)
        learner.components = list(self.components)  # the engine calls their hooks through the learner
        return learner

    @property
    def values(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for c in self.components:
            merged.update(c.values)
        return merged

    def __repr__(self) -> str:
        return f"Method({self.name!r}, {self.values})"
