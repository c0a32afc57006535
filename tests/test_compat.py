"""hicom.compat.official: legacy projector names, official state dicts, and release checkpoints folders.

Parity with the release's own code is checked outside the tree by scripts/release_parity.py (see the README)."""

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from hicom.compat.official import (
    build_compressor,
    convert_state_dict,
    load_official,
    parse_projector_type,
    to_official_state_dict,
)
from hicom.modules.compressors import Adapt, BilinearPoolCompressor, Guide, HICom
from hicom.modules.compressors.reference import hicom_reference

WIDTH = 256  # the release fixes 1152; any width builds here


def official(name, use_guide="direct", clip="", **extra):
    return dict(
        mm_projector_type=name,
        use_guide=use_guide,
        use_clip_scale=clip,
        mm_hidden_size=WIDTH,
        hidden_size=32,
        mm_vision_tower="google/siglip-so400m-patch14-384",
        **extra,
    )


def randomised(module):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.1)
    return module


def test_the_release_scripts_configs_build_as_the_paper_describes():
    default = build_compressor(official("local43_global32_coarse"))
    assert isinstance(default, HICom)
    assert default.local_compressor.kernel == (4, 3, 3)
    assert default.local_compressor.guide is Guide.DIRECT
    assert default.global_compressor.guide is Guide.COARSE  # the name says coarse: so does the paper
    assert default.num_tokens(32, 27, 27) == 8 * 9 * 9 + 32
    assert default.num_tokens(1, 27, 27, "image") == 81 + 32
    defect = build_compressor(official("local43_global32_coarse"), reproduce_defect_1=True)
    assert defect.global_compressor.guide is Guide.DIRECT
    adapted = build_compressor(official("local43_adaptkv_global32"))
    assert adapted.local_compressor.adapt == {Adapt.K, Adapt.V}
    assert adapted.global_compressor.guide is Guide.DIRECT
    baseline = build_compressor(official("mlp2x_gelu", use_guide=None))
    assert isinstance(baseline, BilinearPoolCompressor)
    assert baseline.num_tokens(32, 27, 27) == 32 * 196


def test_official_parameter_names_are_ours():
    module = build_compressor(official("local43_adaptqkvg_global32_adaptg", "coarse", "local,global"))
    names = set(module.state_dict())
    for name in (
        "local_compressor.readout.0.weight",
        "local_compressor.k_proj.2.bias",
        "local_compressor.v_norm.weight",
        "local_compressor.q_proj.weight",
        "local_compressor.q_alpha",
        "local_compressor.guide_injector.coarse_proj.0.weight",
        "local_compressor.guide_injector.guide_alpha",
        "global_compressor.query",
        "global_compressor.attn_layer.out_proj.bias",
        "global_compressor.guide_injector.guide_norm.weight",
    ):
        assert name in names
    theirs = to_official_state_dict(module.state_dict())
    assert "model.mm_projector.local_logit_scale" in theirs
    assert "model.mm_projector.global_logit_bias" in theirs
    fine = build_compressor(official("global32", "fine"))
    assert "global_compressor.guide_injector.fine_proj.k_proj.weight" in fine.state_dict()


@pytest.mark.parametrize(
    ("name", "fails"),
    [
        ("local4_global32", "before any"),
        ("local43_global32_fancy", "unknown part"),
        ("local43_local22", "twice"),
        ("global32_adaptk", "only has adaptg"),
        ("local43_guidebest", "unknown guide mode"),
        ("", "before any"),
    ],
)
def test_unknown_names_are_refused_not_guessed(name, fails):
    with pytest.raises(ValueError, match=fails):
        parse_projector_type(name, "direct")


def test_bad_config_values_are_refused():
    with pytest.raises(ValueError, match="use_guide"):
        parse_projector_type("local43", "strong")
    with pytest.raises(ValueError, match="use_clip_scale"):
        parse_projector_type("local43", "direct", "local,middle")
    with pytest.raises(ValueError, match="mm_hidden_size"):
        build_compressor({"mm_projector_type": "local43", "hidden_size": 8})


@pytest.mark.parametrize("prefix", ["model.mm_projector.", ""])
@pytest.mark.parametrize(
    "config",
    [
        official("local43_global32_coarse"),
        official("local43_adaptkv_global32", "fine", "local,global"),
        official("mlp2x_gelu", None),
        official("linear", None),
    ],
)
def test_a_state_dict_in_the_official_layout_round_trips(config, prefix):
    source = randomised(build_compressor(config))
    theirs = to_official_state_dict(source.state_dict(), prefix=prefix)
    target = build_compressor(config)
    target.load_state_dict(convert_state_dict(theirs, target), strict=True)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)
    assert to_official_state_dict(convert_state_dict(theirs), prefix=prefix).keys() == theirs.keys()


def test_missing_and_unexpected_keys_are_listed():
    module = build_compressor(official("local43_global32_coarse"))
    theirs = to_official_state_dict(module.state_dict())
    del theirs["model.mm_projector.global_compressor.query"]
    theirs["model.mm_projector.local_compressor.extra"] = torch.zeros(1)
    with pytest.raises(
        KeyError, match=r"missing \['global_compressor.query'\], unexpected \['local_compressor.extra'\]"
    ):
        convert_state_dict(theirs, module)


