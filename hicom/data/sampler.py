"""The training order, a function of the seed and the epoch: shuffled, sharded across processes, optionally grouped
by modality and length; and a DataLoader that Lightning resumes mid-epoch."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Sized

import numpy as np
from torch.utils.data import DataLoader, DistributedSampler

log = logging.getLogger(__name__)


class TrainSampler(DistributedSampler):
    """This process's indices for one epoch: a permutation seeded by (seed, epoch) when `shuffle`, else file order,
    shared out among `num_replicas` processes as DistributedSampler does (padded to equal shards). With one process
    too, so that every epoch's order depends on the seed and the epoch alone (a resumed run goes on with it); and
    Lightning, which under DDP swaps a training sampler that is not a DistributedSampler for its own, always
    shuffled and seeded by the run, keeps this one with its `shuffle` and `seed`. It calls `set_epoch`.

    With `lengths` and `groups` (one per sample), each run of `megabatch * batch_size` indices is ordered by
    (group, length) and cut into batches of `batch_size`, which then come in a seeded order where `shuffle` (a
    short batch last), so that a batch holds one modality and similar lengths: less padding, frames of like count.
    The DataLoader batches the stream every `batch_size` indices, where the cuts were made: not at the groups'
    boundaries, so that the batch count depends on the sample count alone. Where a group ends inside a batch (at
    most once per group and megabatch), that batch holds two modalities, which the collator and the compressors
    take like any other batch.

    `multiple_of`: each process's share of an epoch is cut to a multiple of this many samples, its tail left out,
    where a strategy accumulates gradients inside its engine (DeepSpeed; see VideoQADataModule.train_dataloader):
    at `batch_size` x the accumulation, every epoch ends on an optimizer step. The cut comes before the grouping,
    and with shuffling it leaves out other samples each epoch.
    """

    def __init__(
        self,
        dataset: Sized,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        batch_size: int = 1,
        lengths: np.ndarray | None = None,
        groups: np.ndarray | None = None,
        megabatch: int = 64,
        multiple_of: int = 1,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        if (lengths is None) != (groups is None):
            raise ValueError("grouping needs both lengths and groups")
        if lengths is not None and not len(lengths) == len(groups) == len(dataset):
            raise ValueError(f"{len(lengths)} lengths and {len(groups)} groups for {len(dataset)} samples")
        if batch_size < 1 or megabatch < 1 or multiple_of < 1:
            raise ValueError(
                f"batch_size, megabatch and multiple_of must be >= 1, got {batch_size}, {megabatch} and {multiple_of}"
            )
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.groups = None if groups is None else np.asarray(groups)
        self.batch_size, self.megabatch = batch_size, megabatch
        # DistributedSampler's num_samples stays the padded share; this is what an epoch hands out of it
        self.kept = self.num_samples // multiple_of * multiple_of

    def __len__(self) -> int:
        return self.kept

    def __iter__(self) -> Iterator[int]:
        # a shard is strided over the permutation, so its tail is the permutation's end, where the padding is
        indices = list(super().__iter__())[: self.kept]
        if self.lengths is None:
            return iter(indices)
        rng = np.random.default_rng((self.seed, self.epoch))
        size = self.megabatch * self.batch_size
        return itertools.chain.from_iterable(
            self._grouped(np.asarray(indices[start : start + size]), rng) for start in range(0, len(indices), size)
        )

    def _grouped(self, ids: np.ndarray, rng: np.random.Generator) -> list[int]:
        ordered = ids[np.lexsort((self.lengths[ids], self.groups[ids]))]
        batches = [ordered[i : i + self.batch_size] for i in range(0, len(ordered), self.batch_size)]
        full = len(batches) - (len(batches[-1]) < self.batch_size)  # a short batch stays last
        order = [*(rng.permutation(full) if self.shuffle else range(full)), *range(full, len(batches))]
        return np.concatenate([batches[i] for i in order]).tolist()


class ResumableLoader(DataLoader):
    """A training DataLoader over a `TrainSampler` that resumes mid-epoch. Its state (`state_dict`) is the epoch
    and how many of its batches were handed out; after `load_state_dict` the sampler takes that epoch, and the next
    iteration leaves out those batches' indices before any sample is read, so that a resumed run goes on with the
    batches it would have had next. The data module keeps this state in Lightning's checkpoints (see its
    `state_dict`).

    Iteration starts at the first batch asked for, not at `iter()`, so that a state loaded in between applies,
    and after the trainer has set the epoch it runs: a state of an earlier epoch (taken on that epoch's last
    batch, or where limit_train_batches ended it early) is dropped, and the epoch starts from its first batch.
    `epochs_done` gives the epochs the trainer counts as done (those whose end it has processed, an epoch that
    max_steps cut short included): a state taken past the loader's epoch names the trainer's next one. None (no
    trainer): an epoch is done when all its batches are. An epoch the trainer counts done before its last batch
    (`batches_per_epoch`, the trainer's count: max_steps stopped it) is named in the state, and resuming from it
    says which batches are left out. The state also records the layout it counts in (the
    processes, the batch size, the samples, and the seed, shuffling and grouping of the order): under another
    layout the same count means other samples, so the epoch starts over, with a warning. Where Lightning gives the
    loader another sampler (overfit_batches), there is no place to keep, and the loader iterates as a DataLoader
    does.
    """

    def __init__(
        self,
        *args,
        epochs_done: Callable[[], int | None] | None = None,
        batches_per_epoch: Callable[[], float | None] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._epochs_done = epochs_done or (lambda: None)
        self._batches_per_epoch = batches_per_epoch or (lambda: None)
        self._resume: dict[str, int] | None = None  # a loaded state the next iteration starts from
        self._skipping = 0  # while an iteration is made: the batches it leaves out
        self._taken = 0  # batches of the current epoch handed out, the left-out ones included

    @property
    def _index_sampler(self):
        return _Skipping(self, super()._index_sampler)

    def __iter__(self) -> Iterator:
        return self._batches()

    def _layout(self) -> dict[str, int]:
        layout = {"processes": self.sampler.num_replicas, "batch_size": self.batch_size, "samples": len(self.dataset)}
        if isinstance(self.sampler, TrainSampler):  # what else decides the order: another seed is another order
            sampler = self.sampler
            megabatch = sampler.megabatch if sampler.lengths is not None else 0  # 0: not grouped by length
            layout |= {"seed": int(sampler.seed), "shuffle": int(sampler.shuffle), "megabatch": megabatch}
        return layout

    def _batches(self) -> Iterator:
        state, self._resume = self._resume, None
        if state is not None and isinstance(self.sampler, TrainSampler):
            layout = {key: state.get(key, value) for key, value in self._layout().items()}
            if layout != self._layout():
                log.warning(
                    "the checkpoint's data loader counted %d batches of epoch %d in another layout (%s, now %s): "
                    "the same count is other samples here, so the epoch starts over",
                    state["batches"], state["epoch"], layout, self._layout(),
                )  # fmt: skip
            elif state["epoch"] >= self.sampler.epoch:  # the trainer has set the epoch it runs by now
                self.sampler.set_epoch(state["epoch"])
                self._skipping = state["batches"]
                if state.get("cut_short"):
                    log.warning(
                        "the run this resumes stopped after %d of epoch %d's %d batches (max_steps, max_time or "
                        "should_stop), and its checkpoint counts that epoch done: it goes on with epoch %d, and the "
                        "rest of epoch %d is not trained",
                        state["cut_short"], state["epoch"] - 1, state["of"], state["epoch"], state["epoch"] - 1,
                    )  # fmt: skip
        try:
            iterator = super().__iter__()
        finally:
            self._taken, self._skipping = self._skipping, 0
        for batch in iterator:
            self._taken += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        if not isinstance(self.sampler, TrainSampler):
            return {}
        if self._resume is not None:
            return dict(self._resume)
        epoch, done = self.sampler.epoch, self._epochs_done()
        if done is None:
            done = epoch + 1 if self._taken >= len(self) else epoch
        if done > epoch:
            per_epoch = self._batches_per_epoch() or len(self)
            short = {"cut_short": self._taken, "of": int(per_epoch)} if 0 < self._taken < per_epoch else {}
            return {"epoch": done, "batches": 0, **self._layout(), **short}
        return {"epoch": epoch, "batches": self._taken, **self._layout()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state:
            self._resume = {key: int(value) for key, value in state.items()}


class _Skipping:
    """A loader's batch sampler, less the batches its iteration under way leaves out (`_skipping`, read when an
    iteration starts): a DataLoader's iterator keeps its index sampler and, with persistent workers, iterates it
    again for each epoch, when nothing is left out."""

    def __init__(self, loader: ResumableLoader, batches) -> None:
        self.loader, self.batches = loader, batches

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batches), self.loader._skipping, None)

    def __len__(self) -> int:
        return max(len(self.batches) - self.loader._skipping, 0)
