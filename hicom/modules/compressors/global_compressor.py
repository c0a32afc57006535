"""HICom's global compressor: N learned queries attend to every token of the clip, with a 3D position table."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from hicom.modules.compressors.base import (
    RELEASE_INIT_STD,
    Compressor,
    PackedLayout,
    add_clip_scale,
    fp16_products,
    init_weights,
    pad_packed,
    readout,
    readout_words,
)
from hicom.modules.compressors.injection import Attention, Guide, GuideInjector
from hicom.utils.choices import Choice, flag, whole_number


class Position(Choice):
    """Where the global compressor adds the 3D position table: keys and values (as released), keys only (as the
    paper writes), or nowhere."""

    KV = "kv"
    K = "k"
    NONE = "none"


def sincos_table(n: int, dim: int, device=None) -> torch.Tensor:
    """(n, dim) table: sin at even and cos at odd channels of pos / 10000^(2 * (i // 2) / dim)."""
    pos = torch.arange(n, dtype=torch.float64, device=device)[:, None]
    i = torch.arange(dim, device=device)
    angles = pos / torch.pow(10000.0, (2 * (i // 2)).double() / dim)
    return torch.where(i % 2 == 0, angles.sin(), angles.cos())  # float64


def position_table_3d(t: int, h: int, w: int, dim: int, device=None) -> torch.Tensor:
    """(T, H, W, dim) float64: the sum of separate sine-cosine tables over time, rows and columns."""
    table = (
        sincos_table(t, dim, device)[:, None, None]
        + sincos_table(h, dim, device)[None, :, None]
        + sincos_table(w, dim, device)[None, None, :]
    )
    return table


class GlobalCompressor(Compressor):
    """Multi-head attention from `num_queries` learned queries (optionally guide-injected) to all tokens.

    Output: readout(query + attention). The position table is added to the keys and values as released
    (`position="kv"`) or to the keys only as the paper writes (`position="k"`).
    """

    @classmethod
    def unguided_config(cls, cfg):
        from omegaconf import OmegaConf

        return OmegaConf.merge(cfg, {"guide": "off", "adapt_guide": False})

    def __init__(
        self,
        *,
        in_dim: int,
        out_dim: int,
        guide_dim: int | None = None,
        num_queries: int = 32,
        guide: Guide = Guide.COARSE,
        num_heads: int | None = None,
        position: Position = Position.KV,
        adapt_guide: bool = False,
        clip_scale: bool = False,
        train_clip_scale: bool = False,
        readout_depth: int = 2,
        init_std: float | None = RELEASE_INIT_STD,
    ) -> None:
        super().__init__()
        whole_number("num_queries", num_queries)
        flag("adapt_guide", adapt_guide)
        self.num_queries = num_queries
        self.num_heads = max(1, in_dim // 128) if num_heads is None else whole_number("num_heads", num_heads)
        if in_dim % self.num_heads:
            raise ValueError(f"in_dim {in_dim} is not divisible by num_heads {self.num_heads}")
        self.position = Position(position)
        self.guide = Guide(guide)
        self.uses_guide = self.guide is not Guide.OFF
        self.query = nn.Parameter(torch.zeros(num_queries, in_dim))
        if adapt_guide and not self.uses_guide:
            raise ValueError("adapt_guide needs a guide: set guide to direct, coarse or fine")
        self.guide_injector = (
            GuideInjector(mode=self.guide, guide_dim=guide_dim or in_dim, dim=in_dim, adapt=adapt_guide)
            if self.uses_guide
            else None
        )
        self.guide_tokens = self.guide is Guide.FINE
        self.attn_layer = Attention(in_dim, self.num_heads)
        # Clip scale: unit-length projected queries and keys, SigLIP's logit scale and bias for 1 / sqrt(d_head).
        add_clip_scale(self, clip_scale, train_clip_scale)
        self.readout = readout(in_dim, out_dim, readout_depth)
        self.apply(partial(init_weights, std=init_std))
        self._table: torch.Tensor | None = None

    @property
    def label(self) -> str:
        words = ["global", str(self.num_queries), "unguided" if self.guide is Guide.OFF else self.guide.value]
        if self.position is not Position.KV:
            words.append(f"position {self.position.value}")
        if self.guide_injector is not None and self.guide_injector.adapt:
            words.append("adapt g")
        if self.clip_scale:
            words.append("clip-scale trained" if self.train_clip_scale else "clip-scale")
        return " ".join(words + readout_words(self.readout))

    def num_tokens(self, t: int, h: int, w: int, modality: str = "video") -> int:
        return self.num_queries

    def _axis_table(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """(n, D) sine-cosine table of one axis (the same for t, h and w), cached and grown on demand."""
        table = self._table
        if table is None or table.device != like.device or table.shape[0] < n:
            size = n if table is None else max(n, table.shape[0])
            with torch.inference_mode(False):  # kept for training steps after a first call in inference mode
                table = self._table = sincos_table(size, like.shape[-1], like.device)
        return table[:n].to(like.dtype)

    def forward_packed(
        self,
        features: torch.Tensor,
        embeds: torch.Tensor | None,
        guide: torch.Tensor | None,
        layout: PackedLayout,
        guide_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Clips of any lengths in one pass: padded to the longest clip, the padding masked out of the keys.
        (sum T, H, W, D) -> (B * num_queries, d_out), clip by clip; guide_mask (B, L) marks a token-level guide's
        real tokens."""
        _, h, w, _ = features.shape
        b = len(layout.num_frames)
        padded, real = pad_packed(features, layout.num_frames)  # (B, T_max, H, W, D), (B, T_max) or None
        queries = self.query.expand(b, -1, -1)
        if self.guide_injector is not None:
            if guide is None:
                raise ValueError("this global compressor is guided: pass the guide")
            queries = self.guide_injector(queries, guide, guide_mask)
        key_mask = None if real is None else real.repeat_interleave(h * w, dim=1)  # (B, T_max H W)
        out = self.readout(queries + self._attend(queries, padded, key_mask))
        return out.reshape(b * self.num_queries, -1)

    def _keys_values(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, H, W, D) -> keys and values (B, T H W, D), the position table added as configured."""
        b, t, h, w, d = features.shape
        tokens = features.reshape(b, t * h * w, d)
        if self.position is Position.NONE:
            return tokens, tokens
        table = position_table_3d(t, h, w, d, features.device).to(features.dtype)
        keys = tokens + table.reshape(1, t * h * w, d)
        return keys, (keys if self.position is Position.KV else tokens)

    def _attend(
        self, queries: torch.Tensor, features: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Multi-head attention of (B, N, D) queries over the (B, T, H, W, D) tokens plus positions, with the
        q, k, v and out projections; key_mask (B, T H W) True for real tokens.

        With few queries and many keys the key and value projections are folded into the query side, so that
        no (L, D) x (D, D) product is ever formed: per head h, q_h . (W_k,h x + b_k,h) = (W_k,h^T q_h) . x + const,
        where the constant is shared by all keys and drops out of the softmax, and since the weights sum to one,
        sum_i a_i (W_v,h x_i + b_v,h) = W_v,h (sum_i a_i x_i) + b_v,h. The position table is a sum of one table
        per axis, p(t, h, w) = P[t] + P[h] + P[w], so its share of the scores and of the weighted sum is taken
        axis by axis, and keys + positions are never formed either. Scores and weights are at least fp32.
        """
        b, n, d = queries.shape
        _, t, h, w, _ = features.shape
        heads, head_dim = self.num_heads, d // self.num_heads
        proj = self.attn_layer
        q = proj.q_proj(queries)  # (B, N, D)
        x = features.reshape(b, t * h * w, d)
        wide = torch.promote_types(x.dtype, torch.float32)  # bf16 / fp16 scores are widened for the softmax
        folded = not self.clip_scale
        if not folded:  # unit-length projected keys need every key projected
            keys, x = self._keys_values(features)
            # F.normalize is q / |q| where |q| > 1e-12: the zero vector (the unguided learned query and q_proj's
            # bias both start at zero; a padded frame's key) stays zero instead of 0 / 0, in the backward too
            q = F.normalize(q, dim=-1)
            k = F.normalize(proj.k_proj(keys), dim=-1).reshape(b, -1, heads, head_dim).transpose(1, 2)
            q = q.reshape(b, n, heads, head_dim).transpose(1, 2)
            scores = torch.matmul(q, k.transpose(2, 3)).to(wide) * self.logit_scale.exp() + self.logit_bias
            scores = scores.reshape(b, heads * n, -1)  # (B, h N, L)
        else:
            q = q.reshape(b, n, heads, head_dim).transpose(1, 2)  # (B, h, N, dh)
            w_k = proj.k_proj.weight.reshape(heads, head_dim, d)  # rows of head h: (h, dh, D)
            q_in = torch.einsum("bhnc,hcd->bhnd", q, w_k).reshape(b, heads * n, d)  # (B, h N, D), input space
            # q_h . b_k,h is the same for every key: it cancels in the softmax, but adding it keeps b_k in the
            # graph (its gradient is zero either way), so that DDP and DeepSpeed see no unused parameter.
            scale = head_dim**-0.5
            # the scaled bias, scaled while its parts are small: (B, h N, 1), then (B, h N, L) with positions
            bias = (q * proj.k_proj.bias.reshape(heads, 1, head_dim)).sum(-1).reshape(b, heads * n, 1) * scale
            if self.position is not Position.NONE:  # q . p(t, h, w) = q . P[t] + q . P[h] + q . P[w]
                along = [(q_in * scale) @ self._axis_table(size, x).T for size in (t, h, w)]  # (B, h N, size) each
                bias = (
                    (bias[..., None, None] + along[0][..., :, None, None] + along[1][..., None, :, None])
                    + along[2][..., None, None, :]
                ).reshape(b, heads * n, t * h * w)
            # one pass, scale * q x^T + bias, where it runs in fp32; under autocast (bf16-mixed) the product is
            # made in bf16 and the bias added after it in fp32, so that the softmax gets fp32 scores (SPEC 2.3)
            autocast = x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)  # meta: none
            if x.dtype == wide and not autocast:
                scores = torch.baddbmm(bias, q_in, x.transpose(1, 2), alpha=scale)
            elif fp16_products(x):  # fp16 products overflow past 65504: the queries are scaled before
                scores = torch.bmm(q_in * scale, x.transpose(1, 2)).to(wide) + bias.to(wide)
            else:
                scores = torch.bmm(q_in, x.transpose(1, 2)).to(wide) * scale + bias.to(wide)  # (B, h N, L)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
        weights = scores.softmax(dim=-1, dtype=wide).to(x.dtype)  # fp32 even where autocast would make it bf16
        mixed = torch.bmm(weights, x)  # (B, h N, D): sum_i a_i x_i for each head's queries
        if folded and self.position is Position.KV:  # + sum_i a_i p_i, axis by axis from the weights' marginals
            grid = weights.reshape(b, heads * n, t, h, w)
            over_w = grid.sum(-1)  # (B, h N, T, H)
            mixed = (
                mixed
                + over_w.sum(-1) @ self._axis_table(t, x)
                + over_w.sum(-2) @ self._axis_table(h, x)
                + grid.sum((2, 3)) @ self._axis_table(w, x)
            )
        mixed = mixed.reshape(b, heads, n, d)
        w_v = proj.v_proj.weight.reshape(heads, head_dim, d)
        out = torch.einsum("bhnd,hcd->bnhc", mixed, w_v) + proj.v_proj.bias.reshape(heads, head_dim)
        return proj.out_proj(out.reshape(b, n, d))
