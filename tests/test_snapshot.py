"""hicom.snapshot: a run's weights at its checkpoint, as the folder evaluate.py reads."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import load_file

from tests.conftest import SMALL

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def launched_run(cache_dir, tmp_path_factory) -> Path:
    """A run launched as a user launches one (Hydra records its overrides), 4 steps."""
    run = tmp_path_factory.mktemp("snapshot") / "run"
    env = {**os.environ, "HICOM_CACHE": str(cache_dir)}
    env.pop("HICOM_RUN_STAMP", None)
    cmd = [
        sys.executable,
        "train.py",
        *SMALL,
        "evaluate=false",
        "trainer.max_steps=4",
        f"hydra.run.dir={run}",
        "logger.csv.name=mine",
    ]  # fmt: skip  (a logger's setting: the snapshot leaves the logger out, and it)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=600)
    return run


def test_a_snapshot_of_a_run_part_way_is_the_weights_its_checkpoint_holds(launched_run, cache_dir, tmp_path,
                                                                          monkeypatch, capsys):  # fmt: skip
    """A run still fitting has no hand-off: the snapshot of its last checkpoint is the hand-off its fit would
    write there, bit for bit, in a folder evaluate.py takes."""
    from hicom.eval.runner import find_handoff
    from hicom.snapshot import main

    monkeypatch.setenv("HICOM_CACHE", str(cache_dir))
    run = shutil.copytree(launched_run, tmp_path / "run", symlinks=True)
    written = load_file(str(run / "handoff.safetensors"))  # what the fit's end wrote, from the same weights
    for name in ("handoff.safetensors", "manifest.json", "metrics.json"):
        (run / name).unlink()  # as a run part-way has them
    out = main([str(run)])
    assert out.parent == run / "snapshots" and out.name.startswith("last-")
    snapshot = load_file(str(out / "handoff.safetensors"))
    assert snapshot.keys() == written.keys() and all(torch.equal(snapshot[k], written[k]) for k in written)
    assert find_handoff(out) == out and json.loads((out / "metrics.json").read_text())["steps"] == 4
    assert not (out / "checkpoints").exists() and sorted(p.name for p in run.iterdir()) == sorted(
        [".hydra", "checkpoints", "config.yaml", "mine", "snapshots", "train.log"]
    )  # nothing of the run's own is touched
    assert f"score them: python evaluate.py ckpt={out}" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="holds files already"):
        main([str(run), f"out={out}"])


def test_a_snapshot_is_refused_what_it_cannot_read_as_the_run_trained(launched_run, cache_dir, tmp_path, monkeypatch):
    from hicom.snapshot import main

    monkeypatch.setenv("HICOM_CACHE", str(cache_dir))
    with pytest.raises(FileNotFoundError, match=r"is not a run folder train.py made"):
        main([str(tmp_path)])
    with pytest.raises(FileNotFoundError, match=r"no checkpoint to read .*gone\.ckpt is missing"):
        main([str(launched_run), f"ckpt={tmp_path / 'gone.ckpt'}"])
    foreign = shutil.copy(launched_run / "checkpoints/last.ckpt", tmp_path / "other.ckpt")  # another run's, say
    with pytest.raises(ValueError, match=r"other\.ckpt is not a checkpoint of .*run \(in neither it nor"):
        main([str(launched_run), f"ckpt={foreign}"])
    (tmp_path / "staged" / "stages" / "alignment").mkdir(parents=True)  # no record of its launch
    for folder in (tmp_path / "staged", tmp_path / "staged" / "stages" / "alignment"):
        with pytest.raises(FileNotFoundError, match=r"is not a run folder train.py made"):
            main([str(folder)])
    # the overrides compose otherwise here (the tiny models' cache moved): the weights would meet other towers
    monkeypatch.setenv("HICOM_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(ValueError, match=r"compose another config than the one it trained with .*model"):
        main([str(launched_run), f"out={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as usage:
        main([])
    assert usage.value.code == 2


@pytest.fixture(scope="module")
def staged_run(cache_dir, tmp_path_factory) -> Path:
    """A staged run launched as a user launches one, its three stages 4 steps each."""
    run = tmp_path_factory.mktemp("snapshot_staged") / "run"
    env = {**os.environ, "HICOM_CACHE": str(cache_dir)}
    env.pop("HICOM_RUN_STAMP", None)
    # the last stage sets its own logger and checkpoint settings, which its config merges before the snapshot
    # takes both away
    own = ["+stages.2.config.logger.csv.name=instruction", "+stages.2.config.callbacks.model_checkpoint.save_last=true"]
    cmd = [sys.executable, "train.py", "experiment=tiny_stages", *SMALL, *own, f"hydra.run.dir={run}"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=600)
    return run


def part_way(run: Path, stage: str, tmp_path: Path, drop: tuple[str, ...] = ()) -> Path:
    """`run` moved elsewhere, as it is while `stage` fits (no hand-off yet), the stages after it (`drop`) not begun."""
    copy = shutil.copytree(run, tmp_path / "run", symlinks=True)
    run.rename(tmp_path / "away")  # the run's config.yaml files name its folders where they were
    for name in ("handoff.safetensors", "manifest.json", "metrics.json"):
        (copy / "stages" / stage / name).unlink()
    for later in drop:
        shutil.rmtree(copy / "stages" / later)
    return copy


def same_tensors(a: Path, b: Path) -> bool:
    first, second = load_file(str(a)), load_file(str(b))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("stage, drop", [("instruction", ()), ("conditional", ("instruction",))])
def test_a_snapshot_of_a_stage_part_way_is_the_hand_off_its_stage_would_write(staged_run, cache_dir, tmp_path,
                                                                             monkeypatch, stage, drop):  # fmt: skip
    """The recipe's runs are staged: the stage that is fitting (found from the run's folder, or named by its own)
    is restored as the stage runner resumes it, its parent's hand-off first (the guide's new modules of
    `conditional` from their init, then the checkpoint), and its snapshot is the stage's own hand-off bit for bit."""
    from hicom.eval.runner import find_handoff
    from hicom.snapshot import main

    monkeypatch.setenv("HICOM_CACHE", str(cache_dir))
    run = part_way(staged_run, stage, tmp_path, drop)
    try:
        out = main([str(run)]) if stage == "instruction" else main([str(run / "stages" / stage)])
    finally:
        (tmp_path / "away").rename(staged_run)
    assert out.parent == run / "snapshots" and out.name.startswith(f"{stage}-last-")
    assert OmegaConf.load(out / "config.yaml").ckpt_path == str(run / "stages" / stage / "checkpoints" / "last.ckpt")
    assert same_tensors(out / "handoff.safetensors", staged_run / "stages" / stage / "handoff.safetensors")
    assert find_handoff(out) == out
    manifest = json.loads((out / "manifest.json").read_text())
    parent = "conditional" if stage == "instruction" else "alignment"
    assert manifest["parent"] == str(run / "stages" / parent)
    assert not (out / "checkpoints").exists() and not (run / "stages" / stage / "manifest.json").exists()


