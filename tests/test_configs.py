"""Every config composes; every experiment instantiates (with tiny parts); missing weights fail at once."""

import importlib.util
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from hicom.data.index import read_mixture
from hicom.training import build
from hicom.utils.checkpoints import check_safetensors
from tests.conftest import CONFIGS, SMALL, compose_train

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
TINY_PARTS = [
    "assets=tiny",
    "model/vision=tiny_siglip",
    "model/llm=tiny_qwen2",
    "data=synthetic",
    "trainer=default",
    "~strategy",
]


def _json_data(folder: Path, train: str, val: str | None = None) -> list[str]:
    """Overrides that train on LLaVA JSON files written into `folder` (their media are never read: the tests using
    them fail first)."""
    (folder / "media").mkdir(parents=True, exist_ok=True)
    for name, text in (("train.json", train), ("val.json", val)):
        if text is not None:
            (folder / name).write_text(text)
    overrides = [
        *(o for o in SMALL if not o.startswith("data.source.")),
        "data=llava_json",
        f"data.source.train_json={folder / 'train.json'}",
        f"data.source.data_root={folder / 'media'}",
        f"data.index_dir={folder / 'index'}",
    ]
    return overrides + ([f"data.source.val_json={folder / 'val.json'}"] if val is not None else [])


GOOD_RECORD = json.dumps(
    [
        {
            "id": "a",
            "video": "a.mp4",
            "conversations": [{"from": "human", "value": "<video>\nQ?"}, {"from": "gpt", "value": "A."}],
        }
    ]
)


@pytest.mark.parametrize("group", ["model/compressor", "logger", "debug", "data", "trainer"])
def test_every_option_of_a_group_composes(group, cache_dir, tmp_path):
    for option in sorted(p.stem for p in (CONFIGS / group).glob("*.yaml")):
        cfg = compose_train(cache_dir, tmp_path, [f"{group}={option}"])
        assert cfg.model.compressor._target_


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_instantiate_with_tiny_parts(experiment, cache_dir, tmp_path):
    cfg = compose_train(cache_dir, tmp_path, [f"experiment={experiment}", *TINY_PARTS, *SMALL])
    model, datamodule = build(cfg)
    assert model.net.num_visual_tokens(datamodule.num_frames) > 0
    assert set(model.trainable) == set(cfg.model.trainable)
    instantiate(cfg.trainer)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_without_weights_name_the_missing_path_and_key(experiment, cache_dir, tmp_path):
    cfg = compose_train(cache_dir, tmp_path, [f"experiment={experiment}", f"paths.weights_dir={tmp_path / 'none'}"])
    if cfg.get("assets"):
        pytest.skip("this experiment runs on the tiny checkpoints the project writes")
    with pytest.raises(FileNotFoundError, match=r"model\.vision\.path(.|\n)*model\.llm\.path") as error:
        build(cfg)  # both missing folders at once
    assert str(Path(tmp_path / "none")) in str(error.value)


def test_missing_weights_and_missing_data_are_named_in_one_message(cache_dir, tmp_path):
    """The weights were checked first, alone: the data's missing files came to light a launch later."""
    from hicom.stages import run_stages
    from hicom.training import check

    missing = [f"paths.weights_dir={tmp_path / 'no_weights'}", f"paths.data_dir={tmp_path / 'no_data'}"]
    recipe = compose_train(cache_dir, tmp_path / "run", ["experiment=directg_local43_global32", *missing])
    with pytest.raises(FileNotFoundError) as error:
        run_stages(recipe)
    message = str(error.value)
    assert "model.llm.path" in message and "stage alignment: " in message and "stage instruction: " in message
    one_fit = ["experiment=directg_local43_global32", "stages=null", "data=llava_json", *missing,
               f"data.source.train_json={tmp_path / 'no_data' / 'train.json'}"]  # fmt: skip
    with pytest.raises(FileNotFoundError) as error:
        check(compose_train(cache_dir, tmp_path / "one", one_fit))
    assert "model.vision.path" in str(error.value) and str(tmp_path / "no_data" / "train.json") in str(error.value)


def test_one_stage_without_a_finished_parent_names_stage_parent_before_any_weights_load(cache_dir, tmp_path):
    from hicom.stages import run_stages

    cfg = compose_train(cache_dir, tmp_path / "run", ["experiment=tiny_stages", *SMALL, "stage=conditional"])
    with pytest.raises(FileNotFoundError, match=r"stages/alignment holds no finished stage.*stage_parent=<a finished"):
        run_stages(cfg)
    assert not (tmp_path / "run" / "stages" / "conditional").exists()


