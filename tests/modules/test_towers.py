"""The swappable parts: a CLIP tower and a Llama-family LLM go through the same training path as SigLIP + Qwen2."""

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from hicom.training import train
from tests.conftest import SMALL, compose_train

SWAP = ["model/vision=tiny_clip", "model/llm=tiny_llama", "model.compressor.local.keys=features"]


def test_clip_and_llama_train_and_answer_through_the_default_path(cache_dir, tmp_path):
    cfg = compose_train(cache_dir, tmp_path / "run", [*SMALL, *SWAP])
    metrics = train(cfg)
    assert metrics["steps"] == 4 and metrics["n_questions"] == 16
    # the tiny CLIP has 7 x 7 patches like the tiny SigLIP: (2 x 3 x 3) local + 32 global
    assert metrics["visual_tokens_per_video"] == 50
    assert metrics["train_loss"] > 0 and 0.0 <= metrics["accuracy"] <= 1.0


def test_clip_guide_is_projected_into_the_joint_space_and_pads_do_not_move_it(cache_dir, tmp_path):
    from hicom.utils.instantiators import write_assets

    cfg = compose_train(cache_dir, tmp_path, SWAP)
    write_assets(cfg.assets)
    tower = instantiate(cfg.model.vision)
    assert tower.hidden_size == 64 and tower.text_hidden_size == 48 and tower.grid == 7
    from transformers import AutoTokenizer

    processor = json.loads((Path(tower.path) / "preprocessor_config.json").read_text())
    assert processor["size"] == processor["crop_size"] == 112  # bare numbers, as the openai CLIP folders write them
    tok = AutoTokenizer.from_pretrained(tower.path)
    short = tok(["What colour is the circle?"], return_tensors="pt")["input_ids"]
    padded = tok(["What colour is the circle?"], padding="max_length", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        pooled = tower.encode_guide(short)
        assert pooled.shape == (1, 48)
        torch.testing.assert_close(tower.encode_guide(padded), pooled)  # pooled at the end token, causal mask
        assert tower.encode_guide(padded, tokens=True).shape == (1, padded.shape[1], 48)
        # C_f's last row is C_p, as for SigLIP (a pooled branch beside a fine one reads it there), and its rows
        # are every position's, in another order
        both = tok(["What colour is the circle?", "Is it red, green or blue, and how big?"], padding="max_length",
                   return_tensors="pt")["input_ids"]  # fmt: skip
        guide_tokens = tower.encode_guide(both, tokens=True)
        torch.testing.assert_close(guide_tokens[:, -1], tower.encode_guide(both))
        every = tower.text_projection(tower.guide_encoder(input_ids=both).last_hidden_state)
        nearest = torch.cdist(guide_tokens, every, compute_mode="donot_use_mm_for_euclid_dist").min(
            -1
        )  # each row's nearest position: one each
        assert nearest.values.max() < 1e-5 and all(len(set(i.tolist())) == both.shape[1] for i in nearest.indices)
        features, embeds = tower(torch.randn(3, 3, 112, 112))
    assert features.shape == (3, 7, 7, 64) and embeds is None


def test_a_compressor_that_needs_joint_space_keys_is_refused_with_clip(cache_dir, tmp_path):
    cfg = compose_train(cache_dir, tmp_path, ["model/vision=tiny_clip"])  # guided local branch, keys from embeds
    from hicom.training import build

    with pytest.raises(Exception, match=r"model\.compressor\.local\.keys=features"):  # Hydra wraps the ValueError
        build(cfg)


def test_an_image_processor_of_another_side_than_the_tower_is_refused_before_weights_load(cache_dir, tmp_path):
    import shutil

    from omegaconf import open_dict

    from hicom.utils.instantiators import check_model, write_assets

    cfg = compose_train(cache_dir, tmp_path, SWAP)
    write_assets(cfg.assets)
    check_model(cfg)
    folder = shutil.copytree(cfg.model.vision.path, tmp_path / "clip")
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**processor, "size": 96, "crop_size": 96}))
    with open_dict(cfg):
        cfg.model.vision.path = str(folder)
    with pytest.raises(
        ValueError, match=r"clip/preprocessor_config\.json resizes frames to 96 px, but the vision tower"
    ):
        check_model(cfg)


