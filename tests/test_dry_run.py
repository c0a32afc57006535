"""The dry run builds the real architectures on the meta device and reports each stage's costs."""

import pytest
from omegaconf import open_dict

from hicom.dry_run import memory_per_gpu, report
from tests.conftest import compose_train


def test_the_paper_recipe_on_qwen25_05b(cache_dir, tmp_path, capsys):
    recipe = ["experiment=directg_local43_global32", "model/llm=qwen25_05b"]
    rows = report(compose_train(cache_dir, tmp_path, recipe))  # no weights on disk: only the bundled architectures
    assert [r["stage"] for r in rows] == ["alignment", "conditional", "instruction"]
    assert [r["visual_tokens"] for r in rows] == [113, 680, 680]  # SPEC 2.5
    out = capsys.readouterr().out
    assert "llm 494.0M" in out and "vision_trunk 413.0M" in out  # Qwen2.5-0.5B, SigLIP so400m
    conditional = rows[1]["forward_tflops"]
    assert 20 < conditional["vision_trunk"] < 23 and 0.03 < conditional["compressor"] < 0.04
    assert rows[2]["memory_gib"]["optimizer"] > rows[1]["memory_gib"]["optimizer"]
    # each stage as the runner composes it: stage 1 without the injection modules, SPEC 5's ZeRO stages
    assert rows[0]["trainable_params"] < rows[1]["trainable_params"]  # the compressor alone trains in both
    assert [r["zero_stage"] for r in rows] == [0, 0, 2]
    assert [r["micro_batch"] for r in rows] == [32, 8, 2]  # each stage's data.batch_size: the release's per GPU
    named = report(compose_train(cache_dir, tmp_path, [*recipe, "trainer.strategy=deepspeed_stage_1"]))
    assert [r["zero_stage"] for r in named] == [1, 1, 2]  # a name Lightning registers, as its config
    # stage=<name>: that stage alone, as training runs it
    one = report(compose_train(cache_dir, tmp_path, [*recipe, "stage=alignment", "dry_run_settings.micro_batch=1"]))
    assert [(r["stage"], r["micro_batch"]) for r in one] == [("alignment", 1)]
    assert one[0]["memory_gib"]["activations"] < rows[0]["memory_gib"]["activations"]
    with pytest.raises(ValueError, match=r"stage='tuning' is not one of \['alignment', 'conditional', 'instruction'\]"):
        report(compose_train(cache_dir, tmp_path, [*recipe, "stage=tuning"]))


def test_a_part_without_a_bundled_architecture_is_built_from_its_folder(cache_dir, tmp_path, capsys):
    """The tiny staged experiment names no bundled architecture: its parts come from their folders' config.json."""
    rows = report(compose_train(cache_dir, tmp_path, ["experiment=tiny_stages"]))
    assert [r["stage"] for r in rows] == ["alignment", "conditional", "instruction"]
    assert [r["visual_tokens"] for r in rows] == [50, 50, 50]
    assert "dry run: siglip + HICom + qwen2" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"model\.llm\.arch(.|\n)*config\.json at `model\.llm\.path` \(\S+: no config"):
        report(compose_train(cache_dir, tmp_path, [f"model.llm.path={tmp_path / 'nowhere'}"]))
    with pytest.raises(ValueError, match="guide_tokens=33: this guide encoder takes at most 32 tokens"):
        report(compose_train(cache_dir, tmp_path, ["dry_run_settings.guide_tokens=33"]))


def test_a_token_level_guide_from_clip_is_counted_on_the_meta_device(cache_dir, tmp_path):
    """CLIP's guide rows are placed by comparing values, which the meta device has none of: the dry run of CLIP with
    InstructBLIP (or a fine injection) failed there, and training's FLOP count was dropped without a word."""
    from hicom.utils.instantiators import write_assets

    cfg = compose_train(cache_dir, tmp_path, ["model/vision=tiny_clip", "model/compressor=instructblip"])
    write_assets(cfg.assets)
    (row,) = report(cfg)
    assert row["forward_tflops"]["compressor"] > 0