def test_a_staged_run_checks_every_stages_data_before_the_first_trains(cache_dir, tmp_path):
    from hicom.stages import run_stages

    data = tmp_path / "data"
    (data / "LLaVA-Pretrain" / "images").mkdir(parents=True)
    (data / "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json").write_text(GOOD_RECORD)
    # stage 1 finds its file and its media folder; stage 2's file is missing; of stage 3's, two files are there
    # without their media folders: one names clips in it, the other is text-only and reads none
    (data / "Video_Mix_Instruct").mkdir(parents=True)
    (data / "Video_Mix_Instruct/m4_instruct.jsonl").write_text(json.dumps(json.loads(GOOD_RECORD)[0]) + "\n")
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hi."}]}
    (data / "Video_Mix_Instruct/videochatgpt.jsonl").write_text(json.dumps(text_only) + "\n")
    overrides = ["experiment=directg_local43_global32", *TINY_PARTS[:3], f"paths.data_dir={data}"]
    cfg = compose_train(cache_dir, tmp_path / "run", overrides)
    with pytest.raises(FileNotFoundError) as error:
        run_stages(cfg)
    message = str(error.value)  # every missing file and folder of every stage, in one launch
    assert "stage conditional: 1 path(s) of the mixture not found" in message and "HICOM_DATA" in message
    assert "annotation file '" + str(data / "Ins-VL/20241020/248328_qa_llavaformat.json") in message
    third = len(read_mixture(CONFIGS / "mixtures" / "stage3_video_instruct.yaml", data))
    assert f"stage instruction: {third - 1} path(s)" in message  # 2 files there, 1 folder a file there reads
    assert message.count("stage3_video_instruct.yaml)") == third - 1
    assert message.count("media folder '") == 1 and "media folder '" + str(data / "Video_Mix_Instruct/m4_") in message
    assert not (tmp_path / "run" / "stages").exists()  # nothing trained


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+stages.2.config={model: {lr: {llm: -1.0}}}", "stage instruction: learning rates must be > 0"),
        (
            "+stages.2.global_batch_size=6",
            r"stage instruction: global_batch_size 6 is not a multiple .* \(this stage's: "
            r"stages\.2\.global_batch_size, stages\.2\.config\.data\.batch_size\)",
        ),
        ("+stages.1.config={model: {compressor: {local: {kernel: [0, 3, 3]}}}}", "stage conditional: "),
        ("+stages.1.num_frame=4", r"stage 'conditional': unknown fields \['num_frame'\]; a stage holds"),
        # a later stage's data and trainer values: refused before the first stage trains
        ("stages.1.num_frames=0", r"stage conditional: .*num_frames must be a whole number >= 1, got 0"),
        ("+stages.1.config.data.batch_size=0", r"stage conditional: data.batch_size must be a whole number >= 1"),
        ("+stages.1.config.data.sampling.fps=-1", r"stage conditional: .*fps must be positive"),
        ("+stages.2.config.trainer.precision=fp32", r"stage instruction: trainer.precision: Precision 'fp32'"),
    ],
)
def test_a_staged_run_checks_every_stages_values_before_the_first_trains(override, message, cache_dir, tmp_path):
    from hicom.stages import run_stages

    cfg = compose_train(cache_dir, tmp_path / "run", ["experiment=tiny_stages", *SMALL, override])
    with pytest.raises(ValueError, match=message):
        run_stages(cfg)
    assert not (tmp_path / "run" / "stages").exists()  # nothing trained


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (None, [("DeepSpeedStrategy", 0), ("DeepSpeedStrategy", 0), ("DeepSpeedStrategy", 2)]),  # SPEC 5
        ("strategy=deepspeed_zero3", [("DeepSpeedStrategy", 3)] * 3),  # more sharding than a stage needs is kept
        ("strategy=ddp", [("DDPStrategy", None)] * 3),
        # Lightning's registered names read as the configs they stand for
        ("trainer.strategy=deepspeed_stage_1", [("DeepSpeedStrategy", 1)] * 2 + [("DeepSpeedStrategy", 2)]),
        ("trainer.strategy=deepspeed_stage_3_offload", [("DeepSpeedStrategy", 3)] * 3),
        ("trainer.strategy=ddp_find_unused_parameters_true", [("DDPStrategy", None)] * 3),
    ],
)
def test_the_recipes_stages_run_under_deepspeed_zero_0_0_2_unless_told_otherwise(
    override, expected, cache_dir, tmp_path
):
    from hicom.stages import stage_config

    cfg = compose_train(cache_dir, tmp_path, ["experiment=directg_local43_global32", *([override] if override else [])])
    strategies = [stage_config(cfg, stage, tmp_path / stage.name).trainer.strategy for stage in cfg.stages]
    assert [(s._target_.rsplit(".", 1)[-1], s.get("stage")) for s in strategies] == expected


@pytest.mark.parametrize("compressor", sorted(p.stem for p in (CONFIGS / "model" / "compressor").glob("*.yaml")))
def test_the_recipe_composes_with_every_compressor(compressor, cache_dir, tmp_path):
    """`experiment=directg_local43_global32 model/compressor=<any>`: stage 1 aligns it without its guide, the later
    stages guide it where it can be guided, and every stage builds it at the release's init."""
    from hicom.stages import stage_config

    cfg = compose_train(cache_dir, tmp_path, ["experiment=directg_local43_global32", f"model/compressor={compressor}"])
    guided = []
    for stage in cfg.stages:
        built = instantiate(stage_config(cfg, stage, tmp_path / stage.name).model.compressor)
        guided.append(built(in_dim=48, out_dim=8, guide_dim=48).uses_guide)
    assert guided == [False, *[compressor in ("hicom", "instructblip")] * 2]
    comp = cfg.model.compressor
    stds = [c.init_std for c in (comp, comp.get("local"), comp.get("global_")) if c is not None and "init_std" in c]
    # the release's init where the compressor has the setting (the Q-Former keeps BERT's initializer_range)
    assert set(stds) == (set() if compressor in ("qformer", "instructblip") else {0.02})


@pytest.mark.parametrize(
    "variant",
    [["model.compressor.global_=null"], ["model.compressor.local=null"],
     ["model.compressor.global_.adapt_guide=true", "model.compressor.local.adapt=[k,v,g]"]],
    ids=["local-only", "global-only", "guide-adapters"],
)  # fmt: skip
def test_the_recipe_turns_off_every_hicom_variants_guide_in_stage_1(variant, cache_dir, tmp_path):
    """Single-branch ablations and the release's adaptg variants: stage 1 builds them unguided (a guide adapter
    without a guide is refused), the later stages guided."""
    from hicom.stages import stage_config

    cfg = compose_train(cache_dir, tmp_path, ["experiment=directg_local43_global32", *variant])
    guided = [
        instantiate(stage_config(cfg, stage, tmp_path / stage.name).model.compressor)(in_dim=48, out_dim=8).uses_guide
        for stage in cfg.stages
    ]
    assert guided == [False, True, True]


def test_a_later_stage_with_an_unreadable_annotation_file_fails_before_the_first_stage_trains(cache_dir, tmp_path):
    from omegaconf import open_dict

    from hicom.stages import run_stages

    overrides = _json_data(tmp_path / "data", GOOD_RECORD)
    (tmp_path / "bad.json").write_text(GOOD_RECORD[:-1] + ", {not json")
    cfg = compose_train(cache_dir, tmp_path / "run", ["experiment=tiny_stages", *overrides])
    with open_dict(cfg):
        cfg.stages[2].config = {"data": {"source": {"train_json": str(tmp_path / "bad.json")}}}
    with pytest.raises(ValueError, match=r"bad\.json: not JSON"):
        run_stages(cfg)
    assert not (Path(cfg.paths.output_dir) / "stages").exists()


@pytest.mark.parametrize(
    "compressor, tokens",
    [
        ("hicom", 2 * 3 * 3 + 32),
        ("avgpool", 2 * 3 * 3),
        ("bilinear", 8 * 4 * 4),
        ("qformer", 32),
        ("instructblip", 32),
    ],
)
def test_default_token_counts(compressor, tokens, cfg_small, cache_dir, tmp_path):
    cfg = compose_train(cache_dir, tmp_path, [f"model/compressor={compressor}", *SMALL])
    model, _ = build(cfg)
    assert model.net.num_visual_tokens(8) == tokens


