"""HICom's local compressor: one query per cell of a (k_t, k_s, k_s) grid attends to the tokens under its cell."""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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
    frame_kernel,
    group_index,
    index_cache,
    init_weights,
    linear_sources,
    readout,
    readout_words,
    take_rows,
)
from hicom.modules.compressors.injection import Guide, GuideInjector
from hicom.utils.choices import Choice, kernel_sizes


class Adapt(Choice):
    """Which inputs of the local attention get a learned adapter: queries, keys, values, or the guide."""

    Q = "q"
    K = "k"
    V = "v"
    G = "g"


class Keys(Choice):
    """What a guided local compressor matches its queries against: the joint-space embeddings E or the features V."""

    EMBEDS = "embeds"
    FEATURES = "features"


class ClipNorm(Choice):
    """What a clip-scale local compressor makes unit length before its dot products: the queries and keys its
    attention uses (`qk`, SPEC 2.2), or what the release does (`release`): the joint-space embeddings and the
    guide where the keys are the embeddings, nothing where they are the features. Under `release` queries other
    than the guide itself (coarse or fine injection, or no guide) keep their length, and SigLIP's logit scale then
    makes each cell's softmax nearly one-hot. The two agree where the queries are the guide itself (direct
    injection, no guide adapter, a guide as wide as the features) and the keys are the unadapted embeddings."""

    QK = "qk"
    RELEASE = "release"