def test_llama_without_a_pad_token_pads_with_its_end_token(cache_dir, tmp_path):
    from hicom.utils.checkpoints import load_tokenizer
    from hicom.utils.instantiators import write_assets

    cfg = compose_train(cache_dir, tmp_path, SWAP)
    write_assets(cfg.assets)
    tok = load_tokenizer(cfg.model.llm.path)
    assert tok.pad_token == tok.eos_token == "<|eot_id|>"


@pytest.mark.parametrize("vision", ["tiny_siglip", "tiny_clip"])
def test_a_tower_takes_the_selected_hidden_state_alone_and_equal_to_hf_s(vision, cache_dir, tmp_path):
    """The trunk keeps only the state it reads (a hook on the layer that makes it), not every layer's: the same
    tensors as HF's output_hidden_states, at every select_layer, with autograd through a trainable trunk; where no
    joint-space keys are made, the layers after the selected one do not run."""
    from hicom.utils.instantiators import write_assets

    cfg = compose_train(cache_dir, tmp_path, [f"model/vision={vision}"])
    write_assets(cfg.assets)
    tower = instantiate(cfg.model.vision)
    layers = len(tower.vision_tower.encoder.layers)
    pixels = torch.randn(2, 3, tower.image_size, tower.image_size)
    with torch.no_grad():
        reference = tower.vision_tower(pixel_values=pixels, output_hidden_states=True)
    ran = []
    for layer in tower.vision_tower.encoder.layers:
        layer.register_forward_pre_hook(lambda module, args, ran=ran: ran.append(module))
    for select_layer in (-2, -1, 0, 1, layers, -layers - 1):
        tower.select_layer = select_layer
        with torch.no_grad():
            selected, final = tower._trunk(pixels)
            ran.clear()
            alone, none = tower._trunk(pixels, final=False)  # no joint-space keys: the later layers do not run
        assert torch.equal(selected, reference.hidden_states[select_layer]), select_layer
        assert torch.equal(final, reference.last_hidden_state)
        assert torch.equal(alone, selected) and none is None
        assert len(ran) == (select_layer % (layers + 1) or layers), select_layer  # 0: the tower's own input
    assert len(tower.vision_tower.encoder.layers) == layers  # every layer back in place
    tower.select_layer = -2
    with torch.no_grad():
        features, _ = tower(pixels)
    tokens = reference.hidden_states[-2][:, 1:] if vision == "tiny_clip" else reference.hidden_states[-2]
    assert torch.equal(features, tokens.reshape(features.shape))
    tower.vision_tower.requires_grad_(True)  # a trainable trunk: the gradient reaches the layers below the state
    tower(pixels)[0].square().sum().backward()
    assert tower.vision_tower.encoder.layers[0].mlp.fc1.weight.grad is not None
    assert tower.vision_tower.encoder.layers[-1].mlp.fc1.weight.grad is None  # after layer -2: not read here


def test_an_llm_config_of_another_family_names_the_folders_model_type(tiny_paths):
    from hicom.modules.llm import CausalLM

    with pytest.raises(ValueError, match=r"no '<\|reserved_special_token_0\|>' token .* holds a qwen2 model: pick"):
        CausalLM(path=str(tiny_paths["qwen2"]), visual_token="<|reserved_special_token_0|>")