def test_a_stage_snapshot_is_refused_where_no_stage_or_another_parent_is_meant(staged_run, cache_dir, tmp_path,
                                                                               monkeypatch):  # fmt: skip
    from hicom.snapshot import main, snapshot_config

    monkeypatch.setenv("HICOM_CACHE", str(cache_dir))
    with pytest.raises(ValueError, match=r"no stage part-way .*finished: \['alignment', 'conditional', 'instructi"):
        main([str(staged_run)])
    with pytest.raises(ValueError, match=r"stage alignment is finished: evaluate.py ckpt=.*alignment reads its hand"):
        main([str(staged_run / "stages" / "alignment")])
    # a finished stage's checkpoint, named: the weights at it (here the stage's last, so its hand-off)
    out = main(
        [str(staged_run), f"ckpt={staged_run / 'stages/alignment/checkpoints/last.ckpt'}", f"out={tmp_path / 'a'}"]
    )
    assert same_tensors(out / "handoff.safetensors", staged_run / "stages/alignment/handoff.safetensors")
    foreign = shutil.copy(staged_run / "stages/alignment/checkpoints/last.ckpt", tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=r"other\.ckpt is not a checkpoint of .*run: in none of its stages' folders"):
        main([str(staged_run), f"ckpt={foreign}"])
    # the parent trained again since the stage began: its hand-off would carry other weights than the stage's
    run = part_way(staged_run, "instruction", tmp_path)
    (tmp_path / "away").rename(staged_run)
    started = run / "stages/instruction/started.json"
    started.write_text(json.dumps({**json.loads(started.read_text()), "parent_sha256": "0" * 64}))
    with pytest.raises(ValueError, match=r"stage instruction began its fit from other weights than .*conditional"):
        main([str(run)])
    assert not (run / "snapshots").exists()
    # ... unless the run's last launch resumed it so on purpose, which also launched that stage alone: the other
    # stages' checkpoints are still the run's
    recorded = run / ".hydra" / "overrides.yaml"
    again = ["stage=instruction", f"ckpt_path={run / 'stages/instruction/checkpoints/last.ckpt'}"]
    recorded.write_text(yaml.safe_dump([*yaml.safe_load(recorded.read_text()), *again]))
    cfg, handoff = snapshot_config(run, out=tmp_path / "resumed")  # composed, checked, not fitted (tested above)
    assert (
        cfg.ckpt_path == str(run / "stages/instruction/checkpoints/last.ckpt") and handoff.parent.name == "conditional"
    )
    first = run / "stages/alignment/checkpoints/last.ckpt"
    cfg, handoff = snapshot_config(run / "stages" / "alignment", first, tmp_path / "first")
    assert cfg.ckpt_path == str(first) and cfg.model.trainable == ["compressor"] and handoff.parent is None


