"""Instruction injection: how the guide (the question's text embedding) conditions a set of queries."""

from __future__ import annotations

import enum

import torch
from torch import nn

from hicom.modules.compressors.base import readout


class Guide(str, enum.Enum):
    OFF = "off"
    DIRECT = "direct"
    COARSE = "coarse"


class GuideInjector(nn.Module):
    """Inj(A, C): direct replaces the queries by the guide; coarse modulates them, LN(A * (1 + scale) + shift).

    The coarse form is the release's (its weights were trained with it). Queries A (B, N, D), guide (B, Dg).
    """

    def __init__(self, *, mode: Guide, guide_dim: int, dim: int, depth: int = 2) -> None:
        super().__init__()
        self.mode = Guide(mode)
        self.text2qk_proj = readout(guide_dim, dim, depth) if guide_dim != dim else nn.Identity()
        if self.mode is Guide.COARSE:
            self.coarse_proj = readout(dim, 2 * dim, depth)
            self.coarse_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, queries: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """Queries (B, N, D), guide (B, Dg) -> (B, N, D)."""
        guide = self.text2qk_proj(guide)[:, None]  # (B, 1, D)
        if self.mode is Guide.DIRECT:
            return guide.expand_as(queries)
        scale, shift = self.coarse_proj(guide).chunk(2, dim=-1)
        return self.coarse_norm(queries * (1 + scale) + shift)

    def forward_rows(self, queries: torch.Tensor, guide: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        """Packed queries (R, D) of several clips, guide (B, Dg), clip (R,) the clip of each row -> (R, D).
        The guide is transformed once per clip, not once per row."""
        guide = self.text2qk_proj(guide)  # (B, D)
        if self.mode is Guide.DIRECT:
            return guide[clip]
        scale, shift = self.coarse_proj(guide).chunk(2, dim=-1)
        return self.coarse_norm(queries * (1 + scale[clip]) + shift[clip])