def test_siglips_default_text_ids_do_not_warn_and_other_out_of_vocabulary_ids_still_do():
    """transformers' SigLIP text config puts CLIP's bos / eos ids (49406, 49407) beside a 32,000-token vocabulary, and
    warns so for every SigLIP config, google's so400m folder included; that pair alone is dropped."""
    import logging

    from transformers import SiglipConfig, SiglipTextConfig

    import hicom.modules.vision  # noqa: F401  (its filter)
    from hicom.dry_run import ARCH_DIR

    logger = logging.getLogger("transformers.configuration_utils")
    heard = []
    handler = logging.Handler()
    handler.emit = lambda record: heard.append(record.getMessage())
    logger.addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # transformers warns once per message and process
    try:
        arch = json.loads((ARCH_DIR / "siglip_so400m_patch14_384.json").read_text())
        SiglipConfig(vision_config=arch["vision_config"], text_config=arch["text_config"])
        assert heard == []
        SiglipTextConfig(vocab_size=32000, bos_token_id=40000)
        assert len(heard) == 1 and "got 40000" in heard[0]
    finally:
        logger.removeHandler(handler)


def test_a_model_folder_of_another_family_or_size_than_its_config_is_refused_before_loading(cache_dir, tmp_path):
    """A SigLIP config on a CLIP folder failed deep in loading; a sized config (`arch`: the 0.5B of Table 4) on a
    folder of another size trained that other model without a word, while the dry run reported the 0.5B."""
    from hicom.utils.instantiators import check_pretrained, write_assets

    clip = compose_train(cache_dir, tmp_path, SWAP)
    write_assets(clip.assets)
    cfg = compose_train(cache_dir, tmp_path, [f"model.vision.path={clip.model.vision.path}"])
    with pytest.raises(ValueError, match=r"model\.vision\.path=.* holds a 'clip' model, and model\.vision builds a "
                                         r"'siglip' one: pick the model/vision config"):  # fmt: skip
        check_pretrained(cfg)
    sized = compose_train(cache_dir, tmp_path, ["+model.llm.arch=qwen2.5_0.5b_instruct"])
    with pytest.raises(ValueError, match=r"is not the model model\.llm\.arch=qwen2\.5_0\.5b_instruct describes "
                                         r"\(hidden_size 64 there, 896 in qwen2\.5_0\.5b_instruct"):  # fmt: skip
        check_pretrained(sized)
    check_pretrained(compose_train(cache_dir, tmp_path))  # the tiny default names no arch: nothing to compare
    # so400m at 224 px (google/siglip-so400m-patch14-224): the same widths and depths, 16 x 16 patches a frame
    from hicom.dry_run import ARCH_DIR

    arch = json.loads((ARCH_DIR / "siglip_so400m_patch14_384.json").read_text())
    arch["vision_config"]["image_size"] = 224
    (tmp_path / "so400m-224").mkdir()
    (tmp_path / "so400m-224" / "config.json").write_text(json.dumps(arch))
    small = compose_train(
        cache_dir, tmp_path, ["model/vision=siglip_so400m", f"model.vision.path={tmp_path / 'so400m-224'}"]
    )
    with pytest.raises(ValueError, match=r"\(vision_config\.image_size 224 there, 384 in siglip_so400m_patch14_384\)"):
        check_pretrained(small)


def test_a_gradient_checkpointing_value_that_is_no_flag_is_refused(tiny_paths):
    from hicom.modules.llm import CausalLM

    with pytest.raises(ValueError, match=r"model\.llm\.gradient_checkpointing must be true or false, got 'no'"):
        CausalLM(path=str(tiny_paths["qwen2"]), gradient_checkpointing="no")


@pytest.mark.parametrize("vision", ["tiny_siglip", "tiny_clip"])
def test_frames_handed_over_as_bytes_are_normalised_by_the_tower_bit_for_bit(vision, cache_dir, tmp_path):
    """The data loaders hand frames over as bytes (a quarter of float32's), and the tower normalises them with its
    folder's image-processor settings: the same features, exactly, as from frames normalised on the CPU."""
    import numpy as np

    from hicom.data.transforms import FrameTransform
    from hicom.utils.instantiators import write_assets

    cfg = compose_train(cache_dir, tmp_path, [f"model/vision={vision}"])
    write_assets(cfg.assets)
    tower = instantiate(cfg.model.vision)
    transform = FrameTransform.from_pretrained(tower.path)
    frames = np.random.default_rng(0).integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    squared = transform.squared(frames)
    assert squared.dtype == torch.uint8 and squared.shape == (3, 3, transform.size, transform.size)
    with torch.no_grad():
        from_bytes, from_floats = tower(squared)[0], tower(transform(frames))[0]
    assert torch.equal(from_bytes, from_floats)


