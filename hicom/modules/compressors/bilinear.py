"""Baseline: an MLP projector per token, then each video frame downsampled by 2 with bilinear interpolation
(LLaVA-OneVision / LLaVA-Video: 27 x 27 -> 14 x 14, 196 tokens a frame). Images keep their full grid."""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F

from hicom.modules.compressors.base import (
    RELEASE_INIT_STD,
    Compressor,
    PackedLayout,
    deterministic_resize,
    index_cache,
    init_weights,
    readout,
    readout_words,
    resize_matrix,
)


class BilinearPoolCompressor(Compressor):
    """readout(token) for every token, then video frames resized to (ceil(H / factor), ceil(W / factor))."""

    def __init__(
        self,
        *,
        in_dim: int,
        out_dim: int,
        guide_dim: int | None = None,
        factor: int = 2,
        readout_depth: int = 2,
        init_std: float | None = RELEASE_INIT_STD,
    ) -> None:
        super().__init__()
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be an int >= 1, got {factor!r}")
        self.factor = factor
        self.readout = readout(in_dim, out_dim, readout_depth)
        self.apply(partial(init_weights, std=init_std))

    @property
    def label(self) -> str:
        return " ".join([f"bilinear 1/{self.factor}", *readout_words(self.readout)])

    def grid(self, h: int, w: int, modality: str = "video") -> tuple[int, int]:
        if modality == "image":
            return h, w
        return math.ceil(h / self.factor), math.ceil(w / self.factor)

    def num_tokens(self, t: int, h: int, w: int, modality: str = "video") -> int:
        return t * math.prod(self.grid(h, w, modality))

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """(frames, H, W, d) -> (frames, H', W', d)"""
        size = self.grid(x.shape[1], x.shape[2])
        if size == tuple(x.shape[1:3]):
            return x
        if deterministic_resize(x):  # the same resize as matrix products, whose gradient CUDA makes deterministic
            ph, pw = (resize_matrix(n, m, False, x.device).to(x.dtype) for n, m in zip(x.shape[1:3], size, strict=True))
            return torch.einsum("hj,wk,fjkd->fhwd", ph, pw, x)
        x = F.interpolate(x.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
        return x.permute(0, 2, 3, 1)

    def forward_clips(self, features, embeds=None, guide=None, modality: str = "video") -> torch.Tensor:
        b, t, h, w, _ = features.shape
        x = self.readout(features.flatten(0, 1))  # (B T, H, W, d_out)
        if modality != "image":
            x = self._pool(x)
        return x.reshape(b, -1, x.shape[-1])  # (B, N, d_out)

    def forward_packed(self, features, embeds, guide, layout: PackedLayout) -> torch.Tensor:
        """Every frame projected and pooled in one pass; image frames then take their unpooled tokens."""
        x = self.readout(features)  # (sum T, H, W, d_out)
        pooled = self._pool(x)
        if "image" not in layout.modalities:
            return pooled.reshape(-1, x.shape[-1])
        rows = torch.cat([pooled.reshape(-1, x.shape[-1]), x.reshape(-1, x.shape[-1])])
        return rows.index_select(0, _rows(layout, self.grid(layout.height, layout.width), x.device))


@index_cache(maxsize=32)
def _rows(layout: PackedLayout, pooled_grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Rows of cat([pooled tokens, full tokens]) that make up each clip in order: pooled for video frames,
    full for image frames."""
    per_pooled, per_full = math.prod(pooled_grid), layout.height * layout.width
    pooled_total = sum(layout.num_frames) * per_pooled
    pieces = []
    for n, modality, start in zip(layout.num_frames, layout.modalities, layout.frame_starts, strict=True):
        if modality == "image":
            pieces.append(pooled_total + torch.arange(start * per_full, (start + n) * per_full))
        else:
            pieces.append(torch.arange(start * per_pooled, (start + n) * per_pooled))
    return torch.cat(pieces).to(device)