def test_frozen_parts_stay_in_eval_mode_while_training(cache_dir, tmp_path):
    cfg = compose_train(cache_dir, tmp_path, ["model.trainable=[compressor,vision_head]", *SMALL])
    model, _ = build(cfg)
    for mode in (True, False, True):
        model.train(mode)
        assert model.net.compressor.training is mode
        assert model.net.vision.vision_tower.head.training is mode
        assert not model.net.llm.model.training
        assert not model.net.vision.vision_tower.encoder.training
        assert not model.net.vision.guide_encoder.training


def test_global_batch_is_the_one_source_of_accumulation():
    from hicom.training import gradient_accumulation

    assert gradient_accumulation(None, 4, 8) == 1
    assert gradient_accumulation(512, 1, 8) == 64
    assert gradient_accumulation(256, 2, 16) == 8
    for bad in ((100, 1, 8), (4, 1, 8)):
        with pytest.raises(ValueError, match="global_batch_size"):
            gradient_accumulation(*bad)


def test_the_global_batch_is_checked_against_the_tasks_of_an_srun_step(cache_dir, tmp_path, monkeypatch):
    """srun sets no WORLD_SIZE: its task count is read, and only inside a step (a python started by the batch
    script itself runs alone)."""
    from hicom.training import check_global_batch

    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    cfg = compose_train(cache_dir, tmp_path, [*SMALL, "global_batch_size=8"])  # micro batch 4
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_PROCID", "0")
    check_global_batch(cfg)  # no step: one process, 8 = 4 x 2
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    with pytest.raises(ValueError, match="global_batch_size"):
        check_global_batch(cfg)  # 4 tasks of micro batch 4 make 16 a step


def test_a_stage_setting_a_key_the_chosen_data_group_lacks_says_to_run_one_fit(cache_dir, tmp_path):
    """data=llava_json under the recipe's stages, which give each stage a mixture (data.source.train), was a bare
    ConfigKeyError."""
    from hicom.stages import stage_config

    cfg = compose_train(
        cache_dir, tmp_path, ["experiment=directg_local43_global32", *TINY_PARTS[:3], "data=llava_json"]
    )
    with pytest.raises(ValueError, match=r"stage 'alignment' sets data.source.train, a key .* stages=null"):
        stage_config(cfg, cfg.stages[0], tmp_path / "alignment")


def test_the_global_batch_is_checked_against_the_processes_lightning_will_start(cache_dir, tmp_path, monkeypatch):
    """Launched as one process with trainer.devices=2, Lightning starts the second only after the first has built
    the model: the check counts both before anything loads (it counted one, and the second process failed late)."""
    from hicom.training import check_global_batch, planned_processes

    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    cfg = compose_train(cache_dir, tmp_path, [*SMALL, "global_batch_size=12", "trainer.devices=2"])  # micro 4
    with pytest.raises(ValueError, match="global_batch_size 12 is not a multiple"):
        check_global_batch(cfg)  # 2 processes of micro batch 4 make 8
    assert planned_processes({"devices": [0, 3], "num_nodes": 2}) == 4
    assert planned_processes({"devices": "0,1,2", "num_nodes": 1}) == 3
    assert planned_processes({"devices": "auto", "accelerator": "cpu"}) == 1
    monkeypatch.setenv("WORLD_SIZE", "5")  # a launcher's count wins
    with pytest.raises(ValueError, match="world size 5"):
        check_global_batch(cfg)


@pytest.mark.parametrize("strategy", sorted(p.stem for p in (CONFIGS / "strategy").glob("*.yaml")))
def test_strategies_compose_without_batch_settings(strategy, cache_dir, tmp_path):
    cfg = compose_train(cache_dir, tmp_path, [f"strategy={strategy}"])
    node = cfg.trainer.strategy
    assert node._target_.startswith("lightning.pytorch.strategies.")
    assert not any("batch" in key for key in node)
    if strategy == "ddp":
        instantiate(cfg.trainer)


def test_a_global_batch_sets_accumulation_in_a_run(cache_dir, tmp_path):
    from hicom.training import train

    overrides = [*SMALL, "global_batch_size=8", "data.batch_size=4", "trainer.limit_train_batches=4"]
    metrics = train(compose_train(cache_dir, tmp_path, overrides))
    assert metrics["steps"] == 2  # 4 micro batches of 4, 2 per optimizer step


def test_the_recipe_without_its_stages_is_one_fit_of_stage_2_with_its_batch(cache_dir, tmp_path):
    """`experiment=directg_local43_global32 stages=null` trains as stage 2 does, 512 samples per optimizer step
    (SPEC 5) of 8 per GPU, on any number of GPUs; the stages keep their own batches."""
    from omegaconf import OmegaConf

    from hicom.stages import stage_config
    from hicom.training import gradient_accumulation

    staged = compose_train(cache_dir, tmp_path, ["experiment=directg_local43_global32"])
    stages = [stage_config(staged, stage, tmp_path / stage.name) for stage in staged.stages]
    one = compose_train(cache_dir, tmp_path, ["experiment=directg_local43_global32", "stages=null"])
    keys = (
        "global_batch_size",
        "data.batch_size",
        "data.num_frames",
        "data.source.train",
        "model.trainable",
        "model.lr",
    )
    assert {k: OmegaConf.select(one, k) for k in keys} == {k: OmegaConf.select(stages[1], k) for k in keys}
    assert (one.global_batch_size, one.data.batch_size) == (512, 8)
    for world in (1, 8, 64):
        micro = one.data.batch_size
        assert micro * world * gradient_accumulation(one.global_batch_size, micro, world) == 512
    assert [(s.global_batch_size, s.data.batch_size) for s in stages] == [(512, 32), (512, 8), (256, 2)]


