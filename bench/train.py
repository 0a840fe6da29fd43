"""Training and per-epoch evaluation of one cell, with exact resume from its checkpoints.

``train_cell`` reads as the loop it is: build the cell (``CellSetup``), resume (``Checkpointer``),
train epoch by epoch, evaluate the reported epoch, write its per-query records and artifacts.
The checkpoint holds the trained weights (plus method buffers such as the proxy memory), the
optimisers, the scheduler, every RNG and the history so far; the sampler's batches are a pure
function of (seed, epoch, step). A run killed at any point and restarted therefore ends with
the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from bench import catalog
from bench import data as dml_data
from bench.artifacts import class_sample, write_artifacts
from bench.backbones import data_config
from bench.config import CellConfig
from bench.cell_evaluation import SplitEvaluation, check_recall_ks, evaluate_split, metrics_of, write_per_query
from bench.checkpointer import Checkpointer, RunState, restore_best, save_best
from bench.errors import CellFailure, UserError
from bench.learner import build_learner
from bench.loggers import EpochLog
from bench.optim import LazySGD, SparseAdamW
from bench.measure import (SavedTensorMeter, StepTimer, counted_training_memory, device_name, parameter_counts,
                           peak_memory, reset_peak_memory)
from bench.model import MetricLearner
from bench.ranks import ONE, Ranks

Progress = Callable[[dict[str, Any]], None] | None


@dataclass
class Outcome:
    epochs: list[dict[str, Any]]
    final: dict[str, Any]
    oracle: dict[str, Any] | None
    measurements: dict[str, Any]
    num_skipped_images: int = 0
    learner: MetricLearner | None = field(default=None, repr=False)
    model: dict[str, Any] = field(default_factory=dict)  # what was built: resolved backbone, input
    evaluation: dict[str, Any] | None = field(default=None, repr=False)  # the reported epoch's, per split
    splits: Any = field(default=None, repr=False)


def select_device(name: str, ranks: Ranks = ONE) -> torch.device:
    """The cell's device; on several ranks, each rank's own GPU (``LOCAL_RANK``)."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device: {name} requested but CUDA is not available")
    if ranks.several and device.type == "cuda":
        if ranks.local_rank >= torch.cuda.device_count():
            raise UserError(f"rank {ranks.rank}: LOCAL_RANK {ranks.local_rank} but this node has "
                            f"{torch.cuda.device_count()} GPUs; ask for one task per GPU")
        device = torch.device("cuda", ranks.local_rank)
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def is_sparse_parameter(learner: MetricLearner) -> set[int]:
    return {id(m.weight) for m in learner.modules() if isinstance(m, nn.Embedding) and m.sparse}


def build_optimizers(learner: MetricLearner, config: CellConfig) -> list[torch.optim.Optimizer]:
    """Dense parameters (proxies with their own learning rate) and, if a method has sparse
    tables (class prompts kept in CPU memory), a sparse optimiser of the same family that
    updates only the batch's rows, with the same learning rate and weight decay (bench.optim).
    A class-prompt table on the device is a dense parameter like any other, as in the
    reference implementation: dense AdamW's moments keep moving rows of absent classes."""
    sparse_ids = is_sparse_parameter(learner)
    proxies = learner.criterion.proxies
    dense, sparse = [], []
    for p in learner.parameters():
        if not p.requires_grad or p is proxies:
            continue
        (sparse if id(p) in sparse_ids else dense).append(p)
    groups = [{"params": dense, "lr": config.lr}]
    if proxies.requires_grad:
        groups.append({"params": [proxies], "lr": config.proxy_lr})
    if config.optimizer == "sgd":
        optimizers = [torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                                      weight_decay=config.weight_decay)]
        if sparse:
            optimizers.append(LazySGD(sparse, lr=config.lr, momentum=config.momentum,
                                      weight_decay=config.weight_decay))
    else:
        optimizers = [torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)]
        if sparse:
            optimizers.append(SparseAdamW(sparse, lr=config.lr, weight_decay=config.weight_decay))
    return optimizers


