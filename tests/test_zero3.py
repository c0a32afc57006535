"""DeepSpeed on the CPU (DS_ACCELERATOR=cpu, gloo).

ZeRO-3 on 2 processes, training the compressor, LLM, SigLIP head and text tower (the recipe's instruction-tuning
parts): the loaded weights survive partitioning (same loss), one Adam step moves every weight as the unpartitioned
gradient says, and the hand-off gathers whole tensors. And train.py's fits under Lightning's DeepSpeedStrategy at
ZeRO-2 and ZeRO-3: checkpoints without the frozen weights, and resuming from them.

The set-up (the dev extra) installs deepspeed; the tests are skipped where it is absent.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import SMALL

ROOT = Path(__file__).resolve().parents[1]


def test_zero3_keeps_the_loaded_weights_steps_them_right_and_hands_off_whole_tensors(cache_dir, tmp_path):
    pytest.importorskip("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]  # a free port
    script = str(ROOT / "tests" / "scripts" / "zero3_handoff.py")
    done = subprocess.run(
        [*command, script, str(cache_dir), str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("ZERO3 ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    report = json.loads(lines[-1][len("ZERO3 ") :])
    assert report["world_size"] == 2 and report["local_numel"] < report["full_numel"]  # really sharded
    assert report["zero3_loss"] == pytest.approx(report["reference_loss"], rel=1e-6)
    # the step is lr (1e-3) x sign(g) wherever |g| > 1e-4: the hand-off matches it far below one step
    assert report["handoff_keys_match"] and report["moved_parameters"] > 100_000
    assert report["handoff_max_difference"] < 1e-5
    assert report["generated_tokens"] >= 1  # generation under ZeRO-3 with replies of different lengths: no hang


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_checkpoints_leave_out_the_frozen_weights_and_resume_checked(zero_stage, cache_dir, tmp_path):
    """train.py's fit under Lightning's DeepSpeedStrategy (on the CPU: tests/scripts/cpu_deepspeed.py), the LLM
    frozen and gradient-checkpointed as the real LLMs' configs set it: the checkpoint holds the trained compressor and not the frozen towers and LLM, which the resume loads again from
    their folders; a run whose checkpoints kept them resumes to the same weights; a checkpoint that lacks a weight
    the model needs is refused by name although the engine loads leniently."""
    pytest.importorskip("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}  # Lightning finds a free port
    script = str(ROOT / "tests" / "scripts" / "deepspeed_resume.py")
    done = subprocess.run(
        [sys.executable, script, str(cache_dir), str(tmp_path), str(zero_stage)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("DEEPSPEED ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    report = json.loads(lines[-1][len("DEEPSPEED ") :])
    assert report["first"] == report["kept"] == {"steps": 2}
    first, kept = report["first_saved"], report["kept_saved"]
    assert first["module"] == first["module_keys"] and kept["module"] == kept["module_keys"]  # as recorded
    # the trained compressor only: not even the tied LM head's alias, which DeepSpeed keeps under its second name
    assert {name.split(".")[1] for name in first["module"]} == {"compressor"}
    assert (
        "net.llm.model.lm_head.weight" in first["frozen_left_out"] and "net.llm.model.lm_head.weight" in kept["module"]
    )
    assert set(first["frozen_left_out"]) == set(kept["module"]) - set(first["module"])
    assert first["bytes"] < 0.5 * kept["bytes"]
    assert report["resumed"] == report["resumed_kept"] == {"steps": 3}
    assert report["resumed_difference"] == 0.0
    # another trainable set: refused before the build, as the engine would (with a message about parameter alignment)
    assert "trained ['compressor'] and this one trains ['compressor', 'llm']" in report["llm_trained"]["error"]
    assert "missing ['net.compressor.global_compressor.query'] (1)" in report["damaged"]["error"]


def test_the_staged_recipe_runs_under_deepspeed_and_a_stopped_stage_resumes_from_its_folder(cache_dir, tmp_path):
    """train.py's three stages under Lightning's DeepSpeedStrategy (ZeRO-2 on the CPU): each stage hands off to
    the next, and launched again after the third stopped (its hand-off missing), the run skips the first two and
    resumes the third from its DeepSpeed folder, which left out the frozen towers. (Its parent deleted too, it would
    be refused: its checkpoint started from the parent's old weights, `check_lineage`.)"""
    pytest.importorskip("deepspeed")
    # HICOM_LOGS: Hydra's own folder for each launch (its .hydra/ and train.log), not the checkout's logs/
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HICOM_LOGS": str(tmp_path / "logs")}
    run = tmp_path / "run"
    command = [
        sys.executable, "train.py", "experiment=tiny_stages", *SMALL, "trainer.limit_train_batches=2",
        "strategy=deepspeed_zero2", "trainer.strategy._target_=tests.scripts.cpu_deepspeed.CPUDeepSpeedStrategy",
        f"paths.cache_dir={cache_dir}", f"paths.output_dir={run}",
    ]  # fmt: skip
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    stages = run / "stages"
    assert all((stages / name / "manifest.json").is_file() for name in ("alignment", "instruction", "conditional"))
    assert (stages / "instruction" / "checkpoints" / "last.ckpt" / "latest").is_file()  # a DeepSpeed folder
    for name in ("manifest.json", "handoff.safetensors"):  # as if it stopped part-way
        (stages / "instruction" / name).unlink()
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert "stage conditional is done" in log and "stage instruction: resuming from" in log
    assert (stages / "instruction" / "manifest.json").is_file()


def test_a_bf16_deepspeed_fit_hands_off_the_fp32_weights_its_optimizer_stepped(cache_dir, tmp_path):
    """In bf16 the engine holds the module in bf16 and its optimizer steps fp32 masters (ZeRO 0 whole, ZeRO 2 and 3
    sharded): the hand-off holds the masters, as a DDP fit's holds its fp32 weights, not the bf16 copies (which
    started the next stage up to 6e-4 off)."""
    pytest.importorskip("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    script = str(ROOT / "tests" / "scripts" / "deepspeed_bf16_handoff.py")
    done = subprocess.run(
        [sys.executable, script, str(cache_dir), str(tmp_path), "0", "2", "3"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("BF16 ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    for stage, row in json.loads(lines[-1][len("BF16 ") :]).items():
        assert row["dtypes"] == ["torch.float32"] and row["masters"] == row["parameters"] == 23, (stage, row)
        assert row["from_masters"] == 0.0 and row["from_copies"] > 1e-5, (stage, row)
    # the LLM trained by the first stage and carried frozen by the second is handed on as the first wrote it (the
    # engine's bf16 copy of it was handed on, 6e-4 off)
    (carried,) = [
        json.loads(line[len("CARRIED ") :]) for line in done.stdout.splitlines() if line.startswith("CARRIED ")
    ]
    assert carried["carried"] == carried["as_handed"] == 26, carried
    (zero0,) = [json.loads(line[len("ZERO0 ") :]) for line in done.stdout.splitlines() if line.startswith("ZERO0 ")]
    # (the trunk's frozen last layer handed on as it loaded, not as the engine's bf16 copy of it)
    assert zero0["keys"] and zero0["equal"] == zero0["tensors"] and zero0["frozen"] == 16, zero0
    assert zero0["dtypes"] == ["torch.float32"], zero0


def test_a_process_whose_batch_was_all_skipped_keeps_in_step_under_zero2(cache_dir, tmp_path):
    """torchrun, 2 processes under ZeRO-2 (on the CPU), micro batch 1, no shuffling: process 1's second and third
    samples (3 and 5) are corrupt. ZeRO-2 reduces gradients in buckets in the order the backward makes them, so
    the skipped process runs its last batch again at zero weight: a zero over its parameters would hand the
    others' reduction buckets of other sizes (gloo: "Received data size doesn't match"; NCCL: a hang)."""
    pytest.importorskip("deepspeed")
    from tests.test_train import _videos_with_bad_ones

    records, overrides = _videos_with_bad_ones(cache_dir, tmp_path, 3, 5)
    env = {k: v for k, v in os.environ.items() if k != "HICOM_RUN_STAMP"}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HICOM_LOGS=str(tmp_path / "logs"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*torchrun, "train.py", *overrides, "data.batch_size=1", "data.shuffle=false", "data.group_by_length=false",
               "trainer.devices=2", "strategy=deepspeed_zero2",
               "trainer.strategy._target_=tests.scripts.cpu_deepspeed.CPUDeepSpeedStrategy",
               # buckets of a 7B model's share: several per backward, where one holds all of a tiny model's
               "+trainer.strategy.reduce_bucket_size=3000", "+trainer.strategy.allgather_bucket_size=3000",
               f"paths.cache_dir={cache_dir}", "evaluate=false"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (folder,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["steps"] == 4
    assert {s["id"] for s in metrics["skipped_samples"]} == {records[i]["id"] for i in (3, 5)}
    # its checkpoint, scored from one process (as from a login node while the run holds its GPUs): DeepSpeed's
    # zero_to_fp32 gathers both processes' partitions of the masters, and the snapshot is the run's own hand-off
    (folder / "handoff.safetensors").rename(tmp_path / "handoff.safetensors")
    snapshot = [sys.executable, "-m", "hicom.snapshot", str(folder), f"out={tmp_path / 'snapshot'}"]
    done = subprocess.run(snapshot, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "world_size: 2" in done.stdout + done.stderr, done.stderr[-3000:]
    written, gathered = (load_file(str(path / "handoff.safetensors")) for path in (tmp_path, tmp_path / "snapshot"))
    assert written.keys() == gathered.keys() and all(torch.equal(written[k], gathered[k]) for k in written)
    # refused before the model is built: the held-out check, which needs Lightning's restore; a partition missing
    import shutil

    from hicom.snapshot import main

    with pytest.raises(ValueError, match=r"evaluate=true asks the held-out questions .*evaluate.py ckpt=<it>"):
        main([str(folder), "evaluate=true", f"out={tmp_path / 'evaluated'}"])
    cut = shutil.copytree(folder / "checkpoints" / "last.ckpt", folder / "checkpoints" / "cut.ckpt")
    next(cut.glob("*/zero_pp_rank_1_*optim_states.pt")).unlink()
    with pytest.raises(ValueError, match=r"holds the optimizer partitions of 1 of the 2 processes that saved it"):
        main([str(folder), f"ckpt={cut}", f"out={tmp_path / 'cut'}"])
    assert not (tmp_path / "evaluated").exists() and not (tmp_path / "cut").exists()
