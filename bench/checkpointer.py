"""A cell's resumable state, owned by one object: save, resume, mid-epoch progress, RNG, stop.

``Checkpointer`` is what ``train_cell`` calls at its three boundaries (as dinov2's ``do_train``
calls its checkpointer once per step): ``resume()`` before the first epoch, ``after_step()``
after every optimisation step (a save inside the epoch when the time-based interval is due or
SLURM asked the job to stop) and ``after_epoch()`` at the end of each epoch. Batches and
augmentations are functions of (seed, epoch, step), so a run resumed from any save replays the
rest exactly; the file format itself lives in ``bench.checkpoint``.
"""
from __future__ import annotations

import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bench.cell_files import CellFiles
from bench.checkpoint import load_checkpoint, save_checkpoint
from bench.checkpoint import remove_checkpoint as remove_checkpoint_files
from bench.errors import CellFailure
from bench.ranks import ONE, Ranks
from bench.results import atomic_write_bytes


@dataclass
class RunState:
    """Where training stands: ``epoch`` epochs finished, ``step`` steps of the next one done (a
    mid-epoch save, with ``partial``: its loss sum, step count and seconds so far), the history of
    finished epochs and the evaluation time spent."""
    epoch: int = 0
    step: int = 0
    partial: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    eval_seconds: float = 0.0
    resumed_from_epoch: int = 0


