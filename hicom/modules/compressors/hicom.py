"""HICom: local tokens, then global tokens (SPEC 2.5)."""

from __future__ import annotations

import torch

from hicom.modules.compressors.base import Compressor, PackedLayout, index_cache, unguided_config
from hicom.modules.compressors.global_compressor import GlobalCompressor
from hicom.modules.compressors.local import LocalCompressor


class HICom(Compressor):
    """Local + global compression; either branch may be left out for the ablations.

    `local` and `global_` are partials (from Hydra) taking in_dim / out_dim / guide_dim.
    """

    @classmethod
    def unguided_config(cls, cfg):
        """Each branch the config has (one may be null: the single-branch ablations) unguided."""
        from omegaconf import OmegaConf, open_dict

        cfg = OmegaConf.create(cfg)
        with open_dict(cfg):
            for key in ("local", "global_"):
                if cfg.get(key) is not None:
                    cfg[key] = unguided_config(cfg[key])
        return cfg

    def __init__(self, *, in_dim: int, out_dim: int, guide_dim: int | None = None, local=None, global_=None) -> None:
        super().__init__()
        if local is None and global_ is None:
            raise ValueError("HICom needs a local or a global branch (or both): model.compressor.local / global_")
        dims = dict(in_dim=in_dim, out_dim=out_dim, guide_dim=guide_dim)

        def branch(name: str, make):
            try:
                return make(**dims) if make is not None else None
            except (ValueError, TypeError) as err:  # which branch's value: both have a guide, an init, ...
                raise (TypeError if isinstance(err, TypeError) else ValueError)(f"{name}: {err}") from err

        self.local_compressor: LocalCompressor | None = branch("local", local)
        self.global_compressor: GlobalCompressor | None = branch("global_", global_)
        branches = [m for m in (self.local_compressor, self.global_compressor) if m is not None]
        self.uses_guide = any(m.uses_guide for m in branches)
        self.uses_embeds = any(m.uses_embeds for m in branches)
        self.guide_tokens = any(m.guide_tokens for m in branches)

    @property
    def label(self) -> str:
        return " + ".join(m.label for m in (self.local_compressor, self.global_compressor) if m is not None)

    def num_tokens(self, t: int, h: int, w: int, modality: str = "video") -> int:
        branches = (self.local_compressor, self.global_compressor)
        return sum(m.num_tokens(t, h, w, modality) for m in branches if m is not None)

    def forward_packed(self, features, embeds, guide, layout: PackedLayout, guide_mask=None) -> torch.Tensor:
        """(sum T, H, W, D) -> (sum N, d_out): each clip's local tokens, then its global tokens."""
        local = global_ = None
        if self.local_compressor is not None:
            local = self.local_compressor.forward_packed(features, embeds, guide, layout, guide_mask)
        if self.global_compressor is not None:
            global_ = self.global_compressor.forward_packed(features, embeds, guide, layout, guide_mask)
        if local is None or global_ is None:
            return local if global_ is None else global_
        # Interleave clip by clip with one gather: rows of `local` first, then those of `global_`.
        h, w = layout.height, layout.width
        clips = zip(layout.num_frames, layout.modalities, strict=True)
        counts = [self.local_compressor.num_tokens(n, h, w, modality) for n, modality in clips]
        order = _interleave(tuple(counts), self.global_compressor.num_queries, local.device)
        return torch.cat([local, global_]).index_select(0, order)


@index_cache(maxsize=32)
def _interleave(local_counts: tuple[int, ...], num_global: int, device: torch.device) -> torch.Tensor:
    """Row order that puts each clip's `local_counts[i]` local rows before its `num_global` global rows."""
    local_total = sum(local_counts)
    rows, start = [], 0
    for i, count in enumerate(local_counts):
        rows.append(torch.arange(start, start + count))
        rows.append(local_total + i * num_global + torch.arange(num_global))
        start += count
    return torch.cat(rows).to(device)
