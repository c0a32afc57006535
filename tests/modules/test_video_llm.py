"""The network's guide plumbing: token-level guides for fine injection, clip scale from the vision checkpoint."""

import functools
from types import SimpleNamespace

import pytest
import torch

from hicom.modules.compressors import GlobalCompressor
from hicom.modules.compressors.base import Compressor
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
    # as released, SigLIP's pair is kept while the compressor trains: saved with it, never stepped
    assert not branch.logit_scale.requires_grad and branch.logit_scale.grad is None
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert not {name for name in trained if "logit_" in name}
    assert {"net.compressor.global_compressor.logit_scale", "net.compressor.global_compressor.logit_bias"} <= set(
        model.state_dict()
    )


@pytest.mark.parametrize("branch", ["local", "global_"])
def test_train_clip_scale_trains_the_pair_with_the_compressor(cache_dir, tmp_path, branch):
    """The release's "attn_scale" tunable part: the pair becomes parameters of the branch, stepped with it."""
    overrides = [f"model.compressor.{branch}.clip_scale=true", f"model.compressor.{branch}.train_clip_scale=true"]
    model, _ = build(compose_train(cache_dir, tmp_path, [*overrides, *SMALL]))
    prefix = f"net.compressor.{'local' if branch == 'local' else 'global'}_compressor"
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {f"{prefix}.logit_scale", f"{prefix}.logit_bias"} <= trained
    vision = model.net.vision
    torch.testing.assert_close(model.get_parameter(f"{prefix}.logit_scale"), vision.logit_scale.reshape(1).detach())


def test_train_clip_scale_needs_clip_scale():
    with pytest.raises(ValueError, match="train_clip_scale .* needs clip_scale"):
        GlobalCompressor(in_dim=8, out_dim=4, train_clip_scale=True)


def test_questions_sharing_a_clip_see_it_once_and_get_the_tokens_of_their_own_copies(cfg_small):
    """An evaluation batch of questions about two clips, the first asked twice: the collator keeps each clip's
    frames once, and the network runs the tower once per clip; each question's tokens equal those of a batch that
    holds a copy of its clip per question (the guide differs between the questions)."""
    from hicom.data.collate import Collator
    from hicom.utils.checkpoints import load_guide_tokenizer

    model, _ = build(cfg_small)
    net = model.net.eval()
    size = net.vision.vision_tower.config.image_size
    frames = {"a": torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8),
              "b": torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)}  # fmt: skip
    asked = [("a", "what is the man doing"), ("b", "why"), ("a", "where is the cat")]
    items = [{"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([-100, -100]), "id": f"q{i}", "guide": guide,
              "pixel_values": frames[clip], "num_frames": len(frames[clip]), "modality": "video", "clip": clip}
             for i, (clip, guide) in enumerate(asked)]  # fmt: skip
    collate = Collator(pad_token_id=0, guide_tokenizer=load_guide_tokenizer(net.vision.path))
    shared, copies = collate(items), collate([{k: v for k, v in item.items() if k != "clip"} for item in items])
    assert shared["pixel_values"].shape[0] == 6 and shared["clip_index"].tolist() == [0, 1, 0]
    assert copies["pixel_values"].shape[0] == 10 and "clip_index" not in copies
    with torch.no_grad():
        once, each = net.encode_visual(shared), net.encode_visual(copies)
    assert once.shape == (net.num_visual_tokens(4) * 2 + net.num_visual_tokens(2), net.llm.hidden_size)
    torch.testing.assert_close(once, each, rtol=1e-5, atol=1e-6)
    first, third = once.split([net.num_visual_tokens(4), net.num_visual_tokens(2) + net.num_visual_tokens(4)])
    assert not torch.equal(first, third[-net.num_visual_tokens(4) :])  # their own guides


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