def test_a_run_fine_tuned_from_a_release_folder_is_taken_with_its_llm_from_there(cache_dir, tmp_path, monkeypatch):
    """init_from=<release folder>: the fit points its LLM at the folder (and its config.yaml says so), which the
    snapshot's composition must do too, or it refuses the run as composed otherwise."""

    from hicom.compat.official import export_official
    from hicom.snapshot import main
    from hicom.training import build, train
    from tests.conftest import compose_train

    monkeypatch.setenv("HICOM_CACHE", str(cache_dir))
    model, _ = build(compose_train(cache_dir, tmp_path / "source", SMALL))
    release = export_official(model.net, tmp_path / "release", num_frames=8)
    run = tmp_path / "tuned"
    overrides = [
        *SMALL,
        "model.trainable=[compressor]",
        "trainer.max_steps=2",
        "evaluate=false",
        f"init_from={release}",
    ]
    train(compose_train(cache_dir, run, overrides))
    (run / ".hydra").mkdir()  # as Hydra records a launch's overrides
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"paths.cache_dir={cache_dir}", *overrides]))
    (run / "handoff.safetensors").rename(tmp_path / "handoff.safetensors")
    out = main([str(run), f"out={tmp_path / 'snapshot'}"])
    assert same_tensors(out / "handoff.safetensors", tmp_path / "handoff.safetensors")
    assert json.loads((out / "manifest.json").read_text())["init_from"] == str(release)


def test_a_snapshot_refused_after_its_config_is_written_leaves_no_folder(launched_run, cache_dir, tmp_path,
                                                                         monkeypatch):  # fmt: skip
    """A checkpoint whose weights hold a NaN restores, and its hand-off is refused as a fit's would be: the folder,
    which holds the config.yaml written before the fit by then, is taken away again."""
    from hicom.callbacks.checkpoint import NonFiniteWeightsError
    from hicom.snapshot import main

    monkeypatch.setenv("HICOM_CACHE", str(cache_dir))
    run = shutil.copytree(launched_run, tmp_path / "run", symlinks=True)
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    name = next(key for key in checkpoint["state_dict"] if key.startswith("net.compressor."))
    checkpoint["state_dict"][name].view(-1)[0] = float("nan")
    torch.save(checkpoint, run / "checkpoints" / "nan.ckpt")
    with pytest.raises(NonFiniteWeightsError, match=r"hold NaN or infinite values .*compressor"):
        main([str(run), f"ckpt={run / 'checkpoints' / 'nan.ckpt'}", f"out={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()
