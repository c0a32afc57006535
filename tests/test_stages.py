"""A stage starts only from a parent that trained its compressor, as configured (hicom/stages.py)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

import hicom.stages
from hicom.stages import HandoffError, load_handoff, run_stages, save_handoff, stage_config
from tests.conftest import SMALL, compose_train

OTHER_COMPRESSOR = [
    "model.compressor.local.kernel=[2,2,2]",
    "model.compressor.global_.position=k",
    "model.compressor.global_.num_heads=1",
]


def finished_stage(cfg, folder: Path) -> dict[str, torch.Tensor]:
    """A finished stage in `folder` that trained the compressor of `cfg` (as the stage runner writes it); its
    hand-off's tensors."""
    model = instantiate(cfg.model)
    save_handoff(model, folder, ["compressor"], None, cfg)
    return {f"compressor.{k}": v.clone() for k, v in model.net.compressor.state_dict().items()}


def without_compressor_entry(folder: Path, to: Path) -> Path:
    """A copy of a finished stage whose manifest is as hand-offs wrote it before they recorded the compressor."""
    shutil.copytree(folder, to)
    manifest = json.loads((to / "manifest.json").read_text())
    del manifest["compressor"]
    (to / "manifest.json").write_text(json.dumps(manifest))
    return to


def test_a_parent_that_trained_another_compressor_is_refused_before_its_weights_load(
    tiny_paths, cache_dir, tmp_path, caplog
):
    parent_cfg = compose_train(cache_dir, tmp_path / "a", ["model.trainable=[compressor]"])
    trained = finished_stage(parent_cfg, tmp_path / "parent")
    cfg = compose_train(cache_dir, tmp_path / "b", ["model.trainable=[compressor]", *OTHER_COMPRESSOR])
    model = instantiate(cfg.model)  # the same names and shapes: loading alone would take the parent's weights
    before = {k: v.clone() for k, v in model.net.compressor.state_dict().items()}
    with pytest.raises(HandoffError) as error:
        load_handoff(model, tmp_path / "parent", [], compressor=cfg.model.compressor)
    lines = str(error.value).splitlines()
    assert "  local.kernel: the parent's [4,3,3], this stage's [2,2,2]" in lines
    assert "  global_.position: the parent's kv, this stage's k" in lines
    assert "  global_.num_heads: the parent's null, this stage's 1" in lines
    assert len([line for line in lines if line.startswith("  ")]) == 3  # nothing else differs
    # what to write to go on from this parent
    assert (
        "model.compressor.local.kernel=[4,3,3] model.compressor.global_.position=kv "
        "model.compressor.global_.num_heads=null" in str(error.value)
    )
    assert all(torch.equal(v, before[k]) for k, v in model.net.compressor.state_dict().items())

    # the same compressor at another init: the parent's weights replace the init, so it loads
    cfg = compose_train(cache_dir, tmp_path / "c", ["model.trainable=[compressor]", "compressor_init_std=0.02"])
    assert cfg.model.compressor.local.init_std != parent_cfg.model.compressor.local.init_std
    model = instantiate(cfg.model)
    assert load_handoff(model, tmp_path / "parent", [], compressor=cfg.model.compressor) == ["compressor"]
    assert all(torch.equal(v, trained[f"compressor.{k}"]) for k, v in model.net.compressor.state_dict().items())

    # a hand-off from before manifests recorded the compressor loads as it did, and the log says it is unchecked
    legacy = without_compressor_entry(tmp_path / "parent", tmp_path / "legacy")
    cfg = compose_train(cache_dir, tmp_path / "d", ["model.trainable=[compressor]", *OTHER_COMPRESSOR])
    with caplog.at_level("WARNING", logger="hicom.stages"):
        assert load_handoff(instantiate(cfg.model), legacy, [], compressor=cfg.model.compressor) == ["compressor"]
    assert "records no compressor config" in caplog.text and "not checked" in caplog.text


