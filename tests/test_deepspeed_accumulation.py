"""Gradient accumulation under DeepSpeed (on the CPU: DS_ACCELERATOR=cpu, gloo), whose engine accumulates itself.

Its engine steps on every accumulation-th micro-batch since the fit began, Lightning's loop counts from each
epoch's start: an epoch that ends inside a step left that step's gradients unapplied (the last epoch) or added them
to the next epoch's first step, after which the engine stepped batches away from Lightning's steps (its scheduler,
checkpoints and SIGTERM stops), and the schedule counted a step per epoch that never came.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_deepspeed_epochs_end_on_an_optimizer_step_and_the_engine_steps_with_lightning(cache_dir, tmp_path):
    """12 micro-batches an epoch at 5 a step, 2 epochs: each epoch takes 10 (2 samples a batch short of a step are
    left out, and said), the engine steps where Lightning counts a step at every batch, no gradient is left
    unapplied, and the schedule's total is the steps taken. A batch limit that ends an epoch inside a step is
    refused. One step of 8 samples applies the same gradient as 1, 2 or 4 micro-batches."""
    pytest.importorskip("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}  # Lightning finds a free port
    script = str(ROOT / "tests" / "scripts" / "deepspeed_accumulation.py")
    done = subprocess.run(
        [sys.executable, script, str(cache_dir), str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("ACCUMULATION ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    report = json.loads(lines[-1][len("ACCUMULATION ") :])
    rows = report["rows"]
    assert all(engine == lightning for _, _, engine, lightning in rows), rows  # the same step at every batch
    assert [(epoch, batch) for epoch, batch, _, _ in rows] == [(e, b) for e in range(2) for b in range(10)]
    assert [engine for _, batch, engine, _ in rows if batch in (4, 9)] == [1, 2, 3, 4]
    assert report["ended"] == {
        "batches": 10, "estimated": 4, "global_step": 4, "scheduler_steps": 4, "engine_steps": 4,
        "engine_micro_steps": 20,  # every micro-batch's gradient in a step taken
    }  # fmt: skip
    assert "leaving out 8 of the 48 samples an epoch" in done.stderr
    assert "ends inside an optimizer step of 5 batches" in report["limited"]
    assert "trainer.limit_train_batches to a multiple of 5" in report["limited"]
    # the same 8 samples in 1, 2 or 4 micro-batches make the same step: the engine's own division of the loss by the
    # accumulation is undone (the norms were 8.8, 4.4 and 2.2 when Lightning's and the engine's both applied)
    norms = report["step_gradient_norm"]
    assert norms["4"] == pytest.approx(norms["8"], rel=1e-4) and norms["2"] == pytest.approx(norms["8"], rel=1e-4), (
        norms
    )
