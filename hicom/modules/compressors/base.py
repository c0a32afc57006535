"""What every compressor shares: the interface, the readout MLP and the grouping of tokens under a kernel."""

from __future__ import annotations

import math

import torch
from torch import nn


def readout(in_dim: int, out_dim: int, depth: int = 2) -> nn.Sequential:
    """Linear(in -> out), then (GELU, Linear(out -> out)) x (depth - 1): the projection into the LLM's width."""
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


def init_weights(module: nn.Module) -> None:
    """Truncated-normal linear weights (std 0.02), zero biases, unit LayerNorms, as the release initialises."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def group_starts(n: int, k: int) -> list[int]:
    """Start positions of the ceil(n / k) windows of min(k, n) consecutive positions that cover 0..n-1.

    Where n is not a multiple of k the later windows start early and overlap their predecessor, by one position
    per window when that suffices (the release's rule, e.g. n=10, k=4: 0, 3, 6), spreading any larger overlap
    over the later windows so that every size works (n=5, k=4: 0, 1).
    """
    size = min(k, n)
    count = math.ceil(n / k)
    if count == 1:
        return [0]
    overlap = count * size - n
    base, extra = divmod(overlap, count - 1)
    starts = [0]
    for boundary in range(1, count):
        shift = base + (1 if boundary >= count - extra else 0)
        starts.append(starts[-1] + size - shift)
    return starts


def group_index(n: int, k: int, device: torch.device | None = None) -> torch.Tensor:
    """(ceil(n / k), min(k, n)) indices of the positions in each window."""
    starts = torch.tensor(group_starts(n, k), device=device)
    return starts[:, None] + torch.arange(min(k, n), device=device)


class Compressor(nn.Module):
    """A compressor maps the vision features of one clip to a sequence of LLM-width tokens.

    `forward(features, embeds, guide, modality)` takes a batch of same-shaped clips: features (B, T, H, W, D),
    joint-space embeds of the same shape or None, guide (B, Dg) pooled or (B, L, Dg) token-level or None, and
    returns (B, N, d_out) with N = `num_tokens(T, H, W, modality)`, computable without running.
    """

    uses_embeds: bool = False
    uses_guide: bool = False

    def num_tokens(self, t: int, h: int, w: int, modality: str = "video") -> int:
        raise NotImplementedError