def test_the_recipe_as_one_fit_names_the_rate_of_a_part_it_trains_beyond_stage_2(cache_dir, tmp_path, unloadable_llm):
    """The recipe's rates are stage 2's and null for the other parts: a one fit that also trains the LLM is refused
    before any weights load, rather than train it at the tiny default's 3e-4; given its rate, it composes."""
    from hicom.training import train

    trains_llm = [
        "experiment=directg_local43_global32",
        *TINY_PARTS,
        "stages=null",
        "model.trainable=[compressor,llm]",
        f"model.llm.path={unloadable_llm}",
    ]
    with pytest.raises(ValueError, match=r"no learning rate for trainable parts \['llm'\]: set model.lr.<part>"):
        train(compose_train(cache_dir, tmp_path, trains_llm))
    given = compose_train(cache_dir, tmp_path, [*trains_llm, "model.lr.llm=1e-5"])
    assert dict(given.model.lr) == {
        "vision_trunk": None, "vision_head": None, "guide_encoder": None, "compressor": 1e-4, "injection": 1e-3,
        "llm": 1e-5,
    }  # fmt: skip


def test_command_line_values_a_staged_experiment_would_replace_are_refused_with_the_per_stage_keys(cache_dir, tmp_path):
    from hicom.stages import check_stage_overrides

    stages = compose_train(cache_dir, tmp_path, ["experiment=directg_local43_global32"]).stages
    fine = [
        "model/compressor=avgpool",
        "strategy=ddp",
        "data=mixture",
        "~logger",
        "trainer.max_epochs=2",
        "stages.1.num_frames=16",
        "stages.2.config.model.lr.llm=2e-5",
        "model.weight_decay=0.01",
        "data.source={data_dir: /elsewhere}",
    ]  # fmt: skip  (a dict merges: only data_dir is set)
    check_stage_overrides(stages, fine)
    cases = {
        "data.num_frames=16": "stages.0.num_frames=... (alignment), stages.1.num_frames=... (conditional), "
        "stages.2.num_frames=... (instruction)",
        "global_batch_size=64": "stages.2.global_batch_size=... (instruction)",
        "model.trainable=[llm]": "stages.0.trainable=... (alignment)",
        "model.lr.compressor=5e-5": "stages.1.config.model.lr.compressor=... (conditional)",
        "model.lr.llm=5e-5": "stages.2.config.model.lr.llm=... (instruction)",
        "data.source.train=mix.yaml": "stages.0.config.data.source.train=... (alignment)",
        "model.lr={compressor: 1}": "stages.0.config.model.lr.compressor=... (alignment)",
    }
    for override, hint in cases.items():
        with pytest.raises(ValueError, match=re.escape(hint)):
            check_stage_overrides(stages, [*fine, override])
    with pytest.raises(ValueError) as error:  # every one named at once
        check_stage_overrides(stages, list(cases))
    assert all(f"\n  {override}: the stages set it themselves" in str(error.value) for override in cases)
    lines = {line.split(": ")[0].strip(): line for line in str(error.value).splitlines()[1:]}
    assert "other stages" not in lines["data.num_frames=16"]  # every stage sets it
    # a key only stage 2 sets: its key, then how the other two take the value
    assert lines["model.lr.llm=5e-5"].endswith(
        "per stage: stages.2.config.model.lr.llm=... (instruction); the other stages take it as "
        "+stages.0.config.model.lr.llm=... (alignment), +stages.1.config.model.lr.llm=... (conditional)"
    )


def test_a_group_chosen_with_a_dot_is_refused_with_the_slash_form():
    """`model.compressor=avgpool` sets the key to a text, which failed in Hydra's instantiate ("Cannot instantiate
    config of type str"), `model.vision=tiny_clip` in a resolver ("not a container")."""
    from hicom.utils.config import refuse_group_slips

    for arg, slashed in [("model.compressor=avgpool", "model/compressor=avgpool"),
                         ("model.vision=tiny_clip", "model/vision=tiny_clip"), ("+model.llm=tiny_llama", "model/llm")]:  # fmt: skip
        with pytest.raises(SystemExit, match=re.escape(slashed)):
            refuse_group_slips([arg])
    # a value given to the group's node, and keys inside it, are left to Hydra
    refuse_group_slips(
        ["model.compressor={kernel: [2, 2, 2]}", "model.compressor.kernel=[2,2,2]", "data.sampling.fps=1"]
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["experiment=tiny_stages", "data.num_frames=4"], "data.num_frames=4: the stages set it themselves"),
        (["stage=conditional"], "stage= and stage_parent= pick a stage of a staged experiment"),
        (
            ["experiment=directg_local43_global32", "strategy=null"],
            "strategy=null: a config group is left out with ~strategy",
        ),
    ],
)
def test_train_py_refuses_values_it_would_not_use_with_the_form_to_write(overrides, message, tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "train.py", *overrides, "dry_run=true", f"hydra.run.dir={tmp_path}"],
                          cwd=CONFIGS.parent, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("compressor", ["qformer", "instructblip"])
def test_the_q_former_is_tiny_on_the_tiny_default_and_bert_base_in_the_real_experiments(
    compressor, cache_dir, tmp_path
):
    sizes = ("hidden_size", "num_layers", "num_heads", "intermediate_size")
    tiny = compose_train(cache_dir, tmp_path, [f"model/compressor={compressor}"]).model.compressor
    assert [tiny[k] for k in sizes] == [64, 2, 2, 256]
    for experiment in ("directg_local43_global32", "ablation_conditional"):
        real = compose_train(cache_dir, tmp_path, [f"experiment={experiment}", f"model/compressor={compressor}"])
        assert [real.model.compressor[k] for k in sizes] == [768, 12, 12, 3072]


