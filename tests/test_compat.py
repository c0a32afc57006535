"""hicom.compat.official: legacy projector names, official state dicts, and release checkpoints folders.

Parity with the release's own code is checked outside the tree by scripts/release_parity.py (see the README)."""

import json
import logging
import re
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from hicom.compat.official import (
    build_compressor,
    convert_state_dict,
    export_official,
    load_official,
    parse_projector_type,
    projector_type,
    to_official_state_dict,
)
from hicom.modules.compressors import Adapt, BilinearPoolCompressor, GlobalCompressor, Guide, HICom, LocalCompressor
from hicom.modules.compressors.reference import hicom_reference

WIDTH = 256  # the release fixes 1152 (SigLIP so400m); a config that names no tower builds at any width
SIGLIP = "google/siglip-so400m-patch14-384"


def official(name, use_guide="direct", clip="", **extra):
    return dict(
        mm_projector_type=name, use_guide=use_guide, use_clip_scale=clip, mm_hidden_size=WIDTH, hidden_size=32, **extra
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
        # one mode and one adapt part per branch: the release reads the last guide<mode> and no bare mode, and
        # only the last adapt part
        ("local43_global32_coarse_fine", "'local43_global32_coarse_fine': its global branch names a second guide"),
        ("local43_guidedirect_coarse", "its local branch names a second guide mode, 'coarse' after 'direct'"),
        ("local43_guidecoarse_guidefine", "second guide mode"),
        ("local43_adaptk_adaptv", "'local43_adaptk_adaptv': a second adapt part 'adaptv'"),
    ],
)
def test_unknown_names_are_refused_not_guessed(name, fails):
    with pytest.raises(ValueError, match=fails):
        parse_projector_type(name, "direct")


@pytest.mark.parametrize(
    ("name", "local", "global_"),
    [
        ("local43_global32", (4, 3), (32,)),
        ("local43_adaptkv_global32", (4, 3), (32,)),
        ("local43_global32_coarse", (4, 3), (32,)),
        ("local43_adaptkv_global32_coarse", (4, 3), (32,)),
        ("local43_adaptqkvg_global32_adaptg", (4, 3), (32,)),
        ("local43_guidecoarse_global32_guidefine", (4, 3), (32,)),
        ("local22_global16_guidecoarse", (2, 2), (16,)),
        ("local44", (4, 4), None),
        ("local412", (4, 12), None),
        ("global32", None, (32,)),
    ],
)
def test_the_names_the_release_writes_parse(name, local, global_):
    spec = parse_projector_type(name, "direct")
    assert (spec.local and spec.local.size, spec.global_ and spec.global_.size) == (local, global_)


def test_only_the_siglip_so400m_tower_is_built():
    built = build_compressor({**official("local43_global32"), "mm_hidden_size": 1152, "mm_vision_tower": SIGLIP})
    assert built.local_compressor.dim == 1152
    for tower, width, fails in [
        ("openai/clip-vit-large-patch14-336", 1024, "a CLIP tower: the release's CLIP variants are not built"),
        ("/models/vit-base", 1152, "not a tower the release builds"),
        (SIGLIP, WIDTH, "mm_hidden_size 256 with mm_vision_tower .* 1152 wide"),
    ]:
        with pytest.raises(ValueError, match=fails):
            build_compressor({**official("local43_global32"), "mm_hidden_size": width, "mm_vision_tower": tower})


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
    linear = config["mm_projector_type"] == "linear"
    source = randomised(build_compressor(config))
    theirs = to_official_state_dict(source.state_dict(), prefix=prefix, linear=linear)
    target = build_compressor(config)
    target.load_state_dict(convert_state_dict(theirs, target), strict=True)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)
    assert to_official_state_dict(convert_state_dict(theirs), prefix=prefix, linear=linear).keys() == theirs.keys()


def test_the_baseline_is_written_as_the_release_builds_it():
    """mlp<depth>x_gelu is an nn.Sequential in the release, mlp1x_gelu too; only "linear" is a bare nn.Linear."""
    state = build_compressor(official("mlp1x_gelu", None)).state_dict()
    assert set(to_official_state_dict(state)) == {"model.mm_projector.0.weight", "model.mm_projector.0.bias"}
    assert set(to_official_state_dict(state, linear=True)) == {"model.mm_projector.weight", "model.mm_projector.bias"}
    with pytest.raises(ValueError, match="one nn.Linear"):
        to_official_state_dict(build_compressor(official("mlp2x_gelu", None)).state_dict(), linear=True)


