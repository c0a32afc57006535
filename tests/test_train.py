"""End to end through the real path: generated clips, tiny checkpoints, Lightning fit and test."""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from hicom.training import train
from tests.conftest import SMALL, compose_train

ROOT = Path(__file__).resolve().parents[1]


def test_a_few_steps_lower_the_loss_and_write_the_summary(cfg_small, cache_dir, tmp_path):
    from hicom.callbacks.throughput import BatchFlops
    from hicom.dry_run import build_meta
    from hicom.training import build

    model, datamodule = build(cfg_small)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(12):
        loss = model.net(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]

    with open_dict(cfg_small):
        cfg_small.callbacks.throughput.window_size = 2  # a rate from the second micro-batch on
        cfg_small.logger.tensorboard = compose_train(cache_dir, tmp_path, ["logger=tensorboard"]).logger.tensorboard
    metrics = train(cfg_small)
    written = json.loads((Path(cfg_small.paths.output_dir) / "metrics.json").read_text())
    assert written == metrics
    assert metrics["steps"] == 4 and metrics["n_questions"] == 16
    assert metrics["train_samples"] == 16 and metrics["samples_per_second"] > 0
    assert metrics["gpu_peak_memory_gib"] is None  # on CPU
    # 16 samples of 8-frame clips, whose questions differ by a few tokens: about the first batch's count a sample
    per_sample = BatchFlops(build_meta(cfg_small), model.trainable)(batch) / 4 / 1e9
    assert metrics["train_gflop_per_sample"] == pytest.approx(per_sample, rel=0.05)
    done = metrics["train_gflop_per_sample"] * metrics["train_samples"]
    fit = metrics["fit_seconds"]  # rounded to 0.1 s
    assert done / (fit + 0.051) < metrics["train_gflops_per_second"] < done / max(fit - 0.051, 1e-3)
    import csv

    rows = list(csv.DictReader((Path(cfg_small.paths.output_dir) / "csv" / "version_0" / "metrics.csv").open()))
    rates = [(int(r["train/samples"]), float(r["train/device/samples_per_sec"]), float(r["train/device/items_per_sec"]))
             for r in rows if r.get("train/device/samples_per_sec")]  # fmt: skip
    assert [n for n, _, _ in rates] == [8, 12, 16]  # ThroughputMonitor, at steps 2-4 of batch 4
    assert all(0 < per_second < tokens for _, per_second, tokens in rates)
    # held-out batches have rates of their own, and no FLOP/s: the last training batch's count is not theirs
    held_out = [r for r in rows if r.get("test/device/batches_per_sec")]
    assert held_out and not any(r.get(f"{s}/device/flops_per_sec") for r in rows for s in ("validate", "test"))
    flop_rates = [float(r["train/device/flops_per_sec"]) for r in rows if r.get("train/device/flops_per_sec")]
    assert len(flop_rates) == 3 and all(rate > 1e6 for rate in flop_rates)  # no MFU on a CPU: its peak is unknown
    assert metrics["visual_tokens_per_video"] == 50 and metrics["uncompressed_tokens_per_video"] == 8 * 7 * 7
    assert metrics["mean_visual_tokens_per_video"] == 50  # every generated clip has its 8 frames
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["chance"] == 0.25
    assert (Path(cfg_small.paths.output_dir) / "checkpoints" / "last.ckpt").is_file()
    # TensorBoard's HPARAMS tab: the run's config beside its figures, no placeholder hp_metric
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(cfg_small.logger.tensorboard.save_dir).Reload()
    assert "hp_metric" not in events.Tags()["scalars"]
    assert events.Scalars("summary/accuracy")[-1].value == pytest.approx(metrics["accuracy"])
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["model/compressor/local/guide"].string_value == "direct"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert "summary/accuracy" in {info.name.tag for info in experiment.metric_infos}


def _videos_with_bad_ones(
    cache_dir: Path, tmp_path: Path, missing: int, corrupt: int, *more_corrupt: int
) -> tuple[list[dict], list[str]]:
    """16 generated training samples as a LLaVA JSON of their own, sample `missing`'s video missing and the videos
    of samples `corrupt` and `more_corrupt` garbage; the records and the overrides that train on them."""
    from hicom.training import build

    _, datamodule = build(compose_train(cache_dir, tmp_path / "prep", SMALL))
    splits = datamodule.source.prepare(datamodule.root)
    records = json.loads(splits.train_json.read_text())[:16]
    records[missing]["video"] = "train/missing.mp4"
    media = tmp_path / "media"
    (media / "train").mkdir(parents=True)
    for i, record in enumerate(records):
        if i != missing:
            (media / record["video"]).write_bytes((splits.video_root / record["video"]).read_bytes())
    for i in (corrupt, *more_corrupt):
        (media / records[i]["video"]).write_bytes(b"\x00corrupt" * 64)
    (tmp_path / "train.json").write_text(json.dumps(records))
    overrides = [
        *(o for o in SMALL if not o.startswith("data.source.")),
        "data=llava_json",
        "data.num_frames=8",
        "data.num_workers=0",
        f"data.source.train_json={tmp_path / 'train.json'}",
        f"data.source.val_json={tmp_path / 'train.json'}",
        f"data.source.data_root={media}",
    ]
    return records, overrides


def test_missing_and_corrupt_videos_train_to_the_end_and_are_reported(cache_dir, tmp_path):
    records, overrides = _videos_with_bad_ones(cache_dir, tmp_path, missing=0, corrupt=5)
    metrics = train(compose_train(cache_dir, tmp_path / "run", [*overrides, "data.batch_size=4"]))
    assert metrics["steps"] == 4
    skipped = {s["id"]: s["skip"] for s in metrics["skipped_samples"]}
    assert skipped == {records[0]["id"]: "missing", records[5]["id"]: "undecodable"}
    assert metrics["n_questions"] == 16 and metrics["n_failed"] == 2  # the held-out copies count wrong


def test_a_run_without_held_out_questions_skips_the_check_and_says_so(cache_dir, tmp_path, caplog):
    records, overrides = _videos_with_bad_ones(cache_dir, tmp_path, missing=0, corrupt=5)
    overrides = [o for o in overrides if not o.startswith("data.source.val_json=")]
    with caplog.at_level("INFO"):
        metrics = train(compose_train(cache_dir, tmp_path / "run", [*overrides, "data.source.val_json=null"]))
    assert metrics["n_questions"] == 0 and metrics["accuracy"] is None
    assert "no held-out questions (data.source names none): the held-out check is skipped" in caplog.text