def test_multinode_reads_the_launchers_counts(cache_dir, tmp_path, monkeypatch):
    launchers = ["SLURM_NNODES", "SLURM_NTASKS_PER_NODE", "GROUP_WORLD_SIZE", "LOCAL_WORLD_SIZE"]
    for name in (*launchers, "HICOM_NUM_NODES", "HICOM_GPUS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    cpu = ["trainer=multinode", "trainer.accelerator=cpu", "trainer.precision=32-true"]

    def trainer():  # built as train.py builds it: Lightning takes counts as ints, not the strings the env gives
        return instantiate(compose_train(cache_dir, tmp_path, cpu).trainer)

    assert (trainer().num_nodes, trainer().world_size) == (1, 1)  # no launcher: one node, Lightning's devices
    monkeypatch.setenv("SLURM_NNODES", "4")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    assert (trainer().num_nodes, trainer().world_size) == (4, 8)
    monkeypatch.setenv("GROUP_WORLD_SIZE", "3")  # a plain torchrun --nnodes=3 --nproc_per_node=2 (inside SLURM too)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert (trainer().num_nodes, trainer().world_size) == (3, 6)
    monkeypatch.setenv("HICOM_NUM_NODES", "2")
    monkeypatch.setenv("HICOM_GPUS_PER_NODE", "1")
    assert (trainer().num_nodes, trainer().world_size) == (2, 2)


def test_auto_attention_is_sdpa_without_flash_attn():
    from hicom.utils.checkpoints import resolve_attention

    assert resolve_attention("auto") == "sdpa"  # no GPU, no flash-attn here
    assert resolve_attention("eager") == "eager"


LAUNCH_VARIABLES = ["HICOM_RUN_STAMP", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_PROCID",
                    "SLURM_JOB_ID", "SLURM_STEP_ID"]  # fmt: skip


@pytest.mark.parametrize(
    ("env", "stamp"),
    [
        ({"HICOM_RUN_STAMP": "ablation 3/a"}, "ablation-3-a"),  # given: as a folder name
        ({"WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "3f2a9c"}, "torchrun-3f2a9c"),  # every torchrun worker shares it
        ({"SLURM_NTASKS": "16", "SLURM_PROCID": "5", "SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0"}, "slurm-42.0"),
        ({"SLURM_NTASKS": "16", "SLURM_PROCID": "5", "SLURM_JOB_ID": "42", "HICOM_RUN_STAMP": "mine"}, "mine"),
        ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_ID": "42"}, None),  # one process: the time
        ({"SLURM_NTASKS": "16", "SLURM_PROCID": "0", "SLURM_JOB_ID": "42"}, None),  # the batch script, not a step
        ({}, None),
    ],
)
def test_every_process_of_a_launch_names_the_run_folder_alike(env, stamp, monkeypatch):
    from hicom.utils.config import run_stamp

    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if stamp is None:  # the time, and this process: a launch of its own
        time_part, pid = run_stamp("%Y-%m-%d_%H-%M-%S").rsplit("_", 1)
        assert len(time_part) == len("2026-01-01_00-00-00") and pid == str(os.getpid())
    else:
        assert run_stamp("%Y-%m-%d_%H-%M-%S") == stamp


def test_a_launch_without_a_shared_id_warns_that_its_processes_may_part(monkeypatch):
    from hicom.utils.config import run_stamp

    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default with --master_addr
    with pytest.warns(UserWarning, match="HICOM_RUN_STAMP"):
        run_stamp("%Y")


def test_the_run_folder_is_named_by_the_launch(cache_dir, tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    monkeypatch.setenv("HICOM_RUN_STAMP", "sweep-7")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    assert Path(cfg.hydra.run.dir).name == "sweep-7" and Path(cfg.hydra.sweep.dir).name == "sweep-7"


def test_the_run_stamp_is_read_once_per_config(monkeypatch):
    """Lightning's DDP launcher reads hydra.run.dir again for its child processes, seconds later: the same folder."""
    from omegaconf import OmegaConf

    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    seconds = iter(["00", "07", "09"])
    monkeypatch.setattr("hicom.utils.config.time.strftime", lambda pattern: next(seconds))
    cfg = OmegaConf.create({"dir": "runs/${run_stamp:%S}"})
    assert cfg.dir == cfg.dir == f"runs/00_{os.getpid()}"


def test_a_staged_run_without_a_shared_run_folder_refuses_to_start(cache_dir, tmp_path, monkeypatch):
    from hicom.stages import run_stages

    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    cfg = compose_train(cache_dir, tmp_path, ["experiment=tiny_stages", *SMALL])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    with pytest.raises(RuntimeError, match="HICOM_RUN_STAMP"):
        run_stages(cfg)


@pytest.fixture(scope="module")
def unloadable_llm(tiny_paths, tmp_path_factory) -> Path:
    """The tiny LLM folder with one tensor of the wrong shape in whole weights: it fails only when it loads."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(tiny_paths["qwen2"], tmp_path_factory.mktemp("unloadable") / "qwen2")
    state = load_file(str(folder / "model.safetensors"))
    state[next(iter(state))] = torch.zeros(3, 3)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.lr.compressor=-1", "learning rates must be > 0"),
        ("model.lr=1e-4", r"model.lr is a learning rate per trainable part, got 0.0001: set model.lr.<part>=1e-4"),
        ("model.lr.compressor=abc", r"learning rates are numbers, got \{'compressor': 'abc'\}"),
        ("model.trainable=[compressor,bogus]", "unknown trainable parts"),
        (
            "model.trainable=compressor",
            r"model\.trainable is a list of parts \(e\.g\. \[compressor\]\), got 'compressor'",
        ),
        ("+model.lr.compresor=1e-3", r"model\.lr: unknown parts \['compresor'\]; the learning rates are of"),
        ("seed=abc", "seed must be a whole number >= 0, got 'abc'"),
        ("model.warmup_ratio=5", "warmup_ratio"),
        (
            "model.compressor.global_.num_queries=0",
            "model.compressor: global_: num_queries must be a whole number >= 1",
        ),
        ("model.compressor.global_.num_queries=2.5", "global_: num_queries must be a whole number >= 1, got 2.5"),
        (
            "model.compressor.local.kernel=abc",
            r"local: kernel must be three whole numbers >= 1 \(k_t, k_s, k_s\), got 'abc'",
        ),
        ("model.compressor.local.kernel=[4,3.5,3.5]", r"local: kernel must be three whole numbers >= 1"),
        ("model.compressor.local.kernel=[4,3,2]", r"local: kernel must be \(k_t, k_s, k_s\): one spatial size"),
        ("global_batch_size=-4", "global_batch_size must be a whole number >= 1, got -4"),
        ("float32_matmul_precision=tf32", r"float32_matmul_precision must be one of \['highest', 'high', 'medium'\]"),
        ("global_batch_size=abc", "global_batch_size must be a whole number >= 1, got 'abc'"),
        ("data.batch_size=four", "data.batch_size must be a whole number >= 1, got 'four'"),
        ("model.compressor.local.keys=embed", r"local: keys must be one of \['embeds', 'features'\], got 'embed'"),
        ("model.compressor.global_.guide=Direct", r"global_: guide must be one of \['off', 'direct'"),
        ("model.compressor.global_.position=q", r"global_: position must be one of \['kv', 'k', 'none'\], got 'q'"),
        *(
            [
                ("trainer=gpu", "sees no CUDA GPU: trainer=default trains on the CPU"),
                ("strategy=deepspeed_zero2", r"Lightning runs on CUDA GPUs only, .* '~strategy' \(one process\)"),
            ]
            if not torch.cuda.is_available()
            else []
        ),
        ("model.vision.attn_implementation=spda", r"model.vision.attn_implementation must be one of \['auto', 'sdpa'"),
        ("model.llm.gradient_checkpointing=yes", "model.llm.gradient_checkpointing must be true or false, got 'yes'"),
        *(
            [("model.llm.attn_implementation=flash_attention_2", "flash_attention_2 needs the flash-attn package")]
            if importlib.util.find_spec("flash_attn") is None
            else []
        ),
        ("data.sampling.fallback=decrd", r"fallback must be one of \['decord', 'pyav'\], got 'decrd'"),
        ("data.sampling.decoder=ffmpeg", r"decoder must be one of \['decord', 'pyav'\], got 'ffmpeg'"),
        ("model.compressor.local.guide=bogus", r"guide must be one of \['off', 'direct', 'coarse', 'fine'\]"),
        ("model/vision=tiny_clip", "joint-space keys, which ClipTower does not provide"),
        ("data.batch_size=0", "data.batch_size must be a whole number >= 1"),
        ("data.eval_batch_size=0", "data.eval_batch_size must be a whole number >= 1"),
        ("data.num_workers=-1", "data.num_workers must be a whole number >= 0"),
        ("data.multiprocessing_context=frk", r"data.multiprocessing_context must be one of \['fork', 'forkserver', 's"),
        ("data.num_frames=0", "num_frames must be a whole number >= 1, got 0"),
        ("data.num_frames=2.5", "num_frames must be a whole number >= 1, got 2.5"),
        ("data.sampling.frame_folder_fps=0", r"frame_folder_fps \(frames per second of a folder of frames\) must be"),
        ("data.sampling.repeat_frames=no", "repeat_frames must be true or false, got 'no'"),
        ("data.shuffle=no", "data.shuffle must be true or false, got 'no'"),
        ("evaluate=maybe", "evaluate must be true or false, got 'maybe'"),
        ("model.compressor.local.clip_scale=no", "local: clip_scale must be true or false, got 'no'"),  # read as true
        ("model.compressor.global_.adapt_guide=no", "global_: adapt_guide must be true or false, got 'no'"),
        ("data.sampling.fps=-1", "fps must be positive"),
        ("data.sampling.fps=nan", "fps must be positive and finite, or None"),
        ("data.sampling.time_limit=inf", r"time_limit must be positive and finite, or None \(no limit\)"),
        ("trainer.max_steps=-5", "max_steps"),
        ("+global_batch_size=6", "global_batch_size 6 is not a multiple"),
        ("model.trainable=[]", "model.trainable is empty"),
        ("model.weight_decay=-1", "model.weight_decay must be >= 0"),
        ("model.weight_decay=abc", "model.weight_decay is a number, got 'abc'"),
        ("model.max_new_tokens=0", "model.max_new_tokens is how many tokens an answer may take, >= 1: got 0"),
        ("model.vision.select_layer=-10", r"select_layer=-10: this tower has \d+ layers"),
        ("data.max_length=0", "data.max_length must be a whole number >= 1"),
        ("data.max_length=40", "data.max_length=40 leaves no room for text after the 50 visual tokens"),
        ("data.too_long=cut", r"data.too_long must be one of \['skip', 'truncate'\], got 'cut'"),
        (
            "callbacks.throughput.window_size=1",
            r"callbacks.throughput.window_size must be a whole number >= 2 \(.*\), got 1",
        ),
        # values Lightning takes as they are: a division by zero within the fit, or passed over without a word
        ("trainer.deterministic=yes", "trainer.deterministic must be true, false, warn or null, got 'yes'"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches must be a whole number >= 1, got 0"),
        ("trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch must be a whole number >= 1, got 0"),
        ("+trainer.val_check_interval=0", r"trainer.val_check_interval must be .* got 0"),
        ("+trainer.val_check_interval=1.5", r"trainer.val_check_interval must be .* got 1.5"),
        ("trainer.gradient_clip_val=-1", r"trainer.gradient_clip_val must be a finite number >= 0 .* got -1"),
        ("trainer.gradient_clip_val=nan", r"trainer.gradient_clip_val must be a finite number >= 0 .* got nan"),
        ("trainer.precision=fp32", "trainer.precision: Precision 'fp32' is invalid"),
        ("data.seed=abc", "data.seed must be a whole number >= 0, got 'abc'"),
        ("data.seed=1.5", "data.seed must be a whole number >= 0, got 1.5"),
        ("+model.betas=[0.9]", r"model.betas are AdamW's two decay rates, each in \[0, 1\) .* got \[0.9\]"),
        ("+model.betas=0.9", r"model.betas are AdamW's two decay rates.* got 0.9"),
        ("+model.betas=[0.9,1.5]", r"model.betas are AdamW's two decay rates"),
        ("callbacks.model_checkpoint.train_time_interval.hours=0", "train_time_interval must be a positive time"),
        ("trainer.max_steps=1.5", "trainer.max_steps must be a whole number >= -1, got 1.5"),  # ran 2 steps
        ("trainer.max_epochs=0.5", "trainer.max_epochs must be a whole number >= -1, got 0.5"),
        ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps must be a whole number >= 1, got 0"),  # no logs
        ("callbacks.model_checkpoint.save_last=no", "save_last must be true, false or link, got 'no'"),  # saved
        ("data.visual_token='<|image_pad|>'", r"data.visual_token='<\|image_pad\|>' is not the LLM's placeholder"),
        ("model/compressor=qformer model.compressor.initializer_range=-1.0", "initializer_range must be a finite"),
        # a compressor of one's own whose module is not on the path (Hydra said only "Error locating target")
        (
            "model.compressor._target_=nowhere_module.Mine",
            r"nowhere_module.Mine cannot be imported here \(No module "
            r"named 'nowhere_module'\)(.|\n)*on PYTHONPATH",
        ),  # fmt: skip
    ],
)
def test_a_bad_config_value_fails_before_any_weights_load(override, message, cache_dir, tmp_path, unloadable_llm):
    """Each bad value is reported, not the LLM's unloadable weights: it was checked before they load."""
    from hicom.training import train

    overrides = [*SMALL, *override.split(), f"model.llm.path={unloadable_llm}"]
    with pytest.raises(Exception, match=message):
        train(compose_train(cache_dir, tmp_path, overrides))


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.llm.path=null", r"the LLM checkpoint: model.llm.path is null. Set `model.llm.path=<folder>`"),
        ("model.vision.path=null", r"model.vision.path is null. Set `model.vision.path=<folder>`"),
        ("data.source.train=null", r"data.source.train is null: set `data.source.train=<file.yaml>`"),
        ("data.source.data_dir=null", r"data.source.data_dir is null: set `data.source.data_dir=<dir>`"),
    ],
)
def test_a_null_path_is_named_before_anything_loads(override, message, cache_dir, tmp_path):
    """A path set to null is a missing one, named with its key (it was a TypeError naming none, after the vision
    tower had loaded)."""
    from hicom.training import train

    mixture = Path(__file__).resolve().parents[1] / "configs/mixtures/stage2_hicom248k.yaml"
    data = ["data=mixture", f"data.source.train={mixture}"]
    small = [o for o in SMALL if not (override.startswith("data.") and o.startswith("data.source."))]
    overrides = [*small, *(data if override.startswith("data.") else []), override]
    with pytest.raises(FileNotFoundError, match=message):
        train(compose_train(cache_dir, tmp_path, overrides))


@pytest.mark.parametrize("strategy", ["strategy=deepspeed_zero2", "trainer.strategy=deepspeed_stage_2"])
def test_a_deepspeed_strategy_without_deepspeed_says_how_to_train_instead(
    strategy, cache_dir, tmp_path, unloadable_llm, monkeypatch
):
    """The set-up installs deepspeed; a machine without it is made here by hiding the package."""
    from hicom.training import train

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a)
    )
    overrides = [*SMALL, strategy, f"model.llm.path={unloadable_llm}"]
    with pytest.raises(ValueError, match=r"deepspeed is not installed: .* '~strategy' \(one process\) or strategy=ddp"):
        train(compose_train(cache_dir, tmp_path, overrides))