def test_a_compressor_that_cannot_run_on_the_meta_device_is_named(cache_dir, tmp_path, monkeypatch):
    """One of one's own that reads a value (`.item()`): training takes it; the dry run said only torch's error."""
    from hicom.modules.compressors import HICom

    def reads_a_value(self, features, *args, **kwargs):
        return features.sum().item()

    monkeypatch.setattr(HICom, "forward_packed", reads_a_value)
    with pytest.raises(ValueError, match=r"stage train: model.compressor \(HICom\) or a part does not run on the meta"):
        report(compose_train(cache_dir, tmp_path, []))


def test_a_bad_dry_run_setting_names_itself(cache_dir, tmp_path):
    overrides = ["experiment=directg_local43_global32", "model/llm=qwen25_05b", "dry_run_settings.gpus=0"]
    with pytest.raises(ValueError, match="dry_run_settings.gpus must be a whole number >= 1, got 0"):
        report(compose_train(cache_dir, tmp_path, overrides))
    for setting, message in [
        ("zero_stage=7", r"dry_run_settings.zero_stage must be 0, 1, 2 or 3 .*got 7"),
        ("guide_tokens=0", "dry_run_settings.guide_tokens must be a whole number >= 1, got 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            report(compose_train(cache_dir, tmp_path, [*overrides[:2], "~strategy", f"dry_run_settings.{setting}"]))
    # a run training refuses is not reported: a trainable part without its learning rate
    with pytest.raises(ValueError, match=r"stage train: no learning rate for trainable parts \['llm'\]"):
        report(compose_train(cache_dir, tmp_path, [*overrides[:2], "~strategy", "stages=null",
                                                   "model.trainable=[compressor,llm]"]))  # fmt: skip
    # the data's and the trainer's values, as training checks them: 2.5 frames reported as 2, fps=-1 and an
    # unknown precision reported at all
    for value, message in [
        ("data.num_frames=2.5", "num_frames must be a whole number >= 1, got 2.5"),
        ("data.sampling.fps=-1", "fps must be positive"),
        ("trainer.precision=fp32", "trainer.precision: Precision 'fp32' is invalid"),
    ]:
        with pytest.raises(ValueError, match=message):
            report(compose_train(cache_dir, tmp_path, [value]))
    # not a dry-run setting, but a value the report reads: `yes` counted as gradient checkpointing on
    with pytest.raises(ValueError, match="model.llm.gradient_checkpointing must be true or false, got 'yes'"):
        report(
            compose_train(cache_dir, tmp_path, [*overrides[:2], "~strategy", "model.llm.gradient_checkpointing=yes"])
        )


def test_zero_memory_arithmetic():
    params = {"compressor": 2**30, "llm": 2**30}
    zero0 = memory_per_gpu(params, {"compressor"}, zero=0, gpus=4, activations=0)
    zero3 = memory_per_gpu(params, {"compressor"}, zero=3, gpus=4, activations=0)
    assert (zero0["weights"], zero0["gradients"], zero0["optimizer"]) == (4.0, 2.0, 12.0)
    assert (zero3["weights"], zero3["gradients"], zero3["optimizer"]) == (1.0, 0.5, 3.0)
    offloaded = memory_per_gpu(params, {"compressor"}, zero=3, gpus=4, activations=0, offload=(True, True))
    assert (offloaded["weights"], offloaded["gradients"], offloaded["optimizer"]) == (0.0, 0.5, 0.0)


def test_the_dry_run_counts_deepspeeds_offload_out_of_gpu_memory(cache_dir, tmp_path, capsys):
    recipe = ["experiment=directg_local43_global32", "model/llm=qwen25_05b", "stage=instruction"]
    (kept,) = report(compose_train(cache_dir, tmp_path, [*recipe, "strategy=deepspeed_zero3"]))
    kept = kept["memory_gib"]
    capsys.readouterr()
    (offloaded,) = report(compose_train(cache_dir, tmp_path, [*recipe, "strategy=deepspeed_zero3_offload"]))
    assert offloaded["memory_gib"]["optimizer"] == offloaded["memory_gib"]["weights"] == 0 < kept["optimizer"]
    assert "ZeRO-3 (optimizer states and parameters in CPU memory)" in capsys.readouterr().out


def test_clip_l336_and_llama31_8b_are_selectable_by_config(cache_dir, tmp_path, capsys):
    swap = ["model/vision=clip_l336", "model/llm=llama31_8b", "model.compressor.local.keys=features"]
    rows = report(compose_train(cache_dir, tmp_path, ["experiment=directg_local43_global32", *swap]))
    # 24 x 24 patches: an image 8 x 8 local + 32 global, 32 frames 8 x 8 x 8 + 32
    assert [r["visual_tokens"] for r in rows] == [96, 544, 544]
    out = capsys.readouterr().out
    assert "vision_trunk 303.5M" in out and "llm 8030.3M" in out  # CLIP-L/14-336, Llama-3.1-8B
    assert rows[1]["forward_tflops"]["vision_head"] == 0  # CLIP gives no joint-space keys


def test_the_dry_run_prints_each_stages_config_as_the_runner_composes_it(cache_dir, tmp_path, capsys):
    overrides = ["experiment=directg_local43_global32", "model/llm=qwen25_05b", "dry_run_settings.print_config=true"]
    report(compose_train(cache_dir, tmp_path, overrides))
    out = capsys.readouterr().out
    alignment = out.split("[alignment] config:")[1].split("[conditional]")[0]
    instruction = out.split("[instruction] config:")[1]
    assert "guide: 'off'" in alignment and "stage1_llava_pretrain.yaml" in alignment and "stage: 0" in alignment
    assert "stage3_video_instruct.yaml" in instruction and "stage: 2" in instruction


def test_the_dry_run_refuses_a_compressor_whose_output_is_not_what_it_counts(cache_dir, tmp_path):
    cfg = compose_train(cache_dir, tmp_path, ["experiment=directg_local43_global32", "model/llm=qwen25_05b"])
    own = {"_target_": "tests.modules.test_video_llm.OwnCompressor", "_partial_": True, "wider": 1}
    with open_dict(cfg):
        cfg.model.compressor = own  # a compressor of one's own that writes one column too many
    with pytest.raises(
        ValueError, match=r"stage alignment: model.compressor: OwnCompressor gave \(1, 897\) for a video of 1 frame of"
    ):
        report(cfg)


def test_memory_follows_the_strategy_precision_and_checkpointing_the_run_trains_with(cache_dir, tmp_path):
    """Weights were counted at 2 bytes whatever the run: DDP (mixed precision: fp32 weights, gradients and Adam
    states) and 32-true print the DeepSpeed bf16 figures; and the LLM's activations as checkpointed when it is not."""
    recipe = ["experiment=directg_local43_global32", "model/llm=qwen25_05b"]

    def memory(*overrides: str) -> dict:
        (row,) = report(compose_train(cache_dir, tmp_path, [*recipe, "stage=conditional", *overrides]))
        return row["memory_gib"]

    deepspeed, ddp, fp32 = memory(), memory("strategy=ddp"), memory("trainer.precision=32-true")
    assert ddp["weights"] == pytest.approx(2 * deepspeed["weights"]) == pytest.approx(fp32["weights"])
    assert ddp["optimizer"] == pytest.approx(deepspeed["optimizer"] * 8 / 12)  # m and v, no master copy
    assert ddp["activations"] == deepspeed["activations"] < fp32["activations"]  # made in bf16 under autocast
    unchecked = memory("model.llm.gradient_checkpointing=false")
    assert unchecked["activations"] > 5 * deepspeed["activations"]  # every layer's internals, 24 layers
    with pytest.raises(ValueError, match=r"stage alignment on dry_run_settings.gpus=64: global_batch_size 512"):
        report(compose_train(cache_dir, tmp_path, [*recipe, "dry_run_settings.gpus=64"]))  # 32 x 64 > 512


def test_parts_left_frozen_are_named_with_why(cache_dir, tmp_path, capsys):
    """CLIP's tower has no head: the dry run said its vision_head stays frozen because the compressor does not read
    it, which sent readers to look for a reading the compressor does not do."""
    from hicom.utils.instantiators import write_assets

    cfg = compose_train(cache_dir, tmp_path, ["model/vision=tiny_clip", "model/compressor=avgpool"])
    write_assets(cfg.assets)
    report(cfg)
    out = capsys.readouterr().out
    assert "vision_head (it has no parameters), guide_encoder (this compressor takes no guide)" in out


def test_the_memory_estimate_measures_what_the_compressor_and_trainable_towers_keep(cache_dir, tmp_path):
    """It counted the LLM's activations and two feature maps: a Q-Former's attention over every frame, and a
    trainable trunk's layers, were left out (about 12 GiB and 170 GiB at the real sizes)."""
    from hicom.utils.instantiators import write_assets

    def row(*overrides):
        cfg = compose_train(cache_dir, tmp_path, ["dry_run_settings.micro_batch=1", *overrides])
        write_assets(cfg.assets)
        (only,) = report(cfg)
        return only

    trained = row("model/compressor=qformer", "model.trainable=[compressor,llm]")
    frozen = row("model/compressor=qformer", "model.trainable=[llm]")  # no gradient through it: it keeps nothing
    assert trained["memory_gib"]["activations"] > 1.2 * frozen["memory_gib"]["activations"]
    frozen = row("model/compressor=avgpool", "model.trainable=[compressor]")
    trunk = row("model/compressor=avgpool", "model.trainable=[compressor,vision_trunk]")
    assert trunk["memory_gib"]["activations"] > 1.5 * frozen["memory_gib"]["activations"]
    # the trunk's last layer and post-layernorm never run for a compressor without joint-space keys: left frozen
    # and not counted as trained, as the training module leaves them
    from hicom.training import build

    module, _ = build(
        compose_train(cache_dir, tmp_path, ["model/compressor=avgpool", "model.trainable=[compressor,vision_trunk]"])
    )
    assert trunk["trainable_params"] == sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_a_stage_whose_visual_tokens_fill_max_length_is_refused_as_training_refuses_it(cache_dir, tmp_path):
    from hicom.utils.instantiators import write_assets

    cfg = compose_train(cache_dir, tmp_path, ["data.max_length=40"])
    write_assets(cfg.assets)
    with pytest.raises(
        ValueError, match=r"stage train: data.max_length=40 leaves no room for text after the 50 visual"
    ):
        report(cfg)


def test_a_release_folders_llm_is_dry_run_as_training_reads_it(cache_dir, tmp_path, cfg_small, monkeypatch):
    """Its config.json says model_type hicom_qwen2, which training registers with transformers: the dry run failed
    with a bare KeyError."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from hicom.compat.official import export_official
    from hicom.compat.release_llm import RELEASE_TYPES
    from hicom.training import build
    from hicom.utils.instantiators import write_assets

    folder = export_official(build(cfg_small)[0].net, tmp_path / "official")
    cfg = compose_train(cache_dir, tmp_path, [f"model.llm.path={folder}"])
    write_assets(cfg.assets)
    # As in a fresh process: whatever ran before in this one (the export above) may have registered the types.
    for model_class in RELEASE_TYPES.values():
        config_class = model_class.config_class
        monkeypatch.delitem(CONFIG_MAPPING._extra_content, config_class.model_type, raising=False)
        monkeypatch.delitem(MODEL_FOR_CAUSAL_LM_MAPPING._extra_content, config_class, raising=False)
    (row,) = report(cfg)
    assert row["forward_tflops"]["llm"] > 0
