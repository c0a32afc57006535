"""What Lightning's ThroughputMonitor counts in one of our batches (configs/callbacks/default.yaml): its samples,
and its LLM tokens (text and visual, padding left out), so that the dashboards show `train/device/samples_per_sec`
and `train/device/items_per_sec` (tokens) over a window of micro-batches (all processes' under `train/` where there
are several)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache, partial

import torch

from hicom.data.template import IGNORE_INDEX
from hicom.dry_run import flops
from hicom.modules.compressors.base import PackedLayout
from hicom.modules.llm import labelled_head


def samples(batch: dict) -> int:
    """The batch's samples as read, those skipped as unreadable included: Lightning's count refuses a batch of none
    (a batch whose every sample was skipped would stop the run)."""
    return len(batch["ids"]) + len(batch.get("skipped") or ())


def tokens(batch: dict) -> int:
    """The LLM's tokens in the batch, the visual placeholders included, and one for each skipped sample: Lightning's
    count needs at least a token per sample it counted."""
    mask = batch.get("attention_mask")
    return (0 if mask is None else int(mask.sum())) + len(batch.get("skipped") or ())


class BatchFlops:
    """The training FLOPs of one of our batches, which ThroughputMonitor turns into `train/device/flops_per_sec` and,
    on a GPU it knows the peak of, `train/device/mfu` (VideoLLMModule sets its `flops_per_batch` from this at each
    step). Each part's forward and backward are counted on the meta device by torch's FlopCounterMode (the dry run's
    count), with the run's trainable parts taking gradients and a gradient passed back into a frozen part wherever
    a part before it trains: the vision tower per frame, the compressor per clip length (counted once per length),
    the guide encoder and the LLM as a + b n + c n^2 in their sequence length n (fitted exactly from three lengths:
    matrix products grow with n, attention with n^2), and the LLM's head once per labelled token (where it runs on
    those alone: `CausalLM.loss`). A batch is the sum over its samples at their own lengths,
    padding left out (the LLM's, and the global attention's over shorter clips); the guide encoder at its padded
    length, for the samples with a clip. These are the model's FLOPs: what
    gradient checkpointing computes again is not counted.

    `exact`: the guide encoder and the LLM counted at each length asked for (once per length) instead of fitted: for
    the few lengths of the dry run's one sample per stage, one count each rather than three."""

    def __init__(self, meta, trainable, exact: bool = False) -> None:
        self.meta, trainable = meta, set(trainable)
        for name, part in meta.parts().items():
            part.requires_grad_(name in trainable)
        self.grads = {  # which inputs carry a gradient back: those of a part upstream that trains
            "features": "vision_trunk" in trainable,
            "embeds": bool({"vision_trunk", "vision_head"} & trainable),
            "guide": "guide_encoder" in trainable,
        }
        self.grads["llm"] = any(self.grads.values()) or "compressor" in trainable
        tower, compressor = meta.vision, meta.compressor
        frame = torch.empty(1, 3, tower.image_size, tower.image_size, device="meta", dtype=torch.float32)
        self.frame = flops(partial(_trained, lambda: tower(frame, joint_embeds=compressor.uses_embeds)))
        hidden = meta.llm.config.hidden_size
        # the LM head runs on the labelled positions alone where it is a plain linear map (CausalLM.loss): it is then
        # counted per labelled token, and the rest of the LLM per sequence length
        plain_head = labelled_head(meta.llm.config)
        body = meta.llm.get_decoder() if plain_head else meta.llm

        def llm(n: int) -> int:
            embeds = torch.empty(1, n, hidden, device="meta", dtype=torch.float32, requires_grad=self.grads["llm"])
            return flops(partial(_trained, lambda: body(inputs_embeds=embeds)[0]))

        self.head = 0
        if plain_head:
            row = torch.empty(1, hidden, device="meta", dtype=torch.float32, requires_grad=self.grads["llm"])
            self.head = flops(partial(_trained, lambda: meta.llm.get_output_embeddings()(row)))

        lengthwise = cache if exact else _quadratic
        self.llm = lengthwise(llm)
        self.guide = None
        if compressor.uses_guide:

            def guide(n: int) -> int:
                ids = torch.zeros(1, n, dtype=torch.long, device="meta")
                return flops(partial(_trained, lambda: tower.encode_guide(ids, tokens=compressor.guide_tokens)))

            self.guide = lengthwise(guide)
        self._clips: dict[tuple[int, str, int], int] = {}

    def clip(self, frames: int, modality: str, guide_length: int) -> int:
        """The compressor's FLOPs for one clip of `frames` frames (and a token-level guide of that many tokens)."""
        tower, compressor = self.meta.vision, self.meta.compressor
        key = (frames, modality, guide_length if compressor.guide_tokens else 0)
        if key not in self._clips:
            grid, meta = tower.grid, {"device": "meta", "dtype": torch.float32}  # as the meta parts are
            features = torch.empty(frames, grid, grid, tower.hidden_size, **meta, requires_grad=self.grads["features"])
            embeds = None
            if compressor.uses_embeds:
                embeds = torch.empty(features.shape, **meta, requires_grad=self.grads["embeds"])
            guide = None
            if compressor.uses_guide:
                width = tower.text_hidden_size
                shape = (1, guide_length, width) if compressor.guide_tokens else (1, width)
                guide = torch.empty(shape, **meta, requires_grad=self.grads["guide"])
            layout = PackedLayout((frames,), (modality,), grid, grid)
            self._clips[key] = flops(partial(_trained, lambda: compressor(features, embeds, guide, layout=layout)))
        return self._clips[key]

    def sample(self, frames: int, modality: str, length: int, guide_length: int, labelled: int) -> int:
        """One sample's training FLOPs: a clip of `frames` frames (none for 0), `length` LLM tokens, and `labelled`
        tokens predicted (the loss's)."""
        total = self.llm(length) + labelled * self.head
        if frames:
            total += frames * self.frame + self.clip(frames, modality, guide_length)
            if self.guide is not None:  # for the samples with a clip (the encoder runs on all, in one batched call)
                total += self.guide(guide_length)
        return total

    def __call__(self, batch: dict) -> int:
        if "input_ids" not in batch:  # every sample was skipped: nothing ran
            return 0
        guide_ids = batch.get("guide_ids")
        guide_length = 0 if guide_ids is None else guide_ids.shape[1]
        samples = zip(
            batch["num_frames"].tolist(),
            batch["modalities"],
            batch["attention_mask"].sum(dim=1).tolist(),
            (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).tolist(),  # each labelled token is predicted once
            strict=True,
        )
        return sum(
            self.sample(frames, modality, length, guide_length, labelled)
            for frames, modality, length, labelled in samples
        )


def _trained(forward: Callable) -> None:
    """forward(), and backward from whatever of its outputs needs a gradient."""
    out = forward()
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None and o.requires_grad]
    if outs:
        torch.autograd.backward([o.sum() for o in outs])


def _quadratic(count) -> Callable[[int], int]:
    """The quadratic in n through count(n) at n = 1, 2, 3, in Newton's form (whole numbers throughout): exact where
    count is a quadratic, as FlopCounterMode's counts of a transformer are."""
    f1, f2, f3 = count(1), count(2), count(3)
    first, second = f2 - f1, f3 - 2 * f2 + f1
    return lambda n: f1 + (n - 1) * first + (n - 1) * (n - 2) // 2 * second
