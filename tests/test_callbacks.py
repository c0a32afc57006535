from types import SimpleNamespace

import pytest
import torch

from hicom.callbacks.bad_samples import BadSampleGuard, BadSampleRateExceeded

ONE_PROCESS = SimpleNamespace(world_size=1)


class Recorder:
    device = torch.device("cpu")

    def __init__(self):
        self.logged = {}

    def log(self, name, value, **kwargs):
        self.logged[name] = value


def batch(good: int, bad: list[str]) -> dict:
    skipped = [{"skip": reason, "id": f"s{i}", "path": "v.mp4", "error": "e"} for i, reason in enumerate(bad)]
    return {"ids": [f"g{i}" for i in range(good)], "skipped": skipped}


def test_skips_are_logged_per_reason_and_a_mostly_bad_run_stops_with_a_report():
    guard, module = BadSampleGuard(max_fraction=0.25, min_samples=10), Recorder()
    guard.on_train_batch_start(ONE_PROCESS, module, batch(3, ["missing"]), 0)
    guard.on_train_batch_start(
        ONE_PROCESS, module, batch(3, ["missing", "timeout"]), 1
    )  # 3 of 9 > 25%, but too few yet
    assert module.logged == {"data/skipped/missing": 2.0, "data/skipped/timeout": 1.0}
    with pytest.raises(BadSampleRateExceeded, match=r"4 of 13 training samples were skipped") as error:
        guard.on_train_batch_start(ONE_PROCESS, module, batch(3, ["undecodable"]), 2)
    assert "missing: 2" in str(error.value) and "preflight" in str(error.value)


def test_a_few_bad_samples_pass_and_the_count_survives_a_resume():
    guard = BadSampleGuard(max_fraction=0.25, min_samples=4)
    for step in range(10):
        guard.on_train_batch_start(ONE_PROCESS, Recorder(), batch(7, ["missing"] if step % 2 else []), step)
    resumed = BadSampleGuard(max_fraction=0.25, min_samples=4)
    resumed.load_state_dict(guard.state_dict())
    assert resumed.seen == 75 and resumed.reasons["missing"] == 5
    with pytest.raises(ValueError, match="max_fraction"):
        BadSampleGuard(max_fraction=1.5)


def test_on_several_processes_the_run_stops_on_the_counts_of_all_of_them():
    """Each process sees its own share; deciding on it, one would stop alone and leave the others waiting."""
    others = torch.tensor([10.0, 8.0])  # the other process: 8 of its 10 samples skipped
    trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(reduce=lambda t, reduce_op: t + others))
    guard = BadSampleGuard(max_fraction=0.25, min_samples=10)
    with pytest.raises(BadSampleRateExceeded, match=r"9 of 20 training samples"):  # this one alone: 1 of 10
        guard.on_train_batch_start(trainer, Recorder(), batch(9, ["missing"]), 0)
