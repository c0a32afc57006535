"""Run by tests/test_deepspeed_accumulation.py (DS_ACCELERATOR=cpu): train.py's fit under Lightning's
DeepSpeedStrategy on the CPU (tests/scripts/cpu_deepspeed.py) with an accumulation that does not divide an epoch's
batches: 48 samples in micro-batches of 4 (12 batches), 5 of them a step, over 2 epochs. Prints one JSON line: the
engine's and Lightning's step counts after every batch, and what the fit ended with; the error of a fit whose
batch limit ends an epoch inside a step; and the gradient norm of one step of the same 8 samples taken as 1, 2 and
4 micro-batches."""

import json
import os
import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


class StepCounts(Callback):
    """After each training batch: (epoch, batch, the engine's optimizer steps, Lightning's)."""

    rows: list[tuple[int, int, int, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        engine = trainer.strategy.deepspeed_engine
        StepCounts.rows.append((trainer.current_epoch, batch_idx, engine.global_steps, trainer.global_step))


class GradientNorm(Callback):
    """The compressor's gradient norm before each optimizer call (under DeepSpeed, every micro-batch's: the last of a
    step's is the gradient the step applies)."""

    norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad.float().norm() for p in pl_module.net.compressor.parameters() if p.grad is not None]
        GradientNorm.norms.append(float(torch.stack(grads).norm()))


def main(cache: str, out: str) -> None:
    from hicom.training import train
    from tests.conftest import SMALL, compose_train
    from tests.scripts.deepspeed_accumulation import GradientNorm, StepCounts  # the classes the configs name

    base = [
        *(o for o in SMALL if not o.startswith(("trainer.limit_train_batches", "trainer.max_epochs"))),
        "strategy=deepspeed_zero2",
        "trainer.strategy._target_=tests.scripts.cpu_deepspeed.CPUDeepSpeedStrategy",
        "model.trainable=[compressor]",
        "global_batch_size=20",
        "trainer.max_epochs=2",
        "trainer.limit_val_batches=0",
        "evaluate=false",
        "~callbacks.throughput",
        "+callbacks.steps._target_=tests.scripts.deepspeed_accumulation.StepCounts",
    ]
    ended = {}

    def after(model) -> None:
        trainer = model.trainer
        engine = trainer.strategy.deepspeed_engine
        ended.update(
            batches=trainer.num_training_batches,
            estimated=trainer.estimated_stepping_batches,
            global_step=trainer.global_step,
            scheduler_steps=trainer.lr_scheduler_configs[0].scheduler.last_epoch,
            engine_steps=engine.global_steps,
            engine_micro_steps=engine.micro_steps,
        )

    train(compose_train(Path(cache), Path(out) / "whole", base), after_fit=after)
    report = {"rows": StepCounts.rows, "ended": ended}
    try:  # 7 batches an epoch at 5 a step
        train(compose_train(Path(cache), Path(out) / "limited", [*base, "trainer.limit_train_batches=7"]))
        report["limited"] = "trained"
    except ValueError as error:
        report["limited"] = str(error)
    one_step = [
        *(
            o
            for o in base
            if not o.startswith(("global_batch_size", "trainer.max_epochs", "+callbacks.steps", "strategy="))
        ),
        "strategy=deepspeed_zero0",  # the gradients in .grad, unpartitioned
        "data.source.num_train=8",
        "data.shuffle=false",
        "global_batch_size=8",
        "trainer.max_steps=1",
        "trainer.gradient_clip_val=0",
        "+callbacks.norm._target_=tests.scripts.deepspeed_accumulation.GradientNorm",
    ]
    report["step_gradient_norm"] = {}
    for micro in (8, 4, 2):
        GradientNorm.norms.clear()
        train(compose_train(Path(cache), Path(out) / f"micro{micro}", [*one_step, f"data.batch_size={micro}"]))
        report["step_gradient_norm"][micro] = GradientNorm.norms[-1]
    print("ACCUMULATION " + json.dumps(report), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(*sys.argv[1:3])