def build_schedulers(optimizers, config: CellConfig) -> list[torch.optim.lr_scheduler.LRScheduler]:
    period = config.lr_cosine_period or config.epochs
    return [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=period, eta_min=config.lr_min) for o in optimizers]


class NonFiniteLoss(Exception):
    def __init__(self, value: float):
        super().__init__(f"non-finite loss ({value})")
        self.value = value


def train_step(learner: MetricLearner, images: torch.Tensor, labels: torch.Tensor, optimizers, *,
               scaler: torch.amp.GradScaler | None = None, grad_clip: float | None = None,
               amp_dtype: torch.dtype | None = None, loss_of: Callable | None = None,
               after_backward: Callable[[], None] | None = None) -> torch.Tensor:
    """One optimisation step: loss (under autocast when ``amp_dtype``), backward, optional
    gradient clipping of the dense gradients, every optimiser's step. Returns the detached
    loss; raises ``NonFiniteLoss`` before touching any weight when the loss is NaN or inf.
    On several ranks ``loss_of`` is the global batch's loss and ``after_backward`` exchanges
    the sparse tables' rows (``bench.distributed``)."""
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = (loss_of or learner.training_loss)(images, labels)
    if not torch.isfinite(loss):
        raise NonFiniteLoss(loss.item())
    for o in optimizers:
        o.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler else loss).backward()
    if after_backward is not None:
        after_backward()
    if grad_clip:
        if scaler:
            scaler.unscale_(optimizers[0])
        torch.nn.utils.clip_grad_norm_(
            [p for p in learner.parameters() if p.requires_grad and p.grad is not None and not p.grad.is_sparse],
            grad_clip)
    for o in optimizers:
        scaler.step(o) if scaler else o.step()
    if scaler:
        scaler.update()
    return loss.detach()


def autocast_dtype(config: CellConfig, device: torch.device) -> torch.dtype | None:
    if not config.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_splits(config: CellConfig):
    """The cell's splits: its dataset, validation carve-out and training subset."""
    return dml_data.load_dataset(config.dataset, config.data_root, val_fraction=config.val_fraction,
                                 seed=config.seed, skip_corrupt=config.skip_corrupt_images,
                                 train_fraction=config.train_fraction,
                                 train_classes_fraction=config.train_classes_fraction,
                                 min_per_class=config.samples_per_class)


def eval_interpolation(config: CellConfig, image_cfg) -> str:
    return image_cfg.interpolation if config.interpolation == "auto" else (config.interpolation or "bilinear")



def eval_transforms(config: CellConfig, image_cfg):
    """(evaluation transform, JPEG draft size or None): what every evaluation of the cell sees."""
    transform = dml_data.build_transforms(image_cfg.image_size, image_cfg.mean, image_cfg.std, train=False,
                                          interpolation=eval_interpolation(config, image_cfg))
    draft = None
    if config.jpeg_draft:
        draft = max(math.ceil(config.jpeg_draft * image_cfg.image_size), round(image_cfg.image_size * 256 / 224))
    return transform, draft