@pytest.mark.parametrize(
    ("train_text", "val_text", "message"),
    [
        ('[{"id": "a"}, {"id": ', None, r"train\.json: not JSON"),
        ('{"id": "a"}', None, r"train\.json: expected a JSON list of samples"),
        ("[]", None, r"train\.json holds no record: a source that would add nothing"),
        (GOOD_RECORD, "[{", r"val\.json: not JSON"),
    ],
)
def test_an_unreadable_annotation_file_fails_before_any_weights_load(
    train_text, val_text, message, cache_dir, tmp_path, unloadable_llm
):
    from hicom.training import train

    overrides = [*_json_data(tmp_path / "data", train_text, val_text), f"model.llm.path={unloadable_llm}"]
    with pytest.raises(ValueError, match=message):
        train(compose_train(cache_dir, tmp_path / "run", overrides))


@pytest.mark.parametrize("extra", [[], ["data.max_length=40", "data.too_long=truncate"]])
def test_the_unloadable_llm_fails_when_it_loads(extra, cache_dir, tmp_path, unloadable_llm):
    """What the test above relies on: with good values, the run gets as far as loading the LLM, and fails there.
    (A max_length below the clip's visual tokens is good where the text alone is cut to it.)"""
    with pytest.raises(Exception, match="ignore_mismatched_sizes"):
        build(compose_train(cache_dir, tmp_path, [*SMALL, *extra, f"model.llm.path={unloadable_llm}"]))


