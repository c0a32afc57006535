"""HICom: local tokens, then global tokens (SPEC 2.5)."""

from __future__ import annotations

import torch

from hicom.modules.compressors.base import Compressor
from hicom.modules.compressors.global_compressor import GlobalCompressor
from hicom.modules.compressors.local import LocalCompressor


class HICom(Compressor):
    """Local + global compression; either branch may be left out for the ablations.

    `local` and `global_` are partials (from Hydra) taking in_dim / out_dim / guide_dim.
    """

    def __init__(self, *, in_dim: int, out_dim: int, guide_dim: int | None = None, local=None, global_=None) -> None:
        super().__init__()
        if local is None and global_ is None:
            raise ValueError("HICom needs a local or a global branch (or both)")
        dims = dict(in_dim=in_dim, out_dim=out_dim, guide_dim=guide_dim)
        self.local_compressor: LocalCompressor | None = local(**dims) if local is not None else None
        self.global_compressor: GlobalCompressor | None = global_(**dims) if global_ is not None else None
        branches = [m for m in (self.local_compressor, self.global_compressor) if m is not None]
        self.uses_guide = any(m.uses_guide for m in branches)
        self.uses_embeds = any(m.uses_embeds for m in branches)

    def num_tokens(self, t: int, h: int, w: int, modality: str = "video") -> int:
        branches = (self.local_compressor, self.global_compressor)
        return sum(m.num_tokens(t, h, w, modality) for m in branches if m is not None)

    def forward(self, features, embeds=None, guide=None, modality: str = "video") -> torch.Tensor:
        outputs = [
            m(features, embeds, guide, modality)
            for m in (self.local_compressor, self.global_compressor)
            if m is not None
        ]
        return torch.cat(outputs, dim=1)  # (B, N_local + N_global, d_out)