def make_loaders(config: CellConfig, splits, image_cfg, device: torch.device, ranks: Ranks = ONE):
    train_tf = dml_data.build_transforms(image_cfg.image_size, image_cfg.mean, image_cfg.std, train=True,
                                         interpolation=eval_interpolation(config, image_cfg))
    test_tf, eval_draft = eval_transforms(config, image_cfg)
    sampler = dml_data.ClassBalancedBatchSampler(
        splits.train.labels, config.batch_size, config.samples_per_class, seed=config.seed,
        num_batches=_num_batches(config, len(splits.train.labels)))
    common = dict(num_workers=dml_data.loader_workers(config.num_workers), pin_memory=device.type == "cuda",
                  persistent_workers=False)
    # the training crop's input; evaluation decodes at least the 256/224 resize's (eval_transforms)
    train_draft = math.ceil(config.jpeg_draft * image_cfg.image_size) if config.jpeg_draft else None
    batches = dml_data.AugmentationSeeds(sampler, config.seed)
    if ranks.several:  # this rank's part of each global batch, each image with its global seed
        from bench.distributed import RankBatches

        batches = RankBatches(batches, ranks.rank, ranks.world_size)
    train = DataLoader(dml_data.ImageDataset(splits.train, train_tf, train_draft), batch_sampler=batches, **common)

    def eval_loader(split, shard: bool = False):
        if split is None:
            return None
        dataset = dml_data.ImageDataset(split, test_tf, eval_draft)
        if shard:
            dataset = torch.utils.data.Subset(dataset, ranks.shard(len(dataset)))
        return DataLoader(dataset, batch_size=config.eval_batch_size, shuffle=False, **common)

    names = ("val", "test", "query", "gallery")
    evals = {name: eval_loader(getattr(splits, name)) for name in names}
    # test transforms, a few images per class: the class means of proxies.npz
    evals["train_eval"] = eval_loader(class_sample(splits.train))
    shards = {name: eval_loader(getattr(splits, name), shard=True) for name in names} if ranks.several else None
    return train, sampler, evals, shards


