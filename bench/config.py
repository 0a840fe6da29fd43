"""The configuration of one cell: everything that decides what a run computes.

A ``CellConfig`` is flat and JSON-serialisable; suites resolve into them and ``result.json``
stores them. Fields that only decide *where* or *how fast* a run goes (``data_root``,
``num_workers``, ``device``) are left out of the cell id hash so that moving data or changing
the machine does not invalidate finished results.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from bench.catalog import DATASET_NAMES as DATASETS
from bench.catalog import is_dataset
from bench.catalog import closest
from methods.registry import method_trains
from bench.errors import UserError

OPTIMIZERS = ("sgd", "adamw")
SELECTIONS = ("last", "val", "auto")
POSITIVE_AVERAGING = ("positive", "all")
# "vpt": VPT's Xavier-uniform prompts, torch's default heads, Kaiming proxies (this suite's
# own). "reference": the distributions of the paper's released code (methods/init.py).
INITS = ("vpt", "reference")

# Fields that do not change what is computed: excluded from the cell hash. A label is
# presentation: renaming a method's row never reruns its cells.
RUNTIME_FIELDS = ("data_root", "num_workers", "device", "eval_batch_size", "suite", "label", "torch_threads",
                  "compile", "save_embeddings", "logger", "checkpoint_every", "checkpoint_minutes",
                  "collective_timeout_s")

# Fields added after the first release: hashed only when set to something else than the default,
# so that adding a field never renames the cells finished before it existed.
HASH_NEUTRAL_AT_DEFAULT: tuple[str, ...] = ("init", "recall_ks", "train_fraction", "train_classes_fraction",
                                            "output", "evaluate_test", "jpeg_draft", "interpolation")
OUTPUTS = ("cls", "mean")
LOGGERS = ("tensorboard", "wandb", "csv")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class ConfigError(UserError, ValueError):
    """A configuration value that cannot be used; the message names the field."""


def bounded(default: Any, *, min: float | None = None, max: float | None = None, above: float | None = None,
            below: float | None = None, **kwargs: Any) -> Any:
    """A field with its valid range: ``min``/``max`` inclusive, ``above``/``below`` exclusive."""
    return field(default=default, metadata={"min": min, "max": max, "above": above, "below": below}, **kwargs)


# Names users bring from other tools; difflib alone would suggest e.g. 'jpeg_draft' for
# 'learning_rate', which sends a reader the wrong way.
FIELD_ALIASES = {
    "learning_rate": "lr", "proxy_learning_rate": "proxy_lr", "wd": "weight_decay",
    "epoch": "epochs", "num_epochs": "epochs", "max_epochs": "epochs", "bs": "batch_size",
    "model": "backbone", "arch": "backbone", "pretrained": "weights", "data": "data_root",
}


@dataclass
class CellConfig:
    dataset: str = "synthetic"
    data_root: str = "data"
    backbone: str = "vit_small_patch16_224.augreg_in21k"
    # None / "none": random init; "hub": timm / Hugging Face hub (or its cache when
    # HF_HUB_OFFLINE=1); anything else: a local weights file or a HF cache directory.
    weights: str | None = "hub"
    embedding_size: int = bounded(384, min=1)
    image_size: int | None = bounded(None, min=8)  # None: the backbone's pretrained input size
    method: str = "linear_probe"  # registry name, components joined by '+', e.g. "vpt_deep+bitfit"
    method_args: dict[str, Any] = field(default_factory=dict)
    label: str | None = None  # display name in tables, e.g. "VPT (B)"
    seed: int = bounded(0, min=0)
    output: str = "cls"  # what the head reads: the CLS token, or the mean of the patch tokens (OUTPUTS)

    epochs: int = bounded(15, min=0)  # 0 only for methods that do not train (zero_shot)
    batch_size: int = bounded(64, min=2)
    samples_per_class: int = bounded(2, min=1)
    max_steps_per_epoch: int | None = bounded(None, min=1)  # cap for tests and the demo; None = full epoch
    optimizer: str = "sgd"
    lr: float = bounded(5e-3, above=0.0)
    proxy_lr: float = bounded(0.1, above=0.0)
    weight_decay: float = bounded(1e-6, min=0.0)
    momentum: float = bounded(0.9, min=0.0, below=1.0)
    lr_cosine_period: int | None = bounded(None, min=1)  # cosine T_max in epochs; None = epochs
    lr_min: float = bounded(1e-8, min=0.0)
    grad_clip: float | None = bounded(None, above=0.0)  # max gradient norm; None = no clipping
    amp: bool = True  # bf16/fp16 autocast on CUDA only; CPU always runs fp32
    grad_checkpointing: bool = False
    # torch.compile each transformer block (regional compilation): same results up to float
    # rounding, so it is a runtime choice; whether it pays off depends on the card (BENCHMARKS.md).
    compile: bool = False

    loss_alpha: float = bounded(32.0, above=0.0)
    loss_delta: float = bounded(0.1, min=0.0, max=1.0)
    loss_positive_average: str = "positive"  # "all" = the reference implementation's quirk
    init: str = "vpt"  # initial values of prompts, heads and proxies: "vpt" or "reference" (INITS)

    val_fraction: float = bounded(0.0, min=0.0, below=1.0)  # class-disjoint validation classes from train
    selection: str = "auto"  # "last" epoch, or "val" (best validation R@1); auto = val if val_fraction
    # a seeded, class-stratified share of each training class's images (each keeps >= samples_per_class)
    train_fraction: float = bounded(1.0, above=0.0, max=1.0)
    train_classes_fraction: float = bounded(1.0, above=0.0, max=1.0)  # a seeded share of the train classes
    eval_every: int = bounded(1, min=1)
    recall_ks: list[int] | None = None  # R@K to report; None: the dataset's (bench.catalog)
    # False: the test split is never evaluated (tuning trials: they are chosen on validation only)
    evaluate_test: bool = True
    skip_corrupt_images: bool = False
    # Resizing in the transforms: None = bilinear (torchvision's default, what the reference
    # trained with), "auto" = the backbone's pretrained config's (bicubic for DINO, CLIP), or a name
    interpolation: str | None = None
    # Decode JPEGs at a reduced DCT scale keeping the shorter side >= jpeg_draft x image_size
    # (evaluation: >= the 256/224 resize); None decodes every pixel, as the reference does.
    jpeg_draft: float | None = bounded(None, min=1.0)

    num_workers: int | str = 4  # data loader processes; "auto": the CPUs this job may use
    # CPU threads for torch in this cell; None = torch's default (one per core). On a busy
    # small machine 1 can be several times faster: two threads wait for each other.
    torch_threads: int | None = bounded(None, min=1)
    eval_batch_size: int = bounded(256, min=1)
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    save_embeddings: bool | None = None  # test embeddings as float16; None: yes except on SOP/iNat sizes
    logger: list[str] = field(default_factory=list)  # extra trackers: tensorboard, wandb, csv
    checkpoint_every: int = bounded(1, min=1)  # epochs between checkpoints
    checkpoint_minutes: float | None = bounded(None, above=0.0)  # also checkpoint inside an epoch this often
    # a cell on several ranks: a collective that waits longer (a rank died or hangs) fails the cell
    collective_timeout_s: float = bounded(600.0, above=0.0)
    suite: str = "adhoc"

    def __post_init__(self) -> None:
        if not method_trains(str(self.method)):
            self.epochs = 0  # zero_shot: evaluated as it is, so the cell id never depends on epochs
        self.validate()

    def validate(self) -> None:
        def fail(name: str, msg: str) -> None:
            raise ConfigError(f"{name}: {msg}")

        for f in dataclasses.fields(self):
            _check_range(f, getattr(self, f.name), fail)
        if not is_dataset(self.dataset):
            fail("dataset", f"unknown dataset {self.dataset!r}{closest(self.dataset, DATASETS)}; "
                            f"choose one of {', '.join(DATASETS)}, or your own images as folder:NAME or csv:NAME "
                            "(README, Your own dataset)")
        for name, choices in (("optimizer", OPTIMIZERS), ("selection", SELECTIONS),
                              ("loss_positive_average", POSITIVE_AVERAGING), ("init", INITS), ("output", OUTPUTS)):
            value = getattr(self, name)
            if value not in choices:
                fail(name, f"must be one of {', '.join(choices)}, got {value!r}{closest(value, choices)}")
        if self.epochs == 0 and method_trains(str(self.method)):
            fail("epochs", f"must be a positive integer for {self.method}, got 0 (only zero_shot has no epochs)")
        if self.batch_size % self.samples_per_class:
            fail("batch_size", f"{self.batch_size} is not divisible by samples_per_class={self.samples_per_class}")
        if self.batch_size // self.samples_per_class < 2:
            fail("batch_size", "a batch needs at least two classes (batch_size / samples_per_class >= 2)")
        if self.selection == "val" and not self.val_fraction:
            fail("selection", "'val' needs a validation split: set val_fraction > 0")
        if not self.evaluate_test and not self.val_fraction:
            fail("evaluate_test", "false needs a validation split to evaluate: set val_fraction > 0")
        if not isinstance(self.method_args, dict):
            fail("method_args", f"must be a mapping, got {type(self.method_args).__name__}")
        if not isinstance(self.device, str) or not DEVICE_PATTERN.match(self.device):
            fail("device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.num_workers != "auto" and (not isinstance(self.num_workers, int) or isinstance(self.num_workers, bool)
                                           or self.num_workers < 0):
            fail("num_workers", f"must be an integer >= 0 or 'auto', got {self.num_workers!r}")
        if self.recall_ks is not None:
            if (not isinstance(self.recall_ks, list) or not self.recall_ks
                    or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in self.recall_ks)):
                fail("recall_ks", f"must be a list of positive integers, e.g. [1, 10], got {self.recall_ks!r}")
            self.recall_ks = sorted(set(self.recall_ks))
        if self.interpolation not in (None, "auto", "bilinear", "bicubic", "nearest"):
            fail("interpolation", f"must be auto, bilinear, bicubic or nearest, got {self.interpolation!r}")
        if not isinstance(self.logger, list) or [x for x in self.logger if x not in LOGGERS]:
            fail("logger", f"must be a list of {', '.join(LOGGERS)}, got {self.logger!r}")
        if len(set(self.logger)) != len(self.logger):
            fail("logger", f"names a tracker twice ({self.logger!r}): each would write every row again")

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
            alias = FIELD_ALIASES.get(k)
            hint = f" (did you mean {alias!r}?)" if alias else closest(k, names)
            hint += f"; fields: {', '.join(names)}"
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
    if base == "int | str":  # num_workers: a number or "auto"
        return value if isinstance(value, str) else _coerce(name, value, "int", where)
    if base.startswith("list["):
        item = base[len("list["):-1]
        if isinstance(value, str) and item == "str":
            value = [v.strip() for v in value.split(",") if v.strip()]  # --set logger=tensorboard,csv
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {name} must be a list of {item}, got {value!r} ({type(value).__name__})")
        return [_coerce(f"{name}[{i}]", v, item, where) for i, v in enumerate(value)]
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


def _check_range(f: dataclasses.Field, value: Any, fail) -> None:
    """Finite numbers inside the field's declared range (``bounded``)."""
    limits = f.metadata
    if not limits or value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(f.name, f"must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        fail(f.name, f"must be a finite number, got {value!r}")
    if limits.get("min") is not None and value < limits["min"]:
        fail(f.name, f"must be >= {limits['min']:g}, got {value!r}")
    if limits.get("max") is not None and value > limits["max"]:
        fail(f.name, f"must be <= {limits['max']:g}, got {value!r}")
    if limits.get("above") is not None and not value > limits["above"]:
        fail(f.name, f"must be > {limits['above']:g}, got {value!r}")
    if limits.get("below") is not None and not value < limits["below"]:
        fail(f.name, f"must be < {limits['below']:g}, got {value!r}")


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
        if isinstance(value, dict):
            value = text  # '{a: 1}' stays text: values are scalars or lists (recall_ks=[1,10])
        parsed[key.strip()] = value
    return parsed


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