def test_two_names_of_one_tensor_are_refused():
    module = build_compressor(official("local43"))
    theirs = to_official_state_dict(module.state_dict())
    theirs["local_compressor.readout.0.bias"] = torch.ones(32)  # bare, beside model.mm_projector.<the same>
    with pytest.raises(ValueError, match=r"'local_compressor.readout.0.bias' twice, as 'model.mm_projector.local_com"):
        convert_state_dict(theirs, module)


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


def test_a_fine_tuning_reads_weights_that_fit_both_readings_as_the_release_ran_them(tmp_path):
    from hicom.compat.official import _description, reading_of

    config = official("local43_global32_off")  # the release runs its global branch direct, ours off
    ours, release = (build_compressor(config, reproduce_defect_1=r) for r in (False, True))
    write_folder(tmp_path / "both", config, to_official_state_dict(randomised(release).state_dict()), "safetensors")
    assert _description(reading_of(tmp_path / "both")) == _description(release) != _description(ours)
    assert release.global_compressor.guide is Guide.DIRECT and ours.global_compressor.guide is Guide.OFF
    # weights that fit the release's reading alone are read that way
    config = official("local43_global32_coarse")
    defect = build_compressor(config, reproduce_defect_1=True)
    write_folder(tmp_path / "one", config, to_official_state_dict(randomised(defect).state_dict()), "safetensors")
    fitted = reading_of(tmp_path / "one")
    assert _description(fitted) == _description(defect) != _description(build_compressor(config))
    state = to_official_state_dict(randomised(defect).state_dict())
    del state["model.mm_projector.global_compressor.query"]
    write_folder(tmp_path / "neither", config, state, "safetensors")
    with pytest.raises(KeyError, match=r"the closest is the release's .*: missing \['global_compressor.query'\]"):
        reading_of(tmp_path / "neither")


def test_a_fine_tuning_from_weights_that_fit_both_readings_starts_in_the_releases(cache_dir, tmp_path):
    """init_from: a bare mode in the name is the release trainer's, so its weights were trained in the release's
    reading; model.compressor must build that one, not the name's."""
    from hicom.compat.official import check_release_start
    from hicom.training import build
    from tests.conftest import SMALL, compose_train

    direct = [*SMALL, "model.compressor.global_.guide=direct"]
    folder = export_official(build(compose_train(cache_dir, tmp_path / "run", direct))[0].net, tmp_path / "release")
    config = json.loads((folder / "config.json").read_text())
    renamed = {**config, "mm_projector_type": "local43_global32_off", "use_guide": "direct"}  # as the release writes
    (folder / "config.json").write_text(json.dumps(renamed))
    check_release_start(compose_train(cache_dir, tmp_path / "ok", [*direct, f"init_from={folder}"]))
    off = [*SMALL, "model.compressor.global_.guide=off", f"init_from={folder}"]
    with pytest.raises(ValueError, match=r"the weights fit .*global32_guidedirect.*model.compressor builds .*guideoff"):
        check_release_start(compose_train(cache_dir, tmp_path / "off", off))
    # the layer the compressor was trained on, before the towers load (at 7B, an fp32 load of some 30 GB)
    other_layer = [*direct, f"init_from={folder}", "model.vision.select_layer=-1"]
    with pytest.raises(ValueError, match=r"hidden state -2 \(mm_vision_select_layer\).*model.vision.select_layer=-2"):
        check_release_start(compose_train(cache_dir, tmp_path / "layer", other_layer))


@pytest.mark.parametrize(
    ("name", "use_guide", "branch", "release_mode", "name_mode"),
    [
        ("local43_global32_off", "direct", "global_compressor", Guide.DIRECT, Guide.OFF),
        ("local43_off_global32", "direct", "local_compressor", Guide.DIRECT, Guide.OFF),
        ("local43_global32_direct", None, "global_compressor", Guide.OFF, Guide.DIRECT),
    ],
)
def test_weights_that_fit_both_readings_load_the_releases_and_say_how_to_load_the_names(
    tmp_path, caplog, name, use_guide, branch, release_mode, name_mode
):
    """Direct and off injection have the same weights, so they cannot tell which reading they were trained in; the
    name can: only the release's trainer writes a bare mode (ours writes guide<mode>), so it was the release's."""
    config = official(name, use_guide)
    trained = randomised(build_compressor(config, reproduce_defect_1=True))
    write_folder(tmp_path / "ckpt", config, to_official_state_dict(trained.state_dict()), "safetensors")
    with caplog.at_level(logging.WARNING):
        loaded = load_official(tmp_path / "ckpt")
    assert getattr(loaded, branch).guide is release_mode
    warning = caplog.text
    assert f"the name gives the {branch.split('_')[0]} branch {name_mode.value} injection, the release" in warning
    assert "fit both readings" in warning and "Loading the release's: only its trainer writes a bare mode" in warning
    assert "load_official(folder, reproduce_defect_1=False) loads the name's reading" in warning
    v, e, g = torch.randn(4, 9, 9, WIDTH), torch.randn(4, 9, 9, WIDTH), torch.randn(WIDTH)
    if use_guide is None:  # the release's unguided model reads neither embeddings nor a guide
        e = g = None
    torch.testing.assert_close(loaded.compress(v, e, g), trained.compress(v, e, g), rtol=0, atol=0)
    caplog.clear()
    named = load_official(tmp_path / "ckpt", reproduce_defect_1=False)
    assert getattr(named, branch).guide is name_mode and not caplog.text