def _num_batches(config: CellConfig, num_images: int) -> int:
    full = max(num_images // config.batch_size, 1)
    return min(full, config.max_steps_per_epoch) if config.max_steps_per_epoch else full


@dataclass
class CellSetup:
    """Everything built for one cell before its first step: the learner on its device, the
    optimisers and schedulers, AMP, the loaders and sampler, the timer and the Ks to report."""
    config: CellConfig
    device: torch.device
    learner: MetricLearner
    image_cfg: Any
    optimizers: list
    schedulers: list
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    train_loader: DataLoader
    sampler: Any
    eval_loaders: dict[str, DataLoader | None]
    ks: tuple[int, ...]
    timer: StepTimer
    ranks: Ranks = ONE
    model: nn.Module | None = None  # what the training forward calls: the learner, or its DDP wrapper
    shard_loaders: dict[str, DataLoader | None] | None = None  # this rank's part of each split
    saved_bytes: int = 0  # what autograd keeps for backward in one step, counted on the first one

    @property
    def trains(self) -> bool:  # zero_shot: no epochs, one evaluation of the model as it is
        return self.config.epochs > 0

    @classmethod
    def build(cls, config: CellConfig, splits, ranks: Ranks = ONE) -> "CellSetup":
        device = select_device(config.device, ranks)
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        ks = tuple(config.recall_ks) if config.recall_ks else catalog.dataset(config.dataset).eval_ks
        if config.evaluate_test:
            check_recall_ks(ks, splits, config.dataset)
        seed_everything(config.seed)
        learner = build_learner(config, splits.train.num_classes).to(device)
        image_cfg = data_config(learner.model.backbone, config.image_size)
        optimizers = build_optimizers(learner, config) if config.epochs > 0 else []
        amp_dtype = autocast_dtype(config, device)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        train_loader, sampler, eval_loaders, shard_loaders = make_loaders(config, splits, image_cfg, device, ranks)
        model = learner
        if ranks.several and config.epochs > 0:
            from bench.distributed import wrap

            model = wrap(learner)
        return cls(config, device, learner, image_cfg, optimizers, build_schedulers(optimizers, config), amp_dtype,
                   scaler, train_loader, sampler, eval_loaders, ks, StepTimer(device), ranks, model, shard_loaders)

    def evaluate(self, split: str) -> SplitEvaluation | None:
        """One split's evaluation; on several ranks each rank embeds its shard and rank 0 scores
        the split (``bench.rank_evaluation``)."""
        if split == "test" and not self.config.evaluate_test:
            return None
        if self.ranks.several:
            from bench.rank_evaluation import evaluate_on_ranks

            return evaluate_on_ranks(self.learner, self.shard_loaders, split, self.ks, self.device, self.amp_dtype,
                                     self.ranks)
        return evaluate_split(self.learner, self.eval_loaders, split, self.ks, self.device, self.amp_dtype)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimisation step; on several ranks, of the global batch."""
        def run(**ranked) -> torch.Tensor:
            return train_step(self.learner, images, labels, self.optimizers, scaler=self.scaler,
                              grad_clip=self.config.grad_clip, amp_dtype=self.amp_dtype, **ranked)

        if not self.ranks.several:
            return run()
        from bench.distributed import collective, exchange_sparse_gradients, global_batch_loss

        # the backward's collectives (DDP's all-reduce, the gathered embeddings' gradients) run
        # inside autograd: a lost rank there fails the cell like any other collective
        return collective("the training step's backward (gradient all-reduce)", lambda: run(
            loss_of=lambda x, y: global_batch_loss(self.model, self.learner, x, y),
            after_backward=lambda: exchange_sparse_gradients(self.learner)), only_transport_errors=True)

    def checkpointer(self, cell_dir: Path, identity_hash: str, emit) -> Checkpointer:
        return Checkpointer(cell_dir, identity_hash, learner=self.learner, optimizers=self.optimizers,
                            schedulers=self.schedulers, scaler=self.scaler, timer=self.timer,
                            every_epochs=self.config.checkpoint_every,
                            every_minutes=self.config.checkpoint_minutes, emit=emit, ranks=self.ranks)


def train_cell(config: CellConfig, cell_dir: Path, identity_hash: str, splits, progress: Progress = None,
               ranks: Ranks = ONE) -> Outcome:
    """Train and evaluate one cell on its ``splits`` (``load_splits(config)``); on several ranks,
    this rank's part of it (only the main rank writes files)."""
    emit = progress or (lambda event: None)
    cell = CellSetup.build(config, splits, ranks)
    last_evaluation: dict[str, Any] | None = None  # the latest evaluated epoch, kept for the report
    with cell.checkpointer(cell_dir, identity_hash, emit) as checkpointer:
        run = checkpointer.resume()
        epoch_log = EpochLog(cell_dir, config.logger if ranks.main else [], resume_after=run.epoch,
                             run_name=cell_dir.name, project=config.suite, config=config.to_dict(),
                             write=ranks.main)
        emit({"event": "cell_start", "total_epochs": config.epochs, "start_epoch": run.epoch,
              "steps": len(cell.sampler)})
        reset_peak_memory(cell.device)
        for epoch in range(run.epoch + 1, config.epochs + 1):
            loss_sum, steps, seconds = train_epoch(cell, run, epoch, checkpointer, emit)
            last_evaluation = end_epoch(cell, run, epoch, (loss_sum, steps, seconds), cell_dir) or last_evaluation
            checkpointer.after_epoch(run, epoch, config.epochs)
            record = run.history[-1]
            memory, _ = peak_memory(cell.device)
            epoch_log.epoch({**record, "step_ms_median": cell.timer.summary()["step_latency_ms_median"],
                             "memory_bytes": memory})
            emit({"event": "epoch_end", "epoch": epoch, "train_loss": record["train_loss"],
                  "test": record["test"], "val": record["val"]})
            checkpointer.hand_over_if_stopped(epoch)
        epoch_log.close()
    if not cell.trains:
        last_evaluation = zero_shot_evaluation(cell, run, emit)
    final, oracle, last_evaluation = reported_epoch(cell, run, last_evaluation, cell_dir)
    if ranks.main:
        write_per_query(cell_dir, last_evaluation["test"], last_evaluation["val"])
        write_artifacts(cell_dir, config, cell.learner, splits, cell.eval_loaders, last_evaluation, cell.device,
                        cell.amp_dtype, cell.trains)
    return outcome(cell, run, final, oracle, last_evaluation, splits)


def train_epoch(cell: CellSetup, run: RunState, epoch: int, checkpointer: Checkpointer, emit) -> tuple[float, int, float]:
    """The steps of one epoch from where the run stands (a resumed epoch goes on from its saved
    step); returns (loss sum, steps, seconds) of the whole epoch."""
    first, partial = run.step, run.partial
    run.step, run.partial = 0, None
    cell.sampler.set_epoch(epoch, start=first)
    cell.model.train()
    epoch_start = time.perf_counter()
    loss_sum, steps, earlier_seconds = (partial["loss_sum"], partial["steps"], partial["seconds"]) \
        if partial and first else (0.0, 0, 0.0)
    for offset, (images, labels) in enumerate(cell.train_loader):
        step = first + offset
        images = images.to(cell.device, non_blocking=True)
        labels = labels.to(cell.device, non_blocking=True)
        with cell.timer.step(step, len(labels)), SavedTensorMeter(cell.learner.parameters(),
                                                                  active=not cell.saved_bytes) as meter:
            try:
                loss = cell.step(images, labels)
                cell.saved_bytes = cell.saved_bytes or meter.bytes
            except NonFiniteLoss as e:
                raise CellFailure(f"non-finite loss ({e.value}) at epoch {epoch}, step {step + 1}", run.history) \
                    from None
        loss_value = loss.item()
        loss_sum += loss_value
        steps += 1
        emit({"event": "step", "epoch": epoch, "step": step + 1, "steps": len(cell.sampler), "loss": loss_value})
        checkpointer.after_step(run, epoch, step + 1, len(cell.sampler), {
            "loss_sum": loss_sum, "steps": steps, "seconds": earlier_seconds + time.perf_counter() - epoch_start})
    return loss_sum, steps, earlier_seconds + time.perf_counter() - epoch_start


def end_epoch(cell: CellSetup, run: RunState, epoch: int, trained: tuple[float, int, float],
              cell_dir: Path) -> dict[str, Any] | None:
    """The epoch's bookkeeping, in a fixed order (evaluation draws from the RNG, so the order is
    part of an exact resume): timer, schedulers, the evaluation when due, the best validation
    epoch's weights, the history. Returns the evaluation when there was one."""
    config = cell.config
    loss_sum, steps, seconds = trained
    cell.timer.add_epoch(steps * config.batch_size, seconds)
    lr = cell.optimizers[0].param_groups[0]["lr"]
    for scheduler in cell.schedulers:
        scheduler.step()
    record: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / max(steps, 1), "lr": lr, "time_s": seconds,
                              "val": None, "test": None}
    evaluation = None
    if epoch % config.eval_every == 0 or epoch == config.epochs:
        eval_start = time.perf_counter()
        val = cell.evaluate("val")
        test = cell.evaluate("test")
        record["val"], record["test"] = metrics_of(val), metrics_of(test)
        evaluation = {"epoch": epoch, "test": test, "val": val}
        run.eval_seconds += time.perf_counter() - eval_start
        if (config.selection_rule == "val" and val is not None and cell.ranks.main
                and is_best_validation(run.history, record)):
            save_best(cell_dir, cell.learner, epoch)
    run.history.append(record)
    return evaluation


