"""The swappable parts: a CLIP tower and a Llama-family LLM go through the same training path as SigLIP + Qwen2."""

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

    tok = AutoTokenizer.from_pretrained(tower.path)
    short = tok(["What colour is the circle?"], return_tensors="pt")["input_ids"]
    padded = tok(["What colour is the circle?"], padding="max_length", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        pooled = tower.encode_guide(short)
        assert pooled.shape == (1, 48)
        torch.testing.assert_close(tower.encode_guide(padded), pooled)  # pooled at the end token, causal mask
        assert tower.encode_guide(padded, tokens=True).shape == (1, padded.shape[1], 48)
        features, embeds = tower(torch.randn(3, 3, 112, 112))
    assert features.shape == (3, 7, 7, 64) and embeds is None


def test_a_compressor_that_needs_joint_space_keys_is_refused_with_clip(cache_dir, tmp_path):
    cfg = compose_train(cache_dir, tmp_path, ["model/vision=tiny_clip"])  # guided local branch, keys from embeds
    from hicom.training import build

    with pytest.raises(Exception, match=r"model\.compressor\.local\.keys=features"):  # Hydra wraps the ValueError
        build(cfg)


def test_llama_without_a_pad_token_pads_with_its_end_token(cache_dir, tmp_path):
    from hicom.utils.checkpoints import load_tokenizer
    from hicom.utils.instantiators import write_assets

    cfg = compose_train(cache_dir, tmp_path, SWAP)
    write_assets(cfg.assets)
    tok = load_tokenizer(cfg.model.llm.path)
    assert tok.pad_token == tok.eos_token == "<|eot_id|>"
