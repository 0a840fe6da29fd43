"""The one method registry, torch-free: every method's name, display, components and presets.

As Hugging Face peft registers each tuner with a torch-free config, a method here is one
``MethodSpec`` line: the components it applies (by name, from ``COMPONENTS``), the presets of
their arguments, its display name and what it is (trains or not, semantic proxies or not).
``COMPONENTS`` names each component's class (imported only when a model is built) and its
argument dataclass (``methods/configs.py``). Suites, ``run --dry-run``, ``status``, the reporter
and the catalog read this module; none of them imports torch through it.

Adding a method: its component in one file of this package (a ``Component`` subclass whose
``apply`` injects and marks what trains), its ``Args`` in ``configs.py``, and one line in
``COMPONENTS`` and ``METHODS`` below.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from methods import configs
from methods.args import ArgSpec, MethodError, coerce, specs


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    cls: str  # "module:Class" in this package, imported when a model is built
    args: type | None = None  # its arguments (methods/configs.py)
    exclusive: str | None = None  # what it sets that no other component of a method may set

    def arg_specs(self) -> list[ArgSpec]:
        return specs(self.args)

    def check(self, values: dict[str, Any]) -> dict[str, Any]:
        """Its own arguments of ``values`` coerced to their types and checked (ranges, then the
        config's ``check`` for what ranges cannot say); returns them with defaults filled in."""
        declared = {spec.name: spec for spec in self.arg_specs()}
        out = {name: spec.default for name, spec in declared.items()}
        for key, value in values.items():
            if key in declared:
                out[key] = coerce(self.name, declared[key], value)
        check = getattr(self.args, "check", None)
        if check is not None:
            check(out)
        return out


@dataclass(frozen=True)
class MethodSpec:
    name: str
    display: str
    components: tuple[str, ...]
    presets: dict[str, Any] = field(default_factory=dict)
    trains: bool = True  # False: evaluated as it is, no epochs (zero_shot)
    uses_proxies: bool = True  # the loss's proxies exist (every trained method)
    semantic_proxies: bool = False  # proxies made by the method (VPTSP)
    suffix: str | None = None  # combined with another method it is printed as a suffix: "VPT-deep (B)"


COMPONENTS: dict[str, ComponentSpec] = {spec.name: spec for spec in (
    ComponentSpec("zero_shot", "zero_shot:ZeroShot"),
    ComponentSpec("full_ft", "full_ft:FullFineTune"),
    ComponentSpec("bitfit", "bitfit:BitFit"),
    ComponentSpec("adapter", "adapter:Adapter", configs.AdapterArgs),
    ComponentSpec("lora", "lora:LoRA", configs.LoRAArgs),
    ComponentSpec("ssf", "ssf:SSF"),
    ComponentSpec("ln_tuning", "ln_tuning:LayerNormTuning"),
    ComponentSpec("fact_tt", "fact:FacT", configs.FacTArgs),
    ComponentSpec("peft", "peft_methods:PeftMethod", configs.PeftArgs),
    ComponentSpec("vpt_shallow", "prompts:ShallowPrompts", configs.ShallowPromptArgs, exclusive="prompts"),
    ComponentSpec("vpt_deep", "prompts:DeepPrompts", configs.DeepPromptArgs, exclusive="prompts"),
    ComponentSpec("gate_vpt", "gated_prompts:GatedPrompts", configs.GatedPromptArgs, exclusive="prompts"),
    ComponentSpec("semantic_proxies", "semantic_proxies:SemanticProxies", configs.SemanticProxyArgs,
                  exclusive="proxies"),
)}

# Paper order (Table 1): no training, cheapest baselines, the proposed method last.
METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("zero_shot", "Zero-shot (no training)", ("zero_shot",), trains=False, uses_proxies=False),
    MethodSpec("full_ft", "Full fine-tuning", ("full_ft",)),
    MethodSpec("linear_probe", "Linear probing", ()),
    MethodSpec("bitfit", "BitFit", ("bitfit",), suffix="B"),
    MethodSpec("adapter", "Adapter", ("adapter",)),
    MethodSpec("lora", "LoRA", ("lora",)),
    MethodSpec("ln_tuning", "LayerNorm tuning", ("ln_tuning",)),
    MethodSpec("ssf", "SSF", ("ssf",)),
    MethodSpec("fact_tt", "FacT-TT", ("fact_tt",)),
    # Hugging Face peft's methods (methods/peft_methods.py), each with its paper's defaults
    MethodSpec("peft:lora", "LoRA (peft)", ("peft",), {"peft_method": "lora", "peft_rank": 8, "peft_alpha": 16.0}),
    MethodSpec("peft:dora", "DoRA", ("peft",), {"peft_method": "dora", "peft_rank": 8, "peft_alpha": 16.0}),
    MethodSpec("peft:vera", "VeRA", ("peft",), {"peft_method": "vera", "peft_rank": 256}),
    MethodSpec("peft:loha", "LoHa", ("peft",), {"peft_method": "loha", "peft_rank": 8, "peft_alpha": 8.0}),
    MethodSpec("peft:lokr", "LoKr", ("peft",), {"peft_method": "lokr", "peft_rank": 8, "peft_alpha": 8.0}),
    MethodSpec("peft:ia3", "(IA)^3", ("peft",), {"peft_method": "ia3", "peft_targets": "qkv,fc2"}),
    MethodSpec("peft:oft", "OFT", ("peft",), {"peft_method": "oft", "peft_block_size": 32}),
    MethodSpec("peft:boft", "BOFT", ("peft",), {"peft_method": "boft", "peft_block_size": 4}),
    MethodSpec("vpt_shallow", "VPT-shallow", ("vpt_shallow",)),
    MethodSpec("vpt_deep", "VPT-deep", ("vpt_deep",)),
    MethodSpec("gate_vpt", "GateVPT", ("gate_vpt",)),
    MethodSpec("vptsp_e", "VPTSP-M (EMA)", ("vpt_deep", "semantic_proxies"), {"accumulator": "ema"},
               semantic_proxies=True),
    MethodSpec("vptsp_g", "VPTSP-G", ("vpt_deep", "semantic_proxies"), {"accumulator": "gru_relu"},
               semantic_proxies=True),
)}