def zero_shot_evaluation(cell: CellSetup, run: RunState, emit) -> dict[str, Any]:
    """A cell without epochs: one evaluation of the model as it is, as epoch 0."""
    eval_start = time.perf_counter()
    val, test = cell.evaluate("val"), cell.evaluate("test")
    run.history = [{"epoch": 0, "train_loss": None, "lr": None, "time_s": 0.0, "val": metrics_of(val),
                    "test": metrics_of(test)}]
    run.eval_seconds = time.perf_counter() - eval_start
    emit({"event": "epoch_end", "epoch": 0, "train_loss": float("nan"), "test": run.history[0]["test"],
          "val": run.history[0]["val"]})
    return {"epoch": 0, "test": test, "val": val}


def reported_epoch(cell: CellSetup, run: RunState, last_evaluation: dict[str, Any] | None, cell_dir: Path):
    """(final, oracle, the reported epoch's evaluation). When the reported epoch is not the one in
    memory (validation chose an earlier one, or the run resumed after its last epoch), its weights
    are put back and it is evaluated again, as it was."""
    final, oracle = select_epochs(run.history, cell.config.selection_rule)
    if last_evaluation is None or last_evaluation["epoch"] != final["epoch"]:
        if final["epoch"] != run.history[-1]["epoch"]:
            restore_best(cell_dir, cell.learner, final["epoch"])
        eval_start = time.perf_counter()
        last_evaluation = {"epoch": final["epoch"], "val": cell.evaluate("val"), "test": cell.evaluate("test")}
        run.eval_seconds += time.perf_counter() - eval_start
        final["test"], final["val"] = metrics_of(last_evaluation["test"]), metrics_of(last_evaluation["val"])
    return final, oracle, last_evaluation