@pytest.fixture
def stage_runs(monkeypatch) -> list[str]:
    """The stages run_stages would train: their fits are not run, only recorded."""
    started = []

    def train(cfg, **_):
        started.append(Path(cfg.paths.output_dir).name)
        return {"steps": 0}

    monkeypatch.setattr(hicom.stages, "train", train)
    return started


def test_a_relaunch_with_another_compressor_stops_before_the_next_stage_is_built(
    tiny_paths, cache_dir, tmp_path, stage_runs
):
    run = tmp_path / "run"
    cfg = compose_train(cache_dir, run, ["experiment=tiny_stages", *SMALL])
    alignment = cfg.stages[0]
    finished_stage(stage_config(cfg, alignment, run / "stages" / "alignment"), run / "stages" / "alignment")
    # the recipe's own difference: stage 2 turns on the guide that stage 1 trained without
    assert run_stages(compose_train(cache_dir, run, ["experiment=tiny_stages", *SMALL, "stage=conditional"])) == {
        "conditional": {"steps": 0}
    }
    assert stage_runs == ["conditional"]
    # the same run launched again with another compressor setting: its finished stage 1 trained the old one
    cfg = compose_train(cache_dir, run, ["experiment=tiny_stages", *SMALL, "model.compressor.global_.position=k"])
    with pytest.raises(HandoffError) as error:
        run_stages(cfg)
    message = str(error.value)
    assert message.startswith(f"stage conditional: {run / 'stages' / 'alignment'} trained a compressor configured")
    assert "without the guide this stage adds" in message
    assert "\n  global_.position: the parent's kv, this stage's k\nTo go on" in message
    assert "model.compressor.global_.position=kv" in message
    assert stage_runs == ["conditional"]  # nothing more was built


def test_a_launch_of_another_run_into_a_folder_with_its_stages_is_refused(tiny_paths, cache_dir, tmp_path, stage_runs):
    """A sweep folder given again for another sweep, or a run launched again with other settings: its finished
    stages were skipped and their figures reported as this launch's, and a stopped stage went on from its checkpoint
    with the new settings (a one-fit run's folder refuses both: own_checkpoint)."""
    from omegaconf import OmegaConf

    run = tmp_path / "run"
    cfg = compose_train(cache_dir, run, ["experiment=tiny_stages", *SMALL])
    stages = {stage.name: stage_config(cfg, stage, run / "stages" / stage.name) for stage in cfg.stages}
    finished_stage(stages["alignment"], run / "stages" / "alignment")
    stopped = run / "stages" / "conditional" / "checkpoints"
    stopped.mkdir(parents=True)
    (stopped / "last.ckpt").write_bytes(b"")  # not read: only its being there counts here
    for name in ("alignment", "conditional"):  # as train writes it
        (run / "stages" / name / "config.yaml").write_text(OmegaConf.to_yaml(stages[name], resolve=True))
    # the same run launched again (other loading settings): the finished stage skipped, the stopped one trained
    # (here its fit only recorded, so the last stage then finds no hand-off to start from)
    with pytest.raises(FileNotFoundError, match="stage instruction starts from its parent's hand-off"):
        run_stages(compose_train(cache_dir, run, ["experiment=tiny_stages", *SMALL, "data.num_workers=1"]))
    assert stage_runs == ["conditional"]
    other = compose_train(cache_dir, run, ["experiment=tiny_stages", *SMALL, "seed=5", "data.max_length=900"])
    with pytest.raises(ValueError, match="holds stages of a run configured otherwise") as error:
        run_stages(other)
    lines = str(error.value).splitlines()
    assert [line.split(" (", 1)[0] for line in lines if line.startswith("  ")] == [
        "  stage alignment", "  stage conditional"
    ]  # fmt: skip
    assert "seed: 0 there, 5 here" in lines[1] and "data.max_length: " in lines[1] and "900 here" in lines[1]
    assert stage_runs == ["conditional"]  # the refused launch built nothing
    # the stopped stage given with its checkpoint: meant, so not compared (its finished parent is not run)
    alone = ["stage=conditional", f"ckpt_path={stopped / 'last.ckpt'}", "seed=5"]
    assert run_stages(compose_train(cache_dir, run, ["experiment=tiny_stages", *SMALL, *alone])) == {
        "conditional": {"steps": 0}
    }


