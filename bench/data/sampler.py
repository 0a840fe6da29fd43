"""Class-balanced batches for proxy-based metric learning (SPEC section 2)."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from bench.data.errors import DataError


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size // samples_per_class`` distinct classes, ``samples_per_class`` each.

    A class's samples are contiguous in the batch. A class with fewer images than
    ``samples_per_class`` contributes all of them plus repeats drawn with replacement. Classes are
    visited by walking through shuffled permutations of all classes, so every class appears
    about equally often. An epoch has ``len(labels) // batch_size`` batches unless
    ``num_batches`` is given.

    An epoch's batches are a pure function of ``(seed, epoch)``: call ``set_epoch(e)`` before
    iterating, and a run resumed at epoch ``e`` sees the same batches as the original.
    Use it as ``DataLoader(dataset, batch_sampler=sampler)``.
    """

    def __init__(self, labels, batch_size: int, samples_per_class: int, *, seed: int,
                 num_batches: int | None = None):
        labels = np.asarray(labels)
        if samples_per_class < 1 or batch_size % samples_per_class != 0:
            raise DataError(f"batch_size {batch_size} must be a positive multiple of "
                            f"samples_per_class {samples_per_class}")
        self.batch_size = batch_size
        self.samples_per_class = samples_per_class
        self.classes_per_batch = batch_size // samples_per_class
        self.seed = seed
        self.epoch = 0
        self.start = 0
        classes, inverse = np.unique(labels, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        self.class_indices = np.split(order, np.cumsum(np.bincount(inverse))[:-1])
        if len(classes) < self.classes_per_batch:
            raise DataError(f"{len(classes)} classes cannot fill a batch of {self.classes_per_batch} "
                            f"classes (batch_size {batch_size} / samples_per_class "
                            f"{samples_per_class}); lower batch_size or raise samples_per_class")
        self.num_batches = len(labels) // batch_size if num_batches is None else num_batches
        if self.num_batches < 1:
            raise DataError(f"{len(labels)} images make no full batch of {batch_size}; "
                            "lower batch_size or pass num_batches")

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The epoch whose batches to yield, from batch ``start`` on (a resumed, half-done epoch:
        the first ``start`` batches are drawn and dropped, so the rest are the same)."""
        self.epoch = epoch
        self.start = start

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        class_stream = self._class_stream(rng)
        for step in range(self.num_batches):
            batch = [self._samples_of(next(class_stream), rng) for _ in range(self.classes_per_batch)]
            if step >= self.start:
                yield np.concatenate(batch).tolist()


    def _class_stream(self, rng: np.random.Generator) -> Iterator[int]:
        """Classes from successive permutations, never repeating one within a batch."""
        num_classes, per_batch = len(self.class_indices), self.classes_per_batch
        pending: list[int] = []
        while True:
            fresh = rng.permutation(num_classes).tolist()
            # A batch may straddle two permutations: move the classes still pending from the
            # old one behind the first batch of the new one so that no batch repeats a class.
            in_pending = set(pending)
            fresh = [c for c in fresh if c not in in_pending] + [c for c in fresh if c in in_pending]
            queue = pending + fresh
            usable = len(queue) - len(queue) % per_batch
            yield from queue[:usable]
            pending = queue[usable:]

    def _samples_of(self, class_index: int, rng: np.random.Generator) -> np.ndarray:
        indices = self.class_indices[class_index]
        if len(indices) >= self.samples_per_class:
            return rng.choice(indices, size=self.samples_per_class, replace=False)
        repeats = rng.choice(indices, size=self.samples_per_class - len(indices), replace=True)
        return np.concatenate([rng.permutation(indices), repeats])


class AugmentationSeeds(Sampler[list[tuple[int, int]]]):
    """A batch sampler whose items carry their own random seed, ``(index, seed)``: each image's
    augmentation is a function of (seed, epoch, step, position), whatever the loader's worker
    count, and a run resumed inside an epoch draws exactly the crops it would have drawn."""

    def __init__(self, batches: ClassBalancedBatchSampler, seed: int):
        self.batches = batches
        self.seed = seed

    @property
    def batch_size(self) -> int:
        return self.batches.batch_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.batches.set_epoch(epoch, start=start)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        epoch = self.batches.epoch
        for step, batch in enumerate(self.batches, start=self.batches.start):
            base = np.random.SeedSequence([self.seed, epoch, step]).generate_state(len(batch), dtype=np.uint64)
            yield [(index, int(s) & 0x7FFF_FFFF_FFFF_FFFF) for index, s in zip(batch, base)]
