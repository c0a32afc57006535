"""Instruction injection: how the guide (the question's text embedding) conditions a set of queries (SPEC 2.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hicom.modules.compressors.base import pad_packed, readout, take_rows, unpad_packed
from hicom.utils.choices import Choice


class Guide(Choice):
    OFF = "off"
    DIRECT = "direct"
    COARSE = "coarse"
    FINE = "fine"


def pooled(guide: torch.Tensor) -> torch.Tensor:
    """The pooled guide C_p (B, D) of a pooled (B, D) or token-level (B, L, D) guide.

    SigLIP's text tower pools by taking the last position and passing it through the text head, and the
    token-level guide C_f is the text head applied at every position, so C_p is C_f's last row.
    """
    return guide[:, -1] if guide.ndim == 3 else guide


class Attention(nn.Module):
    """Multi-head attention with q, k, v and out projections (the release's parameter names), torch SDPA inside."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Queries (B, N, D) attend to keys = values (B, L, D); key_mask (B, L) True for real keys."""
        b, n, d = queries.shape
        heads = self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(b, -1, heads, d // heads).transpose(1, 2)

        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            split(self.q_proj(queries)), split(self.k_proj(keys)), split(self.v_proj(keys)), attn_mask=mask
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class GuideInjector(nn.Module):
    """Inj(A, C) of SPEC 2.4 on queries A:

    - direct: the queries become the (pooled) guide;
    - coarse: scale, shift = MLP(C_p), then LN(A * (1 + scale) + shift) (the release's form, its weights use it);
    - fine: LN(A + MHA(A, C_f, C_f)) over the token-level guide, width / 128 heads.

    The guide is first mapped to the queries' width by an MLP when the widths differ, and with `adapt` (the
    release's "adapt g") blended with an adapted copy, (1 - a) C + a LN(MLP(C)), a learned and zero at init.
    """

    def __init__(self, *, mode: Guide, guide_dim: int, dim: int, adapt: bool = False, depth: int = 2) -> None:
        super().__init__()
        self.mode = Guide(mode)
        if self.mode is Guide.OFF:
            raise ValueError("an injector needs a guide mode other than off")
        self.text2qk_proj = readout(guide_dim, dim, depth) if guide_dim != dim else nn.Identity()
        self.adapt = adapt
        if adapt:
            self.guide_proj = readout(dim, dim, depth)
            self.guide_norm = nn.LayerNorm(dim, eps=1e-6)
            self.guide_alpha = nn.Parameter(torch.zeros(1))
        if self.mode is Guide.COARSE:
            self.coarse_proj = readout(dim, 2 * dim, depth)
            self.coarse_norm = nn.LayerNorm(dim, eps=1e-6)
        elif self.mode is Guide.FINE:
            self.fine_proj = Attention(dim, max(1, dim // 128))
            self.fine_norm = nn.LayerNorm(dim, eps=1e-6)

    @property
    def needs_tokens(self) -> bool:
        return self.mode is Guide.FINE

    def prepare(self, guide: torch.Tensor) -> torch.Tensor:
        """The guide in the queries' space: pooled (B, D) for direct and coarse, token-level (B, L, D) for fine."""
        if self.mode is Guide.FINE:
            if guide.ndim != 3:
                raise ValueError(f"fine injection needs the token-level guide (B, L, D), got {tuple(guide.shape)}")
        else:
            guide = pooled(guide)
        guide = self.text2qk_proj(guide)
        if self.adapt:
            guide = (1 - self.guide_alpha) * guide + self.guide_alpha * self.guide_norm(self.guide_proj(guide))
        return guide

    def forward(
        self, queries: torch.Tensor, guide: torch.Tensor, guide_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Queries (B, N, D), guide (B, Dg) or (B, L, Dg) -> (B, N, D); guide_mask (B, L) True or 1 for the
        token-level guide's real tokens, the only ones the fine injection attends to (None: all)."""
        guide = self.prepare(guide)
        if self.mode is Guide.DIRECT:
            # every query is the guide (SPEC 3's defect 1 where the global branch runs so): the learned queries
            # join at zero weight, a zero gradient, so that DDP and DeepSpeed see no unused parameter
            return guide[:, None] + 0 * queries
        if self.mode is Guide.COARSE:
            scale, shift = self.coarse_proj(guide)[:, None].chunk(2, dim=-1)
            return self.coarse_norm(queries * (1 + scale) + shift)
        return self.fine_norm(queries + self.fine_proj(queries, guide, _key_mask(guide_mask)))

    def forward_rows(
        self,
        queries: torch.Tensor,
        guide: torch.Tensor,
        clip: torch.Tensor,
        counts: tuple[int, ...],
        guide_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Packed queries (R, D) of several clips, guide (B, ...), clip (R,) the clip of each row, which is
        sorted, and counts (B,) the rows of each clip -> (R, D). The guide is transformed once per clip."""
        guide = self.prepare(guide)
        if self.mode is Guide.DIRECT:
            return take_rows(guide, clip)
        if self.mode is Guide.COARSE:
            scale, shift = self.coarse_proj(guide).chunk(2, dim=-1)
            return self.coarse_norm(queries * (1 + take_rows(scale, clip)) + take_rows(shift, clip))
        padded, real = pad_packed(queries, counts)  # rows padded to the largest clip, then taken back
        attended = self.fine_proj(padded, guide, _key_mask(guide_mask))
        attended = attended.reshape_as(queries) if real is None else unpad_packed(attended, counts)
        return self.fine_norm(queries + attended)


def _key_mask(guide_mask: torch.Tensor | None) -> torch.Tensor | None:
    """A token-level guide's mask (B, L) as the attention's key mask: bool, True for real tokens."""
    return None if guide_mask is None else guide_mask.bool()