def test_a_run_of_one_kind_into_a_folder_of_the_other_is_refused(tiny_paths, cache_dir, tmp_path, stage_runs):
    """A staged run launched into a one-fit run's folder (a sweep folder given again for a staged sweep) trained its
    stages beside that run's records, and the reverse wrote a fit's beside the stages: evaluate.py and the sweep's
    table then read the other run's (helper's reproduction: rc 0, the old fit scored)."""
    from hicom.training import train
    from hicom.utils.files import RunFolderTaken

    fit = tmp_path / "fit"
    fit.mkdir()
    (fit / "metrics.json").write_text("{}")
    with pytest.raises(RunFolderTaken, match=r"holds a run of one fit \(metrics.json\)"):
        run_stages(compose_train(cache_dir, fit, ["experiment=tiny_stages", *SMALL]))
    assert stage_runs == [] and not (fit / "stages.json").exists()  # refused before anything is written
    staged = tmp_path / "staged"
    (staged / "stages").mkdir(parents=True)
    (staged / "stages.json").write_text('["alignment"]')
    with pytest.raises(RunFolderTaken, match=r"holds a staged run"):
        train(compose_train(cache_dir, staged, SMALL))
    assert sorted(p.name for p in staged.iterdir()) == ["stages", "stages.json"]


def test_a_stage_from_another_runs_parent_names_each_setting_that_differs(tiny_paths, cache_dir, tmp_path, stage_runs):
    cfg = compose_train(cache_dir, tmp_path / "other", ["experiment=tiny_stages", *SMALL])
    other = tmp_path / "other" / "stages"
    finished_stage(stage_config(cfg, cfg.stages[0], other / "alignment"), other / "alignment")
    finished_stage(stage_config(cfg, cfg.stages[1], other / "conditional"), other / "conditional")

    def alone(stage: str, parent: Path, *overrides: str):
        with_parent = [f"stage={stage}", f"stage_parent={parent}", *overrides]
        return run_stages(compose_train(cache_dir, tmp_path / "run", ["experiment=tiny_stages", *SMALL, *with_parent]))

    with pytest.raises(HandoffError) as error:
        alone("instruction", other / "conditional", *OTHER_COMPRESSOR)
    assert [line for line in str(error.value).splitlines() if line.startswith("  ")] == [
        "  local.kernel: the parent's [4,3,3], this stage's [2,2,2]",
        "  global_.position: the parent's kv, this stage's k",
        "  global_.num_heads: the parent's null, this stage's 1",
    ]
    # stage 3 from a stage 1 (trained unguided) is not the recipe: only stage 2 adds the guide
    with pytest.raises(HandoffError, match=r"\n  local.guide: the parent's off, this stage's direct\n"):
        alone("instruction", other / "alignment")
    # nor is stage 2 from a parent that trained with the guide it adds
    with pytest.raises(HandoffError, match=r"from a parent trained without it \(a stage with guided: false\)"):
        alone("conditional", other / "conditional")
    assert stage_runs == []
    assert alone("instruction", other / "conditional") == {"instruction": {"steps": 0}}
    # a parent whose manifest predates the recorded compressor is taken as it was
    legacy = without_compressor_entry(other / "conditional", tmp_path / "legacy")
    assert alone("instruction", legacy, *OTHER_COMPRESSOR) == {"instruction": {"steps": 0}}
    assert stage_runs == ["instruction", "instruction"]