def test_weights_that_fit_neither_reading_are_reported_against_the_closest(tmp_path):
    """A HICom-7B-style folder (the release's reading has no coarse injector) is reported against the release's
    reading, not against the six coarse tensors ours would want; readouts of other widths name config.json's."""
    config = official("local43_global32_coarse")
    theirs = to_official_state_dict(randomised(build_compressor(config, reproduce_defect_1=True)).state_dict())
    dropped = {key: value for key, value in theirs.items() if not key.endswith("global_compressor.query")}
    write_folder(tmp_path / "dropped", config, dropped, "safetensors")
    with pytest.raises(KeyError) as error:
        load_official(tmp_path / "dropped")
    assert (
        "in either reading of mm_projector_type 'local43_global32_coarse' (use_guide 'direct', defect 1 of SPEC 3); "
        "the closest is the release's (1 mismatch; the name's: 7 mismatches): missing ['global_compressor.query'], "
        "unexpected []" in str(error.value)
    )
    assert "coarse" not in str(error.value).split("mismatches):")[1] and "readout" not in str(error.value)
    for field, width, stored in (("hidden_size", 64, "256 -> 32"), ("mm_hidden_size", 128, "256 -> 32")):
        folder = tmp_path / field
        write_folder(folder, {**config, field: width}, theirs, "safetensors")
        with pytest.raises(KeyError) as error:
            load_official(folder)
        assert "the closest is the release's" in str(error.value)
        assert f"Every readout is of other widths than {folder / 'config.json'} gives: the weights map {stored}" in str(
            error.value
        )
        assert f"Its {field} {width} is likely not these weights'" in str(error.value)
    # readings with the same tensors miss the same ones: listed once
    both = official("local43_global32_off")
    state = to_official_state_dict(build_compressor(both).state_dict())
    del state["model.mm_projector.local_compressor.readout.2.bias"]
    write_folder(tmp_path / "same", both, state, "safetensors")
    with pytest.raises(KeyError, match=r"defect 1 of SPEC 3\): missing \['local_compressor.readout.2.bias'\]"):
        load_official(tmp_path / "same")


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


def test_the_weight_files_read_are_those_from_pretrained_reads(tmp_path, caplog):
    """The LLM of a release folder loads through from_pretrained, which reads the files the index names: the rest
    is read from the same files, a stale copy beside them ignored. Where a tensor could come from two files (two
    without an index, a tensor in two shards, an index naming another file), which one loads is not guessed."""
    config = official("local43_global32_coarse")
    source = randomised(build_compressor(config))
    theirs = to_official_state_dict(source.state_dict())
    names = sorted(theirs)
    shards = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    for shard, keys in shards.items():
        save_file({key: theirs[key] for key in keys}, folder / shard)
    weight_map = {key: shard for shard, keys in shards.items() for key in keys}
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    save_file({key: value + 1 for key, value in theirs.items()}, folder / "model_stale.safetensors")
    with caplog.at_level(logging.WARNING):
        loaded = load_official(folder)
    assert "ignoring ['model_stale.safetensors'], which model.safetensors.index.json does not name" in caplog.text
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # a tensor in two of the shards the index names
    save_file({key: theirs[key] for key in [*names[10:], *names[:4]]}, folder / "model-00002-of-00002.safetensors")
    with pytest.raises(
        ValueError,
        match=r"the weight files \['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors'\] hold the "
        rf"same tensors, .* \(4 tensors: '{names[0]}' in \['model-00001-of-00002.safetensors', 'model-00002-of-00002"
        r".safetensors'\], .* and 1 more\): remove the stale copies",
    ):
        load_official(folder)
    # a tensor in another shard than the index says
    save_file({key: theirs[key] for key in names[:9]}, folder / "model-00001-of-00002.safetensors")
    save_file({key: theirs[key] for key in names[9:]}, folder / "model-00002-of-00002.safetensors")
    with pytest.raises(
        ValueError,
        match=rf"maps tensors to other files than those holding them \(1 tensor: '{names[9]}' mapped to "
        r"'model-00001-of-00002.safetensors', in 'model-00002-of-00002.safetensors'\): write the index again",
    ):
        load_official(folder)
    # a shard the index names that is missing
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"index.json maps tensors to \['model-00002-of-00002.safetensors'\], which .*ckpt does not hold",
    ):
        load_official(folder)
    # several files and no index
    save_file({key: theirs[key] for key in names[10:]}, folder / "model-00002-of-00002.safetensors")
    index.unlink()
    with pytest.raises(
        ValueError,
        match=r"holds 3 .safetensors files, \['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', "
        r"'model_stale.safetensors'\], and no model.safetensors.index.json",
    ):
        load_official(folder)
    # ... unless one is model.safetensors, the one from_pretrained reads by name
    save_file(theirs, folder / "model.safetensors")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        loaded = load_official(folder)
    assert "reading model.safetensors and ignoring ['model-00001-of-00002.safetensors'," in caplog.text
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in source.state_dict().items())