def method_names() -> list[str]:
    return list(METHODS)


def method_parts(name: str) -> list[str]:
    """'vptsp_g+bitfit' -> ['vptsp_g', 'bitfit'] (no check that they exist)."""
    return [p.strip() for p in str(name).split("+") if p.strip()]


def split_name(name: str) -> list[str]:
    """The registered methods a (combined) name is made of; MethodError naming what is wrong."""
    from bench.catalog import closest

    parts = method_parts(name)
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


def components_of(name: str) -> list[tuple[ComponentSpec, dict[str, Any]]]:
    """(component, presets) in application order, each component once (vptsp_g+vpt_deep: one set
    of deep prompts); MethodError when two of them set the same thing."""
    out: list[tuple[ComponentSpec, dict[str, Any]]] = []
    for part in split_name(name):
        spec = METHODS[part]
        for component in spec.components:
            if all(c.name != component for c, _ in out):
                out.append((COMPONENTS[component], spec.presets))
    for what in {c.exclusive for c, _ in out if c.exclusive}:
        owners = [c.name for c, _ in out if c.exclusive == what]
        if len(owners) > 1:
            raise MethodError(f"method: {name} combines {owners}, which cannot be used together")
    return out


def method_arg_specs(name: str) -> list[ArgSpec]:
    """The declared arguments of a (combined) method, with the preset defaults applied."""
    merged: dict[str, ArgSpec] = {}
    for part in split_name(name):
        spec = METHODS[part]
        for component in spec.components:
            for arg in COMPONENTS[component].arg_specs():
                merged[arg.name] = arg
        for key, value in spec.presets.items():
            merged[key] = dataclasses.replace(merged[key], default=value)
    return list(merged.values())


def method_arguments(name: str) -> dict[str, Any]:
    """Every argument the (combined) method accepts, with its default."""
    return {spec.name: spec.default for spec in method_arg_specs(name)}


def resolve_arguments(name: str, args: dict[str, Any] | None = None) -> list[tuple[ComponentSpec, dict[str, Any]]]:
    """Each component of the method with its checked argument values (presets, then ``args``):
    everything about a method that can be known without torch. MethodError names the argument."""
    from bench.catalog import closest

    args = dict(args or {})
    accepted = method_arguments(name)
    unknown = [k for k in args if k not in accepted]
    if unknown:
        k = unknown[0]
        valid = ", ".join(sorted(accepted)) or "none"
        raise MethodError(f"method_args: {name} has no argument {k!r}{closest(k, accepted)}; valid: {valid}")
    return [(component, component.check({**presets, **args})) for component, presets in components_of(name)]


def validate_method(name: str, args: dict[str, Any] | None = None) -> None:
    """MethodError for an unknown name, argument or value; torch-free."""
    resolve_arguments(name, args)


# --- what the catalog and the reporter ask of a method name ------------------------------------

def method_trains(name: str) -> bool:
    """False for a method that is evaluated as it is (zero_shot)."""
    return all(METHODS[p].trains for p in method_parts(name) if p in METHODS)


def method_display(name: str, label: str | None = None) -> str:
    """The suite's label when it gave one, else a name built from the registry: a method with a
    ``suffix`` combined with others is printed as the paper prints BitFit, 'VPT-deep (B)'."""
    if label:
        return str(label)
    parts = method_parts(name)
    if not parts:
        return "?"
    suffixes = [METHODS[p].suffix for p in parts if p in METHODS and METHODS[p].suffix] if len(parts) > 1 else []
    rest = [p for p in parts if not (len(parts) > 1 and p in METHODS and METHODS[p].suffix)]
    text = " + ".join(METHODS[p].display if p in METHODS else p for p in rest)
    return text + "".join(f" ({s})" for s in suffixes)


def method_rank(name: str) -> tuple[int, int]:
    """Sort key: registry order of the main part; a suffix variant ('+bitfit') right after its base."""
    parts = method_parts(name)
    main = [p for p in parts if not (p in METHODS and METHODS[p].suffix)] or parts
    order = list(METHODS)
    rank = order.index(main[0]) if main and main[0] in METHODS else len(order)
    return rank, len(parts)


def default_argument(name: str, argument: str) -> Any:
    """The value a method's parts give ``argument`` when a suite does not (presets, then the
    component default); None when no part has it."""
    for part in method_parts(name):
        if part not in METHODS:
            continue
        if argument in METHODS[part].presets:
            return METHODS[part].presets[argument]
        for component in METHODS[part].components:
            for spec in COMPONENTS[component].arg_specs():
                if spec.name == argument:
                    return spec.default
    return None