def test_a_stage_that_changes_the_compressor_its_parent_trains_is_refused_before_any_stage_trains(
    tiny_paths, cache_dir, tmp_path, stage_runs
):
    override = "+stages.2.config={model: {compressor: {global_: {position: k}}}}"
    cfg = compose_train(cache_dir, tmp_path / "run", ["experiment=tiny_stages", *SMALL, override])
    with pytest.raises(
        HandoffError, match=r"stage instruction: .*\n  global_.position: the parent's kv, this stage's k"
    ):
        run_stages(cfg)
    assert stage_runs == [] and not (tmp_path / "run" / "stages").exists()


def test_a_stopped_stage_is_resumed_into_the_runs_own_folder(cache_dir, tmp_path):
    """HICOM_RUN_STAMP names a folder under logs/train/runs/ alone: a staged run in a folder of its own choosing
    (`hydra.run.dir`) was told to go on in another one, where it would start over from stage 1."""
    import shlex

    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from hicom.stages import relaunch
    from hicom.utils.config import hydra_path
    from tests.conftest import CONFIGS

    # a path Hydra's grammar refuses bare (an accent, brackets, a comma): the command printed must parse
    run = tmp_path / "my runs (José, v2)" / "recipe"
    overrides = [f"paths.cache_dir={cache_dir}", "experiment=tiny_stages"]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        HydraConfig.instance().set_config(
            compose("train", overrides=[*overrides, hydra_path("hydra.run.dir", run)], return_hydra_config=True)
        )
        try:
            cfg = compose("train", overrides=overrides)
            cfg.paths.output_dir = str(run)
            message = relaunch(cfg, "conditional")
        finally:
            HydraConfig.instance().cfg = None
        args = shlex.split(message.split(" (or your launcher's", 1)[0])
        again = compose("train", overrides=args[2:], return_hydra_config=True)
    assert again.hydra.run.dir == str(run) and message.endswith("resumes stage conditional")


def test_a_stage_that_declares_new_parameters_may_change_its_compressor_to_add_them(
    tiny_paths, cache_dir, tmp_path, stage_runs, caplog
):
    """`new_parameters` is how a stage grows its parent's compressor (here the release's key and value adapters):
    the difference is logged, not refused."""
    run = tmp_path / "run"
    grow = [
        "+stages.2.config={model: {compressor: {local: {adapt: [k, v]}}}}",
        "+stages.2.new_parameters=[compressor.local_compressor.k_*,compressor.local_compressor.v_*]",
    ]
    cfg = compose_train(cache_dir, run, ["experiment=tiny_stages", *SMALL, *grow])
    for stage in cfg.stages[:2]:
        finished_stage(stage_config(cfg, stage, run / "stages" / stage.name), run / "stages" / stage.name)
    with caplog.at_level("WARNING", logger="hicom.stages"):
        assert set(run_stages(cfg)) == {"alignment", "conditional", "instruction"}
    assert stage_runs == ["instruction"]
    assert (
        "declares new_parameters" in caplog.text and "local.adapt: the parent's [], this stage's [k,v]" in caplog.text
    )