def test_multirun_trains_each_compressor_and_writes_its_metrics(cache_dir, tmp_path):
    env = {**os.environ, "HICOM_CACHE": str(cache_dir), "HICOM_LOGS": str(tmp_path)}
    overrides = [o for o in SMALL if not o.startswith("~")] + ["callbacks.progress.refresh_rate=0", "evaluate=false"]
    cmd = [sys.executable, "train.py", "-m", "model/compressor=hicom,avgpool", *overrides]
    done = subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=600)
    files = sorted(tmp_path.glob("train/multiruns/*/*/metrics.json"))
    assert [json.loads(f.read_text())["compressor"] for f in files] == [
        "local 4x3x3 direct + global 32 coarse",
        "avgpool 4x3x3",
    ]
    # one table of the runs: the swept override, then each run's figures
    (sweep,) = tmp_path.glob("train/multiruns/*")
    table = (sweep / "summary.md").read_text().splitlines()
    assert table[0].startswith("| job | model/compressor | compressor | visual_tokens_per_video | accuracy |")
    assert table[2].startswith("| 0 | hicom | local 4x3x3 direct + global 32 coarse | ")
    assert table[3].startswith("| 1 | avgpool | avgpool 4x3x3 | ")
    rows = json.loads((sweep / "summary.json").read_text())
    assert [row["metrics"] for row in rows] == [json.loads(f.read_text()) for f in files]
    assert "the sweep's 2 runs" in done.stderr + done.stdout
    # another sweep launched into that folder by mistake: its job 0 is refused (the folder holds the hicom run), and
    # the finished sweep's table and job folders are left as they were (no error.txt beside job 0's metrics.json)
    table_before = (sweep / "summary.json").read_text()
    other = [*cmd[:3], "model/compressor=avgpool", f"hydra.sweep.dir={sweep}", *overrides]
    done = subprocess.run(other, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert not (sweep / "0" / "error.txt").exists()
    assert (sweep / "summary.json").read_text() == table_before
    assert done.returncode != 0 and "holding another run" in done.stderr + done.stdout
    # the same sweep folder again, one job: its table lists that job, not the earlier launch's job 1 left there;
    # the job goes on from the checkpoint its folder holds (a requeue), where it is the same run (another run's
    # launch into a run folder is refused: test_a_run_resumes_from_its_checkpoint)
    again = [*cmd[:3], "model/compressor=hicom", f"hydra.sweep.dir={sweep}", *overrides]
    subprocess.run(again, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    assert [row["job"] for row in json.loads((sweep / "summary.json").read_text())] == ["0"]
    # on several processes a sweep is started by torchrun: Lightning's launcher would give each job's other
    # processes the whole sweep's command
    ddp = [*cmd[:3], "model/compressor=hicom", f"hydra.sweep.dir={tmp_path / 'ddp'}", *overrides]
    done = subprocess.run([*ddp, "trainer.devices=2", "strategy=ddp"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode != 0 and "Start every process of the sweep with torchrun instead" in done.stderr
    assert not (tmp_path / "ddp" / "0" / "config.yaml").exists()
    # a job that fails, in the first sweep's folder, whose job 0 holds an earlier launch's metrics.json: the sweeper
    # raises and calls no end-of-multirun hook, and the table, written as each job ends, has the job with its error
    # (also in the job's error.txt), not the earlier launch's figures
    broken = [*cmd[:3], "optimized_metric=no_such_figure", f"hydra.sweep.dir={sweep}", *overrides]
    assert subprocess.run(broken, cwd=ROOT, env=env, capture_output=True, timeout=600).returncode != 0
    (row,) = json.loads((sweep / "summary.json").read_text())
    assert row["metrics"] is None and row["error"].startswith("ValueError: optimized_metric='no_such_figure' is not")
    assert (sweep / "0" / "error.txt").read_text() == row["error"] + "\n"
    assert (
        "| 0 | failed: ValueError: optimized_metric='no_such_figure' is not a figure"
        in (sweep / "summary.md").read_text()
    )


def test_the_sweep_table_shows_values_as_they_read_and_escapes_a_bar():
    """Hydra records a swept text with its escapes (`what\\ is\\ it?`): the table shows the text; other values as
    they were written; a bar escaped for Markdown."""
    from hicom.sweep import SweepSummary

    values = ["a=b", "c|d", r"what\ is\ it?", r"x\,y", "1e-4", "[4,3,3]"]
    rows = [{"job": str(i), "overrides": [f"+note={v}", "seed=0"], "stage": None, "metrics": {"accuracy": 0.5}}
            for i, v in enumerate(values)]  # fmt: skip
    table = SweepSummary().table(rows).splitlines()
    assert table[0].startswith("| job | +note | compressor |")
    assert table[2].startswith("| 0 | a=b | n/a | n/a | 0.5 |") and table[3].startswith("| 1 | c\\|d | n/a |")
    assert [line.split(" | ")[1] for line in table[4:]] == ["what is it?", "x,y", "1e-4", "[4,3,3]"]


def test_a_run_without_any_logger_trains(cache_dir, tmp_path):
    """`~logger`: the learning-rate monitor has nowhere to write, and is left out rather than fail the fit."""
    overrides = [o for o in SMALL if o != "logger=csv"] + ["~logger", "trainer.limit_train_batches=2", "evaluate=false"]
    assert train(compose_train(cache_dir, tmp_path, overrides))["steps"] == 2


def test_a_run_without_a_seed_takes_lightnings_and_records_it(cache_dir, tmp_path, monkeypatch):
    """`seed=null`: Lightning picks one (PL_GLOBAL_SEED, else 0); the data's seed and config.yaml follow it."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    overrides = [*SMALL, "seed=null", "trainer.limit_train_batches=1", "evaluate=false"]
    assert train(compose_train(cache_dir, tmp_path, overrides))["steps"] == 1
    written = OmegaConf.load(tmp_path / "config.yaml")
    assert written.seed == 5 and written.data.seed == 5


def test_the_summary_measures_the_tokens_of_clips_shorter_than_num_frames(cache_dir, tmp_path):
    """16 frames asked of the generated 8-frame clips, each frame once: 2 x 3 x 3 + 32 tokens ran, not 4 x 3 x 3 + 32."""
    overrides = [*SMALL, "data.num_frames=16", "data.sampling.repeat_frames=false", "trainer.limit_train_batches=2"]
    metrics = train(compose_train(cache_dir, tmp_path, [*overrides, "evaluate=false"]))
    assert metrics["visual_tokens_per_video"] == 68 and metrics["mean_visual_tokens_per_video"] == 50


def test_a_fit_of_no_step_says_so(cache_dir, tmp_path, caplog):
    """Allowed (it hands off the weights a run started from, e.g. a release folder's), but never silent."""
    overrides = [*SMALL, "trainer.limit_train_batches=0", "evaluate=false"]
    assert train(compose_train(cache_dir, tmp_path, overrides))["steps"] == 0
    assert "this fit took no optimizer step" in caplog.text


def test_a_training_batch_without_supervised_tokens_is_an_error(cfg_small):
    import pytest
    import torch

    from hicom.data.template import IGNORE_INDEX
    from hicom.training import build

    model, datamodule = build(cfg_small)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = datamodule.collate([datamodule.train_set[0], datamodule.train_set[1]])
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    with pytest.raises(ValueError, match="no supervised token"):
        model.training_step(batch, 0)


def test_two_process_ddp_follows_the_one_process_run_into_one_folder(cache_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo), micro batch 4, against 1 process at micro batch 8: the same global
    batches (no shuffling: DistributedSampler deals rank r the samples r, r + 2, ...), the same losses; both
    processes write into one run folder (named by torchrun's rendezvous id), and the summary covers every held-out
    question, not process 0's share. val/loss is over both processes' held-out samples, each once: 15 of them, which
    Lightning's DistributedSampler deals as 8 and 8, the second process's last a repeat of the first sample."""
    import csv

    common = [o for o in SMALL if o != "logger=csv"] + ["logger=csv", "data.shuffle=false", "global_batch_size=8",
              f"paths.cache_dir={cache_dir}", "data.eval_batch_size=1", "data.source.num_val=15"]  # fmt: skip

    def run(name: str, launcher: list[str], overrides: list[str]) -> tuple[list[float], dict, list[str]]:
        env = {k: v for k, v in os.environ.items() if k != "HICOM_RUN_STAMP"}
        env["HICOM_LOGS"] = str(tmp_path / name)
        cmd = [*launcher, "train.py", *common, *overrides]
        done = subprocess.run(cmd, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        (folder,) = (tmp_path / name / "train" / "runs").iterdir()  # one folder for the launch
        rows = list(csv.DictReader((folder / "csv" / "version_0" / "metrics.csv").open()))
        losses = [float(r[key]) for key in ("train/loss", "val/loss") for r in rows if r.get(key)]
        ids = [json.loads(line)["id"] for line in (folder / "predictions.jsonl").open()]
        return losses, json.loads((folder / "metrics.json").read_text()), ids

    single, single_metrics, single_ids = run(
        "one", [sys.executable], ["data.batch_size=8", "~trainer.limit_val_batches"]
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]  # a free port
    two = ["data.batch_size=4", "trainer.devices=2", "trainer.strategy=ddp", "~trainer.limit_val_batches"]
    ddp, ddp_metrics, ddp_ids = run("two", torchrun, two)
    assert len(single) == len(ddp) == 5  # 4 training steps, then val/loss
    for a, b in zip(single, ddp, strict=True):
        assert abs(a - b) <= 1e-4 * abs(a), (single, ddp)
    assert single_metrics["n_questions"] == ddp_metrics["n_questions"] == 15
    assert ddp_ids == single_ids  # every question once, in the held-out set's order
    # each process logs to its own file in the shared folder; only the first writes Hydra's record
    (folder,) = (tmp_path / "two" / "train" / "runs").iterdir()
    assert sorted(p.name for p in folder.glob("*.log")) == ["train.log", "train.rank1.log"]
    assert sorted(p.name for p in folder.glob(".hydra*")) == [".hydra"]


def test_the_logged_training_loss_is_each_steps_mean_over_its_micro_batches(cache_dir, tmp_path):
    """Lightning writes a step's metrics at its end: logged at every micro-batch, train/loss (and metrics.json's
    train_loss) was the step's last micro-batch's alone under gradient accumulation."""
    import csv

    losses = []

    def record(model) -> None:
        loss = model._loss

        def recorded(batch):
            value = loss(batch)
            losses.append(float(value))
            return value

        model._loss = recorded

    cfg = compose_train(cache_dir, tmp_path, [*SMALL, "global_batch_size=8", "trainer.limit_val_batches=0"])
    metrics = train(cfg, before_fit=record)  # 4 micro-batches of 4, 2 a step
    rows = csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open())
    logged = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 4 and len(logged) == 2
    means = [(losses[0] + losses[1]) / 2, (losses[2] + losses[3]) / 2]
    assert logged == pytest.approx(means, rel=1e-6) and metrics["train_loss"] == pytest.approx(means[1], abs=1e-4)


def test_a_process_whose_batch_was_all_skipped_keeps_in_step_with_the_others(cache_dir, tmp_path):
    """torchrun, 2 processes, micro batch 1, no shuffling: process 1's first and third samples (1 and 5) are
    missing / corrupt. It steps with a zero loss over its trainable parameters, so the other's gradient all-reduce
    is answered (returning nothing failed the run), and the loss curve is the mean over processes with samples.
    The fourth step's samples (6 and 7) are corrupt on both processes: that step leaves AdamW as it was."""
    import csv

    records, overrides = _videos_with_bad_ones(cache_dir, tmp_path, 1, 5, 6, 7)
    env = {k: v for k, v in os.environ.items() if k != "HICOM_RUN_STAMP"}
    env["HICOM_LOGS"] = str(tmp_path / "logs")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*torchrun, "train.py", *overrides, "data.batch_size=1", "data.shuffle=false", "data.group_by_length=false", "trainer.devices=2",
               "strategy=ddp", f"paths.cache_dir={cache_dir}"]  # fmt: skip
    done = subprocess.run(command, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (folder,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["steps"] == 4
    assert {s["id"] for s in metrics["skipped_samples"]} == {records[i]["id"] for i in (1, 5, 6, 7)}
    losses = [
        float(r["train/loss"])
        for r in csv.DictReader((folder / "csv" / "version_0" / "metrics.csv").open())
        if r.get("train/loss")
    ]
    # the fourth step logs no loss; Lightning's row for it repeats the third's
    assert len(losses) == 4 and losses[3] == losses[2] and all(0 < loss < 100 for loss in losses)
    skips = [float(r["data/skipped"]) for r in csv.DictReader((folder / "csv" / "version_0" / "metrics.csv").open())
             if r.get("data/skipped")]  # fmt: skip
    # both processes' distinct skipped samples (process 0 logged its own alone: 1): the held-out questions are the
    # same file here, and the sanity check's validation met all four before the first step
    assert skips == [4.0, 4.0, 4.0, 4.0]
    checkpoint = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    adam_steps = {float(state["step"]) for state in checkpoint["optimizer_states"][0]["state"].values()}
    assert checkpoint["global_step"] == 4 and adam_steps == {3.0}
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == 3  # the schedule did not advance either


def test_one_process_whose_data_is_all_bad_stops_every_process(cache_dir, tmp_path):
    """torchrun, 2 processes, micro batch 1, no shuffling: every sample of process 1 (the odd ones) is missing or
    corrupt, half of the run, under max_fraction=0.9; its own rate is over max_process_fraction, and both processes
    stop on it together with the report (neither left waiting in a collective for the other)."""
    _, overrides = _videos_with_bad_ones(cache_dir, tmp_path, 1, 3, 5, 7, 9, 11, 13, 15)
    env = {k: v for k, v in os.environ.items() if k != "HICOM_RUN_STAMP"}
    env["HICOM_LOGS"] = str(tmp_path / "logs")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*torchrun, "train.py", *overrides, "data.batch_size=1", "data.shuffle=false", "data.group_by_length=false",
               "trainer.devices=2", "strategy=ddp", "evaluate=false", f"paths.cache_dir={cache_dir}",
               "callbacks.bad_samples.max_fraction=0.9", "callbacks.bad_samples.window=2"]  # fmt: skip
    done = subprocess.run(command, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("BadSampleRateExceeded: process 1 skipped 2 of its last 2 training samples") == 2, (
        done.stderr[-3000:]
    )


def _text_only_second_and_fourth(cache_dir: Path, tmp_path: Path) -> list[str]:
    """16 generated training samples, the second and fourth text-only (the bad ones are past 4 steps at batch 1);
    the overrides that train on them."""
    records, overrides = _videos_with_bad_ones(cache_dir, tmp_path, 15, 13)
    for i in (1, 3):
        records[i].pop("video")
        records[i]["conversations"] = [{"from": "human", "value": "What is two and two?"},
                                       {"from": "gpt", "value": "Four."}]  # fmt: skip
    (tmp_path / "train.json").write_text(json.dumps(records))
    return overrides


def test_text_only_batches_train_under_ddp_beside_video_ones(cache_dir, tmp_path):
    """torchrun, 2 processes, micro batch 1, no shuffling: process 1's first two samples (1 and 3) are text-only, so
    its first two batches run no visual part while process 0's do. DDP (no search for unused parameters) still
    finds a gradient for every trainable parameter: the visual parts run a blank image at zero weight."""
    overrides = _text_only_second_and_fourth(cache_dir, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "HICOM_RUN_STAMP"}
    env["HICOM_LOGS"] = str(tmp_path / "logs")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*torchrun, "train.py", *overrides, "data.batch_size=1", "data.shuffle=false", "data.group_by_length=false",
               "trainer.devices=2", "strategy=ddp", "evaluate=false", f"paths.cache_dir={cache_dir}"]  # fmt: skip
    done = subprocess.run(command, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (folder,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["steps"] == 4


def test_text_only_batches_with_the_llm_frozen_are_passed_over_on_one_process(cache_dir, tmp_path, caplog):
    """Micro batch 1, no shuffling, the compressor alone trained: the second and fourth samples are text-only, so
    their loss reaches no trainable parameter (backward failed on it). They are passed over with a warning, and only
    the two steps with clips move AdamW and the schedule."""
    overrides = _text_only_second_and_fourth(cache_dir, tmp_path)
    overrides += ["data.batch_size=1", "data.shuffle=false", "data.group_by_length=false", "evaluate=false",
                  "model.trainable=[compressor]"]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="hicom"):
        metrics = train(compose_train(cache_dir, tmp_path / "run", overrides))
    assert metrics["steps"] == 4
    assert sum("trains nothing and is passed over" in r.getMessage() for r in caplog.records) == 1
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    adam_steps = {float(state["step"]) for state in checkpoint["optimizer_states"][0]["state"].values()}
    assert adam_steps == {2.0} and checkpoint["lr_schedulers"][0]["last_epoch"] == 2


def test_held_out_batches_without_clips_join_the_visual_gathers_under_zero3(cfg_small, monkeypatch):
    """Under ZeRO-3 every part's parameters are gathered from all processes when the part runs: a process whose
    held-out batch is text-only runs a blank image through the visual parts, before the LLM, as a process with
    clips does; on one process, or without ZeRO-3, it runs the LLM alone."""
    from hicom.training import build

    model, _ = build(cfg_small)
    net = model.net
    calls = []
    for name, part in (("vision", net.vision), ("compressor", net.compressor), ("llm", net.llm.model.get_decoder())):
        part.register_forward_pre_hook(lambda *_, name=name: calls.append(name) if calls[-1:] != [name] else None)
    tokens = net.llm.tokenizer(["What is two and two?"], return_tensors="pt")
    batch = {"ids": ["t"], "input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask,
             "labels": tokens.input_ids.clone()}  # fmt: skip
    held_out = {**batch, "positions": [0], "answers": ["A"], "options": [["4", "5"]]}
    model.eval()
    model.on_validation_epoch_start()
    model.on_test_epoch_start()
    with torch.no_grad():
        model.validation_step(batch, 0)
        model.test_step(held_out, 0)
        assert calls == ["llm"]  # one process: no visual part runs
        net.zero3 = True
        monkeypatch.setattr(type(model), "_world", lambda self: 2)
        calls.clear()
        model.validation_step(batch, 0)
        assert calls == ["vision", "compressor", "llm"]
        calls.clear()
        model.test_step(held_out, 0)
        assert calls[:3] == ["vision", "compressor", "llm"] and set(calls[3:]) <= {"llm"}
        # a batch whose every sample was skipped runs the last batch again as a stand-in: text-only, it too
        model._stand_ins = {"val": batch, "test": held_out}
        for step in (model.validation_step, model.test_step):
            calls.clear()
            step({"ids": [], "skipped": []}, 0)
            assert calls[:3] == ["vision", "compressor", "llm"], step.__name__


def test_lightnings_own_ddp_launcher_keeps_one_run_folder(cache_dir, tmp_path):
    """`trainer.devices=2 strategy=ddp` without torchrun: Lightning starts the second process itself, handing it
    the run folder it reads again seconds later; both write into one folder."""
    env = {k: v for k, v in os.environ.items() if k != "HICOM_RUN_STAMP"}
    env["HICOM_LOGS"] = str(tmp_path)
    overrides = [*SMALL, f"paths.cache_dir={cache_dir}", "trainer.devices=2", "strategy=ddp"]
    done = subprocess.run([sys.executable, "train.py", *overrides], cwd=Path(__file__).parents[1], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (folder,) = (tmp_path / "train" / "runs").iterdir()
    assert json.loads((folder / "metrics.json").read_text())["n_questions"] == 16


def test_the_shares_of_the_held_out_answers_merge_in_order_without_the_repeats():
    from hicom.training import merge_shares

    def rows(*positions: int) -> list[dict]:
        return [{"id": f"video{p // 2}", "position": p} for p in positions]  # two questions per video: one id

    # 5 questions on 2 processes: the sampler deals 0, 2, 4 and 1, 3, 0 (question 0 again, to even the shares)
    merged = merge_shares([rows(0, 2, 4), rows(1, 3, 0)])
    assert [r["position"] for r in merged] == [0, 1, 2, 3, 4] and [r["id"] for r in merged][:2] == ["video0"] * 2
    assert [r["position"] for r in merge_shares([rows(0, 4), rows(1, 3, 0)])] == [0, 1, 3, 4]  # 2 was skipped
    assert [r["position"] for r in merge_shares([rows(0, 1, 2)])] == [0, 1, 2]  # one process


def test_three_stages_hand_off_skip_when_done_and_resume_after_a_stage_is_deleted(
    cache_dir, tmp_path, monkeypatch, caplog
):
    import shutil

    from safetensors.torch import load_file

    import hicom.stages
    from hicom.stages import HandoffError, load_handoff, run_stages
    from hicom.training import build

    cfg = compose_train(cache_dir, tmp_path / "run", ["experiment=tiny_stages", *SMALL])
    results = run_stages(cfg)
    stages = tmp_path / "run" / "stages"
    assert list(results) == ["alignment", "conditional", "instruction"]
    assert all(r["steps"] == 4 for r in results.values())
    manifests = {s: json.loads((stages / s / "manifest.json").read_text()) for s in results}
    assert manifests["alignment"]["parts"] == ["compressor"] and manifests["alignment"]["parent"] is None
    mode = os.stat(stages / "alignment" / "handoff.safetensors").st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # as any file made here (safetensors alone makes it 0600: the owner's only)
    assert manifests["instruction"]["parts"] == ["compressor", "llm"]
    assert manifests["instruction"]["parent"] == str(stages / "conditional")
    # frozen parts stay out of the hand-off; the stage-2 injection modules appear from stage 2 on
    names = set(load_file(str(stages / "instruction" / "handoff.safetensors")))
    assert names and all(n.split(".")[0] in ("compressor", "llm") for n in names)
    # the tiny Qwen2 ties its LM head to its embeddings: written once, and tied again by whoever loads it
    assert "llm.model.embed_tokens.weight" in names and "llm.lm_head.weight" not in names
    assert not any("guide_injector" in n for n in manifests["alignment"]["parameters"])
    assert any("guide_injector" in n for n in manifests["conditional"]["parameters"])
    # a re-run skips every finished stage; one deleted is trained again from its parent, but not while a finished
    # stage after it holds weights trained from its old ones: refused before anything trains
    assert all(r == {"skipped": True} for r in run_stages(cfg).values())
    # stopped during its held-out check (a job's time limit): its hand-off written, not its metrics. Launched again,
    # it was skipped as done, its figures never written; it goes on from its last.ckpt, trains no step, and asks
    handoff = (stages / "instruction" / "handoff.safetensors").read_bytes()
    (stages / "instruction" / "metrics.json").unlink()
    again = run_stages(cfg)
    assert again["alignment"] == again["conditional"] == {"skipped": True}
    assert again["instruction"]["steps"] == 4  # the steps it had: none trained now
    assert (stages / "instruction" / "metrics.json").is_file()
    assert (stages / "instruction" / "handoff.safetensors").read_bytes() == handoff
    before = load_file(str(stages / "alignment" / "handoff.safetensors"))
    shutil.rmtree(stages / "conditional")
    stale = r"stage instruction is done .*, trained from .*conditional as it was, which this run trains again"
    with pytest.raises(ValueError, match=stale):
        run_stages(cfg)
    assert not (stages / "conditional").exists()
    other_lr = ["experiment=tiny_stages", *SMALL, "stage=conditional", "+stages.1.config.model.lr.compressor=5e-3"]
    again = run_stages(compose_train(cache_dir, tmp_path / "run", other_lr))  # that stage alone: other weights
    assert again["conditional"]["steps"] == 4
    with pytest.raises(
        ValueError, match=r"stage instruction is done .*, trained from other weights than .*conditional"
    ):
        run_stages(cfg)  # known by the digest of the hand-off it was trained from
    assert all(
        torch.equal(v, load_file(str(stages / "alignment" / "handoff.safetensors"))[k]) for k, v in before.items()
    )
    # one stage alone, from its default parent (the stage before it)
    shutil.rmtree(stages / "instruction")
    from hicom.eval.runner import find_handoff

    with pytest.raises(FileNotFoundError, match=r"stages \['instruction'\] have not finished .* ckpt=.*/stages/<name>"):
        find_handoff(tmp_path / "run")  # evaluate.py would score the stage before, as if it were the run
    assert find_handoff(stages / "conditional") == stages / "conditional"  # named, it is scored
    alone = run_stages(
        compose_train(cache_dir, tmp_path / "run", ["experiment=tiny_stages", *SMALL, "stage=instruction"])
    )
    assert list(alone) == ["instruction"] and alone["instruction"]["steps"] == 4
    assert find_handoff(tmp_path / "run") == stages / "instruction"
    # a stage run alone into a folder of its own: that folder's run is the stage
    single = ["experiment=tiny_stages", *SMALL, "stage=instruction", f"stage_parent={stages / 'conditional'}"]
    run_stages(compose_train(cache_dir, tmp_path / "single", single))
    assert find_handoff(tmp_path / "single") == tmp_path / "single" / "stages" / "instruction"
    # a finished stage asked for again from another parent is not skipped in silence
    other_parent = ["experiment=tiny_stages", *SMALL, "stage=instruction", f"stage_parent={stages / 'alignment'}"]
    with pytest.raises(ValueError, match=r"stage instruction is done in this run .*, and stage_parent names another"):
        run_stages(compose_train(cache_dir, tmp_path / "run", other_parent))
    assert json.loads((stages / "instruction" / "manifest.json").read_text())["parent"] == str(stages / "conditional")
    # ... and one moved since is known by its parent's weights, or, for a manifest of older code, by the stage's name
    (tmp_path / "run").rename(tmp_path / "moved")
    try:
        moved = tmp_path / "moved" / "stages"
        same = ["experiment=tiny_stages", *SMALL, "stage=instruction", f"stage_parent={moved / 'conditional'}"]
        assert run_stages(compose_train(cache_dir, tmp_path / "moved", same)) == {"instruction": {"skipped": True}}
        manifest = json.loads((moved / "instruction" / "manifest.json").read_text())
        assert manifest["parent_sha256"] == json.loads((moved / "conditional" / "manifest.json").read_text())["sha256"]
        (moved / "instruction" / "manifest.json").write_text(json.dumps({**manifest, "parent_sha256": None}))
        assert run_stages(compose_train(cache_dir, tmp_path / "moved", same)) == {"instruction": {"skipped": True}}
        # ... but not where another run's same-named stage still stands where it was recorded
        (tmp_path / "other" / "stages").mkdir(parents=True)
        shutil.copytree(moved / "conditional", tmp_path / "other" / "stages" / "conditional")
        older = {**manifest, "parent_sha256": None, "parent": str(tmp_path / "other" / "stages" / "conditional")}
        (moved / "instruction" / "manifest.json").write_text(json.dumps(older))
        with pytest.raises(ValueError, match=r"stage instruction is done in this run .*, and stage_parent names"):
            run_stages(compose_train(cache_dir, tmp_path / "moved", same))
        shutil.rmtree(tmp_path / "other")
        other_parent[-1] = f"stage_parent={moved / 'alignment'}"
        with pytest.raises(ValueError, match=r"stage instruction is done in this run .*, and stage_parent names"):
            run_stages(compose_train(cache_dir, tmp_path / "moved", other_parent))
        (moved / "instruction" / "manifest.json").write_text(json.dumps(manifest))
    finally:
        (tmp_path / "moved").rename(tmp_path / "run")
    model, _ = build(cfg)
    assert load_handoff(model, stages / "instruction", []) == ["compressor", "llm"]
    # the folders of the parts a hand-off leaves out are recorded by their weights; another folder's are said
    assert set(manifests["conditional"]["frozen_from"]) == {"model.vision.path", "model.llm.path"}
    assert set(manifests["instruction"]["frozen_from"]) == {"model.vision.path"}  # it trained the LLM
    shutil.copytree(cfg.model.llm.path, tmp_path / "llm copy")
    with caplog.at_level(logging.WARNING):
        load_handoff(model, stages / "conditional", [], cfg=compose_train(cache_dir, tmp_path / "run", [
            "experiment=tiny_stages", *SMALL, f"model.llm.path={tmp_path / 'llm copy'}"]))  # fmt: skip
    assert "holds other weights" not in caplog.text  # a copy is the same weights
    weights = next((tmp_path / "llm copy").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one weight's last byte
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        load_handoff(model, stages / "conditional", [], cfg=compose_train(cache_dir, tmp_path / "run", [
            "experiment=tiny_stages", *SMALL, f"model.llm.path={tmp_path / 'llm copy'}"]))  # fmt: skip
    assert f"model.llm.path={tmp_path / 'llm copy'} holds other weights than" in caplog.text
    llm = model.net.llm.model
    assert llm.lm_head.weight is llm.model.embed_tokens.weight
    trained = load_file(str(stages / "instruction" / "handoff.safetensors"))["llm.model.embed_tokens.weight"]
    assert torch.equal(llm.lm_head.weight.detach(), trained)
    # strict: a parent whose parameters do not fit names them
    model, _ = build(compose_train(cache_dir, tmp_path / "other", [*SMALL, "model.compressor.global_.num_queries=4"]))
    with pytest.raises(HandoffError, match=r"wrong shapes \['global_compressor.query \(32, "):
        load_handoff(model, stages / "conditional", [])
    # a manifest that lists fewer parts than its file holds: the unlisted trained parts would stay untrained
    shutil.copytree(stages / "instruction", tmp_path / "edited")
    edited = json.loads((tmp_path / "edited" / "manifest.json").read_text())
    (tmp_path / "edited" / "manifest.json").write_text(json.dumps({**edited, "parts": ["compressor"]}))
    with pytest.raises(HandoffError, match=r"holds \d+ tensors of parts its manifest.json does not list"):
        load_handoff(model, tmp_path / "edited", [])
    # one byte of tensor data changed (the header still whole, so the file would load other numbers) is refused
    model, _ = build(cfg)
    handoff = stages / "conditional" / "handoff.safetensors"
    data = bytearray(handoff.read_bytes())
    data[-5] ^= 0x40
    handoff.write_bytes(bytes(data))
    assert set(load_file(str(handoff))) == set(manifests["conditional"]["parameters"])  # loadable as it is
    with pytest.raises(HandoffError, match=r"conditional/handoff\.safetensors is not the file its stage wrote"):
        load_handoff(model, stages / "conditional", [])
    # a hand-off cut short (a copy that stopped) stops the next stage before anything is built or loaded
    handoff.write_bytes(bytes(data)[:-100])
    shutil.rmtree(stages / "instruction")
    monkeypatch.setattr(hicom.stages, "train", lambda *a, **k: pytest.fail("the stage was built"))
    # (launched as the run now is: its stage 2 was trained again with another rate above)
    with pytest.raises(ValueError, match=r"stage conditional .*: model.lr.compressor: 0.005 there, 0.0003 here"):
        run_stages(cfg)
    as_now = compose_train(cache_dir, tmp_path / "run", ["experiment=tiny_stages", *SMALL, *other_lr[-1:]])
    with pytest.raises(HandoffError, match=r"handoff\.safetensors' \(\d+ bytes\) is not a whole safetensors file"):
        run_stages(as_now)


def test_a_guided_compressor_that_cannot_turn_its_guide_off_is_refused_for_an_unguided_stage(cache_dir, tmp_path):
    from hicom.stages import run_stages

    cfg = compose_train(cache_dir, tmp_path / "run", ["experiment=tiny_stages", *SMALL])
    with open_dict(cfg):  # a compressor of one's own that reads the guide and keeps Compressor's unguided_config
        cfg.model.compressor = {"_target_": "tests.modules.test_video_llm.GuidedOwnCompressor", "_partial_": True}
    with pytest.raises(ValueError, match=r"stage alignment: guided: false, but GuidedOwnCompressor.unguided_config"):
        run_stages(cfg)
    assert not (tmp_path / "run" / "stages").exists()


def test_a_stage_that_stopped_part_way_resumes_from_its_last_checkpoint(cache_dir, tmp_path, monkeypatch):
    """Launched again under its name, a staged run skips the finished stages and resumes the one that stopped
    from its own last.ckpt; the stages after it start fresh. An explicit ckpt_path is one stage's: it needs stage=."""
    import hicom.stages
    import hicom.training
    from hicom.stages import run_stages

    every_step = [
        "callbacks.model_checkpoint.train_time_interval=null",
        "callbacks.model_checkpoint.every_n_train_steps=1",
    ]
    cfg = compose_train(cache_dir, tmp_path / "run", ["experiment=tiny_stages", *SMALL, *every_step])
    trained, resumed_from = {}, {}

    def train(stage_cfg, before_fit, after_fit, resume):
        name = Path(stage_cfg.paths.output_dir).name
        resumed_from[name] = stage_cfg.ckpt_path

        def recorded(model) -> None:
            before_fit(model)
            step = model.training_step

            def dies(batch, *args):
                if name == "conditional" and model.global_step == 2 and not stage_cfg.ckpt_path:
                    raise RuntimeError("the node went away")
                trained.setdefault(name, []).append(model.global_step)
                return step(batch, *args)

            model.training_step = dies

        return hicom.training.train(stage_cfg, before_fit=recorded, after_fit=after_fit, resume=resume)

    monkeypatch.setattr(hicom.stages, "train", train)
    with pytest.raises(RuntimeError, match="node went away"):
        run_stages(cfg)
    assert trained == {"alignment": [0, 1, 2, 3], "conditional": [0, 1]}
    # it goes on from its checkpoint only from the parent it started from: another's would be overridden by it
    started = tmp_path / "run" / "stages" / "conditional" / "started.json"
    recorded = started.read_text()
    started.write_text(json.dumps({**json.loads(recorded), "parent_sha256": "0" * 64}))  # as if trained again since
    with pytest.raises(ValueError, match=r"stage conditional stopped part-way .* training from other weights than"):
        run_stages(cfg)
    started.write_text(recorded)
    trained.clear()
    resumed_from.clear()
    results = run_stages(cfg)
    stages = tmp_path / "run" / "stages"
    assert results["alignment"] == {"skipped": True} and results["conditional"]["steps"] == 4
    assert trained == {"conditional": [2, 3], "instruction": [0, 1, 2, 3]}
    assert resumed_from == {
        "conditional": str(stages / "conditional" / "checkpoints" / "last.ckpt"),
        "instruction": None,
    }
    with pytest.raises(ValueError, match=r"ckpt_path resumes one stage: give stage=<name>"):
        run_stages(compose_train(cache_dir, tmp_path / "run", ["experiment=tiny_stages", *SMALL, "ckpt_path=x.ckpt"]))
    with pytest.raises(ValueError, match=r"stage_parent starts one stage .*: give stage=<name> with it"):
        run_stages(compose_train(cache_dir, tmp_path / "run", ["experiment=tiny_stages", *SMALL, "stage_parent=x"]))


@pytest.mark.parametrize("compressor", ["instructblip", "avgpool"])
def test_the_staged_recipe_takes_another_compressor_by_one_override(compressor, cache_dir, tmp_path):
    """Stage 1 aligns without a guide and stage 2 turns it on whatever the compressor: the instruction-aware
    Q-Former's instruction modules start in stage 2 (its unguided form has none); avgpool has no guide at all."""
    from hicom.stages import run_stages

    overrides = ["experiment=tiny_stages", f"model/compressor={compressor}", *SMALL, "trainer.limit_train_batches=1"]
    results = run_stages(compose_train(cache_dir, tmp_path, overrides))
    assert [r["steps"] for r in results.values()] == [1, 1, 1]
    stages = tmp_path / "stages"
    names = {s: set(json.loads((stages / s / "manifest.json").read_text())["parameters"]) for s in results}
    added = names["conditional"] - names["alignment"]
    assert bool(added) is (compressor == "instructblip") and names["instruction"] >= names["conditional"]
    assert all(name.startswith("compressor.") for name in added)


def test_a_figure_a_run_does_not_have_reads_n_a_in_the_summary():
    from rich.console import Console

    from hicom.training import summary_table

    console = Console(width=100, record=True)
    console.print(summary_table({"accuracy": None, "chance": None, "steps": 3, "skipped_samples": []}))
    text = console.export_text()
    assert "n/a" in text and "0.000" not in text


def test_a_fast_dev_run_puts_one_batch_through_every_hook_test_included(cache_dir, tmp_path):
    metrics = train(compose_train(cache_dir, tmp_path, [*SMALL, "debug=fdr"]))
    assert metrics["steps"] == 1 and metrics["n_questions"] == 8  # one test batch of data.eval_batch_size


@pytest.mark.parametrize(
    ("compressor", "precision"),
    [
        ("hicom", "bf16-true"),
        ("hicom", "bf16-mixed"),
        ("avgpool", "bf16-true"),
        ("bilinear", "bf16-true"),
        ("instructblip", "bf16-true"),
    ],
)
def test_a_step_and_an_answer_in_bf16(compressor, precision, cache_dir, tmp_path):
    """The GPU recipe's number formats, on the CPU: bf16 weights and inputs (DeepSpeed's bf16, bf16-true) or fp32
    weights under autocast (bf16-mixed); a trained part takes the step, and the held-out questions are answered."""
    from safetensors.torch import load_file

    overrides = [*SMALL, "debug=fdr", f"model/compressor={compressor}", f"trainer.precision={precision}"]
    overrides.append("model.warmup_ratio=0")  # a one-step fit's warmup (rounded up) is that step, at lr 0
    before, built, frequencies = {}, [], []

    def keep(model) -> None:
        before.update({k: v.clone() for k, v in model.net.compressor.state_dict().items()})
        built.append(model)
        rotary = model.net.llm.model.model.rotary_emb  # the dtype of RoPE's frequencies in each forward
        rotary.register_forward_pre_hook(lambda module, args: frequencies.append(module.inv_freq.dtype))

    metrics = train(compose_train(cache_dir, tmp_path, overrides), before_fit=keep)
    assert metrics["steps"] == 1 and metrics["n_questions"] == 8 and torch.tensor(metrics["train_loss"]).isfinite()
    # bf16-true casts the module, but RoPE's frequencies stay fp32 in training, validation and test
    assert frequencies and set(frequencies) == {torch.float32}
    assert built[0].net.llm.model.lm_head.weight.dtype == (
        torch.bfloat16 if precision == "bf16-true" else torch.float32
    )
    after = {k.removeprefix("compressor."): v for k, v in load_file(str(tmp_path / "handoff.safetensors")).items()}
    assert all(after[k].isfinite().all() for k in before)
    assert any(not torch.equal(after[k], v.to(after[k].dtype)) for k, v in before.items())  # the step moved it


def _order_recorder(cache_dir, tmp_path, base: list[str]):
    """`run(out, overrides, die_at=, halt_at=)`: a training run's batches (epoch and sample ids), in order; it
    dies (an exception) at step `die_at`, or sets should_stop on micro-batch `halt_at` as max_time's Timer does.
    `run.validated`: the step of each held-out batch of the last run."""

    def run(out, overrides, die_at=None, halt_at=None):
        seen, run.validated = [], []

        def record(model) -> None:
            step, validation_step = model.training_step, model.validation_step

            def validated(batch, *args):
                if not model.trainer.sanity_checking:
                    run.validated.append(model.global_step)
                return validation_step(batch, *args)

            def recorded(batch, *args):
                if model.global_step == die_at:
                    raise RuntimeError("the node went away")
                if len(seen) == halt_at:
                    model.trainer.should_stop = True
                seen.append((model.current_epoch, sorted(batch["ids"])))
                return step(batch, *args)

            model.training_step, model.validation_step = recorded, validated

        try:
            train(compose_train(cache_dir, tmp_path / out, [*base, *overrides]), before_fit=record)
        except RuntimeError as error:
            assert die_at is not None and "node went away" in str(error)
        return seen

    return run


RESUMABLE = [*SMALL, "trainer.limit_train_batches=null", "trainer.limit_val_batches=0", "evaluate=false"]
RESUMABLE += ["trainer.max_epochs=2", "data.source.num_train=24", "data.group_by_length=true"]  # 2 epochs of 6


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_resumed_mid_epoch_trains_the_batches_it_would_have_had(workers, cache_dir, tmp_path):
    """A run that dies mid-epoch resumes from its last periodic checkpoint, its data loader where it was
    (ResumableLoader): the rest of the epoch in the uninterrupted run's order, then the next epoch as that run
    has it, no batch twice. A run that max_steps stopped part-way through an epoch goes on likewise."""
    # persistent workers keep their iterator from epoch to epoch
    run = _order_recorder(cache_dir, tmp_path, [*RESUMABLE, f"data.num_workers={workers}"])
    every_2_steps = [
        "callbacks.model_checkpoint.train_time_interval=null",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    ]
    whole = run("whole", [])
    assert len(whole) == 12 and whole[:6] != whole[6:]  # 2 epochs of 6 batches, each in its own order
    died = run("died", every_2_steps, die_at=5)
    assert died == whole[:5]
    rest = run("rest", [f"ckpt_path={tmp_path / 'died' / 'checkpoints' / 'last.ckpt'}"])  # saved at step 4
    assert whole[:4] + rest == whole
    stopped = run("stopped", ["trainer.max_steps=3"])
    more = run("more", [f"ckpt_path={tmp_path / 'stopped'}", "trainer.max_steps=12"])  # its checkpoints/last.ckpt
    assert stopped + more == whole
    # a checkpoint on an epoch's last batch: the next epoch, whole
    every_6_steps = [every_2_steps[0], "callbacks.model_checkpoint.every_n_train_steps=6"]
    assert run("died_later", every_6_steps, die_at=7) == whole[:7]
    assert run("rest_later", [f"ckpt_path={tmp_path / 'died_later' / 'checkpoints' / 'last.ckpt'}"]) == whole[6:]


def test_a_relaunch_with_another_checkpoint_interval_replaces_last_ckpt(cache_dir, tmp_path):
    """Lightning keeps where it last wrote only for a checkpoint of the same interval settings: a relaunch into the
    run folder with another interval wrote last-v1.ckpt beside last.ckpt, and the next relaunch resumed from the
    stale last.ckpt, its steps trained twice in silence."""
    every_2 = [
        "callbacks.model_checkpoint.train_time_interval=null",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    ]
    for max_steps, interval in ((2, every_2), (4, []), (6, [])):  # the default hourly interval after the first
        train(compose_train(cache_dir, tmp_path / "run", [*RESUMABLE, f"trainer.max_steps={max_steps}", *interval]))
        checkpoints = tmp_path / "run" / "checkpoints"
        assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]
        saved = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
        assert saved["global_step"] == max_steps


def test_a_run_resumed_with_max_steps_after_an_epoch_lightning_counts_done_trains_the_next_epoch_whole(
    cache_dir, tmp_path, caplog
):
    """Lightning counts an epoch done when its fit stops, and kept that epoch's batch count for a fit resumed
    with max_steps set: the next epoch then had 6 - 6 + 1 batches after a whole epoch, 6 - 3 after a stop at 3.
    A checkpoint written there (Lightning's own ModelCheckpoint at a max_steps stop, or any at the end of a
    run's last epoch, or in on_train_epoch_end, whose epoch number stayed one behind) now resumes with the next
    epoch whole."""
    run = _order_recorder(cache_dir, tmp_path, RESUMABLE)
    whole = run("whole", [])
    lightnings = ["callbacks.model_checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint"]
    assert run("stopped", [*lightnings, "trainer.max_steps=3"]) == whole[:3]
    with caplog.at_level("WARNING"):
        assert run("next", [f"ckpt_path={tmp_path / 'stopped'}", "trainer.max_steps=12"]) == whole[6:]
    assert "stopped after 3 of epoch 0's 6 batches (max_steps, max_time or should_stop)" in caplog.text
    assert run("first", ["trainer.max_epochs=1"]) == whole[:6]
    assert run("second", [f"ckpt_path={tmp_path / 'first'}", "trainer.max_steps=12"]) == whole[6:]
    epoch_ends = ["callbacks.model_checkpoint.train_time_interval=null", "+callbacks.model_checkpoint.every_n_epochs=1"]
    epoch_ends += ["callbacks.model_checkpoint.save_top_k=-1"]  # Lightning writes last.ckpt there with a top-k one
    assert run("epoch_ends", epoch_ends, die_at=8) == whole[:8]  # its last.ckpt: epoch 0's on_train_epoch_end
    ended = tmp_path / "epoch_ends" / "checkpoints" / "last.ckpt"
    assert run("after_end", [f"ckpt_path={ended}", "trainer.max_steps=12"]) == whole[6:]


def test_a_run_resumed_with_a_longer_schedule_trains_its_first_step_at_that_schedules_rate(cache_dir, tmp_path, caplog):
    """A run trained on for longer (a resume with a larger max_steps: another total, another cosine) gets the
    rates of a run that had that schedule from the start, its first resumed step included (it ran at the
    restored rate of the ended schedule, 0), and says so; a resume with the same schedule says nothing."""

    def run(out, overrides, halt_at=None):
        rates = []

        def record(model) -> None:
            step = model.training_step

            def recorded(batch, *args):
                if len(rates) == halt_at:
                    model.trainer.should_stop = True
                rates.append([group["lr"] for group in model.trainer.optimizers[0].param_groups])
                return step(batch, *args)

            model.training_step = recorded

        train(compose_train(cache_dir, tmp_path / out, [*RESUMABLE, *overrides]), before_fit=record)
        return rates

    whole = run("whole", [])
    assert len(whole) == 12 and whole[3][0] > 0
    assert run("short", ["trainer.max_steps=4"])[-1] != whole[3]
    with caplog.at_level("WARNING"):
        longer = run("longer", [f"ckpt_path={tmp_path / 'short'}", "trainer.max_steps=12"])
    assert longer == whole[4:]
    assert "resuming at schedule step 4 with a learning-rate schedule of 1 warmup and 12 total steps" in caplog.text
    assert "the checkpoint's run had 1 and 4" in caplog.text
    assert run("halted", [], halt_at=1) == whole[:2]
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert run("same", [f"ckpt_path={tmp_path / 'halted'}"]) == whole[2:]
    assert "learning-rate schedule" not in caplog.text


def test_a_fit_that_should_stop_ends_mid_epoch_resumes_where_it_stopped(cache_dir, tmp_path, caplog):
    """A stop from should_stop (max_time's Timer) part-way through an epoch resumes where it stopped, as a
    max_steps one does; set within a gradient accumulation (in training, or by EarlyStopping at a validation
    there, which does not run again at the step), the fit stops at its step, and last.ckpt is written there where
    such a validation asks for it (its top-k where it measured). A stop with a validation
    writes that validation's checkpoints (a monitored top-k) as well as last.ckpt, which is written after it."""
    run = _order_recorder(cache_dir, tmp_path, RESUMABLE)
    whole = run("whole", [])
    assert run("halted", [], halt_at=1) == whole[:2]
    assert run("after_halt", [f"ckpt_path={tmp_path / 'halted'}"]) == whole[2:]
    accumulating = ["global_batch_size=8"]  # 2 micro-batches of 4 a step
    assert run("halted_within", accumulating, halt_at=2) == whole[:4]  # on a step's first micro-batch
    assert run("after_within", [*accumulating, f"ckpt_path={tmp_path / 'halted_within'}"]) == whole[4:]
    validating = ["trainer.limit_val_batches=1", "+trainer.val_check_interval=3"]
    validating += ["+callbacks.model_checkpoint.monitor=val/loss", "callbacks.model_checkpoint.save_top_k=-1"]
    validating += ["callbacks.model_checkpoint.train_time_interval=null"]
    early = ["+callbacks.early_stopping._target_=lightning.pytorch.callbacks.EarlyStopping"]
    early += ["+callbacks.early_stopping.monitor=val/loss", "+callbacks.early_stopping.stopping_threshold=1000"]
    early += ["+callbacks.early_stopping.check_on_train_epoch_end=false"]  # it stops at the first validation
    validating_within = ["trainer.limit_val_batches=1", "+trainer.val_check_interval=3", *accumulating]
    assert run("stopped_early", [*validating_within, *early]) == whole[:4]  # validated on step 2's first micro-batch
    assert run.validated == [1]  # not again at the step, where Lightning validates a stopping fit
    assert run("after_early", [*accumulating, f"ckpt_path={tmp_path / 'stopped_early'}"]) == whole[4:]
    top_k = [*validating_within, *validating[2:]]  # a monitored top-k at each validation
    assert run("validated_within", top_k, die_at=2) == whole[:4]  # dies on step 3's first micro-batch
    checkpoints = tmp_path / "validated_within" / "checkpoints"
    # the validation's top-k where it measured the weights of step 1; last.ckpt at the step after it
    assert sorted(path.name for path in checkpoints.iterdir()) == ["epoch00-step1.ckpt", "last.ckpt"]
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2 and last["VideoQADataModule"]["train_loader"]["batches"] == 4
    with caplog.at_level("WARNING"):
        assert run("after_within", [*accumulating, f"ckpt_path={checkpoints / 'last.ckpt'}"]) == whole[4:]
    assert "micro-batches, before the step" not in caplog.text  # last.ckpt: at a step
    with caplog.at_level("WARNING"):  # the top-k file: written after 1 of step 2's 2 micro-batches, which is said
        assert run("after_top_k", [*accumulating, f"ckpt_path={checkpoints / 'epoch00-step1.ckpt'}"]) == whole[3:]
    assert "written after 1 of an optimizer step's 2 micro-batches, before the step" in caplog.text
    assert run("validated", [*validating, "trainer.max_steps=3"]) == whole[:3]
    checkpoints = tmp_path / "validated" / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["epoch00-step3.ckpt", "last.ckpt"]
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["VideoQADataModule"]["train_loader"]["batches"] == 3  # epoch 0 under way
    assert last["callbacks"]  # written after the validation: the top-k it recorded
    state = next(value for key, value in last["callbacks"].items() if "LastCheckpoint" in key)
    assert state["best_model_path"].endswith("epoch00-step3.ckpt")


def test_a_resumed_run_that_makes_its_loader_again_each_epoch_resumes_once(cache_dir, tmp_path, caplog):
    """reload_dataloaders_every_n_epochs makes a new loader each epoch: the checkpoint's place applies to the
    first one only. A checkpoint without the loader's place (older code) says so and starts the epoch over."""
    base = [*SMALL, "trainer.limit_train_batches=null", "trainer.limit_val_batches=0", "evaluate=false"]
    base += ["trainer.max_epochs=2", "data.source.num_train=24", "+trainer.reload_dataloaders_every_n_epochs=1"]
    base += ["callbacks.model_checkpoint.train_time_interval=null", "callbacks.model_checkpoint.every_n_train_steps=2"]

    def run(out, overrides):
        seen = []

        def record(model) -> None:
            step = model.training_step
            model.training_step = lambda batch, *args: seen.append(sorted(batch["ids"])) or step(batch, *args)

        train(compose_train(cache_dir, tmp_path / out, [*base, *overrides]), before_fit=record)
        return seen

    whole = run("whole", [])
    run("first", ["trainer.max_epochs=1", "trainer.max_steps=4"])  # its step-4 checkpoint: epoch 0, 4 batches
    checkpoint = torch.load(tmp_path / "first" / "checkpoints" / "last.ckpt", weights_only=True)
    assert run("rest", [f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}"]) == whole[4:]
    del checkpoint["VideoQADataModule"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with caplog.at_level("WARNING"):
        assert run("old", [f"ckpt_path={tmp_path / 'old.ckpt'}"]) == whole[:2] + whole[6:]
    assert "holds no place of the data loader" in caplog.text


def test_last_ckpt_is_written_at_the_end_after_periodic_ones(cache_dir, tmp_path):
    """Lightning's ModelCheckpoint with a step or time trigger writes last.ckpt at the end only if it never wrote
    one: 12 steps checkpointed every 5 ended with a step-10 last.ckpt (LastCheckpoint writes it at 12)."""
    overrides = [*SMALL, "trainer.limit_train_batches=12", "data.source.num_train=48", "evaluate=false"]
    overrides += [
        "callbacks.model_checkpoint.train_time_interval=null",
        "callbacks.model_checkpoint.every_n_train_steps=5",
    ]
    assert train(compose_train(cache_dir, tmp_path, overrides))["steps"] == 12
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 12


def test_the_overfit_debug_config_trains(cache_dir, tmp_path):
    """trainer.overfit_batches: Lightning gives the training loader a sequential sampler of its own."""
    metrics = train(compose_train(cache_dir, tmp_path, [*SMALL, "debug=overfit", "trainer.max_epochs=2"]))
    assert metrics["steps"] == 4


def test_a_fit_stopped_by_sigterm_or_ctrl_c_saves_its_step_and_does_not_exit_as_finished(
    cache_dir, tmp_path, monkeypatch
):
    """SIGTERM (preemption, scancel): Lightning ends the fit after the batch at hand, last.ckpt holds that step and
    the run exits 143, not 0 (a scheduler's afterok must not follow an unfinished run). The first Ctrl-C does the
    same. Either goes on from where it stopped with ckpt_path=<run>, no batch lost or trained twice."""
    import signal

    from safetensors.torch import load_file

    from hicom.callbacks.interrupt import GracefulInterrupt

    before = signal.getsignal(signal.SIGINT)  # Python's default handler, or SIG_IGN in a job started with `&`
    base = [*SMALL, "trainer.limit_train_batches=null", "trainer.limit_val_batches=0", "evaluate=false"]
    base += ["data.source.num_train=24"]  # 6 batches, checkpoints hourly: none before the stop

    def run(out, overrides, seen, stop=None, at=lambda model, seen: model.global_step == 3):
        def record(model) -> None:
            step = model.training_step

            def recorded(batch, *args):
                if stop is not None and at(model, seen):
                    stop()
                seen.append(sorted(batch["ids"]))
                return step(batch, *args)

            model.training_step = recorded

        train(compose_train(cache_dir, tmp_path / out, [*base, *overrides]), before_fit=record)

    def ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)

    def last_step(out):
        saved = torch.load(tmp_path / out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        return saved["global_step"]

    run("whole", [], whole := [])
    assert len(whole) == 6
    with pytest.raises(SystemExit) as stopped:
        run("term", [], term := [], stop=lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert stopped.value.code == 143 and term == whole[:4] and last_step("term") == 4  # the batch at hand finished
    run("term_rest", [f"ckpt_path={tmp_path / 'term'}"], rest := [])
    assert term + rest == whole
    with pytest.raises(SystemExit) as stopped:
        run("int", [], interrupted := [], stop=ctrl_c)
    assert stopped.value.code == 143 and interrupted == whole[:4] and last_step("int") == 4  # as SIGTERM
    run("int_rest", [f"ckpt_path={tmp_path / 'int'}"], rest := [])
    assert interrupted + rest == whole
    with pytest.raises(SystemExit) as stopped:  # the same Ctrl-C passed on by a wrapper: one stop, as above
        run("forwarded", [], [], stop=lambda: [ctrl_c(), ctrl_c()])
    assert stopped.value.code == 143 and last_step("forwarded") == 4
    monkeypatch.setattr(GracefulInterrupt, "again_after", 0.0)
    with pytest.raises(SystemExit) as stopped:  # Ctrl-C again: at once, nothing saved
        run("twice", [], [], stop=lambda: [ctrl_c(), ctrl_c()])
    assert stopped.value.code == 1 and not (tmp_path / "twice" / "checkpoints" / "last.ckpt").exists()
    assert signal.getsignal(signal.SIGINT) is before  # put back
    # 2 micro-batches a step: a SIGTERM within a step (the third micro-batch) is held until the step is taken, since
    # the gradients gathered so far are in no checkpoint; the resumed run ends on the very weights of the whole one
    accumulate = ["global_batch_size=8"]
    run("acc_whole", accumulate, acc_whole := [])
    with pytest.raises(SystemExit) as stopped:
        sigterm = lambda: os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731
        run("acc_term", accumulate, acc_term := [], stop=sigterm, at=lambda model, seen: len(seen) == 2)
    assert stopped.value.code == 143 and acc_term == acc_whole[:4] and last_step("acc_term") == 2
    run("acc_rest", [*accumulate, f"ckpt_path={tmp_path / 'acc_term'}"], acc_rest := [])
    assert acc_term + acc_rest == acc_whole
    ends = [load_file(str(tmp_path / name / "handoff.safetensors")) for name in ("acc_whole", "acc_rest")]
    assert all(torch.equal(ends[0][key], ends[1][key]) for key in ends[0])


def test_a_sigterm_to_one_process_of_a_ddp_launch_stops_them_all_at_one_step(cache_dir, tmp_path):
    """SIGTERM to process 1 alone, within a step's accumulation (its third micro-batch of 2 a step): both processes
    stop after that step and last.ckpt holds it. Lightning's own handler broadcast from inside the signal handler:
    the launch crashed (gloo: "collective mismatch") with nothing saved. (Each process signalled at its own moment
    stops alike: the processes agree at each step.)"""
    env = {k: v for k, v in os.environ.items() if k != "HICOM_RUN_STAMP"}
    env["HICOM_LOGS"] = str(tmp_path / "logs")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*torchrun, "train.py", *SMALL, "data.source.num_train=24", "trainer.limit_train_batches=null",
               "trainer.limit_val_batches=0", "data.batch_size=1", "global_batch_size=4", "trainer.devices=2",
               "strategy=ddp", "evaluate=false", f"paths.cache_dir={cache_dir}",
               "+callbacks.sigterm._target_=tests.scripts.sigterm_at.SigtermAt", "+callbacks.sigterm.at={1:2}"]  # fmt: skip
    done = subprocess.run(command, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=300)
    (folder,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    for log in ("train.log", "train.rank1.log"):
        assert "stopped by SIGTERM or Ctrl-C at step 2," in (folder / log).read_text(), done.stderr[-3000:]
    assert done.returncode == 1  # torchrun's, for processes that exited 143
    checkpoint = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2


def test_a_run_resumes_from_its_checkpoint(cache_dir, tmp_path, monkeypatch, caplog):
    """ckpt_path= loads the Lightning checkpoint (torch.load with weights_only=True: the module's hyperparameters
    must be plain Python values) and goes on from its step."""
    import csv

    first = train(compose_train(cache_dir, tmp_path / "first", [*SMALL, "trainer.max_steps=2"]))
    checkpoint = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert first["steps"] == 2 and checkpoint.is_file()
    more = [*SMALL, f"ckpt_path={checkpoint}", "trainer.max_steps=3", "trainer.max_epochs=3"]
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"truncated\.ckpt' is not a whole checkpoint"):
        train(compose_train(cache_dir, tmp_path / "bad", [*SMALL, f"ckpt_path={truncated}"]))
    damaged = tmp_path / "damaged.ckpt"  # its zip directory whole, bytes within zeroed
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"damaged\.ckpt' is damaged \(its entry .* fails its CRC check\)"):
        train(compose_train(cache_dir, tmp_path / "bad", [*SMALL, f"ckpt_path={damaged}"]))
    with pytest.raises(FileNotFoundError, match="ckpt_path"):
        train(compose_train(cache_dir, tmp_path / "bad", [*SMALL, f"ckpt_path={tmp_path / 'none.ckpt'}"]))
    stopped = tmp_path / "deepspeed.ckpt"  # a DeepSpeed folder whose save stopped before it named its tag
    (stopped / "checkpoint").mkdir(parents=True)
    (stopped / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"deepspeed\.ckpt' is neither a run's folder .* nor a checkpoint folder"):
        train(compose_train(cache_dir, tmp_path / "bad", [*SMALL, f"ckpt_path={stopped}"]))
    (stopped / "latest").write_text("checkpoint")  # named: a DeepSpeed checkpoint, whose tag folder is not one
    with pytest.raises(
        ValueError, match=r"deepspeed\.ckpt': checkpoint/mp_rank_00_model_states\.pt is not a whole checkpoint"
    ):
        train(compose_train(cache_dir, tmp_path / "bad", [*SMALL, f"ckpt_path={stopped}"]))
    with pytest.raises(ValueError, match=r"inside a DeepSpeed checkpoint: give its parent, '.*deepspeed\.ckpt'"):
        train(compose_train(cache_dir, tmp_path / "bad", [*SMALL, f"ckpt_path={stopped / 'checkpoint'}"]))
    with monkeypatch.context() as patch:  # refused before the towers and the LLM load
        patch.setattr("hicom.training.build", lambda *a, **k: pytest.fail("built before the resume was checked"))
        trained = "trained ['compressor', 'guide_encoder', 'llm', 'vision_head', 'vision_trunk'] and this one trains"
        for other, differs in [("model/compressor=avgpool", "another compressor (hicom.modules.compressors.HICom; this run's is "
                                "hicom.modules.compressors.AvgPoolCompressor): resume with the settings of the run"),
                               ("model.compressor.global_.num_queries=8", "global_.num_queries: the checkpoint's 32, "
                                "this run's 8. Resume with the checkpoint's (model.compressor.global_.num_queries=32)"),
                               ("model.trainable=[compressor,llm]", f"{trained} ['compressor', 'llm']"),
                               ("~model.lr.injection", "learning-rate group of their own (model.lr.injection)"),
                               # what the optimizer's state would restore, and the config would say otherwise
                               ("model.lr.compressor=1e-6", "model.lr.compressor is 1e-06 here, 0.0003 in the chec"),
                               ("+model.betas=[0.9,0.95]", "model.betas is [0.9,0.95] here, [0.9,0.999] in the chec"),
                               # the same tensors, another computation
                               ("model.compressor.global_.position=k", "global_.position: the checkpoint's kv, this "
                                "run's k. Resume with the checkpoint's (model.compressor.global_.position=kv)")]:  # fmt: skip
            with pytest.raises(ValueError, match=re.escape(differs)):
                train(compose_train(cache_dir, tmp_path / "bad", [*more, other]))
        legacy = tmp_path / "legacy.ckpt"  # saved before checkpoints kept the compressor's config: its tensors tell
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        del saved["compressor_config"]
        torch.save(saved, legacy)
        with pytest.raises(ValueError, match=re.escape("query (32, 64) != (8, 64)")):
            overrides = [*SMALL, f"ckpt_path={legacy}", "model.compressor.global_.num_queries=8"]
            train(compose_train(cache_dir, tmp_path / "bad", overrides))

    # other data than the checkpoint's run had: meant, as an explicit ckpt_path says, but named in the log
    class Checked(Exception):
        pass

    with monkeypatch.context() as patch, caplog.at_level("WARNING"):  # said before the launch's checks
        patch.setattr("hicom.training.check", lambda *a, **k: (_ for _ in ()).throw(Checked()))
        with pytest.raises(Checked):
            train(compose_train(cache_dir, tmp_path / "other_data", [*more, "data.num_frames=4", "seed=3"]))
    assert re.search(
        r"resuming from .*last\.ckpt, whose run was configured otherwise \(.*first/config\.yaml\): "
        r"data\.num_frames: 8 there, 4 here; data\.seed: 0 there, 3 here; seed: 0 there, 3 here\. The fit goes on",
        caplog.text,
    )
    caplog.clear()
    resumed = train(compose_train(cache_dir, tmp_path / "resumed", more))
    assert "configured otherwise" not in caplog.text
    rows = csv.DictReader((tmp_path / "resumed" / "csv" / "version_0" / "metrics.csv").open())
    assert resumed["steps"] == 3 and [int(r["step"]) for r in rows if r.get("train/loss")] == [2]  # one more step
    # the run's figures, the launch before included
    # (the seconds the checkpoint recorded, not the first launch's whole fit: it went on past its last save)
    before = torch.load(checkpoint, map_location="cpu", weights_only=True)["fit_so_far"]["seconds"]
    assert resumed["train_samples"] == first["train_samples"] // 2 * 3 and resumed["fit_seconds"] > before > 0

    # launched again in its own folder without ckpt_path (a requeued job), a run goes on from its last checkpoint;
    # a launch refused before it is built leaves the folder's config.yaml, what evaluate.py builds from, as it was
    # (another run's launch into the folder is refused, naming what differs from its config.yaml)
    written = (tmp_path / "first" / "config.yaml").read_text()
    relaunch = [*SMALL, "trainer.max_steps=3", "trainer.max_epochs=3"]  # no ckpt_path
    for other, differs in [("model.lr.compressor=1e-6", "model.lr.compressor: 0.0003 there, 1e-06 here"),
                           ("data.num_frames=4", "data.num_frames: 8 there, 4 here"),
                           ("seed=1", "seed: 0 there, 1 here")]:  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(differs) + r".* to go on from that checkpoint with these"):
            train(compose_train(cache_dir, tmp_path / "first", [*relaunch, other]))
    assert (tmp_path / "first" / "config.yaml").read_text() == written
    again = train(compose_train(cache_dir, tmp_path / "first", relaunch))
    assert again["steps"] == 3 and again["train_samples"] == resumed["train_samples"]
    launches = [csv.DictReader((tmp_path / "first" / "csv" / f"version_{n}" / "metrics.csv").open()) for n in (0, 1)]
    assert [[int(r["step"]) for r in rows if r.get("train/loss")] for rows in launches] == [[0, 1], [2]]
    # finished, launched again: no step to train, and the run's figures stay the run's
    done = train(compose_train(cache_dir, tmp_path / "first", relaunch))
    assert done["steps"] == 3 and done["train_loss"] == again["train_loss"] is not None
    assert done["train_samples"] == again["train_samples"] and done["wall_seconds"] >= done["fit_seconds"]
    # an optimizer state for other parameter groups (a checkpoint from before the unread trunk layers were frozen)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    saved["optimizer_states"][0]["param_groups"][0]["params"].append(10**6)
    torch.save(saved, tmp_path / "other_groups.ckpt")
    with pytest.raises(ValueError, match=r"the checkpoint's optimizer state is for groups of \[\("):
        train(compose_train(cache_dir, tmp_path / "groups", [*SMALL, f"ckpt_path={tmp_path / 'other_groups.ckpt'}"]))
    # a checkpoint folder outside the run's own (shared scratch) is no earlier launch of this run: a new run starts
    shared = [*SMALL, "trainer.max_steps=1", f"callbacks.model_checkpoint.dirpath={tmp_path / 'first' / 'checkpoints'}"]
    assert train(compose_train(cache_dir, tmp_path / "new", shared))["steps"] == 1


class _Payload:
    """What a tampered checkpoint could pickle: unpickling it runs a call (here a harmless one)."""

    def __reduce__(self):
        return (print, ("unpickled",))


def test_a_deepspeed_checkpoint_that_pickles_code_or_is_damaged_is_refused_before_its_engine_loads_it(tmp_path):
    """DeepSpeed's engine loads its files with torch.load(weights_only=False): a file naming any class but the
    few DeepSpeed pickles (its loss scaler, ZeRO stage, parameter fragments) would run code at the resume."""
    from hicom.training import check_checkpoint

    deepspeed = pytest.importorskip("deepspeed")
    folder = tmp_path / "last.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    states, optim = folder / "checkpoint/mp_rank_00_model_states.pt", folder / "checkpoint/optim_states.pt"
    torch.save({"module": {"w": torch.ones(64, 64)}, "ds_version": deepspeed.__version__}, states)
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum(2), "state": torch.zeros(64, 64)}, optim)
    check_checkpoint(folder)  # what DeepSpeed writes
    torch.save({"loss_scaler": _Payload()}, optim)
    with pytest.raises(ValueError, match=r"optim_states\.pt pickles \['builtins\.print'\], which DeepSpeed's load"):
        check_checkpoint(folder)
    torch.save({"state": torch.ones(64, 64)}, optim)
    data = bytearray(optim.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 1024] = bytes(1024)  # its zip directory whole, bytes within zeroed
    optim.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"optim_states\.pt is damaged \(its entry .* fails its CRC check\)"):
        check_checkpoint(folder)


def test_a_run_whose_every_training_sample_is_unusable_fails_instead_of_reporting_success(cache_dir, tmp_path):
    records, overrides = _videos_with_bad_ones(cache_dir, tmp_path, missing=0, corrupt=1)
    for record in records:
        record["video"] = "train/missing.mp4"
    (tmp_path / "train.json").write_text(json.dumps(records))
    cfg = compose_train(cache_dir, tmp_path / "run", [*overrides, "data.batch_size=4", "evaluate=false"])
    with pytest.raises(RuntimeError, match=r"no training sample could be used .*'missing': 16"):
        train(cfg)
    assert not (tmp_path / "run" / "handoff.safetensors").exists()  # no untrained weights handed on


def test_skipped_records_are_told_apart_by_file_and_row_not_by_id():
    """Ids repeat across a mixture's files: two bad records with one id are two skips; one record seen twice, one."""
    from types import SimpleNamespace

    from hicom.models.video_llm_module import VideoLLMModule

    bad = {"id": "0001", "skip": "missing", "path": "a.mp4", "error": "file not found"}
    module = SimpleNamespace(skipped={}, skipped_before={"z.json:1": {**bad, "source": ["z.json", 1]}})
    batch = {"skipped": [{**bad, "source": ["x.json", 3]}, {**bad, "source": ["y.json", 3]}]}
    VideoLLMModule._count_skipped(module, batch)
    VideoLLMModule._count_skipped(module, {"skipped": [{**bad, "source": ["x.json", 3]}]})  # the next epoch
    VideoLLMModule._count_skipped(module, {"skipped": [{**bad, "source": ["z.json", 1]}]})  # skipped before a resume
    assert sorted(module.skipped) == ["x.json:3", "y.json:3"]  # this launch's only: the gathers send these


@pytest.mark.parametrize("compressor", ["hicom", "instructblip"])
def test_what_only_the_guide_adds_trains_at_the_injection_rate(compressor, cache_dir, tmp_path, monkeypatch):
    """The injection group is what the compressor's unguided config lacks: HICom's injection modules; the
    instruction-aware Q-Former's instruction projection and the text half of its layers. It is computed from the
    unguided config, so a compressor of one's own need not name them (is_guide_parameter is not asked)."""
    from hydra.utils import instantiate

    from hicom.modules.compressors.base import unguided_config
    from hicom.training import build

    overrides = [*SMALL, f"model/compressor={compressor}", "model.trainable=[compressor]"]
    model, _ = build(compose_train(cache_dir, tmp_path, overrides))
    expected = {n for n, _ in model.net.compressor.named_parameters() if model.net.compressor.is_guide_parameter(n)}
    monkeypatch.setattr(type(model.net.compressor), "is_guide_parameter", lambda self, name: False)
    groups = model.parameter_groups()
    assert set(groups["injection"]) == expected  # the built-ins' own rule agrees
    assert sorted(groups) == ["compressor", "injection"]
    cfg = compose_train(cache_dir, tmp_path, overrides).model.compressor
    vision, net = model.net.vision, model.net.compressor
    widths = {"in_dim": vision.hidden_size, "out_dim": model.net.llm.hidden_size, "guide_dim": vision.text_hidden_size}
    unguided = {n for n, _ in instantiate(unguided_config(cfg))(**widths).named_parameters()}
    assert set(groups["injection"]) == {n for n, _ in net.named_parameters()} - unguided != set()


def test_a_text_only_batch_runs_the_parts_in_the_order_a_batch_with_clips_does(cfg_small, monkeypatch):
    """Under ZeRO-3 each part's parameters are gathered as it runs: every process must run them in one order."""
    from hicom.training import build

    model, datamodule = build(cfg_small)
    datamodule.prepare_data()
    datamodule.setup("fit")
    monkeypatch.setattr(model, "_in_step", lambda: True)  # as on several processes
    order = []
    for name, part in {"compressor": model.net.compressor, "llm": model.net.llm.model.get_decoder()}.items():
        part.register_forward_hook(lambda *_, name=name: order.append(name))
    batch = datamodule.collate([datamodule.train_set[0]])
    model.training_step(batch, 0)
    with_clips, order[:] = list(order), []
    text = {**batch, "pixel_values": None, "num_frames": torch.zeros_like(batch["num_frames"])}
    text["input_ids"] = torch.where(text["input_ids"] == model.net.llm.visual_token_id, 0, text["input_ids"])
    loss = model.training_step(text, 1)
    assert order == with_clips == ["compressor", "llm"] and loss.requires_grad
    # under ZeRO-3 a batch whose samples were all skipped runs the last one again, the text-only one here
    monkeypatch.setattr(model.net, "zero3", True)
    model.training_step(text, 2)  # kept as the stand-in
    order[:] = []
    model.training_step({"ids": ["gone"], "skipped": [{"id": "gone", "skip": "missing", "path": "x", "error": ""}]}, 3)
    assert order == ["compressor", "llm"]


def test_a_finished_stage_is_freed_before_the_next_one_starts(cache_dir, tmp_path, monkeypatch):
    """A fit leaves its trainer and model in reference cycles: at 7B a stage would hold the last one's LLM."""
    import weakref

    import hicom.stages
    from hicom.stages import run_stages

    fit, models, alive = hicom.stages.train, [], []

    def train(cfg, before_fit, after_fit, resume):
        def first(model):
            alive.append([ref() is not None for ref in models])  # the earlier stages' models, as this one starts
            models.append(weakref.ref(model))
            before_fit(model)

        return fit(cfg, before_fit=first, after_fit=after_fit, resume=resume)

    monkeypatch.setattr(hicom.stages, "train", train)
    run_stages(compose_train(cache_dir, tmp_path, ["experiment=tiny_stages", *SMALL, "trainer.limit_train_batches=1"]))
    assert alive == [[], [False], [False, False]]


def test_a_checkpoint_leaves_out_the_frozen_towers_and_llm_and_resumes_with_them(cache_dir, tmp_path):
    """They are what every build loads from the model folders: a checkpoint that held them would be the whole model
    at every save (a frozen 7B LLM in stages 1-2)."""
    import torch

    frozen = [*SMALL, "model.trainable=[compressor]", "evaluate=false"]
    train(compose_train(cache_dir, tmp_path / "first", [*frozen, "trainer.max_steps=2"]))
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    names = set(checkpoint["state_dict"])
    assert names and all(name.startswith("net.compressor.") for name in names)
    left_out = checkpoint["frozen_left_out"]
    assert any(n.startswith("net.llm.") for n in left_out) and any(n.startswith("net.vision.") for n in left_out)
    assert checkpoint["select_layer"] == -2  # the tower's hidden state its compressor read: a resume reads the same
    resumed = train(
        compose_train(
            cache_dir, tmp_path / "again", [*frozen, f"ckpt_path={last}", "trainer.max_steps=3", "trainer.max_epochs=3"]
        )
    )
    assert resumed["steps"] == 3
    # a checkpoint whose left-out weights this model does not have (another LLM size) is refused by name
    checkpoint["frozen_left_out"]["net.llm.model.model.norm.weight"] = [7]
    torch.save(checkpoint, tmp_path / "other.ckpt")
    other = [*frozen, f"ckpt_path={tmp_path / 'other.ckpt'}", "trainer.max_steps=3"]
    with pytest.raises(ValueError, match=r"left out frozen weights .*net.llm.model.model.norm.weight"):
        train(compose_train(cache_dir, tmp_path / "other", other))


def test_the_flop_count_of_a_batch_is_what_torch_counts_for_its_samples_one_by_one(cfg_small):
    """ThroughputMonitor's FLOPs (flops_per_sec, and MFU on a GPU) come from each part counted once on the meta
    device; for a batch of an image, videos of two lengths and a text-only sample they must equal what torch counts
    running each sample's forward and backward through the real model (attention as matrix products, which torch
    counts; its fused CPU kernel it does not)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hicom.callbacks.throughput import BatchFlops
    from hicom.data.template import IGNORE_INDEX
    from hicom.dry_run import build_meta, flops
    from hicom.training import batch_flops, build

    model, datamodule = build(cfg_small)
    datamodule.prepare_data()
    datamodule.setup("fit")
    video = datamodule.collate([datamodule.train_set[0]])
    visual = model.net.llm.visual_token_id
    ids, labels = video["input_ids"][0], video["labels"][0]
    where = (ids == visual).nonzero().flatten().tolist()
    before, after = slice(0, where[0]), slice(where[-1] + 1, None)

    def sample(frames: int, modality: str) -> dict:
        n = model.net.num_visual_tokens(frames, modality) if frames else 0
        one = {**video, "num_frames": torch.tensor([frames]), "modalities": [modality]}
        one["input_ids"] = torch.cat([ids[before], torch.full((n,), visual), ids[after]])[None]
        one["labels"] = torch.cat([labels[before], torch.full((n,), IGNORE_INDEX), labels[after]])[None]
        one["attention_mask"] = torch.ones_like(one["input_ids"])
        one["pixel_values"] = video["pixel_values"][:frames] if frames else None
        return one

    samples = [sample(8, "video"), sample(1, "image"), sample(0, "text"), sample(5, "video")]
    longest = max(s["input_ids"].shape[1] for s in samples)

    def padded(key: str, fill: int) -> torch.Tensor:
        return torch.cat([F.pad(s[key], (0, longest - s[key].shape[1]), value=fill) for s in samples])

    batch = {
        **video,
        "input_ids": padded("input_ids", 0),
        "labels": padded("labels", IGNORE_INDEX),
        "attention_mask": padded("attention_mask", 0),
        "pixel_values": torch.cat([s["pixel_values"] for s in samples if s["pixel_values"] is not None]),
        "num_frames": torch.tensor([8, 1, 0, 5]),
        "modalities": ["video", "image", "text", "video"],
        "guide_ids": video["guide_ids"].expand(len(samples), -1),
        "ids": ["v8", "i", "t", "v5"],
    }
    model.net(batch)  # the batch runs as it is
    with sdpa_kernel(SDPBackend.MATH):
        expected = sum(flops(lambda s=s: model.net(s).backward()) for s in samples)
    assert BatchFlops(build_meta(cfg_small), model.trainable)(batch) == expected  # the default trains every part
    with open_dict(cfg_small):  # a bundled architecture named beside a loaded folder: the folder's is counted
        cfg_small.model.llm.arch = "qwen2.5_7b_instruct"
    assert batch_flops(cfg_small, model.trainable)(batch) == expected
    with open_dict(cfg_small):
        del cfg_small.model.llm.arch
    model.net.requires_grad_(False)
    model.net.compressor.requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):  # the recipe's alignment stage: gradients pass through the frozen LLM
        video_only = [s for s in samples if s["pixel_values"] is not None]
        expected = sum(flops(lambda s=s: model.net(s).backward()) for s in video_only)
    text_free = {**batch, "num_frames": torch.tensor([8, 1, 5]), "modalities": ["video", "image", "video"]}
    text_free["attention_mask"], text_free["labels"] = batch["attention_mask"][[0, 1, 3]], batch["labels"][[0, 1, 3]]
    text_free["guide_ids"] = batch["guide_ids"][:3]
    alignment = BatchFlops(build_meta(cfg_small), ["compressor"])
    assert alignment(text_free) == expected
    assert alignment({"ids": [], "skipped": [{}]}) == 0  # every sample skipped
    model.batch_flops = lambda batch: 1 / 0  # a count that fails turns counting off; the fit goes on
    model.on_train_batch_start(batch, 0)
    assert model.batch_flops is None and model.flops_per_batch is None


def test_loader_workers_started_by_a_forkserver_train_and_validate(cache_dir, tmp_path):
    """data.multiprocessing_context=forkserver: the workers are fresh processes, which unpickle the datasets, the
    collator and the worker set-up (each must pickle), and give the batches forked workers give. The LLM trains
    under gradient checkpointing, as every real LLM config has it: its input hook is a local function, and the
    datasets once carried the whole network with its token count (the first batch failed to pickle)."""
    overrides = [
        *SMALL, "data.num_workers=2", "evaluate=false", "trainer.limit_train_batches=2",
        "model.llm.gradient_checkpointing=true",
    ]  # fmt: skip
    forked = train(compose_train(cache_dir, tmp_path / "forked", overrides))
    served = train(
        compose_train(cache_dir, tmp_path / "served", [*overrides, "data.multiprocessing_context=forkserver"])
    )
    assert served["steps"] == forked["steps"] == 2
    assert served["train_loss"] == forked["train_loss"]


def test_a_dataset_pickles_without_the_network(cfg_small):
    """What a loader worker started by forkserver or spawn is sent: the dataset carries the network's visual token
    count as a copy of the compressor without weights, not the network (1.8 MB of the tiny one's 1.7 MB of weights
    were in it)."""
    from multiprocessing.reduction import ForkingPickler

    from hicom.training import build

    with open_dict(cfg_small):
        cfg_small.model.llm.gradient_checkpointing = True
    model, datamodule = build(cfg_small)
    datamodule.prepare_data()
    datamodule.setup("fit")
    dataset = datamodule.train_dataloader().dataset
    sent = bytes(ForkingPickler.dumps(dataset))
    weights = sum(p.numel() * p.element_size() for p in model.net.parameters())
    assert len(sent) < weights / 10, (len(sent), weights)
    received = ForkingPickler.loads(sent)
    assert {p.device.type for p in received.visual_tokens.compressor.parameters()} == {"meta"}
    for frames, modality in [(32, "video"), (5, "video"), (1, "image"), (3, "image")]:
        assert received.visual_tokens(frames, modality) == model.net.num_visual_tokens(frames, modality)
    assert next(model.net.compressor.parameters()).device.type == "cpu"  # the network's own left as it was