class Checkpointer:
    """Saves and restores everything that decides the rest of a cell's training: the trained
    state, the optimisers, schedulers and AMP scaler, the step timer, every RNG and the run state."""

    def __init__(self, cell_dir: Path, identity_hash: str, *, learner, optimizers, schedulers, scaler, timer,
                 every_epochs: int, every_minutes: float | None, emit: Callable[[dict[str, Any]], None],
                 ranks: Ranks = ONE):
        self.cell_dir = Path(cell_dir)
        self.identity_hash = identity_hash
        self.learner, self.optimizers, self.schedulers, self.scaler, self.timer = (
            learner, optimizers, schedulers, scaler, timer)
        self.every_epochs, self.every_minutes = every_epochs, every_minutes
        self.emit = emit
        self.stop = StopRequest()
        self.last_save = time.monotonic()
        self.ranks = ranks  # every rank resumes from the one file the main rank saves

    def __enter__(self) -> "Checkpointer":
        self.stop.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.__exit__(*exc)

    def resume(self) -> RunState:
        """The run state of the last save, with every object put back as it was then; a fresh
        ``RunState`` when there is none."""
        # big tables are read straight into the learner's own tensors: no second copy while resuming
        state = self._load()
        if state is None:
            return RunState()
        self.learner.load_trainable_state_dict(state["learner"])
        for optimizer, saved in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)
        for scheduler, saved in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(saved)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.timer.load_state_dict(state["timer"])
        set_rng_state(state["rng"])
        epoch = int(state["epoch"])  # epochs finished
        return RunState(epoch=epoch, step=int(state.get("step", 0)), partial=state.get("partial"),
                        history=list(state["history"]), eval_seconds=float(state["eval_seconds"]),
                        resumed_from_epoch=epoch)

    def _load(self) -> dict[str, Any] | None:
        """The checkpoint's state. On several ranks the main rank loads (and moves a bad file
        aside) first; the others then load the same file, and only when the main rank resumed."""
        into = {"learner": self.learner.trainable_state_dict()}
        if not self.ranks.several:
            return load_checkpoint(self.cell_dir, self.identity_hash, self.emit, into=into)
        from bench.distributed import from_main

        if self.ranks.main:
            state = load_checkpoint(self.cell_dir, self.identity_hash, self.emit, into=into)
            from_main(None if state is None else (int(state["epoch"]), int(state.get("step", 0))), "resume point")
            return state
        point = from_main(None, "resume point")
        if point is None:
            return None
        state = load_checkpoint(self.cell_dir, self.identity_hash, lambda event: None, into=into, reader_only=True)
        if state is None or (int(state["epoch"]), int(state.get("step", 0))) != tuple(point):
            raise CellFailure(f"rank {self.ranks.rank}: the checkpoint changed while the ranks resumed (the main rank "
                              f"resumed after epoch {point[0]}, step {point[1]}); run the cell again")
        return state

    def save(self, run: RunState, epoch_done: int, step: int = 0, partial: dict[str, Any] | None = None) -> None:
        if not self.ranks.main:  # the ranks' states are equal: one file, written once
            self.last_save = time.monotonic()
            return
        save_checkpoint(self.cell_dir, {
            "identity": self.identity_hash, "epoch": epoch_done, "step": step, "partial": partial,
            "learner": self.learner.trainable_state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "timer": self.timer.state_dict(), "history": run.history, "eval_seconds": run.eval_seconds,
            "rng": rng_state(),
        })
        self.last_save = time.monotonic()

    def after_step(self, run: RunState, epoch: int, step: int, steps_in_epoch: int,
                   progress: dict[str, Any]) -> None:
        """After step ``step`` (1-based) of ``epoch``: inside the epoch, save when the interval is
        due or a stop was requested (then hand the signal on, which requeues the job)."""
        due = self.every_minutes and time.monotonic() - self.last_save >= 60 * self.every_minutes
        self._agree_on_stop()
        if (self.stop.requested or due) and step < steps_in_epoch:
            self.save(run, epoch - 1, step, progress)
            if self.stop.requested:
                self.stop.hand_over(self.emit, epoch, step)

    def after_epoch(self, run: RunState, epoch: int, last_epoch: int) -> None:
        """At the end of an epoch (already in ``run.history``): save every ``every_epochs``, at
        the last epoch, and when a stop was requested."""
        self._agree_on_stop()
        if epoch % self.every_epochs == 0 or epoch == last_epoch or self.stop.requested:
            self.save(run, epoch)

    def _agree_on_stop(self) -> None:
        """On several ranks a stop any rank was asked for stops every rank at the same step
        (the others would otherwise wait for it in the next collective)."""
        if self.ranks.several:
            from bench.distributed import any_rank

            self.stop.requested = any_rank(self.stop.requested)

    def hand_over_if_stopped(self, epoch: int) -> None:
        if self.stop.requested:
            self.stop.hand_over(self.emit, epoch, 0)


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
        if self.previous is None:  # a rank that got no signal itself, stopped with the others
            raise CellFailure(f"stopped at epoch {epoch}, step {step} with the other ranks, which were asked to stop")
        emit({"event": "note", "text": f"stop signal: checkpointed at epoch {epoch}, step {step}; requeueing"})
        signal.signal(signal.SIGUSR2, self.previous)
        self.previous(signal.SIGUSR2, self.frame)

    def __exit__(self, *exc) -> None:
        if self.previous is not None and signal.getsignal(signal.SIGUSR2) == self._handle:
            signal.signal(signal.SIGUSR2, self.previous)


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


# --- the best validation epoch's weights, kept while training --------------------------------

def save_best(cell_dir: Path, learner, epoch: int) -> None:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in learner.trainable_state_dict().items()}
    atomic_write_bytes(CellFiles(cell_dir).best, save(state, metadata={"epoch": str(epoch)}))


def restore_best(cell_dir: Path, learner, epoch: int) -> None:
    from safetensors.torch import load

    path = CellFiles(cell_dir).best
    if not path.is_file():
        raise CellFailure(f"{path}: the weights of the validation-selected epoch {epoch} are missing; rerun the "
                          "cell with --fresh")
    state = load(path.read_bytes())
    learner.load_trainable_state_dict({k: v.to(t.device) for (k, v), t in zip(
        state.items(), (learner.trainable_state_dict()[k] for k in state))})


def remove_checkpoint(cell_dir: Path) -> None:
    """After the result is written: the files that only a resumed run needs."""
    remove_checkpoint_files(cell_dir)
    CellFiles(cell_dir).best.unlink(missing_ok=True)