def outcome(cell: CellSetup, run: RunState, final, oracle, last_evaluation, splits) -> Outcome:
    """What the cell measured and built, for the runner to put in result.json."""
    learner, config = cell.learner, cell.config
    counted = counted_training_memory(learner, cell.optimizers, cell.saved_bytes)
    memory, memory_kind = peak_memory(cell.device)
    if memory_kind == "cpu_peak_rss":
        # every local cell shares one process: its peak RSS is the process's, not this cell's
        process_rss, memory, memory_kind = memory, counted, "counted_training"
    else:
        process_rss = None
    reported = last_evaluation["test"] or last_evaluation["val"]
    engine = reported.per_query.engine if reported.per_query is not None else None  # None: not the main rank
    measurements = {**parameter_counts(learner), "peak_memory_bytes": memory, "memory_kind": memory_kind,
                    "counted_memory_bytes": counted, "process_peak_rss_bytes": process_rss,
                    **cell.timer.summary(), "eval_time_s": run.eval_seconds, "device": device_name(cell.device),
                    "resumed_from_epoch": run.resumed_from_epoch, "knn_engine": engine,
                    "faiss_package": faiss_package(), "world_size": cell.ranks.world_size,
                    "batch_per_rank": config.batch_size // cell.ranks.world_size}
    model = {"backbone": getattr(learner.model.backbone, "resolved_name", config.backbone),
             "weights": config.weights, "image_size": cell.image_cfg.image_size, "mean": list(cell.image_cfg.mean),
             "std": list(cell.image_cfg.std),
             "embedding_size": config.embedding_size if cell.trains else learner.model.width}
    return Outcome(run.history, final, oracle, measurements, splits.num_skipped, learner, model, last_evaluation,
                   splits)


def is_best_validation(history: list[dict[str, Any]], record: dict[str, Any]) -> bool:
    """Whether this epoch's validation R@1 beats every earlier one (ties keep the earlier epoch,
    as ``select_epochs`` does)."""
    earlier = [h["val"]["recall@1"] for h in history if h.get("val")]
    return not earlier or record["val"]["recall@1"] > max(earlier)


def faiss_package() -> str | None:
    """Which faiss wheel is installed ('faiss-gpu-cu12 1.14.1.post1'), for result.json."""
    from importlib import metadata

    for name in ("faiss-gpu-cu12", "faiss-gpu", "faiss-cpu"):
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def select_epochs(history: list[dict[str, Any]], rule: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The reported epoch (last, or best validation R@1) and the oracle (best test R@1)."""
    evaluated = [h for h in history if h["test"] is not None or h["val"] is not None]
    if not evaluated:
        raise CellFailure("no evaluated epoch", history)
    if rule == "val":
        chosen = max((h for h in evaluated if h["val"]), key=lambda h: h["val"]["recall@1"])
    else:
        chosen = evaluated[-1]
    final = {"epoch": chosen["epoch"], "selection": rule, "test": chosen["test"], "val": chosen["val"]}
    tested = [h for h in evaluated if h["test"] is not None]
    if not tested:  # a tuning trial: never looked at the test split
        return final, None
    best = max(tested, key=lambda h: h["test"]["recall@1"])
    return final, {"epoch": best["epoch"], "test": best["test"]}