def test_a_token_level_clip_guide_is_read_without_its_padding(cache_dir, tmp_path):
    """CLIP's guide tokenizer pads and masks: the fine injection and InstructBLIP's self-attention attend to the
    guide's real tokens only (`guide_rows_mask`), so the same question padded to other lengths compresses alike.
    SigLIP's text tower reads every position, as it was trained, and gives no mask."""
    from transformers import AutoTokenizer

    from hicom.modules.compressors import Guide, LocalCompressor, QFormerCompressor
    from hicom.utils.instantiators import write_assets

    cfg = compose_train(cache_dir, tmp_path, SWAP)
    write_assets(cfg.assets)
    tower = instantiate(cfg.model.vision)
    tok = AutoTokenizer.from_pretrained(tower.path)
    question, longer = "What colour is the circle?", "Is it red, green or blue, and how big is it, and where?"
    torch.manual_seed(0)
    compressors = [
        LocalCompressor(
            in_dim=64, out_dim=16, guide_dim=48, kernel=(2, 3, 3), guide=Guide.FINE, keys="features", init_std=None
        ),
        QFormerCompressor(
            in_dim=64, out_dim=16, guide_dim=48, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
            instruction=True, dropout=0.0,
        ),
    ]  # fmt: skip
    features = torch.randn(2, 4, 7, 7, 64)
    outputs = []
    for padding in ("longest", "max_length"):
        guides = tok([question, longer], padding=padding, return_tensors="pt")
        mask = guides["attention_mask"]
        assert int(mask[0].sum()) < mask.shape[1]  # the question is padded either way
        with torch.no_grad():
            guide = tower.encode_guide(guides["input_ids"], tokens=True, attention_mask=mask)
            rows = tower.guide_rows_mask(mask)
            assert rows[:, -1].all() and torch.equal(rows.sum(-1), mask.sum(-1))  # C_p's row is real
            outputs.append([m(features, None, guide, guide_mask=rows) for m in compressors])
    for short, long in zip(*outputs, strict=True):
        torch.testing.assert_close(short, long, rtol=1e-5, atol=1e-5)


def test_the_model_hands_the_compressor_the_clip_guides_mask(cache_dir, tmp_path):
    """VideoLLM.encode_visual: the collated guide_mask reaches a fine injection as the rows' mask, also for the
    guides of the samples that show a clip (a text-only sample's guide is dropped with its mask row)."""
    from transformers import AutoTokenizer

    from hicom.training import build

    overrides = [*SMALL, *SWAP, "model.compressor.local.guide=fine", "model.compressor.global_=null"]
    net = build(compose_train(cache_dir, tmp_path / "run", overrides))[0].net.eval()
    tok = AutoTokenizer.from_pretrained(net.vision.path)
    torch.manual_seed(0)
    with torch.no_grad():  # fine injection at a weight that shows: at the release's init its share is tiny
        for p in net.compressor.local_compressor.guide_injector.parameters():
            p.normal_(0, 0.3)
    pixels = torch.randint(0, 256, (4, 3, 112, 112), dtype=torch.uint8)
    questions = ["What colour is the circle?", "Is it red?", "Is it red, green or blue, and how big is it?"]
    outputs = []
    for padding in ("longest", "max_length"):
        guides = tok(questions, padding=padding, return_tensors="pt")
        batch = dict(
            pixel_values=pixels,
            num_frames=torch.tensor([2, 0, 2]),
            modalities=["video", "text", "video"],
            guide_ids=guides["input_ids"],
            guide_mask=guides["attention_mask"],
        )
        with torch.no_grad():
            outputs.append(net.encode_visual(batch))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