def test_the_whole_model_round_trips_through_the_release_layout(cfg_small, tmp_path):
    from safetensors.torch import load_file, save_file

    from hicom.compat.official import import_official
    from hicom.training import build

    source = build(cfg_small)[0].net
    with torch.no_grad():
        for p in source.compressor.parameters():
            p.normal_(0, 0.1)
    folder = export_official(source, tmp_path / "official")
    config = json.loads((folder / "config.json").read_text())
    assert config["mm_projector_type"] == "local43_guidedirect_global32_guidecoarse"
    assert "mm_vision_tower" not in config  # named only for so400m's width, which the release's loader then builds
    names = set(load_file(str(folder / "model.safetensors")))
    assert "model.mm_projector.global_compressor.query" in names and "model.embed_tokens.weight" in names
    assert "lm_head.weight" not in names  # the tiny Qwen2 ties it to the embeddings: written once, as HF writes it
    assert any(n.startswith("model.vision_tower.guide_encoder.text_model.") for n in names)
    # the release's parser reads our name the same way
    assert isinstance(build_compressor({**config, "mm_hidden_size": 64, "hidden_size": 8}), HICom)
    torch.manual_seed(1)
    target = build(cfg_small)[0].net
    import_official(target, folder)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # the tower's layer the compressor was trained on: another one is refused, naming the setting
    (folder / "config.json").write_text(json.dumps({**config, "mm_vision_select_layer": -1}))
    with pytest.raises(ValueError, match=r"hidden state -1 \(mm_vision_select_layer\).* model.vision.select_layer=-1"):
        import_official(target, folder)
    (folder / "config.json").write_text(
        json.dumps({**config, "mm_vision_select_layer": len(target.vision.vision_tower.encoder.layers) - 1})
    )  # -2 counted from the first hidden state
    import_official(target, folder)
    # a folder that writes the tied weight twice loads the same
    state = load_file(str(folder / "model.safetensors"))
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()}, str(tmp_path / "both.st"))
    (tmp_path / "both.st").replace(folder / "model.safetensors")
    torch.manual_seed(2)
    again = build(cfg_small)[0].net
    import_official(again, folder)
    assert all(
        torch.equal(a, b) for a, b in zip(source.state_dict().values(), again.state_dict().values(), strict=True)
    )
    assert again.llm.model.lm_head.weight is again.llm.model.model.embed_tokens.weight
    # a part already loaded from the folder (evaluate.py's LLM) is checked but not read again
    with torch.no_grad():
        target.llm.model.model.norm.weight.fill_(7.0)
        target.compressor.global_compressor.query.zero_()
    import_official(target, folder, loaded=("llm",))
    assert torch.equal(target.compressor.global_compressor.query, source.compressor.global_compressor.query)
    assert bool((target.llm.model.model.norm.weight == 7.0).all())
    # strict: a tensor too many or too few is named, in a part already loaded too
    state = load_file(str(folder / "model.safetensors"))
    state["model.mm_projector.local_compressor.extra"] = torch.zeros(1)
    del state["model.norm.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(
        KeyError,
        match=r"(?s)projector: missing or unexpected tensors: .*local_compressor.extra.*llm: .*model.norm.weight",
    ):
        import_official(target, folder)
    with pytest.raises(KeyError, match=r"llm: .*model.norm.weight"):
        import_official(target, folder, loaded=("llm",))


