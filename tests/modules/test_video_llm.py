"""The network's guide plumbing: token-level guides for fine injection, clip scale from the vision checkpoint."""

import torch

from hicom.training import build
from tests.conftest import SMALL, compose_train


def test_token_level_guide_ends_with_the_pooled_guide(cfg_small):
    model, _ = build(cfg_small)
    vision = model.net.vision
    ids = torch.randint(0, 100, (3, 16))
    with torch.no_grad():
        tokens, pooled = vision.encode_guide(ids, tokens=True), vision.encode_guide(ids)
    assert tokens.shape == (3, 16, vision.text_hidden_size)
    torch.testing.assert_close(tokens[:, -1], pooled)


def test_fine_injection_and_clip_scale_run_through_the_network(cache_dir, tmp_path):
    overrides = ["model.compressor.local.guide=fine", "model.compressor.global_.clip_scale=true", *SMALL]
    model, _ = build(compose_train(cache_dir, tmp_path, overrides))
    net = model.net
    assert net.compressor.guide_tokens
    branch = net.compressor.global_compressor
    torch.testing.assert_close(branch.logit_scale, net.vision.logit_scale.reshape(1).detach())
    torch.testing.assert_close(branch.logit_bias, net.vision.logit_bias.reshape(1).detach())
    size = net.vision.vision_tower.config.image_size
    batch = {
        "pixel_values": torch.randn(5, 3, size, size),
        "num_frames": torch.tensor([4, 0, 1]),
        "modalities": ["video", "text", "image"],
        "guide_ids": torch.randint(0, 100, (3, 16)),
    }
    out = net.encode_visual(batch)
    expected = net.num_visual_tokens(4) + net.num_visual_tokens(1, "image")
    assert out.shape == (expected, net.llm.hidden_size)
    out.square().mean().backward()
    assert branch.logit_scale.grad is not None


def test_instruction_aware_qformer_trains_through_the_network(cache_dir, tmp_path):
    small = ["hidden_size=16", "num_layers=2", "num_heads=2", "intermediate_size=32", "dropout=0.0"]
    overrides = ["model/compressor=instructblip", *(f"model.compressor.{o}" for o in small), *SMALL]
    model, _ = build(compose_train(cache_dir, tmp_path, overrides))
    net = model.net
    size = net.vision.vision_tower.config.image_size
    batch = {
        "pixel_values": torch.randn(3, 3, size, size),
        "num_frames": torch.tensor([2, 1]),
        "modalities": ["video", "image"],
        "guide_ids": torch.randint(0, 100, (2, 16)),
    }
    out = net.encode_visual(batch)
    assert out.shape == (2 * 32, net.llm.hidden_size)
    out.square().mean().backward()
    assert net.compressor.instruction_proj.weight.grad is not None