def test_a_frozen_llm_with_gradient_checkpointing_is_checkpointed(cache_dir, tmp_path):
    """Stages 1-2 of the recipe: the LLM is frozen, the compressor's gradients pass through its activations.
    transformers checkpoints only layers in training mode, so the frozen LLM must run in it: the forward then
    keeps far fewer tensors for backward, and the compressor's gradients are the same."""
    import torch.autograd.graph as graph

    saved, grads = {}, {}
    for checkpointing in (False, True):
        overrides = [*SMALL, "model.trainable=[compressor]", f"model.llm.gradient_checkpointing={checkpointing}"]
        torch.manual_seed(0)  # the same compressor init
        model, datamodule = build(compose_train(cache_dir, tmp_path / str(checkpointing), overrides))
        datamodule.setup("fit")
        batch = datamodule.collate([datamodule.train_set[i] for i in range(2)])
        model.train()
        frozen = [module.training for name, part in model.parts().items() if name not in ("compressor", "llm")
                  for module in list(part.modules())[1:]]  # fmt: skip
        assert model.net.llm.model.training is checkpointing and not any(frozen)
        kept = []

        def keep(tensor, kept=kept):
            kept.append(tensor.numel())
            return tensor

        with graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            loss = model.net(batch)
        loss.backward()
        saved[checkpointing] = sum(kept)
        grads[checkpointing] = [p.grad.clone() for p in model.net.compressor.parameters()]
    assert saved[True] < saved[False] / 2, saved
    for a, b in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_weights_stored_in_bf16_load_as_fp32_masters(tiny_paths, tmp_path):
    """Qwen2.5 ships bf16 weights and transformers keeps a checkpoint's dtype: AdamW would then step bf16 weights,
    where a 1e-5 update mostly rounds away. They load in fp32; bf16 compute is the precision plugin's."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from hicom.modules.llm import CausalLM
    from hicom.modules.vision import SiglipTower

    for name in ("qwen2", "siglip"):
        folder = shutil.copytree(tiny_paths[name], tmp_path / name)
        for weights in folder.glob("*.safetensors"):
            state = {k: v.to(torch.bfloat16) for k, v in load_file(str(weights)).items()}
            save_file(state, str(weights), metadata={"format": "pt"})
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16", "torch_dtype": "bfloat16"}))
    llm = CausalLM(path=str(tmp_path / "qwen2"))
    tower = SiglipTower(path=str(tmp_path / "siglip"))
    assert {p.dtype for p in [*llm.parameters(), *tower.parameters()]} == {torch.float32}


def test_a_bf16_cast_keeps_the_rope_frequencies_in_fp32(tiny_paths):
    """Casting the LLM to bf16 rounds its computed RoPE frequencies too (inv_freq 1e-6 apart lose their low bits);
    they are put back in fp32, as from_pretrained(dtype=bf16) keeps them, and the weights stay bf16."""
    from hicom.modules.llm import CausalLM
    from hicom.utils.checkpoints import computed_buffers, restore_computed_buffers

    model = CausalLM(path=str(tiny_paths["qwen2"])).model
    saved = computed_buffers(model)
    rotary = model.model.rotary_emb
    assert {"model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"} <= set(saved)
    exact = rotary.inv_freq.clone()
    model.to(torch.bfloat16)
    assert rotary.inv_freq.dtype == torch.bfloat16 and not torch.equal(rotary.inv_freq.float(), exact)
    restore_computed_buffers(model, saved)
    assert rotary.inv_freq.dtype == torch.float32 and torch.equal(rotary.inv_freq, exact)
    assert rotary.original_inv_freq.dtype == torch.float32 and model.lm_head.weight.dtype == torch.bfloat16
    ids = torch.tensor([[1, 2, 3]])
    assert model(input_ids=ids).logits.dtype == torch.bfloat16  # runs with fp32 frequencies and bf16 weights


def test_a_folder_missing_weight_tensors_or_its_tokenizer_is_an_error_not_a_random_init(tiny_paths, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from hicom.modules.llm import CausalLM
    from hicom.modules.vision import SiglipTower

    for name, prefix, part in (("qwen2", "model.layers.1.", CausalLM), ("siglip", "text_model.", SiglipTower)):
        folder = shutil.copytree(tiny_paths[name], tmp_path / name)
        (weights,) = folder.glob("*.safetensors")
        state = load_file(str(weights))
        save_file({k: v for k, v in state.items() if not k.startswith(prefix)}, str(weights), metadata={"format": "pt"})
        with pytest.raises(ValueError, match=rf"lacks \d+ weight tensors of its architecture \(e\.g\. \['{prefix}"):
            part(path=str(folder))
    folder = shutil.copytree(tiny_paths["qwen2"], tmp_path / "no-tokenizer")
    for file in folder.iterdir():
        if "token" in file.name or file.suffix in (".jinja", ".txt") or file.name == "vocab.json":
            file.unlink()
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        CausalLM(path=str(folder))


UNGUIDED = ["model.compressor.local.guide=off", "model.compressor.global_.guide=off"]


@pytest.mark.parametrize(
    ("compressor", "frozen"),
    [
        ("hicom", []),
        ("avgpool", ["vision_head", "guide_encoder"]),
        ("instructblip", ["vision_head"]),
        ("hicom_unguided", ["vision_head", "guide_encoder"]),
    ],
)
def test_trainable_parts_the_compressor_never_reads_stay_frozen(compressor, frozen, cache_dir, tmp_path):
    """The recipe's stage 3 trains the SigLIP head and the text tower; a compressor that reads neither the
    joint-space keys nor the guide leaves them frozen, so that every trainable parameter gets a gradient (DDP
    stops a run where one does not). Without joint-space keys the trunk's layers after select_layer and its
    post-layernorm never run: they stay frozen too, and the rest of the trunk trains."""
    from omegaconf import open_dict

    parts = ["compressor", "llm", "vision_trunk", "vision_head", "guide_encoder"]
    unguided = compressor == "hicom_unguided"
    overrides = [*SMALL, f"model/compressor={'hicom' if unguided else compressor}", *(UNGUIDED if unguided else [])]
    if compressor == "instructblip":  # a Q-Former of the tiny models' size
        overrides += [
            "model.compressor.hidden_size=32",
            "model.compressor.num_layers=2",
            "model.compressor.num_heads=2",
        ]
        overrides += ["model.compressor.intermediate_size=64"]
    cfg = compose_train(cache_dir, tmp_path, overrides)
    with open_dict(cfg):
        cfg.model.trainable = parts
    model, data = build(cfg)
    assert list(model.trainable) == [p for p in parts if p not in frozen]
    data.prepare_data()
    data.setup("fit")
    model.net(next(iter(data.train_dataloader()))).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    tower = model.net.vision.vision_tower
    unread = [*tower.encoder.layers[-1].parameters(), *tower.post_layernorm.parameters()]  # select_layer -2
    assert all(p.requires_grad != bool(frozen) for p in unread)
    assert all(p.requires_grad for p in tower.encoder.layers[0].parameters())
    grouped = {id(p) for group in model.parameter_groups().values() for p in group.values()}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}  # the optimizer's, and only those
    # without weight decay one AdamW group a part; with it, biases, norm weights and scalars in groups without it
    assert [g["name"] for g in model.optimizer_groups()] == list(model.parameter_groups())
    model.weight_decay = 0.1
    groups = model.optimizer_groups()
    assert {id(p) for g in groups for p in g["params"]} == grouped
    for group in groups:
        undecayed = group["name"].endswith("/no_decay")
        assert group["weight_decay"] == (0.0 if undecayed else 0.1)
        assert all((p.ndim < 2) == undecayed for p in group["params"])
    assert any(g["name"].endswith("/no_decay") for g in groups) and any(g["weight_decay"] for g in groups)


def test_the_guide_is_padded_to_the_text_towers_positions_whatever_the_tokenizer_folder_says(tiny_paths, tmp_path):
    """SigLIP's text tower reads exactly its position count of tokens (64 for so400m), padding included; a
    tokenizer_config.json without model_max_length (transformers then reads 10^30) would leave guides unpadded."""
    import json
    import shutil

    from hicom.data.collate import Collator
    from hicom.utils.checkpoints import load_guide_tokenizer

    folder = shutil.copytree(tiny_paths["siglip"], tmp_path / "siglip")
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    del settings["model_max_length"]
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    positions = json.loads((folder / "config.json").read_text())["text_config"]["max_position_embeddings"]
    tokenizer = load_guide_tokenizer(folder)
    assert tokenizer.model_max_length == positions
    item = {"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([-100, 2]), "pixel_values": None,
            "num_frames": 0, "modality": "text", "id": "a", "guide": "what is the man doing " * 20}  # fmt: skip
    batch = Collator(pad_token_id=0, guide_tokenizer=tokenizer)([item, {**item, "guide": "why"}])
    assert batch["guide_ids"].shape == (2, positions)


class OwnCompressor(Compressor):
    """A researcher's own compressor, one token per frame (the spatial mean, then a Linear into the LLM's width),
    with ways to get the interface wrong."""

    def __init__(self, *, in_dim, out_dim, guide_dim=None, wider=0, extra_image_tokens=0, batched=False, fail=False):
        super().__init__()
        self.proj = torch.nn.Linear(in_dim, out_dim + wider)
        self.extra_image_tokens, self.batched, self.fail = extra_image_tokens, batched, fail

    def num_tokens(self, t, h, w, modality="video"):
        return t + (self.extra_image_tokens if modality == "image" else 0)

    def forward_packed(self, features, embeds, guide, layout):
        if self.fail:
            raise TypeError("unsupported operand")
        out = self.proj(features.mean(dim=(1, 2)))
        return out[None] if self.batched else out  # batched: (B, N, D) where the packed (sum N, D) is due


class GuidedOwnCompressor(OwnCompressor):
    """The same, adding a projection of the pooled guide to every token; it keeps Compressor's unguided_config,
    which leaves a compressor as it is."""

    uses_guide = True

    def __init__(self, *, in_dim, out_dim, guide_dim=None, **wrong):
        super().__init__(in_dim=in_dim, out_dim=out_dim, **wrong)
        self.from_guide = torch.nn.Linear(guide_dim, out_dim)

    def forward_packed(self, features, embeds, guide, layout):
        per_clip = torch.tensor(layout.num_frames, device=features.device)
        return super().forward_packed(features, embeds, guide, layout) + self.from_guide(guide).repeat_interleave(
            per_clip, dim=0, output_size=features.shape[0]
        )


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (
            {"wider": 3},
            r"OwnCompressor gave \(8, 67\) for a video of 8 frames of \d+ x \d+ tokens a frame: .* = \(8, 64\)",
        ),
        ({"batched": True}, r"OwnCompressor gave \(1, 8, 64\) for a video of 8 frames .* = \(8, 64\)"),
        (
            {"extra_image_tokens": 1},
            r"OwnCompressor gave \(9, 64\) for a video of 8 frames and an image, packed, of .*: .* = \(10, 64\)",
        ),
        ({"fail": True}, r"OwnCompressor failed on a video of 8 frames .*: TypeError: unsupported operand"),
    ],
    ids=["width", "batched", "image count", "raises"],
)
def test_a_compressor_of_ones_own_that_gets_the_interface_wrong_is_refused_before_weights_load(
    tiny_paths, cfg_small, wrong, message
):
    """Its output is checked against num_tokens and the LLM's width on the meta device: another width would
    otherwise train on rows scattered across token boundaries, and a miscount fail only at its first batch."""
    from hicom.utils.instantiators import check_model

    assert cfg_small.data.num_frames == 8
    built = check_model(cfg_small, functools.partial(OwnCompressor))
    assert built.proj.weight.is_meta
    with pytest.raises(ValueError, match=f"model.compressor: {message}"):
        check_model(cfg_small, functools.partial(OwnCompressor, **wrong))


def test_the_llm_refuses_visual_tokens_of_another_width(cfg_small):
    model, _ = build(cfg_small)
    llm = model.net.llm
    ids = torch.tensor([[1, llm.visual_token_id, llm.visual_token_id, 2]])
    assert llm.embed(ids, torch.randn(2, llm.hidden_size)).shape == (1, 4, llm.hidden_size)
    with pytest.raises(ValueError, match=rf"visual tokens of shape \(2, {llm.hidden_size + 1}\): the LLM takes"):
        llm.embed(ids, torch.randn(2, llm.hidden_size + 1))


def test_the_loss_runs_the_lm_head_on_labelled_positions_and_equals_the_hf_models_loss(cfg_small, monkeypatch):
    """The LM head runs on the positions whose next token is labelled, not on every visual and prompt token; the
    loss and every gradient equal those of the HF model given `labels` (its head over every position), for a
    right-padded batch of two samples. An LM family not known to have a plain head goes through HF's own loss."""
    from hicom.compat.release_llm import HIComLlamaConfig, HIComQwen2Config
    from hicom.modules import llm as llm_module

    # the release's folders (init_from) load as Qwen2's and Llama's classes under their own model types
    assert {HIComQwen2Config.model_type, HIComLlamaConfig.model_type} <= llm_module.PLAIN_HEAD_TYPES
    model, datamodule = build(cfg_small)
    datamodule.prepare_data()
    datamodule.setup("fit")
    net = model.net
    batch = datamodule.collate([datamodule.train_set[i] for i in range(2)])
    batch["attention_mask"][1, -3:] = 0  # padding at the end of the second sample
    batch["labels"][1, -3:] = -100
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < labelled < batch["labels"][:, 1:].numel() // 2

    rows = []
    head = net.llm.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[:-1].numel()))

    def loss_and_grads(compute) -> tuple[torch.Tensor, list[torch.Tensor]]:
        net.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]

    ours, our_grads = loss_and_grads(lambda: net(batch))
    assert rows == [labelled]

    def hf() -> torch.Tensor:
        embeds = net.llm.embed(batch["input_ids"], net.encode_visual(batch))
        return net.llm.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    reference, hf_grads = loss_and_grads(hf)
    assert rows[1] == batch["input_ids"].numel()
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    assert len(our_grads) == len(hf_grads) > 0
    for a, b in zip(our_grads, hf_grads, strict=True):  # sums in another order: fp32 rounding, at the scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=max(1e-7, 1e-5 * float(b.abs().max())))

    monkeypatch.setattr(llm_module, "PLAIN_HEAD_TYPES", frozenset())
    rows.clear()
    other, _ = loss_and_grads(lambda: net(batch))
    handle.remove()
    assert rows == [batch["input_ids"].numel()]
    torch.testing.assert_close(other, reference, rtol=1e-6, atol=1e-6)


