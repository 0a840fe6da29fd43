"""Equal-budget tuning as orchestration: trials are ordinary cells, the winner is read from
their result files. Nothing here runs inside a training loop.

A suite's ``tune:`` section::

    tune:
      budget: 8                  # trials per method: every method gets the same number
      sampler: random            # random (seeded) or grid (the grid's points, shuffled, first `budget`)
      seed: 0                    # the sampler's seed
      metric: recall@1           # read on the validation split, at the trial's last epoch
      val_fraction: 0.2          # class-disjoint validation classes carved from train for the trials
      seeds: [0]                 # seeds of the trials (their scores are averaged)
      space:                     # per method (its label, or its registry name), and/or default
        default:                 # applies to every method that takes the parameter
          lr: {low: 1.0e-4, high: 1.0e-2, log: true}
          proxy_lr: [1.0e-2, 5.0e-2, 1.0e-1]
        vpt_deep+bitfit:
          num_prompts: [5, 10, 50]

Stage 1: for each method (each cell of the grid without its seed), ``budget`` trial cells
(key ``stage: trial``, ``trial: i``) trained on the training classes minus the validation ones.
Stage 2: once a method's trials have all ended, its winner (best mean validation metric; a tie
goes to the trial the sampler asked for first, and the tuning table says so) is retrained on the full training classes for the suite's seeds (key
``stage: final``) and evaluated on the test split once. Methods with nothing to tune (zero_shot,
or an empty space) go straight to stage 2. Trial parameters come from Optuna's samplers asked in
order (ask without tell): the same suite file always gives the same trials. A trial cell is named
by a hash of its values (key ``trial: p<hash>``), not by its position: adding a value to a space
reruns only the trials whose values are new.

``tuning.json`` in the suite's results folder records the plan, the trials and the winners, for
the reporter (which never imports this module).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from bench.metrics import METRICS, is_metric_key

SAMPLERS = ("random", "grid")
TUNE_KEYS = ("budget", "sampler", "seed", "metric", "val_fraction", "seeds", "space")
TUNING_FILE = "tuning.json"
MAX_BUDGET = 500


@dataclass
class Param:
    """One dimension of a search space: a list of choices, or a numeric range."""
    name: str
    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    def describe(self) -> str:
        if self.choices is not None:
            return "{" + ", ".join(f"{c:g}" if isinstance(c, float) else str(c) for c in self.choices) + "}"
        scale = ", log" if self.log else ""
        return f"[{self.low:g}, {self.high:g}{scale}]"

    def distribution(self):
        import optuna

        if self.choices is not None:
            return optuna.distributions.CategoricalDistribution(self.choices)
        if self.integer:
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log)
        return optuna.distributions.FloatDistribution(float(self.low), float(self.high), log=self.log)


@dataclass
class TunePlan:
    budget: int
    sampler: str = "random"
    seed: int = 0
    metric: str = "recall@1"
    val_fraction: float = 0.2
    seeds: list[int] = field(default_factory=lambda: [0])
    space: dict[str, list[Param]] = field(default_factory=dict)  # method label/name or "default"

    def space_for(self, method: str, label: str | None, accepted: set[str] | None) -> list[Param]:
        """The dimensions a method is tuned over: its own entry (by label, else name) on top of
        ``default``; a method argument only where the method takes it (``accepted``; None: all)."""
        from methods.registry import method_trains

        if not method_trains(method):
            return []  # zero_shot: nothing to tune
        params = {p.name: p for p in self.space.get("default", [])}
        own = self.space.get(label) if label and label in self.space else self.space.get(method, [])
        params.update({p.name: p for p in own or []})
        from bench.config import CellConfig

        fields = set(CellConfig.field_names())
        return [p for name, p in params.items() if name in fields or accepted is None or name in accepted]

    def trials(self, params: list[Param]) -> list[dict[str, Any]]:
        """The first ``budget`` points the seeded sampler asks for: deterministic."""
        if not params:
            return []
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if self.sampler == "grid":
            grid = {p.name: p.choices for p in params}
            sampler = optuna.samplers.GridSampler(grid, seed=self.seed)
            count = min(self.budget, math.prod(len(c) for c in grid.values()))
        else:
            sampler = optuna.samplers.RandomSampler(seed=self.seed)
            count = self.budget
        study = optuna.create_study(sampler=sampler, direction="maximize")
        distributions = {p.name: p.distribution() for p in params}
        points: list[dict[str, Any]] = []
        seen: set[str] = set()
        for _ in range(count * 20):  # a small categorical space draws repeats: each point once
            trial = study.ask(distributions)
            point = {name: _plain(value) for name, value in trial.params.items()}
            marker = repr(sorted(point.items()))
            if marker not in seen:
                seen.add(marker)
                points.append(point)
            if len(points) == count:
                break
        return points

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "sampler": self.sampler, "seed": self.seed, "metric": self.metric,
                "val_fraction": self.val_fraction, "seeds": self.seeds,
                "space": {k: {p.name: p.describe() for p in v} for k, v in self.space.items()}}


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def parse_tune(raw: Any, fail) -> TunePlan | None:
    """Validate a suite's ``tune:`` section (``fail(where, message)`` makes the error)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise fail("tune", f"must be a mapping with {', '.join(TUNE_KEYS)}")
    for key in raw:
        if key not in TUNE_KEYS:
            from bench.catalog import closest

            raise fail(f"tune.{key}", f"unknown key{closest(key, TUNE_KEYS)}; allowed: {', '.join(TUNE_KEYS)}")
    budget = raw.get("budget")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise fail("tune.budget", f"must be a positive integer (trials per method), got {budget!r}")
    if budget > MAX_BUDGET:
        raise fail("tune.budget", f"{budget} trials per method: at most {MAX_BUDGET} (each trial is a cell to train)")
    sampler = raw.get("sampler", "random")
    if sampler not in SAMPLERS:
        raise fail("tune.sampler", f"must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise fail("tune.seed", f"must be an integer, got {seed!r}")
    metric = raw.get("metric", "recall@1")
    if not isinstance(metric, str) or not is_metric_key(metric):
        raise fail("tune.metric", f"must be a metric of bench/metrics.py ({', '.join(METRICS)}), got {metric!r}")
    val_fraction = raw.get("val_fraction", 0.2)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise fail("tune.val_fraction", f"must be in (0, 1): trials are scored on validation classes, "
                                        f"got {val_fraction!r}")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                            for s in seeds):
        raise fail("tune.seeds", f"must be a non-empty list of integers, got {seeds!r}")
    space_raw = raw.get("space") or {}
    if not isinstance(space_raw, dict):
        raise fail("tune.space", "must be a mapping: method (label or name) or default -> parameters")
    space = {}
    for owner, params in space_raw.items():
        if not isinstance(params, dict) or not params:
            raise fail(f"tune.space.{owner}", "must be a non-empty mapping of parameter -> choices or range")
        space[str(owner)] = [_param(str(owner), name, value, sampler, fail) for name, value in params.items()]
    return TunePlan(budget, sampler, seed, metric, float(val_fraction), seeds, space)


