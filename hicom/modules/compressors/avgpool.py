"""Baseline: an MLP projector per token, then average pooling over (k_t, k_s, k_s) cells (LLaVA-OneVision style)."""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F

from hicom.modules.compressors.base import (
    RELEASE_INIT_STD,
    Compressor,
    deterministic_resize,
    frame_kernel,
    init_weights,
    readout,
    readout_words,
    resize_matrix,
)
from hicom.utils.choices import kernel_sizes


class AvgPoolCompressor(Compressor):
    """Pools to a (ceil(T / k_t), ceil(H / k_s), ceil(W / k_s)) grid; k_t = 1 for images and single frames.

    Non-divisible sizes use adaptive pooling, which averages each output cell over the tokens it covers.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        out_dim: int,
        guide_dim: int | None = None,
        kernel: tuple[int, int, int] = (4, 3, 3),
        readout_depth: int = 2,
        init_std: float | None = RELEASE_INIT_STD,
    ) -> None:
        super().__init__()
        self.kernel = kernel_sizes("kernel", kernel)
        self.readout = readout(in_dim, out_dim, readout_depth)
        self.apply(partial(init_weights, std=init_std))

    @property
    def label(self) -> str:
        return " ".join(["avgpool", "x".join(map(str, self.kernel)), *readout_words(self.readout)])

    def grid(self, t: int, h: int, w: int, modality: str = "video") -> tuple[int, int, int]:
        kt = frame_kernel(self.kernel[0], t, modality)
        return math.ceil(t / kt), math.ceil(h / self.kernel[1]), math.ceil(w / self.kernel[2])

    def num_tokens(self, t: int, h: int, w: int, modality: str = "video") -> int:
        return math.prod(self.grid(t, h, w, modality))

    def forward_clips(self, features, embeds=None, guide=None, modality: str = "video") -> torch.Tensor:
        b, t, h, w, _ = features.shape
        grid = self.grid(t, h, w, modality)
        x = self.readout(features)  # (B, T, H, W, d_out)
        if deterministic_resize(x):  # the same averages as matrix products, whose gradient CUDA makes deterministic
            pt, ph, pw = (resize_matrix(n, m, True, x.device).to(x.dtype) for n, m in zip((t, h, w), grid, strict=True))
            return torch.einsum("ti,hj,wk,bijkd->bthwd", pt, ph, pw, x).flatten(1, 3)
        x = F.adaptive_avg_pool3d(x.permute(0, 4, 1, 2, 3), grid)  # (B, d_out, T', H', W')
        return x.flatten(2).transpose(1, 2)  # (B, N, d_out)
