"""The configuration of one cell: everything that decides what a run computes.

A ``CellConfig`` is flat and JSON-serialisable; suites resolve into them and ``result.json``
stores them. Fields that only decide *where* or *how fast* a run goes (``data_root``,
``num_workers``, ``device``) are left out of the cell id hash so that moving data or changing
the machine does not invalidate finished results.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bench.catalog import DATASET_NAMES as DATASETS
from bench.catalog import closest, method_trains
from bench.errors import UserError

OPTIMIZERS = ("sgd", "adamw")
SELECTIONS = ("last", "val", "auto")
POSITIVE_AVERAGING = ("positive", "all")
# "vpt": VPT's Xavier-uniform prompts, torch's default heads, Kaiming proxies (this suite's
# own). "reference": the distributions of the paper's released code (methods/init.py).
INITS = ("vpt", "reference")

# Fields that do not change what is computed: excluded from the cell hash.
RUNTIME_FIELDS = ("data_root", "num_workers", "device", "eval_batch_size", "suite", "label", "torch_threads",
                  "compile")


# Fields added after the first release: hashed only when set to something else than the default.
HASH_NEUTRAL_AT_DEFAULT: tuple[str, ...] = ("init",)


class ConfigError(UserError, ValueError):
    """A configuration value that cannot be used; the message names the field."""


@dataclass
class CellConfig:
    dataset: str = "synthetic"
    data_root: str = "data"
    backbone: str = "vit_small_patch16_224.augreg_in21k"
    # None / "none": random init; "hub": timm / Hugging Face hub (or its cache when
    # HF_HUB_OFFLINE=1); anything else: a local weights file or a HF cache directory.
    weights: str | None = "hub"
    embedding_size: int = 384
    image_size: int | None = None  # None: the backbone's pretrained input size
    method: str = "linear_probe"  # registry name, components joined by '+', e.g. "vpt_deep+bitfit"
    method_args: dict[str, Any] = field(default_factory=dict)
    label: str | None = None  # display name in tables, e.g. "VPT (B)"
    seed: int = 0

    epochs: int = 15
    batch_size: int = 64
    samples_per_class: int = 2
    max_steps_per_epoch: int | None = None  # cap for tests and the demo; None = full epoch
    optimizer: str = "sgd"
    lr: float = 5e-3
    proxy_lr: float = 0.1
    weight_decay: float = 1e-6
    momentum: float = 0.9
    lr_cosine_period: int | None = None  # cosine T_max in epochs; None = epochs
    lr_min: float = 1e-8
    grad_clip: float | None = None
    amp: bool = True  # bf16/fp16 autocast on CUDA only; CPU always runs fp32
    grad_checkpointing: bool = False
    # torch.compile each transformer block (regional compilation): same results up to float
    # rounding, so it is a runtime choice; whether it pays off depends on the card (BENCHMARKS.md).
    compile: bool = False

    loss_alpha: float = 32.0
    loss_delta: float = 0.1
    loss_positive_average: str = "positive"  # "all" = the reference implementation's quirk
    init: str = "vpt"  # initial values of prompts, heads and proxies: "vpt" or "reference" (INITS)

    val_fraction: float = 0.0  # class-disjoint validation classes carved from train
    selection: str = "auto"  # "last" epoch, or "val" (best validation R@1); auto = val if val_fraction
    eval_every: int = 1
    skip_corrupt_images: bool = False

    num_workers: int = 4
    # CPU threads for torch in this cell; None = torch's default (one per core). On a busy
    # small machine 1 can be several times faster: two threads wait for each other.
    torch_threads: int | None = None
    eval_batch_size: int = 256
    device: str = "auto"
    suite: str = "adhoc"

    def __post_init__(self) -> None:
        if not method_trains(str(self.method)):
            self.epochs = 0  # zero_shot: evaluated as it is, so the cell id never depends on epochs
        self.validate()

    def validate(self) -> None:
        def fail(name: str, msg: str) -> None:
            raise ConfigError(f"{name}: {msg}")

        if self.dataset not in DATASETS:
            fail("dataset", f"unknown dataset {self.dataset!r}{closest(self.dataset, DATASETS)}; "
                            f"choose one of {', '.join(DATASETS)}")
        if self.optimizer not in OPTIMIZERS:
            fail("optimizer", f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.selection not in SELECTIONS:
            fail("selection", f"must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.loss_positive_average not in POSITIVE_AVERAGING:
            fail("loss_positive_average", f"must be one of {', '.join(POSITIVE_AVERAGING)}")
        if self.init not in INITS:
            fail("init", f"must be one of {', '.join(INITS)}, got {self.init!r}")
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 0 or (
                self.epochs == 0 and method_trains(str(self.method))):
            fail("epochs", f"must be a positive integer, got {self.epochs!r}")
        for name in ("batch_size", "samples_per_class", "embedding_size", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, f"must be a positive integer, got {value!r}")
        if self.batch_size % self.samples_per_class:
            fail("batch_size", f"{self.batch_size} is not divisible by samples_per_class={self.samples_per_class}")
        if self.batch_size // self.samples_per_class < 2:
            fail("batch_size", "a batch needs at least two classes (batch_size / samples_per_class >= 2)")
        if not 0.0 <= float(self.val_fraction) < 1.0:
            fail("val_fraction", f"must be in [0, 1), got {self.val_fraction!r}")
        if self.selection == "val" and not self.val_fraction:
            fail("selection", "'val' needs a validation split: set val_fraction > 0")
        for name in ("lr", "proxy_lr"):
            if not float(getattr(self, name)) > 0:
                fail(name, f"must be > 0, got {getattr(self, name)!r}")
        if not isinstance(self.method_args, dict):
            fail("method_args", f"must be a mapping, got {type(self.method_args).__name__}")

    @property
    def selection_rule(self) -> str:
        if self.selection == "auto":
            return "val" if self.val_fraction else "last"
        return self.selection

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The part of the config that decides the result (hashed into the cell id).

        Fields added after the first release enter it only when they differ from their
        default, so that a new field never renames the cells finished before it existed."""
        defaults = {f.name: _default(f) for f in dataclasses.fields(self)}
        return {k: v for k, v in self.to_dict().items()
                if k not in RUNTIME_FIELDS and not (k in HASH_NEUTRAL_AT_DEFAULT and v == defaults[k])}

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "CellConfig":
        names = cls.field_names()
        unknown = [k for k in data if k not in names]
        if unknown:
            k = unknown[0]
            hint = closest(k, names) or f"; fields: {', '.join(names)}"
            raise ConfigError(f"{where}: unknown field {k!r}{hint}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        clean = {}
        for k, v in data.items():
            clean[k] = _coerce(k, v, types[k], where)
        return cls(**clean)


def _coerce(name: str, value: Any, type_name: str, where: str) -> Any:
    """YAML gives ints for floats ('lr: 1') and strings for floats ('1e-4'): accept both."""
    base = type_name.replace(" | None", "")
    if value is None:
        if "None" in type_name:
            return None
        raise ConfigError(f"{where}: {name} must not be null")
    try:
        if base == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            if isinstance(value, str):
                raise TypeError
            return int(value)
        if base == "bool":
            if not isinstance(value, bool):
                raise TypeError
            return value
        if base == "str":
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {name} must be {base}, got {value!r} ({type(value).__name__})") from None
    return value


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def parse_assignments(items: list[str], what: str) -> dict[str, Any]:
    """``KEY=VALUE`` pairs from the command line; values parse as YAML scalars (``1e-4``,
    ``true``, ``10``, ``null``); ``what`` names the option in errors (``--set``)."""
    import yaml

    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what}: expected KEY=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        if isinstance(value, str) and _looks_numeric(value):
            value = float(value)  # YAML 1.1 reads '1e-4' as a string
        if isinstance(value, (dict, list)):
            value = text  # '{a: 1}' stays text: values are scalars
        parsed[key.strip()] = value
    return parsed


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