def test_weights_cut_short_are_named_before_anything_loads(cache_dir, tmp_path, tiny_paths):
    import shutil

    from safetensors.torch import save_file

    folder = shutil.copytree(tiny_paths["qwen2"], tmp_path / "qwen2")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=re.escape(f"'{weights}' (1000 bytes) is not a whole safetensors file")):
        build(compose_train(cache_dir, tmp_path / "run", [*SMALL, f"model.llm.path={folder}"]))
    whole = tmp_path / "whole.safetensors"
    save_file({"a": torch.zeros(64), "b": torch.ones(3, 5)}, str(whole))
    check_safetensors(whole)
    data = whole.read_bytes()
    for damaged in (data[:-4], data + b"\0"):  # the tensor data short by 4 bytes; one byte too many
        whole.write_bytes(damaged)
        with pytest.raises(ValueError, match=re.escape(f"({len(damaged)} bytes) is not a whole safetensors file")):
            check_safetensors(whole)


def test_a_tokenizer_that_cannot_encode_is_refused_before_any_weights_load(cache_dir, tmp_path, monkeypatch):
    """A Qwen folder without tokenizer.json (transformers builds a tokenizer of its 5 special tokens, and every text
    tokenizes to nothing), one without tokenizer_config.json (the chat template and end token do not match: every
    sample would fail), and a SigLIP folder without spiece.model: each refused in the checks, naming the folder."""
    import shutil

    from hicom.training import train
    from hicom.utils.instantiators import write_assets

    write_assets(compose_train(cache_dir, tmp_path, SMALL).assets)
    tiny = cache_dir / "tiny"
    broken = {"q_no_vocab": ("qwen2", "tokenizer.json"), "q_no_config": ("qwen2", "tokenizer_config.json"),
              "s_no_spm": ("siglip", "spiece.model")}  # fmt: skip
    for name, (source, missing) in broken.items():
        shutil.copytree(tiny / source, tmp_path / name)
        (tmp_path / name / missing).unlink()
    monkeypatch.setattr("hicom.training.build", lambda *a, **k: pytest.fail("built before the tokenizers were checked"))
    for override, error, message in [
        (f"model.llm.path={tmp_path / 'q_no_vocab'}", FileNotFoundError, "no vocabulary beyond its 5 special tokens"),
        (f"model.llm.path={tmp_path / 'q_no_config'}", ValueError, "chat template cannot be trained on"),
        (
            f"model.vision.path={tmp_path / 's_no_spm'}",
            FileNotFoundError,
            "cannot read the text tokenizer for the guide",
        ),
    ]:
        with pytest.raises(error, match=message) as raised:
            train(compose_train(cache_dir, tmp_path / "run", [*SMALL, override]))
        assert str(tmp_path) in str(raised.value)


def test_warmup_is_counted_as_the_releases_trainer_counts_it():
    from hicom.models.video_llm_module import warmup_steps

    assert warmup_steps(0.03, 1444) == 44  # stage 2 at 512 a step: rounded up, where round() gave 43
    assert warmup_steps(0.03, 100) == math.ceil(100 * 0.03) and warmup_steps(0.0, 100) == 0


