"""Baselines: the Q-Former of BLIP-2 and its instruction-aware form from InstructBLIP (SPEC 2.6).

The Q-Former is transformers' `Blip2QFormerModel`: BERT-like layers in which N learned queries self-attend and,
every `cross_attention_frequency` layers, cross-attend to the visual tokens. Here the visual tokens are every token
of the clip (T H W of them), layer-normalised first as BLIP-2 does (its `ln_vision`: the features are the tower's
layer -2, which no norm has scaled), then the 3D position table added so that frames are told apart; the N outputs
are projected into the LLM's width.

Instruction-aware (InstructBLIP): the instruction's tokens join the queries in self-attention, through the text
half of each layer (its own feed-forward, no cross-attention), and only the query outputs are kept. InstructBLIP
embeds the instruction with the Q-Former's BERT vocabulary; here the instruction is the guide the other compressors
use, SigLIP's token-level text embedding C_f, mapped to the Q-Former's width by a linear layer, so no second
tokenizer is needed.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from hicom.modules.compressors.base import Compressor, PackedLayout, pad_packed, readout, readout_words
from hicom.modules.compressors.global_compressor import position_table_3d
from hicom.utils.choices import flag, positive, whole_number

log = logging.getLogger(__name__)


class QFormerCompressor(Compressor):
    @classmethod
    def unguided_config(cls, cfg):
        from omegaconf import OmegaConf

        return OmegaConf.merge(cfg, {"instruction": False})

    def __init__(
        self,
        *,
        in_dim: int,
        out_dim: int,
        guide_dim: int | None = None,
        num_queries: int = 32,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        cross_attention_frequency: int = 2,
        dropout: float = 0.1,
        initializer_range: float = 0.02,
        instruction: bool = False,
        positions: bool = True,
        visual_norm: bool = True,
        readout_depth: int = 1,
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        whole_number("num_queries", num_queries)
        sizes = ("hidden_size", hidden_size), ("num_layers", num_layers), ("num_heads", num_heads)
        for key, value in (*sizes, ("intermediate_size", intermediate_size)):
            whole_number(key, value)
        whole_number("cross_attention_frequency", cross_attention_frequency)
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        positive("initializer_range", initializer_range)
        flag("instruction", instruction)
        flag("positions", positions)
        flag("visual_norm", visual_norm)
        if hidden_size * 8 <= in_dim:  # train.yaml's qformer_size is sized for the 64-wide tiny towers
            log.warning(
                "model.compressor: a %d-wide Q-Former reads %d-wide visual tokens; train.yaml's qformer_size is the "
                "tiny default's (the real experiments set it to null, BLIP-2's BERT-base): set qformer_size=null "
                "for BERT-base, or leave it if a small Q-Former is what you want",
                hidden_size,
                in_dim,
            )
        config = Blip2QFormerConfig(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            cross_attention_frequency=cross_attention_frequency,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            initializer_range=initializer_range,
            encoder_hidden_size=in_dim,
            use_qformer_text_input=instruction,  # the text half of each layer, for the instruction tokens
        )
        config._attn_implementation = attn_implementation
        self.qformer = Blip2QFormerModel(config)
        self.num_queries = num_queries
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, hidden_size) * initializer_range)
        self.instruction = instruction
        self.uses_guide = self.guide_tokens = instruction
        self.instruction_proj = nn.Linear(guide_dim or in_dim, hidden_size) if instruction else None
        self.positions = positions
        self.ln_vision = nn.LayerNorm(in_dim) if visual_norm else None  # BLIP-2's, before the Q-Former
        self.readout = readout(hidden_size, out_dim, readout_depth)

    def is_guide_parameter(self, name: str) -> bool:
        """The instruction's projection and the text half of each layer (its feed-forward block)."""
        return self.instruction and (
            name.startswith("instruction_proj.")
            or re.fullmatch(r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\..+", name) is not None
        )

    @property
    def label(self) -> str:
        words = ["instructblip" if self.instruction else "qformer", str(self.num_queries)]
        words += (["positions"] if self.positions else []) + ([] if self.ln_vision is not None else ["unnormed"])
        return " ".join(words + readout_words(self.readout))

    def num_tokens(self, t: int, h: int, w: int, modality: str = "video") -> int:
        return self.num_queries

    def forward_packed(self, features, embeds, guide, layout: PackedLayout, guide_mask=None) -> torch.Tensor:
        """Clips padded to the longest, the padding masked out of the cross-attention: (sum T, H, W, D) ->
        (B * num_queries, d_out). guide_mask (B, L): the instruction's real tokens, the others masked out of the
        self-attention, as InstructBLIP masks its instruction's padding."""
        _, h, w, d = features.shape
        b, longest = len(layout.num_frames), max(layout.num_frames)
        if self.positions:
            table = position_table_3d(longest, h, w, d, features.device).to(features.dtype)
        padded, real = pad_packed(features, layout.num_frames)
        mask = None
        if real is not None:
            # an additive (B, 1, queries, T_max H W) mask, passed through as prepared: the cross-attention sees
            # only the queries, even when instruction tokens join them in self-attention. It is built in the dtype
            # the attention runs in, its least value that dtype's: fp32's least is -inf in bf16, on which CUDA's
            # SDPA kernels return NaN, and an fp32 mask would promote eager attention's bf16 scores
            keep = real.repeat_interleave(h * w, dim=1)[:, None, None, :]
            dtype, device_type = self.query_tokens.dtype, features.device.type
            if device_type != "meta" and torch.is_autocast_enabled(device_type):  # meta has no autocast
                dtype = torch.get_autocast_dtype(device_type)
            mask = torch.zeros(keep.shape, dtype=dtype, device=features.device)
            mask = mask.masked_fill(~keep, torch.finfo(dtype).min).expand(-1, -1, self.num_queries, -1)
        if self.ln_vision is not None:
            padded = self.ln_vision(padded)
        if self.positions:
            padded = padded + table
        queries = self.query_tokens.expand(b, -1, -1)
        self_mask = None
        if self.instruction:
            if guide is None or guide.ndim != 3:
                raise ValueError("the instruction-aware Q-Former needs the token-level guide (B, L, D)")
            queries = torch.cat([queries, self.instruction_proj(guide).to(queries.dtype)], dim=1)
            if guide_mask is not None:  # (B, N + L): every query, and the instruction's real tokens
                real_queries = torch.ones(b, self.num_queries, dtype=torch.long, device=guide_mask.device)
                self_mask = torch.cat([real_queries, guide_mask.long()], dim=1)
        out = self.qformer(
            query_embeds=queries,
            query_length=self.num_queries,
            attention_mask=self_mask,
            encoder_hidden_states=padded.reshape(b, longest * h * w, d),
            encoder_attention_mask=mask,
        ).last_hidden_state[:, : self.num_queries]
        return self.readout(out.to(self.readout[0].weight.dtype)).reshape(b * self.num_queries, -1)
