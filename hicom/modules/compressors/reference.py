"""Straightforward per-clip implementations of HICom's compressors, written from SPEC 2.2-2.5 for reading,
testing and benchmarking: one clip at a time, a Python loop over the local cells, every key and value projected.

They use the parameters of the fast modules, so `reference(module, ...)` and `module(...)` must agree to
rounding; tests check that, and bench/compressor.py times the two against each other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hicom.modules.compressors.base import group_starts
from hicom.modules.compressors.global_compressor import GlobalCompressor, Position, position_table_3d
from hicom.modules.compressors.hicom import HICom
from hicom.modules.compressors.local import Adapt, ClipNorm, LocalCompressor


def unit(x: torch.Tensor) -> torch.Tensor:
    """x / |x| along the last axis, a zero vector kept zero (|x| taken as at least 1e-12, as the release's
    F.normalize does): the learned global queries start at zero."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def local_reference(
    module: LocalCompressor,
    features: torch.Tensor,
    embeds: torch.Tensor | None = None,
    guide: torch.Tensor | None = None,
    modality: str = "video",
) -> torch.Tensor:
    """(T, H, W, D) features (and embeds), (Dg,) pooled or (L, Dg) token-level guide -> (N, d_out)."""
    t, h, w, d = features.shape
    kt = 1 if modality == "image" or t == 1 else module.kernel[0]
    ks = module.kernel[1]
    grid = (math.ceil(t / kt), math.ceil(h / ks), math.ceil(w / ks))
    resized = F.interpolate(features.permute(3, 0, 1, 2)[None], size=grid, mode="trilinear", align_corners=False)[0]
    queries = module._adapted(resized.permute(1, 2, 3, 0), Adapt.Q)  # (T', H', W', D)
    keys = embeds if module.uses_embeds else features
    if module.clip_scale and module.clip_norm is ClipNorm.RELEASE and module.uses_embeds:  # the embeds and guide
        keys = unit(keys)
        if guide is not None:
            guide = unit(guide)
    if module.guide_injector is not None:
        queries = module.guide_injector(queries.reshape(1, -1, d), guide[None]).reshape(*grid, d)
    keys = module._adapted(keys, Adapt.K)
    if module.clip_scale and module.clip_norm is ClipNorm.QK:  # the queries and keys the attention uses
        queries = unit(queries)
        keys = unit(keys)
    values = module._adapted(features, Adapt.V)
    if module.clip_scale:
        scale, bias = module.logit_scale.exp(), module.logit_bias
    else:
        scale, bias = 1 / math.sqrt(d), 0.0
    cells = []
    for ct, st in enumerate(group_starts(t, kt)):
        for ch, sh in enumerate(group_starts(h, ks)):
            for cw, sw in enumerate(group_starts(w, ks)):
                block = (slice(st, st + min(kt, t)), slice(sh, sh + min(ks, h)), slice(sw, sw + min(ks, w)))
                query = queries[ct, ch, cw]
                weights = torch.softmax(keys[block].reshape(-1, d) @ query * scale + bias, dim=0)
                cells.append(weights @ values[block].reshape(-1, d))
    return module.readout(torch.stack(cells))


def global_reference(
    module: GlobalCompressor,
    features: torch.Tensor,
    embeds: torch.Tensor | None = None,
    guide: torch.Tensor | None = None,
    modality: str = "video",
) -> torch.Tensor:
    """(T, H, W, D) features, (Dg,) guide -> (num_queries, d_out): multi-head attention, one head at a time."""
    t, h, w, d = features.shape
    queries = module.query
    if module.guide_injector is not None:
        queries = module.guide_injector(queries[None], guide[None])[0]
    tokens = features.reshape(-1, d)
    keys = values = tokens
    if module.position is not Position.NONE:
        keys = tokens + position_table_3d(t, h, w, d, tokens.device).to(tokens.dtype).reshape(-1, d)
        values = keys if module.position is Position.KV else tokens
    proj = module.attn_layer
    q, k, v = proj.q_proj(queries), proj.k_proj(keys), proj.v_proj(values)
    head_dim = d // module.num_heads
    if module.clip_scale:  # unit-length projected queries and keys (across all heads), SigLIP's scale and bias
        q, k = unit(q), unit(k)
        scale, bias = module.logit_scale.exp(), module.logit_bias
    else:
        scale, bias = 1 / math.sqrt(head_dim), 0.0
    heads = []
    for i in range(module.num_heads):
        cols = slice(i * head_dim, (i + 1) * head_dim)
        scores = (q[:, cols] @ k[:, cols].T).to(torch.promote_types(q.dtype, torch.float32))
        weights = torch.softmax(scores * scale + bias, dim=-1).to(v.dtype)
        heads.append(weights @ v[:, cols])
    return module.readout(queries + proj.out_proj(torch.cat(heads, dim=-1)))


def hicom_reference(
    module: HICom,
    features: torch.Tensor,
    embeds: torch.Tensor | None = None,
    guide: torch.Tensor | None = None,
    modality: str = "video",
) -> torch.Tensor:
    """Local tokens, then global tokens, for one clip: (N_local + N_global, d_out)."""
    outputs = []
    if module.local_compressor is not None:
        outputs.append(local_reference(module.local_compressor, features, embeds, guide, modality))
    if module.global_compressor is not None:
        outputs.append(global_reference(module.global_compressor, features, embeds, guide, modality))
    return torch.cat(outputs)