def test_a_stage_flag_that_is_not_true_or_false_is_refused_by_name(cache_dir, tmp_path):
    """`guided: no` read as guided: the alignment stage trained with its guide on."""
    from hicom.stages import run_stages

    cfg = compose_train(cache_dir, tmp_path, ["experiment=tiny_stages", *SMALL, "stages.0.guided=no"])
    with pytest.raises(ValueError, match="stages.alignment.guided must be true or false, got 'no'"):
        run_stages(cfg)


def test_an_empty_path_variable_counts_as_unset(monkeypatch, tmp_path):
    """`export HICOM_CACHE=$UNSET` in a job script sets it empty: the default folder, not the filesystem's root."""
    from hydra import compose, initialize_config_dir

    from hicom.utils.config import project_root

    monkeypatch.setenv("HICOM_DATA", str(tmp_path))
    for name in ("HICOM_ROOT", "HICOM_CACHE", "HICOM_LOGS", "HICOM_WEIGHTS", "HICOM_SIGLIP", "HICOM_QWEN"):
        monkeypatch.setenv(name, "")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=directg_local43_global32"])
    root = str(project_root())
    assert cfg.paths.root_dir == root and cfg.paths.data_dir == str(tmp_path)
    assert (cfg.paths.cache_dir, cfg.paths.log_dir) == (f"{root}/.cache", f"{root}/logs")
    assert cfg.model.vision.path == f"{root}/weights/siglip-so400m-patch14-384"
    assert cfg.model.llm.path == f"{root}/weights/Qwen2.5-7B-Instruct"


def test_each_benchmark_prompt_is_overridden_on_its_own():
    """configs/evaluate.yaml says `benchmarks.<name>.prompts.multiple_choice=...` changes one benchmark: Video-MME
    with subtitles asks as Video-MME does, and an override of either leaves the other as it was."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    def prompts(*overrides: str) -> dict:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose("evaluate", overrides=list(overrides))
        return {name: OmegaConf.to_container(cfg.benchmarks[name].prompts) for name in ("videomme", "videomme_subs")}

    default = prompts()
    assert default["videomme"] == default["videomme_subs"] and default["videomme"]["option"] == "{letter}. {text}"
    for name, other in (("videomme", "videomme_subs"), ("videomme_subs", "videomme")):
        changed = prompts(f"benchmarks.{name}.prompts.multiple_choice='{{question}} {{options}}'")
        assert changed[name] == {**default[name], "multiple_choice": "{question} {options}"}
        assert changed[other] == default[other]


def test_the_bundled_mixtures_are_read_from_the_checkout_wherever_hicom_root_points(monkeypatch, tmp_path):
    """HICOM_ROOT moves the work folders (data, weights, logs, cache); the recipe's mixture files ship with the code,
    and were looked for under HICOM_ROOT/configs/mixtures, where no stage found them."""
    from hydra import compose, initialize_config_dir

    from hicom.utils.config import project_root

    monkeypatch.setenv("HICOM_ROOT", str(tmp_path))
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        recipe = compose("train", overrides=["experiment=directg_local43_global32"])
        mixture = compose("train", overrides=["data=mixture"])
    assert recipe.paths.data_dir == f"{tmp_path}/data"
    trains = [stage.config.data.source.train for stage in recipe.stages] + [mixture.data.source.train]
    assert [Path(train).parent for train in trains] == [Path(project_root()) / "configs" / "mixtures"] * 4
    assert all(Path(train).is_file() for train in trains)


def test_a_stages_missing_mixture_names_the_stages_own_key(cache_dir, tmp_path):
    """The message said `data.source.train=<file.yaml>`, a key the stage's own config replaces."""
    from hicom.stages import run_stages

    overrides = ["experiment=directg_local43_global32", *TINY_PARTS[:3], f"paths.data_dir={tmp_path}",
                 f"stages.1.config.data.source.train={tmp_path / 'mine.yaml'}"]  # fmt: skip
    with pytest.raises(FileNotFoundError) as error:
        run_stages(compose_train(cache_dir, tmp_path / "run", overrides))
    message = str(error.value)
    assert f"stage conditional: mixture file '{tmp_path / 'mine.yaml'}' not found" in message
    assert "(this stage sets its own stages.1.config.data.source.train: data.source.* of the run" in message


def test_runs_and_hand_offs_from_before_train_clip_scale_go_on(cache_dir, tmp_path):
    """Configs written before the key existed: a run without clip scale resumes and relaunches as it was; one with
    it trained its logit pair (its optimizer state holds it) and is told to keep training it; a hand-off carries the
    pair whether it trained or not."""
    from omegaconf import OmegaConf

    from hicom.stages import check_parent_compressor
    from hicom.training import check_resume_compressor_config, run_differences

    def legacy(cfg):
        old = OmegaConf.to_container(cfg.model.compressor, resolve=True)
        for branch in ("local", "global_"):
            del old[branch]["train_clip_scale"]
        return old

    plain = compose_train(cache_dir, tmp_path, SMALL)
    check_resume_compressor_config(legacy(plain), plain.model.compressor)
    earlier = plain.copy()
    earlier.model.compressor = OmegaConf.create(legacy(plain))
    assert run_differences(earlier, plain) == ""  # a requeue into the run's folder goes on
    scaled = compose_train(cache_dir, tmp_path, [*SMALL, "model.compressor.global_.clip_scale=true"])
    with pytest.raises(ValueError, match=r"global_\.train_clip_scale: the checkpoint's true, this run's false"):
        check_resume_compressor_config(legacy(scaled), scaled.model.compressor)
    trained = compose_train(cache_dir, tmp_path, [*SMALL, "model.compressor.global_.clip_scale=true",
                                                  "model.compressor.global_.train_clip_scale=true"])  # fmt: skip
    check_resume_compressor_config(legacy(scaled), trained.model.compressor)
    check_parent_compressor(tmp_path, legacy(scaled), scaled.model.compressor)
    check_parent_compressor(tmp_path, OmegaConf.to_container(trained.model.compressor), scaled.model.compressor)


def test_a_time_for_val_check_interval_is_left_to_lightning():
    from omegaconf import OmegaConf

    from hicom.training import check_trainer

    for interval in ("00:00:30:00", {"minutes": 30}, 100, 0.25, None):
        check_trainer(OmegaConf.create({"val_check_interval": interval}))
