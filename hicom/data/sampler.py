"""Batches of samples of like modality and length, under any sampler (DDP's included)."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import numpy as np
from torch.utils.data import BatchSampler, Sampler


class GroupedBatchSampler(BatchSampler):
    """Takes `megabatch` batches' worth of indices from `sampler` at a time, orders them by (group, length) and
    cuts them into batches, so that a batch holds samples of one modality and similar length (less padding, and
    frames of like count); the batches of a megabatch then come in a seeded order. The cuts fall every
    `batch_size` samples, not at the groups' boundaries, so that the batch count depends on the sample count
    alone: where a group ends inside a batch (at most once per group and megabatch), that batch holds two
    modalities (more where a group is smaller than a batch), which the collator and the compressors take like any
    other batch.

    `sampler` decides which indices and in what order: a RandomSampler for one process; under DDP Lightning
    re-creates this sampler around its DistributedSampler (it keeps the constructor's arguments), so each rank
    groups its own shard, and every rank gets the same number of batches.
    """

    def __init__(
        self,
        sampler: Sampler[int] | Sized,
        batch_size: int,
        drop_last: bool,
        lengths: np.ndarray,
        groups: np.ndarray,
        megabatch: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        if len(lengths) != len(groups):
            raise ValueError(f"{len(lengths)} lengths for {len(groups)} groups")
        if megabatch < 1:
            raise ValueError(f"megabatch must be >= 1, got {megabatch}")
        self.lengths, self.groups = np.asarray(lengths), np.asarray(groups)
        self.megabatch, self.seed = megabatch, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        chunk: list[int] = []
        for index in self.sampler:
            chunk.append(index)
            if len(chunk) == self.megabatch * self.batch_size:
                yield from self._batches(chunk, rng)
                chunk = []
        if chunk:
            yield from self._batches(chunk, rng)

    def _batches(self, chunk: list[int], rng: np.random.Generator) -> Iterator[list[int]]:
        ids = np.asarray(chunk)
        ordered = ids[np.lexsort((self.lengths[ids], self.groups[ids]))]
        batches = [ordered[i : i + self.batch_size].tolist() for i in range(0, len(ordered), self.batch_size)]
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        for i in rng.permutation(len(batches)):
            yield batches[i]
