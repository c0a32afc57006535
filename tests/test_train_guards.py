"""What a run does with a loss or weights gone non-finite, open-ended held-out questions, skipped samples across a
resume, a folder it cannot write, and the command that resumes it (hicom/training.py and what it calls)."""

import json
import logging
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException

from hicom.callbacks.checkpoint import NonFiniteWeightsError
from hicom.models.video_llm_module import NonFiniteLossError
from hicom.stages import save_handoff
from hicom.training import STOPPED_BY_SIGTERM, _unfinished_on_sigterm, train
from tests.conftest import CONFIGS, SMALL, compose_train
from tests.test_train import _videos_with_bad_ones

EVERY_2_STEPS = [
    "callbacks.model_checkpoint.train_time_interval=null",
    "callbacks.model_checkpoint.every_n_train_steps=2",
]


def _saved(folder: Path) -> dict:
    return torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _finite(tensors) -> bool:
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def test_a_non_finite_loss_stops_the_fit_before_it_reaches_the_weights(cache_dir, tmp_path):
    """A NaN loss at step 2 (after the step-2 checkpoint): backpropagated, it made every trained weight NaN, and the
    run went on to exit 0 with last.ckpt and the hand-off NaN. It stops, naming the step and the batch's samples."""
    seen, built = [], []

    def poison(model) -> None:
        loss = model._loss
        built.append(model)

        def poisoned(batch):
            seen.append(list(batch["ids"]))
            value = loss(batch)
            return value * float("nan") if model.global_step == 2 else value

        model._loss = poisoned

    cfg = compose_train(cache_dir, tmp_path, [*SMALL, *EVERY_2_STEPS, "evaluate=false"])
    with pytest.raises(NonFiniteLossError) as stopped:
        train(cfg, before_fit=poison)
    assert f"not finite at step 2: nan for the samples {seen[-1]}." in str(stopped.value)
    assert len(seen) == 3 and _finite(built[0].parameters())
    saved = _saved(tmp_path)
    assert saved["global_step"] == 2 and _finite(saved["state_dict"].values())
    assert not (tmp_path / "handoff.safetensors").exists()


def test_weights_gone_non_finite_are_not_saved_over_the_checkpoint_before(cache_dir, tmp_path):
    """Weights that an update made NaN with a finite loss (the last step's): the save at step 4 is refused, and
    last.ckpt keeps step 2."""

    def poison(model) -> None:
        hook = model.on_before_optimizer_step

        def poisoned(optimizer) -> None:
            hook(optimizer)
            if model.global_step == 3:
                with torch.no_grad():
                    next(model.net.compressor.parameters()).fill_(float("nan"))

        model.on_before_optimizer_step = poisoned

    cfg = compose_train(cache_dir, tmp_path, [*SMALL, *EVERY_2_STEPS, "evaluate=false"])
    with pytest.raises(NonFiniteWeightsError, match=r"at step 4 hold NaN or infinite values \(1 of \d+ tensors"):
        train(cfg, before_fit=poison)
    saved = _saved(tmp_path)
    assert saved["global_step"] == 2 and _finite(saved["state_dict"].values())
    assert not (tmp_path / "checkpoints" / ".last.ckpt.partial").exists()


def test_a_hand_off_of_non_finite_weights_is_refused_with_nothing_written(tiny_paths, cache_dir, tmp_path):
    cfg = compose_train(cache_dir, tmp_path / "run", SMALL)
    model = instantiate(cfg.model)
    name, parameter = next(iter(model.net.compressor.named_parameters()))
    with torch.no_grad():
        parameter.view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=rf"\(1 of \d+ tensors, e.g. \['compressor\.{name}'\]\)"):
        save_handoff(model, tmp_path / "stage", ["compressor"], None, cfg)
    assert not any((tmp_path / "stage").glob("*"))


