"""Training and per-epoch evaluation of one cell, with exact resume from epoch checkpoints.

The checkpoint written at the end of every epoch holds the trained weights (plus method
buffers such as the proxy memory), the optimisers, the scheduler, every RNG and the history
so far; the sampler's batches are a pure function of (seed, epoch). A run killed at any point
and restarted therefore ends with the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import math
import random
import signal
import threading
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
from bench.artifacts import class_sample, npz_bytes, write_artifacts
from bench.backbones import data_config
from bench.config import CellConfig
from bench.errors import CellFailure, UserError
from bench.evaluate import PerQuery, compute_embeddings, retrieval_metrics, top1_ties
from bench.learner import build_learner
from bench.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from bench.checkpoint import remove_checkpoint as remove_checkpoint_files
from bench.loggers import EpochLog
from bench.optim import LazySGD, SparseAdamW
from bench.results import atomic_write_bytes, move_aside
from bench.measure import (SavedTensorMeter, StepTimer, counted_training_memory, device_name, parameter_counts,
                           peak_memory, reset_peak_memory)
from bench.model import MetricLearner

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


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device: {name} requested but CUDA is not available")
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
               amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One optimisation step: loss (under autocast when ``amp_dtype``), backward, optional
    gradient clipping of the dense gradients, every optimiser's step. Returns the detached
    loss; raises ``NonFiniteLoss`` before touching any weight when the loss is NaN or inf."""
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = learner.training_loss(images, labels)
    if not torch.isfinite(loss):
        raise NonFiniteLoss(loss.item())
    for o in optimizers:
        o.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler else loss).backward()
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


def make_loaders(config: CellConfig, splits, image_cfg, device: torch.device):
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
    train = DataLoader(dml_data.ImageDataset(splits.train, train_tf, train_draft),
                       batch_sampler=dml_data.AugmentationSeeds(sampler, config.seed), **common)

    def eval_loader(split):
        if split is None:
            return None
        return DataLoader(dml_data.ImageDataset(split, test_tf, eval_draft), batch_size=config.eval_batch_size,
                          shuffle=False, **common)

    evals = {name: eval_loader(getattr(splits, name)) for name in ("val", "test", "query", "gallery")}
    # test transforms, a few images per class: the class means of proxies.npz
    evals["train_eval"] = eval_loader(class_sample(splits.train))
    return train, sampler, evals


