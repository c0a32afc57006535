"""HICom's local compressor: one query per cell of a (k_t, k_s, k_s) grid attends to the tokens under its cell."""

from __future__ import annotations

import functools
import math
from functools import partial

import torch
import torch.nn.functional as F

from hicom.modules.compressors.base import RELEASE_INIT_STD, Compressor, group_index, init_weights, readout
from hicom.modules.compressors.injection import Guide, GuideInjector


class LocalCompressor(Compressor):
    """Queries are the features resized to the output grid (trilinear), or the guide itself with direct injection;
    keys are the joint-space embeddings when guided (else the features); values are the features.
    Attention is single-head without projections, inside each cell's group of k_t * k_s * k_s tokens.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        out_dim: int,
        guide_dim: int | None = None,
        kernel: tuple[int, int, int] = (4, 3, 3),
        guide: Guide = Guide.DIRECT,
        readout_depth: int = 2,
        init_std: float | None = RELEASE_INIT_STD,
    ) -> None:
        super().__init__()
        if len(kernel) != 3 or min(kernel) < 1 or kernel[1] != kernel[2]:
            raise ValueError(f"kernel must be (k_t, k_s, k_s) with sizes >= 1, got {kernel}")
        self.kernel = tuple(int(k) for k in kernel)
        self.guide = Guide(guide)
        self.uses_guide = self.uses_embeds = self.guide is not Guide.OFF
        self.dim = in_dim
        self.guide_injector = (
            GuideInjector(mode=self.guide, guide_dim=guide_dim or in_dim, dim=in_dim) if self.uses_guide else None
        )
        self.readout = readout(in_dim, out_dim, readout_depth)
        self.apply(partial(init_weights, std=init_std))

    def _kernel(self, t: int, modality: str) -> tuple[int, int, int]:
        kt, ks, _ = self.kernel
        return (1 if modality == "image" or t == 1 else kt), ks, ks

    def grid(self, t: int, h: int, w: int, modality: str = "video") -> tuple[int, int, int]:
        kt, ks, _ = self._kernel(t, modality)
        return math.ceil(t / kt), math.ceil(h / ks), math.ceil(w / ks)

    def num_tokens(self, t: int, h: int, w: int, modality: str = "video") -> int:
        return math.prod(self.grid(t, h, w, modality))

    def forward(
        self,
        features: torch.Tensor,
        embeds: torch.Tensor | None = None,
        guide: torch.Tensor | None = None,
        modality: str = "video",
    ) -> torch.Tensor:
        b, t, h, w, d = features.shape
        kernel = self._kernel(t, modality)
        if self.uses_guide and (guide is None or embeds is None):
            raise ValueError("this local compressor is guided: pass the guide and the joint-space embeddings")
        index = cell_index((t, h, w), kernel, features.device)  # (N, G) into the T * H * W tokens
        keys = (embeds if self.uses_guide else features).reshape(b, t * h * w, d)
        if self.guide is Guide.DIRECT:
            # Every cell's query is the same injected guide: score each token once, then group the scores.
            query = self.guide_injector(features.new_zeros(b, 1, d), guide)  # (B, 1, D)
            scores = torch.bmm(keys, query.transpose(1, 2)).squeeze(-1)[:, index]  # (B, N, G)
        else:
            queries = F.interpolate(
                features.permute(0, 4, 1, 2, 3),
                size=self.grid(t, h, w, modality),
                mode="trilinear",
                align_corners=False,
            )
            queries = queries.flatten(2).transpose(1, 2)  # (B, N, D)
            if self.guide_injector is not None:
                queries = self.guide_injector(queries, guide)
            scores = torch.einsum("bnd,bngd->bng", queries, keys[:, index])
        weights = (scores / math.sqrt(d)).softmax(dim=-1)
        values = features.reshape(b, t * h * w, d)[:, index]  # (B, N, G, D)
        pooled = torch.matmul(weights.unsqueeze(-2), values).squeeze(-2)  # (B, N, D)
        return self.readout(pooled)  # (B, N, d_out)


@functools.lru_cache(maxsize=64)
def _cell_index(size: tuple[int, int, int], kernel: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    t, h, w = size
    it, ih, iw = (group_index(n, k, device) for n, k in zip(size, kernel, strict=True))
    # (T', H', W', kt, ks, ks) flat positions t * H * W + y * W + x, cells time-major then row then column
    flat = (
        it[:, None, None, :, None, None] * (h * w)
        + ih[None, :, None, None, :, None] * w
        + iw[None, None, :, None, None, :]
    )
    return flat.reshape(it.shape[0] * ih.shape[0] * iw.shape[0], -1)


def cell_index(size: tuple[int, int, int], kernel: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """(cells, k_t * k_s * k_s) flat indices of the tokens under each output cell of a (T, H, W) grid."""
    return _cell_index(tuple(size), tuple(kernel), torch.device(device))