def test_compress_is_one_sample_of_the_packed_path():
    module = randomised(build_compressor(official("local43_global32_coarse"))).double()
    v, e, g = torch.randn(6, 5, 5, WIDTH).double(), torch.randn(6, 5, 5, WIDTH).double(), torch.randn(WIDTH).double()
    out = module.compress(v, e, g)
    assert out.shape == (module.num_tokens(6, 5, 5), 32)
    torch.testing.assert_close(out, hicom_reference(module, v, e, g), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="one clip"):
        module.compress(v[None], e[None], g)


def write_folder(folder, config, state, kind):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    if kind == "bin":
        torch.save(state, folder / "mm_projector.bin")
    elif kind == "safetensors":
        save_file(state, folder / "mm_projector.safetensors")
    else:  # a full model's shard: the projector tensors among others
        save_file(
            {**state, "model.embed_tokens.weight": torch.zeros(4, 4)}, folder / "model-00001-of-00001.safetensors"
        )


@pytest.mark.parametrize("kind", ["bin", "safetensors", "shard"])
def test_load_official_reads_every_release_format(tmp_path, kind):
    config = official("local43_adaptkv_global32_coarse", "coarse")
    source = randomised(build_compressor(config))
    write_folder(tmp_path / "ckpt", config, to_official_state_dict(source.state_dict()), kind)
    loaded = load_official(tmp_path / "ckpt")
    v, e, g = torch.randn(4, 27, 27, WIDTH), torch.randn(4, 27, 27, WIDTH), torch.randn(WIDTH)
    torch.testing.assert_close(loaded.compress(v, e, g), source.compress(v, e, g))


def test_checkpoints_trained_with_defect_1_load_with_it_and_say_so(tmp_path, caplog):
    config = official("local43_global32_coarse")  # the released model: its global branch ran direct injection
    trained = randomised(build_compressor(config, reproduce_defect_1=True))
    write_folder(tmp_path / "ckpt", config, to_official_state_dict(trained.state_dict()), "safetensors")
    with caplog.at_level(logging.WARNING):
        loaded = load_official(tmp_path / "ckpt")
    assert "defect 1" in caplog.text
    assert loaded.global_compressor.guide is Guide.DIRECT
    out = loaded.compress(torch.randn(4, 9, 9, WIDTH), torch.randn(4, 9, 9, WIDTH), torch.randn(WIDTH))
    global_tokens = out[-32:]
    torch.testing.assert_close(global_tokens, global_tokens[:1].expand_as(global_tokens))  # all 32 the same


def test_unreadable_or_foreign_folders_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_official(tmp_path)
    config = official("local43_global32_coarse")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="mm_projector.bin"):
        load_official(tmp_path)
    state = to_official_state_dict(build_compressor(config).state_dict())
    save_file(state, tmp_path / "mm_projector.safetensors")
    data = (tmp_path / "mm_projector.safetensors").read_bytes()
    (tmp_path / "mm_projector.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read projector weights"):
        load_official(tmp_path)
    (tmp_path / "mm_projector.safetensors").unlink()
    other = to_official_state_dict(build_compressor(official("local22_global16")).state_dict())
    save_file(other, tmp_path / "mm_projector.safetensors")
    with pytest.raises(KeyError, match=r"wrong shapes \['global_compressor.query \(16, 256\) != \(32, 256\)'\]"):
        load_official(tmp_path)


def test_the_whole_model_round_trips_through_the_release_layout(cfg_small, tmp_path):
    from safetensors.torch import load_file, save_file

    from hicom.compat.official import export_official, import_official
    from hicom.training import build

    source = build(cfg_small)[0].net
    with torch.no_grad():
        for p in source.compressor.parameters():
            p.normal_(0, 0.1)
    folder = export_official(source, tmp_path / "official")
    config = json.loads((folder / "config.json").read_text())
    assert config["mm_projector_type"] == "local43_guidedirect_global32_guidecoarse"
    names = set(load_file(str(folder / "model.safetensors")))
    assert "model.mm_projector.global_compressor.query" in names and "lm_head.weight" in names
    assert any(n.startswith("model.vision_tower.guide_encoder.text_model.") for n in names)
    # the release's parser reads our name the same way
    assert isinstance(build_compressor({**config, "mm_hidden_size": 64, "hidden_size": 8}), HICom)
    torch.manual_seed(1)
    target = build(cfg_small)[0].net
    import_official(target, folder)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # strict: a tensor too many or too few is named
    state = load_file(str(folder / "model.safetensors"))
    state["model.mm_projector.local_compressor.extra"] = torch.zeros(1)
    del state["model.norm.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(KeyError, match=r"(?s)projector: .*local_compressor.extra.*llm: .*model.norm.weight"):
        import_official(target, folder)


def test_a_release_folder_is_imported_only_into_the_compressor_its_config_describes(cfg_small, cache_dir, tmp_path):
    """Weights of the same names and shapes fit a compressor with another guide mode or position table; importing
    into one would evaluate something else without a word."""
    from hicom.compat.official import export_official, import_official
    from hicom.training import build
    from tests.conftest import SMALL, compose_train

    folder = export_official(build(cfg_small)[0].net, tmp_path / "official")
    for override in ("model.compressor.global_.position=k", "model.compressor.local.guide=off"):
        other = build(compose_train(cache_dir, tmp_path / "other", [*SMALL, override]))[0].net
        with pytest.raises(ValueError, match=r"config\.json describes the compressor .* model\.compressor builds"):
            import_official(other, folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot read .*config\.json"):
        import_official(build(cfg_small)[0].net, folder)
