"""The training sampler's cut to whole optimizer steps, and the data module's use of it under a strategy that
accumulates gradients inside its engine (DeepSpeed; a fit under DeepSpeed: tests/test_deepspeed_accumulation.py)."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest
from torch.utils.data import DataLoader

from hicom.data.sampler import TrainSampler


def test_a_cut_to_whole_steps_leaves_out_the_tail_of_each_shard_before_the_grouping():
    n = 103
    dataset = list(range(n))
    groups, lengths = np.arange(n) % 3, (np.arange(n) * 7919) % 101

    def shard(rank, **options):
        sampler = TrainSampler(dataset, num_replicas=2, rank=rank, seed=5, **options)
        sampler.set_epoch(1)
        return sampler, list(sampler)

    for rank in range(2):
        whole, full = shard(rank)
        cut, kept = shard(rank, multiple_of=8)
        assert len(whole) == len(full) == 52 and len(cut) == len(kept) == 48  # 52 (padded) cut to 6 x 8
        assert kept == full[:48]
    kept = [i for rank in range(2) for i in shard(rank, multiple_of=8)[1]]
    assert len(set(kept)) == 96  # the padding's repeats come off first: 7 samples of 103 left out
    grouped = TrainSampler(dataset, num_replicas=2, rank=0, seed=5, multiple_of=8, batch_size=4, lengths=lengths,
                           groups=groups, megabatch=4)  # fmt: skip
    grouped.set_epoch(1)
    batches = [b.tolist() for b in DataLoader(dataset, batch_size=4, sampler=grouped)]
    assert len(batches) == 12 and all(len(b) == 4 for b in batches)
    assert sorted(i for b in batches for i in b) == sorted(shard(0, multiple_of=8)[1])
    with pytest.raises(ValueError, match="multiple_of must be >= 1"):
        TrainSampler(dataset, multiple_of=0)


@pytest.mark.parametrize("engine_accumulates", [True, False])
def test_the_training_loader_ends_its_epochs_on_a_step_where_the_engine_accumulates(
    engine_accumulates, cfg_small, caplog
):
    """48 samples in batches of 4, 5 a step: under DeepSpeed (its strategy's handles_gradient_accumulation) 10
    batches an epoch and the 8 samples left out said; under DDP or one process the 12 batches, as before."""
    from hicom.training import build

    _, datamodule = build(cfg_small)
    datamodule.setup("fit")
    strategy = SimpleNamespace(handles_gradient_accumulation=engine_accumulates)
    datamodule.trainer = SimpleNamespace(strategy=strategy, accumulate_grad_batches=5)
    with caplog.at_level(logging.WARNING, logger="hicom.data.datamodule"):
        loader = datamodule.train_dataloader()
        datamodule.train_dataloader()  # DeepSpeedStrategy makes one too: said once
    said = [r.getMessage() for r in caplog.records if "leaving out" in r.getMessage()]
    if engine_accumulates:
        assert len(loader) == 10 and sum(len(batch["ids"]) for batch in loader) == 40
        assert len(said) == 1 and "takes 40 of each process's 48" in said[0]
        assert "leaving out 8 of the 48 samples an epoch" in said[0]
        datamodule.trainer.accumulate_grad_batches = 13  # more than an epoch's 12 batches
        with pytest.raises(ValueError, match="fewer than one optimizer step"):
            datamodule.train_dataloader()
    else:
        assert len(loader) == 12 and not said


def test_the_samples_repeated_to_give_every_process_as_many_are_said(cfg_small, caplog, monkeypatch):
    """48 samples on 5 processes: 2 are trained twice an epoch (DistributedSampler's padding), which was not said;
    on a debug set of fewer samples than processes, most of an epoch is repeats: a warning."""
    import torch.distributed as dist

    from hicom.training import build

    _, datamodule = build(cfg_small)
    datamodule.setup("fit")
    datamodule.trainer = SimpleNamespace(strategy=SimpleNamespace(handles_gradient_accumulation=False),
                                         accumulate_grad_batches=1)  # fmt: skip
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    for world, level, repeats in ((5, logging.INFO, 2), (64, logging.WARNING, 16)):
        monkeypatch.setattr(dist, "get_world_size", lambda world=world: world)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hicom.data.datamodule"):
            datamodule.train_dataloader()
            datamodule.train_dataloader()  # said once
        said = [r for r in caplog.records if "twice" in r.getMessage()]
        assert len(said) == 1 and said[0].levelno == level
        assert f"48 training samples on {world} processes: each epoch trains {repeats} of them" in said[0].getMessage()