def test_open_ended_held_out_questions_are_scored_apart_from_the_multiple_choice_ones(cache_dir, tmp_path):
    """Half the held-out questions without options (a word for answer): the summary divided by their option count,
    zero, and the run failed after its fit with no metrics.json. They are left out of the accuracy and its chance,
    and scored by exact match; the two unreadable questions count wrong among the multiple-choice ones."""
    from hicom.eval.score import normalize_answer

    records, overrides = _videos_with_bad_ones(cache_dir, tmp_path, missing=0, corrupt=5)
    for record in records[8:]:
        record["conversations"] = [
            {"from": "human", "value": f"<video>\n{record['question']}\nAnswer with one word."},
            {"from": "gpt", "value": record["options"]["ABCD".index(record["answer"])]},
        ]
    (tmp_path / "val.json").write_text(json.dumps(records))
    overrides = [o for o in overrides if not o.startswith("data.source.val_json=")]
    cfg = compose_train(cache_dir, tmp_path / "run", [*overrides, f"data.source.val_json={tmp_path / 'val.json'}"])
    metrics = train(cfg)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    choices, open_ended = rows[:6], rows[6:]
    assert [r["n_options"] for r in rows] == [4] * 6 + [0] * 8 and all(r["pred"] is None for r in open_ended)
    assert metrics["n_questions"] == 16 and metrics["n_failed"] == 2 and metrics["n_open_ended"] == 8
    assert metrics["accuracy"] == sum(r["pred"] == r["answer"] for r in choices) / 8 and metrics["chance"] == 0.25
    assert metrics["n_unparsed"] == sum(r["pred"] is None for r in choices)
    matched = sum(normalize_answer(r["reply"]) == normalize_answer(r["answer"]) for r in open_ended)
    assert metrics["open_ended_exact_match"] == matched / 8


def test_samples_skipped_before_a_resume_stay_in_its_metrics(cache_dir, tmp_path):
    """Two bad samples in the first two steps, a checkpoint at step 2, the job dead at step 3: the resumed run's
    metrics.json listed no skipped sample (the module's records were in no checkpoint)."""
    records, overrides = _videos_with_bad_ones(cache_dir, tmp_path, missing=1, corrupt=5)
    overrides = [o for o in overrides if not o.startswith("data.source.val_json=")]
    overrides += [*EVERY_2_STEPS, "evaluate=false", "trainer.limit_val_batches=0"]
    overrides += ["data.shuffle=false", "data.group_by_length=false"]  # the bad ones in the first two batches

    def die_at_step_3(model) -> None:
        step = model.training_step

        def dying(batch, *args):
            if model.global_step == 3:
                raise RuntimeError("the node went away")
            return step(batch, *args)

        model.training_step = dying

    with pytest.raises(RuntimeError, match="the node went away"):
        train(compose_train(cache_dir, tmp_path / "died", overrides), before_fit=die_at_step_3)
    assert _saved(tmp_path / "died")["global_step"] == 2
    metrics = train(compose_train(cache_dir, tmp_path / "rest", [*overrides, f"ckpt_path={tmp_path / 'died'}"]))
    assert metrics["steps"] == 4
    skipped = {s["id"]: s["skip"] for s in metrics["skipped_samples"]}
    assert skipped == {records[1]["id"]: "missing", records[5]["id"]: "undecodable"}


def test_a_checkpoint_folder_that_cannot_be_written_stops_the_run_before_anything_is_built(
    cache_dir, tmp_path, monkeypatch
):
    """It was found at the first save, an hour into the fit."""
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr("hicom.training.build", lambda *a, **k: pytest.fail("built before the folder was tried"))
    cfg = compose_train(
        cache_dir, tmp_path / "run", [*SMALL, f"callbacks.model_checkpoint.dirpath={tmp_path / 'a_file' / 'ckpt'}"]
    )
    with pytest.raises(OSError, match=r"the checkpoint folder .*a_file/ckpt cannot be written .* point callbacks"):
        train(cfg)
    # the run folder's probe is gone, and no config.yaml tells evaluate.py of a run that was never made
    assert list((tmp_path / "run").iterdir()) == []