class LocalCompressor(Compressor):
    """Queries are the features resized to the output grid (trilinear), or the guide itself with direct injection;
    keys are the joint-space embeddings when guided (else the features, unless `keys` says); values are the features.
    Attention is single-head without projections, inside each cell's group of k_t * k_s * k_s tokens.
    """

    @classmethod
    def unguided_config(cls, cfg):
        from omegaconf import OmegaConf

        adapt = [a for a in (cfg.get("adapt") or []) if a != "g"]  # the guide's adapter goes with the guide
        return OmegaConf.merge(cfg, {"guide": "off", "adapt": adapt})

    def __init__(
        self,
        *,
        in_dim: int,
        out_dim: int,
        guide_dim: int | None = None,
        kernel: tuple[int, int, int] = (4, 3, 3),
        guide: Guide = Guide.DIRECT,
        keys: Keys | None = None,
        adapt: Sequence[str] = (),
        clip_scale: bool = False,
        train_clip_scale: bool = False,
        clip_norm: ClipNorm = ClipNorm.QK,
        readout_depth: int = 2,
        init_std: float | None = RELEASE_INIT_STD,
    ) -> None:
        super().__init__()
        kernel = kernel_sizes("kernel", kernel)
        self.clip_norm = ClipNorm(clip_norm)
        if kernel[1] != kernel[2]:
            raise ValueError(f"kernel must be (k_t, k_s, k_s): one spatial size for both axes, got {kernel!r}")
        self.kernel = tuple(int(k) for k in kernel)
        self.guide = Guide(guide)
        self.uses_guide = self.guide is not Guide.OFF
        # SPEC 2.2: keys are the joint-space embeddings when guided (the guide lives in that space), else V;
        # `keys` set to embeds or features chooses either way.
        self.keys = Keys(keys) if keys is not None else (Keys.EMBEDS if self.uses_guide else Keys.FEATURES)
        self.uses_embeds = self.keys is Keys.EMBEDS
        self.adapt = frozenset(Adapt(a) for a in adapt)
        if Adapt.Q in self.adapt and self.guide is Guide.DIRECT:
            raise ValueError("adapt q has no effect with direct injection (the queries are the guide): drop it")
        if Adapt.G in self.adapt and not self.uses_guide:
            raise ValueError("adapt g needs a guide: set guide to direct, coarse or fine")
        self.dim = in_dim
        self.guide_injector = (
            GuideInjector(mode=self.guide, guide_dim=guide_dim or in_dim, dim=in_dim, adapt=Adapt.G in self.adapt)
            if self.uses_guide
            else None
        )
        self.guide_tokens = self.guide is Guide.FINE
        # Adapters (the release's "adapt q/k/v"): x' = (1 - a) x + a LN(proj(x)), a learned, zero at init.
        for name in sorted(self.adapt - {Adapt.G}):
            proj = nn.Linear(in_dim, in_dim, bias=False) if name is Adapt.Q else readout(in_dim, in_dim, 2)
            self.add_module(f"{name.value}_proj", proj)
            self.add_module(f"{name.value}_norm", nn.LayerNorm(in_dim, eps=1e-6))
            self.register_parameter(f"{name.value}_alpha", nn.Parameter(torch.zeros(1)))
        # Clip scale: unit-length queries and keys (`clip_norm`), SigLIP's logit scale and bias (copied from the vision
        # tower by VideoLLM) in place of 1 / sqrt(D).
        add_clip_scale(self, clip_scale, train_clip_scale)
        self.readout = readout(in_dim, out_dim, readout_depth)
        self.apply(partial(init_weights, std=init_std))

    def _adapted(self, x: torch.Tensor, name: Adapt) -> torch.Tensor:
        if name not in self.adapt:
            return x
        proj, norm, alpha = (getattr(self, f"{name.value}_{part}") for part in ("proj", "norm", "alpha"))
        return (1 - alpha) * x + alpha * norm(proj(x))

    def _kernel(self, t: int, modality: str) -> tuple[int, int, int]:
        kt, ks, _ = self.kernel
        return frame_kernel(kt, t, modality), ks, ks

    @property
    def label(self) -> str:
        words = ["local", "x".join(map(str, self.kernel)), "unguided" if self.guide is Guide.OFF else self.guide.value]
        if self.keys is not (Keys.EMBEDS if self.uses_guide else Keys.FEATURES):  # not the release's for its guide
            words.append(f"keys {self.keys.value}")
        if self.adapt:
            words.append("adapt " + ",".join(sorted(a.value for a in self.adapt)))
        if self.clip_scale:
            words.append("clip-scale" if self.clip_norm is ClipNorm.QK else "clip-scale as released")
            if self.train_clip_scale:
                words.append("trained")
        return " ".join(words + readout_words(self.readout))

    @property
    def unit_qk(self) -> bool:
        """Whether the attention's queries and keys are made unit length (clip scale, SPEC 2.2's way)."""
        return self.clip_scale and self.clip_norm is ClipNorm.QK

    def grid(self, t: int, h: int, w: int, modality: str = "video") -> tuple[int, int, int]:
        kt, ks, _ = self._kernel(t, modality)
        return math.ceil(t / kt), math.ceil(h / ks), math.ceil(w / ks)

    def num_tokens(self, t: int, h: int, w: int, modality: str = "video") -> int:
        return math.prod(self.grid(t, h, w, modality))

    def forward_packed(
        self,
        features: torch.Tensor,
        embeds: torch.Tensor | None,
        guide: torch.Tensor | None,
        layout: PackedLayout,
        guide_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Clips of any lengths and modalities in one pass: (sum T, H, W, D) -> (sum N, d_out); guide_mask (B, L)
        marks a token-level guide's real tokens (the rest are not attended to)."""
        _, h, w, d = features.shape
        if (self.uses_guide and guide is None) or (self.uses_embeds and embeds is None):
            raise ValueError("this local compressor is guided: pass the guide (and the joint-space embeddings)")
        # runs of keys serve the per-cell queries; direct injection scores every token against one query per clip
        runs = self.guide is not Guide.DIRECT and not _GATHER_KEYS.get()
        plan = _packed_plan(layout, self.kernel, features.device, runs=runs)
        keys = embeds if self.uses_embeds else features
        release_norm = self.clip_scale and self.clip_norm is ClipNorm.RELEASE
        if release_norm and self.uses_embeds:  # as released: unit-length embeds and guide, queries as they come
            keys = F.normalize(keys, dim=-1)  # x / |x|, a zero vector kept zero
            if guide is not None:
                guide = F.normalize(guide, dim=-1)
        keys = self._adapted(keys.reshape(-1, d), Adapt.K)  # (sum T H W, D)
        if self.unit_qk:
            keys = F.normalize(keys, dim=-1)
        # where the products come out in fp16 and q, k are not unit length, 1 / sqrt(D) goes on the queries (the
        # raw q . k would overflow) and the rest of the scale on the scores in fp32 (clip scale's would overflow)
        prescaled = not self.unit_qk and fp16_products(keys)
        if self.guide is Guide.DIRECT:
            queries = self.guide_injector.prepare(guide)  # (B, D): one query for all cells of a clip
            if self.unit_qk:
                queries = F.normalize(queries, dim=-1)
            queries = queries / math.sqrt(d) if prescaled else queries
            # each frame's tokens against its own clip's query: (sum T, H W, D) x (sum T, D, 1)
            frame_queries = take_rows(queries, plan.frame_clip).unsqueeze(-1)
            token_scores = torch.bmm(keys.reshape(-1, h * w, d), frame_queries)
            scores = take_rows(token_scores.reshape(-1), plan.index)  # (cells, G)
        else:
            # Trilinear resize, done separably: bilinear over each frame, then linear over each clip's frames.
            spatial = F.interpolate(features.permute(0, 3, 1, 2), size=plan.grid, mode="bilinear", align_corners=False)
            lam = plan.frame_lambda.to(features.dtype)[:, None, None, None]
            low, high = take_rows(spatial, plan.frame_low), take_rows(spatial, plan.frame_high)
            queries = low * (1 - lam) + high * lam  # (sum T', D, H', W')
            queries = self._adapted(queries.permute(0, 2, 3, 1).reshape(-1, d), Adapt.Q)  # (cells, D)
            if self.guide_injector is not None:
                queries = self.guide_injector.forward_rows(queries, guide, plan.cell_clip, plan.cell_counts, guide_mask)
            if self.unit_qk:
                queries = F.normalize(queries, dim=-1)
            queries = queries / math.sqrt(d) if prescaled else queries
            scores = _cell_scores(queries, keys, plan)
        if prescaled:
            scores = scores.float()
            if self.clip_scale:
                scores = scores * (math.sqrt(d) * self.logit_scale.float().exp()) + self.logit_bias.float()
        elif self.clip_scale:
            scores = scores * self.logit_scale.exp() + self.logit_bias
        else:
            scores = scores / math.sqrt(d)
        if plan.padding is not None:  # images' cells hold fewer tokens than videos' cells
            scores = scores.masked_fill(plan.padding, float("-inf"))
        values = self._adapted(features.reshape(-1, d), Adapt.V)  # (sum T H W, D)
        # at least fp32, as the global branch's (SPEC 2.3), also for bf16 weights and under bf16 autocast on CPU;
        # padding positions get weight exactly 0
        weights = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(values.dtype)
        return self.readout(_weighted_sum(weights, values, plan.index))  # (cells, d_out)


def _cell_scores(queries: torch.Tensor, keys: torch.Tensor, plan: _PackedPlan) -> torch.Tensor:
    """q_c . k_i for every cell c and each token i under it: (cells, D), (tokens, D) -> (cells, G).

    Where the row windows tile H (a size the clamped k_s divides), the keys are read in place, in runs of k_s rows
    of a frame: each run is scored against all W' cells of its row of cells (of both rows where its frame lies in
    two overlapping time windows), and each token keeps its scores for its own cells. That is W' (or 2 W') times
    the products of the exact scores, 0.5 GFLOP per video at 32 x 27 x 27 x 1152, where gathering the keys into
    cell blocks copies every token. Elsewhere, or past `MAX_RUN_COLUMNS` scores per key, the keys are gathered
    (runs of single rows in up to two row windows measured no faster on CPU, and kept more for backward).
    """
    if plan.runs is None:
        return torch.einsum("cd,cgd->cg", queries, take_rows(keys, plan.index))
    d = keys.shape[-1]
    runs = plan.runs.rows.shape[0]
    row_queries = take_rows(queries.reshape(-1, plan.grid[1], d), plan.runs.rows)  # (runs, slots, W', D)
    run_keys = keys.reshape(runs, -1, d)  # (runs, run length, D), a view
    # queries x keys^T: on CPU half the rounding error of keys x queries^T (and faster) at these shapes
    run_scores = torch.bmm(row_queries.reshape(runs, -1, d), run_keys.transpose(1, 2))  # (runs, slots W', length)
    return take_rows(run_scores.reshape(-1), plan.runs.score_index)


def _weighted_sum(weights: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """sum_g weights[c, g] * values[index[c, g]] for every cell c: (cells, G), (tokens, D), (cells, G) -> (cells, D).

    A weighted bag sum reads each value row in place, where gathering the (cells, G, D) block first copies every
    token once more (15x slower on CPU at 32 x 27 x 27 x 1152). The gather is used where the bag sum cannot train:
    its gradient for the values accumulates with atomics on CUDA, which deterministic mode refuses, and CUDA has no
    bf16 kernel for its gradient of the weights (torch 2.11: the recipe's stage 3, whose trainable guide encoder and
    vision head put the weights on the gradient's path).
    """
    if (values.requires_grad and torch.are_deterministic_algorithms_enabled()) or (
        weights.requires_grad and weights.is_cuda and weights.dtype == torch.bfloat16
    ):
        return torch.matmul(weights.unsqueeze(-2), take_rows(values, index)).squeeze(-2)
    return F.embedding_bag(index, values, mode="sum", per_sample_weights=weights)


MAX_RUN_COLUMNS = 64  # queries a run of keys may be scored against before gathering the keys is the cheaper way
_GATHER_KEYS = contextvars.ContextVar("gather_keys", default=False)


@contextlib.contextmanager
def gathered_keys() -> Iterator[None]:
    """Inside, the local branch scores each cell against its own gathered keys, one dot product per token as the
    release computes them, instead of reading runs of keys in place. The math is the same, and so are the results
    to fp32 rounding; but where a cell's largest scores are large and nearly tied (thousands, apart by less than
    one), rounding moves its softmax weights visibly, and only the same summation order rounds as the release
    does. scripts/release_parity.py compares with the release in this order."""
    token = _GATHER_KEYS.set(True)
    try:
        yield
    finally:
        _GATHER_KEYS.reset(token)


@dataclass(frozen=True)
class _Runs:
    rows: torch.Tensor  # (runs, slots): the rows of cells, as packed t' * H' + h', each run of keys is scored against
    score_index: torch.Tensor  # (cells, G): each token's score for its cell in the flat (runs, slots, W', length)


@dataclass(frozen=True)
class _PackedPlan:
    index: torch.Tensor  # (cells, G): flat token positions under each cell, padded with a valid position
    padding: torch.Tensor | None  # (cells, G) True where index is padding
    cell_clip: torch.Tensor  # (cells,) clip of each cell
    cell_counts: tuple[int, ...]  # cells of each clip
    frame_clip: torch.Tensor  # (sum T,) clip of each frame
    runs: _Runs | None  # where the local scores read the keys in place (None: gather them)
    grid: tuple[int, int]  # (H', W')
    frame_low: torch.Tensor  # (sum T',) the two source frames of each output frame, and the weight of the second
    frame_high: torch.Tensor
    frame_lambda: torch.Tensor


@index_cache(maxsize=32)
def _packed_plan(
    layout: PackedLayout, kernel: tuple[int, int, int], device: torch.device, runs: bool = True
) -> _PackedPlan:
    """Index tensors for one packed layout, built once per layout; the cell blocks, run layouts (where `runs` asks
    for them and the sizes allow) and frame weights of each clip shape are cached too, so the Python work per clip
    is an offset."""
    kt, ks, _ = kernel
    h, w = layout.height, layout.width
    rows, cols = math.ceil(h / ks), math.ceil(w / ks)
    kernels = [frame_kernel(kt, n, modality) for n, modality in zip(layout.num_frames, layout.modalities, strict=True)]
    # Runs of k_s rows of keys where the row windows tile H; a frame lies in one time window where they tile its
    # clip, else in up to two.
    slots = 1 if all(n % min(k, n) == 0 for n, k in zip(layout.num_frames, kernels, strict=True)) else 2
    use_runs = runs and h % min(ks, h) == 0 and slots * cols <= MAX_RUN_COLUMNS
    blocks, scores, run_rows, low, high, lam = [], [], [], [], [], []
    for n, clip_kt, start in zip(layout.num_frames, kernels, layout.frame_starts, strict=True):
        blocks.append(_cell_index((n, h, w), (clip_kt, ks, ks)) + start * h * w)
        if use_runs:
            clip_rows, clip_scores = _run_index((n, h, w), (clip_kt, ks, ks), slots)
            run_rows.append(clip_rows + len(low) * rows)  # the clip's first row of cells
            scores.append(clip_scores + start * h * w * slots * cols)  # its first run
        below, above, weight = linear_sources(n, math.ceil(n / clip_kt))
        low += [start + i for i in below]
        high += [start + i for i in above]
        lam += weight
    cell_counts = tuple(block.shape[0] for block in blocks)
    width = max(block.shape[1] for block in blocks)
    padding = None
    if any(block.shape[1] < width for block in blocks):  # images' cells hold fewer tokens than videos' cells
        padding = torch.cat([(torch.arange(width) >= b.shape[1]).expand(b.shape[0], width) for b in blocks])
        blocks, scores = (
            [torch.cat([b, b[:, :1].expand(-1, width - b.shape[1])], dim=1) for b in x] for x in (blocks, scores)
        )
    clips = torch.arange(len(blocks))
    return _PackedPlan(
        index=torch.cat(blocks).to(device),
        padding=None if padding is None else padding.to(device),
        cell_clip=clips.repeat_interleave(torch.tensor(cell_counts)).to(device),
        cell_counts=cell_counts,
        frame_clip=clips.repeat_interleave(torch.tensor(layout.num_frames)).to(device),
        runs=_Runs(torch.cat(run_rows).to(device), torch.cat(scores).to(device)) if use_runs else None,
        grid=(rows, cols),
        frame_low=torch.tensor(low, device=device),
        frame_high=torch.tensor(high, device=device),
        frame_lambda=torch.tensor(lam, dtype=torch.float64, device=device),
    )


@index_cache(maxsize=256)
def _run_index(
    size: tuple[int, int, int], kernel: tuple[int, int, int], slots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The run layout of one (T, H, W) clip whose row windows tile H (see `_cell_scores`): the clip's rows of
    cells (t' * H' + h') each run of k_s rows is scored against, (runs, slots), the row of a frame's first time
    window and then of its second (the first again where there is none); and, for each token under each cell, the
    flat position of its score in the (runs, slots, W', k_s W) products, (cells, G) in `_cell_index`'s order
    (cached: callers add offsets, which makes new tensors)."""
    t, h, w = size
    it, ih, iw = (group_index(n, k) for n, k in zip(size, kernel, strict=True))  # (windows, window size) per axis
    windows_t = it.shape[0]
    first_t = _first_window(it, t)  # (T,) the first time window holding each frame
    frame_windows = (first_t[:, None] + torch.arange(slots)).clamp(max=windows_t - 1)  # (T, slots)
    rows = (frame_windows[:, None, :] * ih.shape[0] + torch.arange(ih.shape[0])[:, None]).reshape(-1, slots)
    # every token under every cell, (T', H', W', kt, ks, ks) as in _cell_index, its slot and its cell's column
    tt, yy, xx = it[:, None, None, :, None, None], ih[None, :, None, None, :, None], iw[None, None, :, None, None, :]
    slot = torch.arange(windows_t)[:, None, None, None, None, None] - first_t[tt]
    column = torch.arange(iw.shape[0])[None, None, :, None, None, None]
    token, length = tt * (h * w) + yy * w + xx, ih.shape[1] * w
    run, position = token // length, token % length  # the token's run and its place in the run
    flat = ((run * slots + slot) * iw.shape[0] + column) * length + position
    return rows, flat.reshape(windows_t * ih.shape[0] * iw.shape[0], -1)


def _first_window(windows: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) the first of the (windows, size) windows that holds each of the positions 0..n-1."""
    holds = (windows[:, :, None] == torch.arange(n)).any(dim=1)  # (windows, n)
    return holds.int().argmax(dim=0)


@index_cache(maxsize=256)
def _cell_index(size: tuple[int, int, int], kernel: tuple[int, int, int]) -> torch.Tensor:
    """(cells, k_t * k_s * k_s) flat indices of the tokens under each output cell of one (T, H, W) clip
    (cached: callers add an offset, which makes a new tensor)."""
    t, h, w = size
    it, ih, iw = (group_index(n, k) for n, k in zip(size, kernel, strict=True))
    # (T', H', W', kt, ks, ks) flat positions t * H * W + y * W + x, cells time-major then row then column
    flat = (
        it[:, None, None, :, None, None] * (h * w)
        + ih[None, :, None, None, :, None] * w
        + iw[None, None, :, None, None, :]
    )
    return flat.reshape(it.shape[0] * ih.shape[0] * iw.shape[0], -1)