def test_a_release_folder_of_an_unguided_model_keeps_the_text_tower_of_the_vision_folder(cache_dir, tmp_path, caplog):
    """The release builds a guide encoder only with use_guide on: its folders of unguided models hold none."""
    from safetensors.torch import load_file

    from hicom.compat.official import _GUIDE, import_official
    from hicom.training import build
    from tests.conftest import SMALL, compose_train

    unguided = [*SMALL, "model.compressor.local.guide=off", "model.compressor.global_.guide=off"]
    source = build(compose_train(cache_dir, tmp_path / "run", unguided))[0].net
    with torch.no_grad():
        for p in source.compressor.parameters():
            p.normal_(0, 0.1)
    folder = export_official(source, tmp_path / "official")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({**config, "mm_projector_type": "local43_global32", "use_guide": None})  # as the release writes
    )
    state = load_file(str(folder / "model.safetensors"))
    save_file({key: value for key, value in state.items() if not key.startswith(_GUIDE)}, folder / "model.safetensors")
    torch.manual_seed(1)
    target = build(compose_train(cache_dir, tmp_path / "other", unguided))[0].net
    with torch.no_grad():
        for p in target.vision.guide_encoder.parameters():
            p.add_(1.0)  # other than the vision folder's: kept as they are
    tower = {key: value.clone() for key, value in target.vision.guide_encoder.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="hicom.compat.official"):
        import_official(target, folder)
    assert "use_guide None and no guide encoder saved, as the release saves an unguided model" in caplog.text
    for name, value in target.vision.guide_encoder.state_dict().items():
        assert torch.equal(value, tower[name]), name
    for part in ("compressor", "llm", "vision.vision_tower"):
        ours, theirs = source.get_submodule(part).state_dict(), target.get_submodule(part).state_dict()
        assert all(torch.equal(value, theirs[name]) for name, value in ours.items()), part
    # a guided config whose guide encoder is missing is still refused
    guided = export_official(build(compose_train(cache_dir, tmp_path / "guided", SMALL))[0].net, tmp_path / "guided")
    state = load_file(str(guided / "model.safetensors"))
    save_file({key: value for key, value in state.items() if not key.startswith(_GUIDE)}, guided / "model.safetensors")
    with pytest.raises(KeyError, match=r"guide: missing or unexpected tensors: missing \['embeddings"):
        import_official(build(compose_train(cache_dir, tmp_path / "guided", SMALL))[0].net, guided)


def test_a_projector_saved_beside_the_model_loads_and_a_stage_output_is_refused_early(cfg_small, tmp_path):
    """The release's projector-only stages write config.json + mm_projector.bin; a folder may hold that file beside
    the model's weight files, which then lack the projector."""
    from safetensors.torch import load_file

    from hicom.compat.official import PREFIX, import_official, use_release_llm
    from hicom.training import build

    source = build(cfg_small)[0].net
    with torch.no_grad():
        for p in source.compressor.parameters():
            p.normal_(0, 0.1)
    folder = export_official(source, tmp_path / "official")
    state = load_file(str(folder / "model.safetensors"))
    torch.save({key: value for key, value in state.items() if key.startswith(PREFIX)}, folder / "mm_projector.bin")
    save_file({key: value for key, value in state.items() if not key.startswith(PREFIX)}, folder / "model.safetensors")
    torch.manual_seed(1)
    target = build(cfg_small)[0].net
    import_official(target, folder)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    stage = tmp_path / "stage"
    stage.mkdir()
    for name in ("config.json", "mm_projector.bin"):
        (stage / name).write_bytes((folder / name).read_bytes())
    loaded = load_official(stage)  # the projector alone loads
    assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in source.compressor.state_dict().items())
    refused = r"stage holds config.json and mm_projector.bin but no model weights: the output of a release stage"
    with pytest.raises(ValueError, match=rf"{refused}.*official.load_official\('.*stage'\), or give the folder of the"):
        use_release_llm(cfg_small, stage, "unused")  # evaluate.py's and init_from's first look, before the tokenizer
    with pytest.raises(ValueError, match=refused):
        import_official(target, stage)


def test_a_stale_stage_projector_beside_a_whole_model_is_not_what_loads(cfg_small, tmp_path, caplog):
    """A release stage's mm_projector.bin left in a whole model's folder: both load paths read the projector in the
    model's weight files, as from_pretrained does, and say the file is not read."""
    from hicom.compat.official import PREFIX, import_official, read_projector_weights
    from hicom.training import build

    source = build(cfg_small)[0].net
    folder = export_official(source, tmp_path / "official")
    with torch.no_grad():
        stale = {key: torch.randn_like(value) for key, value in source.compressor.state_dict().items()}
    torch.save({PREFIX + key: value for key, value in stale.items()}, folder / "mm_projector.bin")
    caplog.set_level(logging.INFO, logger="hicom.compat.official")
    read = read_projector_weights(folder)
    assert "mm_projector.bin beside them is not read" in caplog.text
    for key, value in load_official(folder).state_dict().items():
        assert torch.equal(value, source.compressor.state_dict()[key]), key
    assert all(torch.equal(read[PREFIX + key], value) for key, value in source.compressor.state_dict().items())
    target = build(cfg_small)[0].net
    import_official(target, folder)
    assert all(
        torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values(), strict=True)
    )