def test_the_guide_encoder_gets_the_attention_mask_exactly_when_the_guide_tokenizer_gives_one(cfg_small):
    """As the release passes its guide tokenizer's output on whole: the SigLIP folders' tokenizer gives input ids
    alone (the tiny one as the real ones), so the text tower attends to its padding as it was trained to; a
    tokenizer that gives a mask (CLIP's, or a SigLIP folder saved with one) has it applied."""
    model, datamodule = build(cfg_small)
    datamodule.prepare_data()
    datamodule.setup("fit")
    net, collate = model.net, datamodule.collate
    assert collate.guide_tokenizer.model_input_names == ["input_ids"]
    given = []
    net.vision.guide_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: given.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    items = [datamodule.train_set[i] for i in range(2)]
    batch = collate(items)
    assert batch["guide_mask"] is None
    with torch.no_grad():
        unmasked = net.encode_visual(batch)
    assert given == [None]

    collate.guide_tokenizer.model_input_names = ["input_ids", "attention_mask"]
    batch = collate(items)
    mask = batch["guide_mask"]
    assert mask is not None and mask.shape == batch["guide_ids"].shape and not mask.all()  # padded to max length
    with torch.no_grad():
        masked = net.encode_visual(batch)
    assert given[-1] is mask
    assert not torch.allclose(masked, unmasked)  # the padding no longer reaches the guide


def test_a_compressor_that_is_no_compressor_subclass_is_named():
    """A plain nn.Module lacks the flags and the token count the network reads: refused by name at the build, not
    an AttributeError on `uses_embeds`."""
    from hicom.modules.video_llm import compose_compressor

    tower = SimpleNamespace(hidden_size=8, text_hidden_size=6, has_joint_embeds=True)
    with pytest.raises(
        TypeError, match=r"torch\.nn\.modules\.linear\.Linear, which is not a hicom\.modules\.compressors\.Compressor"
    ):
        compose_compressor(lambda in_dim, out_dim, guide_dim: torch.nn.Linear(in_dim, out_dim), tower, 4)