def test_a_compressor_trained_on_one_tower_layer_is_not_loaded_onto_another(
    tiny_paths, cache_dir, tmp_path, stage_runs
):
    """select_layer was recorded nowhere: a stage from a parent trained on hidden state -2, a resume, or an
    evaluation with run_overrides, could read layer -1 with the same weights, without a word."""
    import torch

    from hicom.training import check_resume

    cfg = compose_train(cache_dir, tmp_path / "other", ["experiment=tiny_stages", *SMALL])
    parent = tmp_path / "other" / "stages" / "conditional"
    finished_stage(stage_config(cfg, cfg.stages[1], parent), parent)
    other_layer = ["experiment=tiny_stages", *SMALL, "stage=instruction", f"stage_parent={parent}"]
    with pytest.raises(HandoffError, match=r"hidden state -2 \(manifest.json's select_layer\), this model reads -1: "):
        run_stages(compose_train(cache_dir, tmp_path / "run", [*other_layer, "model.vision.select_layer=-1"]))
    assert stage_runs == []
    # as evaluation loads a run's hand-off, with cfg (run_overrides merged in)
    moved = compose_train(cache_dir, tmp_path / "eval", ["model.vision.select_layer=-1"])
    with pytest.raises(HandoffError, match="set model.vision.select_layer=-2"):
        load_handoff(instantiate(moved.model), parent, [], cfg=moved)
    # a resume: the checkpoint records the layer its compressor read
    torch.save({"select_layer": -2}, tmp_path / "last.ckpt")
    resumed = compose_train(
        cache_dir, tmp_path / "again", [f"ckpt_path={tmp_path / 'last.ckpt'}", "model.vision.select_layer=-1"]
    )
    with pytest.raises(ValueError, match="resume with model.vision.select_layer=-2"):
        check_resume(resumed, None)
    check_resume(compose_train(cache_dir, tmp_path / "again", [f"ckpt_path={tmp_path / 'last.ckpt'}"]), None)
    # the same hidden state written the other way (-2 of a 2-layer tiny tower is 1) is the same layer
    depth = instantiate(moved.model).net.vision.depth
    same = compose_train(cache_dir, tmp_path / "eval", [f"model.vision.select_layer={depth - 1}"])
    load_handoff(instantiate(same.model), parent, [], cfg=same)
    torch.save({"select_layer": -2, "vision_depth": depth}, tmp_path / "last.ckpt")
    check_resume(
        compose_train(
            cache_dir,
            tmp_path / "again",
            [f"ckpt_path={tmp_path / 'last.ckpt'}", f"model.vision.select_layer={depth - 1}"],
        ),
        None,
    )


def test_a_part_carried_frozen_is_read_again_from_its_parent_only_while_that_is_the_file_loaded(
    tiny_paths, cache_dir, tmp_path, caplog
):
    """Under DeepSpeed's bf16 the module holds a frozen carried part in 16 bits: it is handed on from the parent's
    file, as loaded; from the module's copy where that file is no longer the one loaded (the parent moved or trained
    again while the stage fitted: the stage's save must neither fail nor carry weights it did not train with), and
    where the module holds it as loaded (fp32)."""
    from safetensors.torch import load_file, save_file

    cfg = compose_train(cache_dir, tmp_path / "a", ["model.trainable=[compressor,llm]"])
    model = instantiate(cfg.model)
    save_handoff(model, tmp_path / "parent", ["compressor", "llm"], None, cfg)
    handed = load_file(str(tmp_path / "parent" / "handoff.safetensors"))
    stage = compose_train(cache_dir, tmp_path / "b", ["model.trainable=[compressor]"])
    child = instantiate(stage.model)
    handoff = hicom.stages._Handoff(tmp_path / "parent", tmp_path / "child", stage, [])
    handoff.load(child)
    assert handoff.carried == ["compressor", "llm"] and handoff.as_handed(child, ["llm"]) is None  # fp32: as loaded
    child.net.llm.model.to(torch.bfloat16)  # as DeepSpeed's engine casts the module
    exact = handoff.as_handed(child, ["llm"])
    llm = [key for key in handed if key.startswith("llm.")]
    assert sorted(exact) == llm and all(torch.equal(exact[k], handed[k]) for k in llm)
    save_file({k: v + 1 for k, v in handed.items()}, str(tmp_path / "parent" / "handoff.safetensors"))  # again
    with caplog.at_level("WARNING", logger="hicom.stages"):
        assert handoff.as_handed(child, ["llm"]) is None
        (tmp_path / "parent").rename(tmp_path / "moved")
        assert handoff.as_handed(child, ["llm"]) is None
    assert caplog.text.count("is no longer the hand-off this stage loaded") == 2