def test_a_folder_of_pickled_shards_is_refused_before_anything_loads(cfg_small, tmp_path, caplog):
    """Only safetensors are read: a folder whose model is pytorch_model*.bin is named as such by the first look
    (evaluate.py's and init_from's use_release_llm), not after its LLM has loaded. The compressor alone still loads
    from a projector file beside them, saying why."""
    from safetensors.torch import load_file

    from hicom.compat.official import PREFIX, use_release_llm
    from hicom.training import build

    folder = export_official(build(cfg_small)[0].net, tmp_path / "official")
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(
        {k: v for k, v in state.items() if not k.startswith(PREFIX)}, folder / "pytorch_model-00001-of-00001.bin"
    )
    torch.save({k: v for k, v in state.items() if k.startswith(PREFIX)}, folder / "mm_projector.bin")
    pickled = r"holds its model weights as pickled files \(\['pytorch_model-00001-of-00001.bin'\]\).*only safetensors"
    with pytest.raises(ValueError, match=pickled):
        use_release_llm(cfg_small, folder, "unused")
    with caplog.at_level(logging.WARNING, logger="hicom.compat.official"):
        loaded = load_official(folder)
    assert re.search(r"reading the projector from mm_projector.bin, as the model's weight files cannot be read: .*"
                     + pickled, caplog.text)  # fmt: skip
    assert all(torch.equal(v, state[PREFIX + k]) for k, v in loaded.state_dict().items())
    (folder / "mm_projector.bin").unlink()
    with pytest.raises(ValueError, match=pickled):
        load_official(folder)
    # an index whose shards are not all there: the compressor loads from the projector file beside it
    (folder / "pytorch_model-00001-of-00001.bin").unlink()
    torch.save({k: v for k, v in state.items() if k.startswith(PREFIX)}, folder / "mm_projector.bin")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}})
    )
    assert all(torch.equal(v, state[PREFIX + k]) for k, v in load_official(folder).state_dict().items())
    # a whole model copied in part (a shard missing): named, not made up for by the (maybe earlier stage's) file
    sharded = export_official(build(cfg_small)[0].net, tmp_path / "sharded", shard_bytes=2**18)
    torch.save({k: v for k, v in state.items() if k.startswith(PREFIX)}, sharded / "mm_projector.bin")
    sorted(sharded.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(FileNotFoundError, match=r"model-\d+-of-\d+\.safetensors"):
        load_official(sharded)
    with pytest.raises(ValueError, match="num_frames must be a whole number >= 1, got 0"):
        export_official(build(cfg_small)[0].net, tmp_path / "none", num_frames=0)
    assert not (tmp_path / "none").exists()  # refused before anything is written


def test_an_export_past_the_shard_size_writes_shards_and_their_index_as_save_pretrained_does(cfg_small, tmp_path):
    from transformers import AutoModelForCausalLM

    from hicom.compat.official import import_official
    from hicom.compat.release_llm import register
    from hicom.training import build

    source = build(cfg_small)[0].net
    with torch.no_grad():
        for p in source.compressor.parameters():
            p.normal_(0, 0.1)
    folder = export_official(source, tmp_path / "official", shard_bytes=2**18)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    torch.manual_seed(1)
    target = build(cfg_small)[0].net
    import_official(target, folder)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    register()  # evaluate.py loads the LLM from the folder through from_pretrained, which reads the index
    llm = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(llm.model.norm.weight, source.llm.model.model.norm.weight)
    # a stale copy beside the shards, which from_pretrained ignores: every part is read from the shards
    stale = {key: value + 1 for key, value in to_official_state_dict(source.compressor.state_dict()).items()}
    save_file(
        {**stale, "model.norm.weight": torch.zeros_like(llm.model.norm.weight)}, folder / "model_stale.safetensors"
    )
    torch.manual_seed(2)
    again = build(cfg_small)[0].net
    import_official(again, folder)
    for (name, a), b in zip(source.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(AutoModelForCausalLM.from_pretrained(folder).model.norm.weight, llm.model.norm.weight)
    # a stray model.safetensors beside the index: from_pretrained would take the LLM from it, import the shards
    (folder / "model_stale.safetensors").rename(folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"both model\.safetensors and model\.safetensors\.index\.json"):
        import_official(again, folder)
    (folder / "model.safetensors").unlink()
    # what transformers 4, the release's, reads: the files' format metadata (its from_pretrained fails without),
    # rope_theta (a 4.x Qwen2Config without it runs at 10000), torch_dtype, the chat template in tokenizer_config
    from safetensors import safe_open

    with safe_open(folder / shards[0], framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    config = json.loads((folder / "config.json").read_text())
    rope = source.llm.model.config.rope_parameters
    assert config["rope_theta"] == rope["rope_theta"] and config["rope_scaling"] is None
    assert config["torch_dtype"] == "float32"
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == source.llm.tokenizer.chat_template
    # another export's weight files in the folder would stay beside these: refused before anything is written
    with pytest.raises(ValueError, match=r"holds the weight files of another export, \['model-00001-of"):
        export_official(source, folder)
    assert export_official(source, folder, shard_bytes=2**18) == folder  # the same layout again overwrites it


def test_a_release_folder_is_imported_only_into_the_compressor_its_config_describes(cfg_small, cache_dir, tmp_path):
    """Weights of the same names and shapes fit a compressor with another guide mode or position table; importing
    into one would evaluate something else without a word."""
    from hicom.compat.official import import_official
    from hicom.training import build
    from tests.conftest import SMALL, compose_train

    folder = export_official(build(cfg_small)[0].net, tmp_path / "official")
    for override, gap in (
        ("model.compressor.global_.position=k", "global_.position=k"),
        ("model.compressor.local.guide=off", "local.keys=features"),  # off takes the features, the release embeds
    ):
        other = build(compose_train(cache_dir, tmp_path / "other", [*SMALL, override]))[0].net
        with pytest.raises(ValueError, match=r"config\.json describes the compressor .* model\.compressor builds"):
            import_official(other, folder)
        with pytest.raises(ValueError, match=gap):  # nor can such a model be exported as the release's
            export_official(other, tmp_path / "refused")
        assert not (tmp_path / "refused").exists()
    # what the release's fields do not carry, and its reading fixes: 1 head at width 64, not 2
    other = build(compose_train(cache_dir, tmp_path / "other", [*SMALL, "model.compressor.global_.num_heads=2"]))[0]
    with pytest.raises(ValueError, match=r"model.compressor builds otherwise:\n  model.compressor.global_.num_heads=2"):
        import_official(other.net, folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot read .*config\.json"):
        import_official(build(cfg_small)[0].net, folder)


LOCAL_VARIANTS = [None] + [dict(guide=guide, keys=keys) for guide in Guide for keys in (None, "embeds", "features")]
LOCAL_VARIANTS += [
    dict(guide=Guide.DIRECT, adapt=["k", "v"], clip_scale=True, clip_norm="release"),
    dict(guide=Guide.COARSE, adapt=["q", "k", "v", "g"], clip_scale=True, clip_norm="release"),
    dict(guide=Guide.FINE, adapt=["g"]),
    dict(guide=Guide.OFF, kernel=(2, 12, 12), adapt=["q"], clip_scale=True, clip_norm="release"),
    dict(guide=Guide.DIRECT, clip_scale=True),  # unit queries and keys: the release's own for the guide itself
    dict(guide=Guide.COARSE, clip_scale=True),  # unit queries and keys: not the release's for injected queries
]
GLOBAL_VARIANTS = [None] + [dict(guide=guide, position=p) for guide in Guide for p in ("kv", "k", "none")]
GLOBAL_VARIANTS += [
    dict(guide=Guide.COARSE, adapt_guide=True, clip_scale=True),
    dict(guide=Guide.FINE, adapt_guide=True),
]


def release_cannot_carry(local, global_):
    """What of a compressor the release's config cannot describe, by the release's rules: the local keys are the
    joint-space embeddings whenever use_guide is on, positions go to keys and values, and every branch gets the
    guide in the one form use_guide asks for (token-level for fine)."""
    reasons = []
    guides = {branch["guide"] for branch in (local, global_) if branch is not None} - {Guide.OFF}
    if Guide.FINE in guides and len(guides) > 1:
        reasons.append("guides")
    if local is not None:
        keys = local.get("keys") or ("features" if local["guide"] is Guide.OFF else "embeds")
        if keys != ("embeds" if guides else "features"):
            reasons.append(f"local.keys={keys}")
        plain_direct = (
            local["guide"] is Guide.DIRECT and keys == "embeds" and not {"k", "g"} & {*local.get("adapt", [])}
        )
        if local.get("clip_scale") and local.get("clip_norm", "qk") == "qk" and not plain_direct:
            reasons.append("local.clip_norm=qk")
    if global_ is not None and global_.get("position", "kv") != "kv":
        reasons.append(f"global_.position={global_['position']}")
    return reasons


def test_what_the_release_can_describe_exports_and_loads_as_the_same_compressor(tmp_path, caplog):
    """Every pair of branch variants: exported (config fields + weights) and loaded back, the same outputs;
    or refused, naming each setting the release's config cannot carry."""
    width = 128  # one global head, as the release's width / 128
    torch.manual_seed(0)
    v, e = torch.randn(5, 7, 7, width), torch.randn(5, 7, 7, width)
    tokens = torch.randn(6, width)  # token-level guide; its last row is the pooled one
    exported = 0
    for i, (local, global_) in enumerate((a, b) for a in LOCAL_VARIANTS for b in GLOBAL_VARIANTS if a or b):
        source = HICom(
            in_dim=width,
            out_dim=32,
            local=partial(LocalCompressor, **local) if local else None,
            global_=partial(GlobalCompressor, **global_) if global_ else None,
        )
        reasons = release_cannot_carry(local, global_)
        if reasons:
            with pytest.raises(ValueError, match="cannot describe") as refused:
                projector_type(source)
            assert all(reason in str(refused.value) for reason in reasons), (local, global_, str(refused.value))
            continue
        config = {**projector_type(source), "mm_hidden_size": width, "hidden_size": 32}
        source = randomised(source)
        write_folder(tmp_path / f"{i}", config, to_official_state_dict(source.state_dict()), "safetensors")
        with caplog.at_level(logging.WARNING):
            loaded = load_official(tmp_path / f"{i}")
        guide = tokens if source.guide_tokens else tokens[-1]
        torch.testing.assert_close(loaded.compress(v, e, guide), source.compress(v, e, guide), rtol=0, atol=0)
        exported += 1
    assert not caplog.text  # the guide<mode> names read the same way in the release
    assert exported == 64  # of the 284 pairs


def test_the_clip_scale_pair_of_a_missing_branch_is_dropped_on_both_load_paths(cache_dir, tmp_path, caplog):
    """The release keeps global_logit_* whenever use_clip_scale names global, with or without a global branch."""
    from safetensors.torch import load_file

    from hicom.compat.official import import_official
    from hicom.training import build
    from tests.conftest import SMALL, compose_train

    local_only = [*SMALL, "model.compressor.global_=null", "model.compressor.local.clip_scale=true"]
    source = build(compose_train(cache_dir, tmp_path / "run", local_only))[0].net
    folder = export_official(source, tmp_path / "official")
    config = json.loads((folder / "config.json").read_text())
    assert config["use_clip_scale"] == "local"
    (folder / "config.json").write_text(json.dumps({**config, "use_clip_scale": "local,global"}))
    state = load_file(str(folder / "model.safetensors"))
    state |= {f"model.mm_projector.global_logit_{name}": torch.zeros(1) for name in ("scale", "bias")}
    save_file(state, str(folder / "model.safetensors"))
    with caplog.at_level(logging.INFO, logger="hicom.compat.official"):
        loaded = load_official(folder)
        target = build(compose_train(cache_dir, tmp_path / "other", local_only))[0].net
        import_official(target, folder)
    assert caplog.text.count("dropped model.mm_projector.global_logit_scale") == 2
    for compressor in (loaded, target.compressor):
        for (name, a), b in zip(source.compressor.state_dict().items(), compressor.state_dict().values(), strict=True):
            assert torch.equal(a, b), name


def test_an_export_the_release_cannot_describe_writes_nothing(tmp_path):
    compressor = HICom(
        in_dim=WIDTH,
        out_dim=32,
        local=partial(LocalCompressor, guide=Guide.OFF),  # features as keys, where the release takes embeddings
        global_=partial(GlobalCompressor, guide=Guide.COARSE, position="k"),
    )
    from transformers import GPT2Config

    llm = SimpleNamespace(model=SimpleNamespace(config=GPT2Config()))
    net = SimpleNamespace(compressor=compressor, vision=SimpleNamespace(), llm=llm)
    with pytest.raises(ValueError, match="cannot carry") as refused:
        export_official(net, tmp_path / "official")
    settings = (
        "model.vision: a SimpleNamespace",
        "model.llm: a gpt2 LLM",
        "local.keys=features",
        "set embeds (with the",
    )
    for setting in (*settings, "global_.position=k"):
        assert setting in str(refused.value)
    assert not (tmp_path / "official").exists()
    odd = HICom(
        in_dim=WIDTH,
        out_dim=32,
        guide_dim=64,  # a guide narrower than the features: both injectors map it with an MLP
        local=partial(LocalCompressor, kernel=(12, 3, 3), readout_depth=1),
        global_=partial(GlobalCompressor, guide=Guide.DIRECT, num_heads=4),
    )
    with pytest.raises(ValueError, match="cannot describe") as refused:
        projector_type(odd)
    for setting in ("local.kernel=[12, 3, 3]", "local.readout_depth=1", "global_.num_heads=4", "(2 here)"):
        assert setting in str(refused.value)
    assert str(refused.value).count("a guide of another width") == 2