def _num_batches(config: CellConfig, num_images: int) -> int:
    full = max(num_images // config.batch_size, 1)
    return min(full, config.max_steps_per_epoch) if config.max_steps_per_epoch else full


@dataclass
class SplitEvaluation:
    """One split evaluated: its metrics, each query's record, and the embeddings (In-Shop: the
    queries' in ``embeddings``, the gallery's in ``gallery``)."""
    metrics: dict[str, Any]
    per_query: PerQuery
    embeddings: np.ndarray
    labels: np.ndarray
    gallery: np.ndarray | None = None
    gallery_labels: np.ndarray | None = None


def check_embeddings(embeddings: np.ndarray, split: str) -> None:
    """A model whose embeddings are all (nearly) equal, zero or non-finite ranks by index order
    alone: its R@K would be the tie rule's, not the model's (a diverged tuning trial once won
    that way). Such a cell fails with the reason instead of reporting it."""
    if not np.isfinite(embeddings).all():
        raise CellFailure(f"the {split} embeddings hold non-finite values: the model diverged")
    scale = float(np.abs(embeddings).max(initial=0.0))
    spread = float(embeddings.std(axis=0).max(initial=0.0)) if len(embeddings) > 1 else scale
    if scale < 1e-12 or spread <= 1e-6 * scale:
        raise CellFailure(f"degenerate {split} embeddings: every image gets the same embedding (largest per-"
                          f"dimension SD {spread:.3g}, largest value {scale:.3g}); distances all tie, so R@K "
                          "would only reflect the order of the images. Either the images are all alike, or the "
                          "model collapsed (a lower learning rate usually helps)")


def evaluate_split(learner, loaders, name: str, ks, device, amp_dtype) -> SplitEvaluation | None:
    """R@K and MAP@R of one split; In-Shop (query/gallery) when ``name == 'test'`` and it has them."""
    if name == "test" and loaders.get("query") is not None:
        q, ql = compute_embeddings(learner.model, loaders["query"], device, amp_dtype)
        g, gl = compute_embeddings(learner.model, loaders["gallery"], device, amp_dtype)
        check_embeddings(q, "query")
        check_embeddings(g, "gallery")
        metrics, per_query = retrieval_metrics(q, ql, ks, gallery_embeddings=g, gallery_labels=gl,
                                               return_per_query=True)
        _record_ties(metrics, top1_ties(q, ql, gallery_embeddings=g, gallery_labels=gl))
        return SplitEvaluation(metrics, per_query, q, ql, g, gl)
    loader = loaders.get(name)
    if loader is None:
        return None
    emb, labels = compute_embeddings(learner.model, loader, device, amp_dtype)
    check_embeddings(emb, name)
    if name == "val":  # a small validation split cannot have SOP's R@1000: report the Ks it has
        ks = [k for k in ks if k < len(labels)] or [1]
    metrics, per_query = retrieval_metrics(emb, labels, ks, return_per_query=True)
    _record_ties(metrics, top1_ties(emb, labels))
    return SplitEvaluation(metrics, per_query, emb, labels)


def _record_ties(metrics: dict[str, Any], ties: dict[str, int]) -> None:
    """Says in the result how often the tie rule, not the model, decided R@1 (the reporter
    names cells where that is common): ``ties_top1`` of ``ties_checked`` queries."""
    metrics["ties_top1"] = ties["decided_by_tie"]
    metrics["ties_checked"] = ties["checked"]


def _metrics(evaluation: SplitEvaluation | None) -> dict[str, Any] | None:
    return None if evaluation is None else evaluation.metrics


PER_QUERY_FILE = "per_query.npz"
VAL_PER_QUERY_FILE = "val_per_query.npz"
BEST_FILE = "best.safetensors"  # the best-validation epoch's trained state, while training


def write_per_query(cell_dir: Path, test: SplitEvaluation | None, val: SplitEvaluation | None) -> None:
    """``per_query.npz`` (the reported epoch's test queries: query_index, label, ks, hit_at_k,
    ap_at_r) and a compact ``val_per_query.npz`` (float32 AP) for the validation split."""
    if test is not None:
        atomic_write_bytes(cell_dir / PER_QUERY_FILE, npz_bytes(test.per_query.arrays()))
    if val is not None:
        arrays = val.per_query.arrays()
        arrays["ap_at_r"] = arrays["ap_at_r"].astype(np.float32)
        atomic_write_bytes(cell_dir / VAL_PER_QUERY_FILE, npz_bytes(arrays))


def save_best(cell_dir: Path, learner: MetricLearner, epoch: int) -> None:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in learner.trainable_state_dict().items()}
    atomic_write_bytes(cell_dir / BEST_FILE, save(state, metadata={"epoch": str(epoch)}))


def restore_best(cell_dir: Path, learner: MetricLearner, epoch: int) -> None:
    from safetensors.torch import load

    path = cell_dir / BEST_FILE
    if not path.is_file():
        raise CellFailure(f"{path}: the weights of the validation-selected epoch {epoch} are missing; rerun the "
                          "cell with --fresh")
    state = load(path.read_bytes())
    learner.load_trainable_state_dict({k: v.to(t.device) for (k, v), t in zip(
        state.items(), (learner.trainable_state_dict()[k] for k in state))})


def remove_checkpoint(cell_dir: Path) -> None:
    """After the result is written: the files that only a resumed run needs."""
    remove_checkpoint_files(cell_dir)
    (Path(cell_dir) / BEST_FILE).unlink(missing_ok=True)