def test_the_stop_message_resumes_into_the_same_run_folder(cache_dir, tmp_path, caplog):
    """`ckpt_path=<run>` alone resumed into a new folder named by its start time: one more folder, and one more
    whole last.ckpt, per preemption. The command it gives sets the run folder too."""
    run = tmp_path / "logs" / "my run"
    (run / "checkpoints" / "last.ckpt").mkdir(parents=True)  # the stop's save
    overrides = [f"paths.cache_dir={cache_dir}", "trainer.max_steps=5"]

    def stop_message(mode: RunMode) -> list[str]:
        hydra_cfg = compose("train", overrides=[*overrides, f"hydra.run.dir={run}"], return_hydra_config=True)
        hydra_cfg.hydra.mode = mode
        HydraConfig.instance().set_config(hydra_cfg)
        caplog.clear()
        try:
            cfg = compose("train", overrides=overrides)
            cfg.paths.output_dir = str(run)
            with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as stopped:
                with _unfinished_on_sigterm(SimpleNamespace(global_step=3), cfg, "the fit"):
                    raise SIGTERMException
        finally:
            HydraConfig.instance().cfg = None
        assert stopped.value.code == STOPPED_BY_SIGTERM
        command = caplog.text.split("to go on from there: ", 1)[1].split(" (or your launcher's", 1)[0]
        args = shlex.split(command)
        assert args[:2] == ["python", Path(sys.argv[0]).name]
        return args[2:]

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        args = stop_message(RunMode.RUN)
        again = compose("train", overrides=args, return_hydra_config=True)
        assert again.hydra.run.dir == str(run) and again.ckpt_path == str(run) and again.trainer.max_steps == 5
        # a sweep's job (hparams_search sets hydra.mode: MULTIRUN): its command goes on as one run, into its folder,
        # not as a new sweep
        args = stop_message(RunMode.MULTIRUN)
        assert args[-1] == "hydra.mode=RUN"
        assert compose("train", overrides=args, return_hydra_config=True).hydra.mode == RunMode.RUN


def test_a_resumed_runs_config_that_does_not_read_is_warned_of_not_fatal(cfg_small, tmp_path, caplog):
    """An explicit ckpt_path resume compares the checkpoint's run's config.yaml with this launch's (a warning
    where data, seed or global batch differ): a file that does not read is said, and the resume goes on."""
    from omegaconf import open_dict

    from hicom.training import warn_resume_differences

    (tmp_path / "earlier" / "checkpoints").mkdir(parents=True)
    (tmp_path / "earlier" / "config.yaml").write_text("data: [unclosed\n")
    with open_dict(cfg_small):
        cfg_small.ckpt_path = str(tmp_path / "earlier" / "checkpoints" / "last.ckpt")
    with caplog.at_level(logging.WARNING):
        warn_resume_differences(cfg_small)
    assert "config.yaml does not read" in caplog.text and "settings are not compared" in caplog.text


def test_a_stop_before_the_first_save_says_to_start_again_not_to_resume(tmp_path, caplog):
    """A SIGTERM in the sanity check (which writes no checkpoint) stops the fit with 143 as any other; the
    ckpt_path=<run> of the usual message would fail there (nothing in checkpoints/), so it says to start again."""
    from omegaconf import OmegaConf

    from hicom.training import _unfinished_on_sigterm

    trainer = SimpleNamespace(global_step=0)
    for ckpt_path, says in ((None, f"hydra.run.dir={tmp_path}"), ("earlier/last.ckpt", "the same command")):
        cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}, "ckpt_path": ckpt_path})
        caplog.clear()
        with pytest.raises(SystemExit) as stopped, _unfinished_on_sigterm(trainer, cfg, "the fit"):
            raise SIGTERMException
        assert stopped.value.code == 143
        assert "before anything was saved (no checkpoints/last.ckpt); to start it again" in caplog.text
        assert says in caplog.text and "ckpt_path=" not in caplog.text
    (tmp_path / "checkpoints" / "last.ckpt").mkdir(parents=True)  # saved: it goes on from there
    caplog.clear()
    with pytest.raises(SystemExit), _unfinished_on_sigterm(trainer, cfg, "the fit"):
        raise SIGTERMException
    assert f"ckpt_path={tmp_path}" in caplog.text and "holds that step" in caplog.text