def _param(owner: str, name: str, value: Any, sampler: str, fail) -> Param:
    where = f"tune.space.{owner}.{name}"
    if isinstance(value, list):
        if not value:
            raise fail(where, "an empty list of choices")
        return Param(name, choices=list(value))
    if isinstance(value, dict):
        if sampler == "grid":
            raise fail(where, "the grid sampler needs a list of values, not a range")
        unknown = set(value) - {"low", "high", "log", "int"}
        if unknown or "low" not in value or "high" not in value:
            raise fail(where, "a range is {low: .., high: .., log: true|false, int: true|false}")
        low, high = value["low"], value["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
            raise fail(where, f"low and high must be numbers with low < high, got {low!r}, {high!r}")
        if value.get("log") and low <= 0:
            raise fail(where, "a log range needs low > 0")
        return Param(name, low=float(low), high=float(high), log=bool(value.get("log")), integer=bool(value.get("int")))
    raise fail(where, f"must be a list of choices or a range {{low, high}}, got {value!r}")


def winner(trials: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The best trial of one method from its trial results (``{"trial", "params", "scores"}``, one
    score per trial seed, None for a failed one): highest mean score; ties to the lower trial.
    None while a trial has not ended, or when every trial failed."""
    if any(t["scores"] is None for t in trials):
        return None
    # a NaN score (a result that says nothing) never wins a max: such a trial counts as failed
    scored = [t for t in trials if t["scores"] and all(s is not None and s == s for s in t["scores"])]
    if not scored:
        return None
    mean = {id(t): sum(t["scores"]) / len(t["scores"]) for t in scored}
    best = max(scored, key=lambda t: (mean[id(t)], -t["trial"]))
    tied = [t["trial"] for t in scored if t is not best and mean[id(t)] == mean[id(best)]]
    return {**best, "mean": mean[id(best)], "metric": metric, "tied_with": tied}