class StopRequest:
    """SLURM's warning signal (USR2, sent by submitit before a time limit or a preemption) asks
    the loop to stop at the next step boundary: it checkpoints there, then hands the signal to
    submitit's own handler, which requeues the job. Outside a SLURM job (no handler installed
    for USR2) nothing changes."""

    def __init__(self):
        self.requested = False
        self.previous = None
        self.frame = None

    def __enter__(self) -> "StopRequest":
        previous = signal.getsignal(signal.SIGUSR2)
        if callable(previous) and threading.current_thread() is threading.main_thread():
            self.previous = previous
            signal.signal(signal.SIGUSR2, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested, self.frame = True, frame

    def hand_over(self, emit, epoch: int, step: int) -> None:
        emit({"event": "note", "text": f"stop signal: checkpointed at epoch {epoch}, step {step}; requeueing"})
        signal.signal(signal.SIGUSR2, self.previous)
        self.previous(signal.SIGUSR2, self.frame)

    def __exit__(self, *exc) -> None:
        if self.previous is not None and signal.getsignal(signal.SIGUSR2) == self._handle:
            signal.signal(signal.SIGUSR2, self.previous)


def check_recall_ks(ks: tuple[int, ...], splits, dataset: str) -> None:
    """Fail before training when a split cannot have the deepest R@K (a small SOP subset has no
    R@1000): every K needs that many other images to rank."""
    if splits.query is not None and splits.gallery is not None:
        split_name, candidates = "gallery", len(splits.gallery)
    elif splits.test is not None:
        split_name, candidates = "test", len(splits.test) - 1
    else:
        return
    if ks[-1] > candidates:
        possible = [k for k in ks if k <= candidates]
        raise UserError(f"recall@{ks[-1]} needs {ks[-1]} images to rank, but the {split_name} split of {dataset} "
                        f"has {candidates} (the largest possible K is {candidates}); set the cell field recall_ks, "
                        f"e.g. recall_ks: {possible or [1]}")


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    random.setstate(_tuples(state["python"]))


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def train_cell(config: CellConfig, cell_dir: Path, identity_hash: str, progress: Progress = None,
               data_record: dict[str, Any] | None = None) -> Outcome:
    """Train and evaluate one cell; ``data_record["data"]`` gets the split summary as soon as the
    data is read, so that a failure later still shows which split it ran on."""
    device = select_device(config.device)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    emit = progress or (lambda event: None)
    splits = load_splits(config)
    summary = splits.record()
    if data_record is not None:
        data_record["data"] = summary
    emit({"event": "data", "summary": summary})
    ks = tuple(config.recall_ks) if config.recall_ks else catalog.dataset(config.dataset).eval_ks
    if config.evaluate_test:
        check_recall_ks(ks, splits, config.dataset)
    seed_everything(config.seed)
    learner = build_learner(config, splits.train.num_classes).to(device)
    image_cfg = data_config(learner.model.backbone, config.image_size)
    trains = config.epochs > 0  # zero_shot: no epochs, one evaluation of the model as it is
    optimizers = build_optimizers(learner, config) if trains else []
    schedulers = build_schedulers(optimizers, config)
    amp_dtype = autocast_dtype(config, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    train_loader, sampler, eval_loaders = make_loaders(config, splits, image_cfg, device)
    timer = StepTimer(device)
    history: list[dict[str, Any]] = []
    eval_seconds = 0.0
    start_epoch = 0

    # big tables are read straight into the learner's own tensors: no second copy while resuming
    state = load_checkpoint(cell_dir, identity_hash, emit, into={"learner": learner.trainable_state_dict()})
    start_epoch, start_step, partial = 0, 0, None
    if state is not None:
        learner.load_trainable_state_dict(state["learner"])
        for o, s in zip(optimizers, state["optimizers"]):
            o.load_state_dict(s)
        for sch, s in zip(schedulers, state["schedulers"]):
            sch.load_state_dict(s)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        timer.load_state_dict(state["timer"])
        history = list(state["history"])
        eval_seconds = float(state["eval_seconds"])
        start_epoch = int(state["epoch"])  # epochs finished
        start_step = int(state.get("step", 0))  # steps of the next epoch already done (a mid-epoch save)
        partial = state.get("partial")
        set_rng_state(state["rng"])
        state = None  # applied: a resumed process must not hold a second copy of the weights

    def save(epoch_done: int, step: int = 0, progress: dict[str, Any] | None = None) -> None:
        save_checkpoint(cell_dir, {
            "identity": identity_hash, "epoch": epoch_done, "step": step, "partial": progress,
            "learner": learner.trainable_state_dict(),
            "optimizers": [o.state_dict() for o in optimizers],
            "schedulers": [s.state_dict() for s in schedulers],
            "scaler": scaler.state_dict() if scaler else None,
            "timer": timer.state_dict(), "history": history, "eval_seconds": eval_seconds, "rng": rng_state(),
        })

    epoch_log = EpochLog(cell_dir, config.logger, resume_after=start_epoch, run_name=cell_dir.name,
                         project=config.suite, config=config.to_dict())
    emit({"event": "cell_start", "total_epochs": config.epochs, "start_epoch": start_epoch,
          "steps": len(sampler)})
    reset_peak_memory(device)
    saved_bytes = 0  # what autograd keeps for backward in one step, counted on the first one
    last_evaluation: dict[str, Any] | None = None  # the latest evaluated epoch, kept for the report
    last_save = time.monotonic()
    with StopRequest() as stop:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            first = start_step if epoch == start_epoch + 1 else 0
            sampler.set_epoch(epoch, start=first)
            learner.train()
            epoch_start = time.perf_counter()
            loss_sum, steps, earlier_seconds = (partial["loss_sum"], partial["steps"], partial["seconds"]) \
                if partial and first else (0.0, 0, 0.0)
            for offset, (images, labels) in enumerate(train_loader):
                step = first + offset
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                with timer.step(step, len(labels)), SavedTensorMeter(learner.parameters(),
                                                                     active=not saved_bytes) as meter:
                    try:
                        loss = train_step(learner, images, labels, optimizers, scaler=scaler,
                                          grad_clip=config.grad_clip, amp_dtype=amp_dtype)
                        saved_bytes = saved_bytes or meter.bytes
                    except NonFiniteLoss as e:
                        raise CellFailure(f"non-finite loss ({e.value}) at epoch {epoch}, step {step + 1}",
                                          history) from None
                loss_value = loss.item()
                loss_sum += loss_value
                steps += 1
                emit({"event": "step", "epoch": epoch, "step": step + 1, "steps": len(sampler), "loss": loss_value})
                due = config.checkpoint_minutes and time.monotonic() - last_save >= 60 * config.checkpoint_minutes
                if (stop.requested or due) and step + 1 < len(sampler):
                    # inside the epoch: batches and augmentations are functions of (seed, epoch,
                    # step), so the rest of this epoch replays exactly after a resume
                    seconds = earlier_seconds + time.perf_counter() - epoch_start
                    save(epoch - 1, step + 1, {"loss_sum": loss_sum, "steps": steps, "seconds": seconds})
                    last_save = time.monotonic()
                    if stop.requested:
                        stop.hand_over(emit, epoch, step + 1)
            train_seconds = earlier_seconds + time.perf_counter() - epoch_start
            timer.add_epoch(steps * config.batch_size, train_seconds)
            lr = optimizers[0].param_groups[0]["lr"]
            for sch in schedulers:
                sch.step()

            record: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / max(steps, 1), "lr": lr,
                                      "time_s": train_seconds, "val": None, "test": None}
            if epoch % config.eval_every == 0 or epoch == config.epochs:
                eval_start = time.perf_counter()
                val = evaluate_split(learner, eval_loaders, "val", ks, device, amp_dtype)
                test = evaluate_split(learner, eval_loaders, "test", ks, device, amp_dtype) \
                    if config.evaluate_test else None
                record["val"], record["test"] = _metrics(val), _metrics(test)
                last_evaluation = {"epoch": epoch, "test": test, "val": val}
                eval_seconds += time.perf_counter() - eval_start
                if config.selection_rule == "val" and val is not None and is_best_validation(history, record):
                    save_best(cell_dir, learner, epoch)
            history.append(record)
            if epoch % config.checkpoint_every == 0 or epoch == config.epochs or stop.requested:
                save(epoch)
                last_save = time.monotonic()
            memory, _ = peak_memory(device)
            epoch_log.epoch({**record, "step_ms_median": timer.summary()["step_latency_ms_median"],
                             "memory_bytes": memory})
            emit({"event": "epoch_end", "epoch": epoch, "train_loss": record["train_loss"],
                  "test": record["test"], "val": record["val"]})
            if stop.requested:
                stop.hand_over(emit, epoch, 0)
    epoch_log.close()

    if not trains:
        eval_start = time.perf_counter()
        val = evaluate_split(learner, eval_loaders, "val", ks, device, amp_dtype)
        test = evaluate_split(learner, eval_loaders, "test", ks, device, amp_dtype) if config.evaluate_test else None
        last_evaluation = {"epoch": 0, "test": test, "val": val}
        history = [{"epoch": 0, "train_loss": None, "lr": None, "time_s": 0.0, "val": _metrics(val),
                    "test": _metrics(test)}]
        eval_seconds = time.perf_counter() - eval_start
        emit({"event": "epoch_end", "epoch": 0, "train_loss": float("nan"), "test": history[0]["test"],
              "val": history[0]["val"]})

    final, oracle = select_epochs(history, config.selection_rule)
    if last_evaluation is None or last_evaluation["epoch"] != final["epoch"]:
        # the reported epoch is not the one in memory (validation chose an earlier one, or the run
        # resumed after its last epoch): put its weights back and evaluate it again, as it was
        if final["epoch"] != history[-1]["epoch"]:
            restore_best(cell_dir, learner, final["epoch"])
        eval_start = time.perf_counter()
        last_evaluation = {"epoch": final["epoch"],
                           "val": evaluate_split(learner, eval_loaders, "val", ks, device, amp_dtype),
                           "test": evaluate_split(learner, eval_loaders, "test", ks, device, amp_dtype)
                           if config.evaluate_test else None}
        eval_seconds += time.perf_counter() - eval_start
        final["test"], final["val"] = _metrics(last_evaluation["test"]), _metrics(last_evaluation["val"])
    write_per_query(cell_dir, last_evaluation["test"], last_evaluation["val"])
    write_artifacts(cell_dir, config, learner, splits, eval_loaders, last_evaluation, device, amp_dtype, trains)
    engine = (last_evaluation["test"] or last_evaluation["val"]).per_query.engine

    counted = counted_training_memory(learner, optimizers, saved_bytes)
    memory, memory_kind = peak_memory(device)
    if memory_kind == "cpu_peak_rss":
        # every local cell shares one process: its peak RSS is the process's, not this cell's
        process_rss, memory, memory_kind = memory, counted, "counted_training"
    else:
        process_rss = None
    measurements = {**parameter_counts(learner), "peak_memory_bytes": memory, "memory_kind": memory_kind,
                    "counted_memory_bytes": counted, "process_peak_rss_bytes": process_rss,
                    **timer.summary(), "eval_time_s": eval_seconds, "device": device_name(device),
                    "resumed_from_epoch": start_epoch, "knn_engine": engine,
                    "faiss_package": faiss_package()}
    model = {"backbone": getattr(learner.model.backbone, "resolved_name", config.backbone),
             "weights": config.weights, "image_size": image_cfg.image_size, "mean": list(image_cfg.mean),
             "std": list(image_cfg.std),
             "embedding_size": config.embedding_size if trains else learner.model.width}
    return Outcome(history, final, oracle, measurements, splits.num_skipped, learner, model, last_evaluation, splits)


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
