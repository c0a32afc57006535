"""What every compressor shares: the interface, the readout MLP and the grouping of tokens under a kernel."""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from hicom.utils.choices import flag, positive

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger(__name__)


def unguided_config(cfg):
    """A compressor's config (of any class, by its `_target_`) with its guide turned off, by the class's own rule
    (`Compressor.unguided_config`)."""
    from hydra.utils import get_class

    return get_class(cfg._target_).unguided_config(cfg)


def readout_words(layers: nn.Sequential) -> list[str]:
    """A compressor label's words for its readout: none for the release's depth (2), else "readout <depth>"."""
    depth = (len(layers) + 1) // 2
    return [] if depth == 2 else [f"readout {depth}"]


def readout(in_dim: int, out_dim: int, depth: int = 2) -> nn.Sequential:
    """Linear(in -> out), then (GELU, Linear(out -> out)) x (depth - 1): the projection into the LLM's width."""
    from hicom.utils.choices import whole_number

    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(whole_number("readout_depth", depth) - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


def index_cache(maxsize: int) -> Callable[[Callable], Callable]:
    """`functools.lru_cache` for functions that build index tensors of a layout, which are built outside
    `torch.inference_mode`: a tensor made under it (a first batch of that layout in `trainer.validate`, `test` or
    an evaluation) could not be saved for backward, so that a later training step on the same layout would fail."""

    def wrap(fn: Callable) -> Callable:
        @functools.lru_cache(maxsize=maxsize)
        @functools.wraps(fn)
        def built(*args, **kwargs):
            with torch.inference_mode(False):
                return fn(*args, **kwargs)

        return built

    return wrap


RELEASE_INIT_STD = 0.02


def add_clip_scale(module: nn.Module, clip_scale: bool, trained: bool) -> None:
    """A branch's `clip_scale` and `train_clip_scale` settings, checked, and with clip scale its pair, logit_scale
    and logit_bias (VideoLLM copies the vision tower's in). As released they stay SigLIP's while the branch trains:
    buffers, saved with it but never stepped. `trained` makes them parameters (the release's "attn_scale" part)."""
    flag("clip_scale", clip_scale)
    if flag("train_clip_scale", trained) and not clip_scale:
        raise ValueError("train_clip_scale trains the clip-scale pair: it needs clip_scale: true")
    module.clip_scale, module.train_clip_scale = clip_scale, trained
    if not clip_scale:
        return
    for name, value in (("logit_scale", math.log(10.0)), ("logit_bias", -10.0)):
        tensor = torch.full((1,), value)
        if trained:
            module.register_parameter(name, nn.Parameter(tensor))
        else:
            module.register_buffer(name, tensor)


def init_weights(module: nn.Module, std: float | None = RELEASE_INIT_STD) -> None:
    """Truncated-normal linear weights, zero biases, unit LayerNorms.

    `std` 0.02 is the release's init. None scales it to the layer's width, 1 / sqrt(fan_in): at the release's
    width (1152) that is 0.029, close to it, while at the tiny default's width (64) a fixed 0.02 leaves each linear
    layer with a gain of 0.16, so the visual path starts some 40x weaker than the queries it is added to and
    training sits at chance for a thousand steps before it finds the video.
    Use with `module.apply(functools.partial(init_weights, std=...))`.
    """
    if std is not None:  # nan would draw from [-2, 2], true would read as 1.0
        positive("init_std (None: 1 / sqrt(fan_in))", std)
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=module.in_features**-0.5 if std is None else std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def frame_kernel(k_t: int, t: int, modality: str) -> int:
    """The temporal kernel a clip gets: 1 for images and single frames (SPEC 2.2), else k_t."""
    return 1 if modality == "image" or t == 1 else k_t


@functools.lru_cache(maxsize=256)
def linear_sources(n: int, out: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[float, ...]]:
    """Linear interpolation of n positions to `out`, as F.interpolate computes it (align_corners False): for each
    output position the two source positions and the weight of the second."""
    low, high, lam = [], [], []
    for dst in range(out):
        src = max((dst + 0.5) * (n / out) - 0.5, 0.0)
        below = int(src)
        low.append(below)
        high.append(below + (1 if below < n - 1 else 0))
        lam.append(src - below)
    return tuple(low), tuple(high), tuple(lam)


@index_cache(maxsize=64)
def resize_matrix(n: int, out: int, average: bool, device: torch.device) -> torch.Tensor:
    """(out, n) float64 weights that resize an axis of n positions to `out`: adaptive average pooling's windows
    (`average`, as F.adaptive_avg_pool*d takes them) or linear interpolation's (F.interpolate, align_corners False).
    A product with them is a resize whose gradient is a matrix product: deterministic on CUDA, where the gradients
    of adaptive_avg_pool3d and of bilinear interpolate are not, and deterministic mode refuses them."""
    weights = torch.zeros(out, n, dtype=torch.float64)
    for i in range(out):
        if average:
            start, end = (i * n) // out, -(-((i + 1) * n) // out)
            weights[i, start:end] = 1 / (end - start)
        else:
            low, high, lam = (x[i] for x in linear_sources(n, out))
            weights[i, low] += 1 - lam
            weights[i, high] += lam
    return weights.to(device)


def deterministic_resize(x: torch.Tensor) -> bool:
    """Whether a resize of `x` takes the matrix products of `resize_matrix`: in deterministic mode, where a gradient
    will flow through it."""
    return torch.are_deterministic_algorithms_enabled() and torch.is_grad_enabled() and x.requires_grad


def fp16_products(x: torch.Tensor) -> bool:
    """Whether matrix products of `x` come out in fp16: `x` is fp16, or fp16 autocast (16-mixed) is on for its
    device. Their largest value is 65504, which a raw q . k of tokens 256 long already passes, so attention scales
    the queries before such a product instead of the scores after it."""
    if x.dtype == torch.float16:
        return True
    device = x.device.type
    autocast = device in ("cpu", "cuda") and torch.is_autocast_enabled(device)
    return autocast and torch.get_autocast_dtype(device) == torch.float16


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] for an integer index of any shape into the first dimension: the same values as advanced
    indexing, but the gradient sums through index_add (deterministic on CUDA under deterministic mode), which on
    CPU runs several times faster than the index_put that advanced indexing's gradient takes."""
    return x.index_select(0, index.reshape(-1)).reshape(*index.shape, *x.shape[1:])


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


def pad_packed(rows: torch.Tensor, counts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Packed rows (sum counts, ...) of B groups, group-major, as (B, max(counts), ...) zero-padded, with the
    (B, max) mask of real rows; the mask is None when every group has the same count (then nothing is copied)."""
    b, longest = len(counts), max(counts)
    if min(counts) == longest:
        return rows.reshape(b, longest, *rows.shape[1:]), None
    real = torch.arange(longest, device=rows.device) < torch.tensor(counts, device=rows.device)[:, None]
    padded = rows.new_zeros(b, longest, *rows.shape[1:])
    padded[real] = rows  # the mask's True entries run group-major, as the packed rows do
    return padded, real


def unpad_packed(padded: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """The inverse of pad_packed: (B, max(counts), ...) -> the real rows packed group-major, (sum counts, ...).
    Indexed by positions worked out from the counts rather than by the mask, so that no step's output size
    depends on tensor data (the meta device, on which compressors are checked, cannot run a mask's nonzero)."""
    sizes = torch.tensor(counts, device="cpu")
    shift = torch.arange(len(counts), device="cpu") * padded.shape[1] - (torch.cumsum(sizes, 0) - sizes)
    index = torch.arange(int(sizes.sum()), device="cpu") + torch.repeat_interleave(shift, sizes)
    return padded.flatten(0, 1)[index.to(padded.device)]


@dataclass(frozen=True)
class PackedLayout:
    """How clips of different lengths and modalities lie in one packed batch: clip i has `num_frames[i]` frames
    (rows of the packed (sum T, H, W, D) features, in clip order) of H x W tokens and is an image or a video."""

    num_frames: tuple[int, ...]
    modalities: tuple[str, ...]
    height: int
    width: int

    def __post_init__(self) -> None:
        if len(self.num_frames) != len(self.modalities) or min(self.num_frames, default=1) < 1:
            raise ValueError(f"every packed clip needs >= 1 frame and a modality, got {self}")

    @property
    def frame_starts(self) -> tuple[int, ...]:
        return tuple(itertools.accumulate(self.num_frames, initial=0))[:-1]


class Compressor(nn.Module):
    """A compressor maps the vision features of one clip to a sequence of LLM-width tokens.

    `forward_clips(features, embeds, guide, modality)` takes a batch of same-shaped clips: features
    (B, T, H, W, D), joint-space embeds of the same shape or None, guide (B, Dg) pooled or (B, L, Dg) token-level
    or None, and returns (B, N, d_out) with N = `num_tokens(T, H, W, modality)`, computable without running.

    `forward_packed(features, embeds, guide, layout)` takes clips of any lengths and modalities packed along the
    frame axis, (sum T, H, W, D), and returns their tokens packed in clip order, (sum N, d_out). The default
    compresses each group of same-shaped clips in one call; compressors override it with a single pass.

    Calling the module runs one or the other: `compressor(features, embeds, guide, modality)` the clips,
    `compressor(features, embeds, guide, layout=layout)` the packed form. Going through the call (rather than
    the methods) lets module hooks see it, which is how DeepSpeed ZeRO-3 gathers the compressor's parameters.

    A token-level guide may come with `guide_mask` (B, L), True (or 1) for its real tokens, where the guide's tower
    masks its padding (CLIP's; SigLIP's reads every position, and gives none): the call hands it on as the keyword
    `guide_mask` to either method, so a compressor that reads token-level guides (`guide_tokens`) takes it there.
    """

    uses_embeds: bool = False
    uses_guide: bool = False
    guide_tokens: bool = False  # needs the token-level guide C_f (B, L, Dg) rather than the pooled C_p (B, Dg)

    @classmethod
    def unguided_config(cls, cfg: DictConfig) -> DictConfig:
        """This compressor's Hydra config with its guide turned off, and whatever only a guide uses (a recipe stage
        that aligns without a guide applies it, whatever the compressor); unchanged for one that reads no guide."""
        return cfg

    def is_guide_parameter(self, name: str) -> bool:
        """Whether the parameter `name` (as named_parameters gives it) exists only because this compressor reads a
        guide: what its unguided config lacks, which a recipe's conditional stage starts from its init and trains
        at the `injection` learning rate. HICom's are its injection modules (`guide_injector`). Asked only of a
        module built outside `hicom.training.build`, which finds them from `unguided_config` instead."""
        return "guide_injector" in name.split(".")

    @property
    def label(self) -> str:
        """What this compressor is, in a few words, from its built settings (e.g. "local 4x3x3 direct + global 32
        coarse"): `metrics.json`'s and a sweep table's `compressor`. A compressor of one's own gets its class name."""
        return type(self).__name__

    def num_tokens(self, t: int, h: int, w: int, modality: str = "video") -> int:
        raise NotImplementedError

    def forward(
        self,
        features: torch.Tensor,
        embeds: torch.Tensor | None = None,
        guide: torch.Tensor | None = None,
        modality: str = "video",
        layout: PackedLayout | None = None,
        guide_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        masked = {} if guide_mask is None else {"guide_mask": guide_mask}
        if layout is not None:
            return self.forward_packed(features, embeds, guide, layout, **masked)
        return self.forward_clips(features, embeds, guide, modality, **masked)

    def forward_clips(
        self,
        features: torch.Tensor,
        embeds: torch.Tensor | None = None,
        guide: torch.Tensor | None = None,
        modality: str = "video",
        guide_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T, H, W, D) clips of one shape -> (B, N, d_out) through `forward_packed`, for compressors whose one
        implementation is their packed path; the others override `forward_clips` (and inherit the per-shape
        `forward_packed`). A compressor must override one of the two."""
        if type(self).forward_packed is Compressor.forward_packed:
            raise NotImplementedError(f"{type(self).__name__} overrides neither forward_clips nor forward_packed")
        b, t, h, w, _ = features.shape
        layout = PackedLayout((t,) * b, (modality,) * b, h, w)
        packed_embeds = embeds.flatten(0, 1) if embeds is not None else None
        masked = {} if guide_mask is None else {"guide_mask": guide_mask}
        out = self.forward_packed(features.flatten(0, 1), packed_embeds, guide, layout, **masked)
        return out.reshape(b, -1, out.shape[-1])

    def compress(
        self,
        features: torch.Tensor,
        embeds: torch.Tensor | None = None,
        guide: torch.Tensor | None = None,
        modality: str = "video",
        guide_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One clip: features (T, H, W, D), embeds likewise or None, guide (Dg,) pooled or (L, Dg) token-level
        or None (and the token-level guide's mask (L,), or None) -> (N, d_out). The same computation as a batch of
        one."""
        if features.ndim != 4:
            raise ValueError(f"compress takes one clip (T, H, W, D), got shape {tuple(features.shape)}")
        embeds, guide = (x[None] if x is not None else None for x in (embeds, guide))
        masked = {} if guide_mask is None else {"guide_mask": guide_mask[None]}
        return self(features[None], embeds, guide, modality, **masked)[0]

    def forward_packed(
        self,
        features: torch.Tensor,
        embeds: torch.Tensor | None,
        guide: torch.Tensor | None,
        layout: PackedLayout,
        guide_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shapes: dict[tuple[int, str], list[int]] = {}
        for i, key in enumerate(zip(layout.num_frames, layout.modalities, strict=True)):
            shapes.setdefault(key, []).append(i)
        outputs: dict[int, torch.Tensor] = {}
        if type(self).forward_clips is Compressor.forward_clips:
            raise NotImplementedError(f"{type(self).__name__} overrides neither forward_clips nor forward_packed")
        for (n, modality), members in shapes.items():
            frames = torch.stack([torch.arange(layout.frame_starts[i], layout.frame_starts[i] + n) for i in members])
            frames = frames.to(features.device)
            out = self.forward_clips(
                take_rows(features, frames),
                take_rows(embeds, frames) if embeds is not None else None,
                guide[members] if guide is not None else None,
                modality,
                **({} if guide_mask is None else {"guide_mask": guide_mask[members]}),
            )
            outputs.update(zip(members, out, strict=True))
        return torch.cat([outputs[i] for i in range(len(layout.num_frames))])


def check_output(
    compressor: Compressor, *, in_dim: int, guide_dim: int | None, out_dim: int, grid: int, frames: int
) -> None:
    """Run a compressor built on the meta device (no weights, no time) on a video of `frames` frames, grid x grid
    tokens each, and then on that video and an image packed together, and refuse, naming both, an output other
    than `num_tokens` rows of `out_dim`. A compressor of one's own that miscounts its tokens would otherwise fail
    only at its first batch (of images, where only their count is wrong), and one of another width would not fail
    at all: the LLM's embedding scatter would read its rows across token boundaries. One that cannot run on meta
    tensors (an op with no meta kernel, or whose output size depends on data) is left to the first batch; any
    other error is refused on the video, and warned of on the video and image (a run may hold no images)."""
    if next(compressor.parameters(), torch.empty(0, device="meta")).device.type != "meta":
        return  # a loaded compressor (a release folder's): its weights fit the layout that built it
    name = type(compressor).__name__
    for clips in (((frames, "video"),), ((frames, "video"), (1, "image"))):
        what = " and ".join(f"a video of {n} frame{'s' * (n > 1)}" if m == "video" else f"an {m}" for n, m in clips)
        what += (", packed," if len(clips) > 1 else "") + f" of {grid} x {grid} tokens a frame"
        layout = PackedLayout(tuple(n for n, _ in clips), tuple(m for _, m in clips), grid, grid)
        features = torch.empty(sum(layout.num_frames), grid, grid, in_dim, device="meta")
        embeds = features if compressor.uses_embeds else None
        guide = None
        if compressor.uses_guide and guide_dim is not None:
            b = len(clips)
            guide = torch.empty((b, 8, guide_dim) if compressor.guide_tokens else (b, guide_dim), device="meta")
        try:
            out = compressor(features, embeds, guide, layout=layout)
        except Exception as err:
            if isinstance(err, NotImplementedError) or "meta" in str(err).lower():  # no meta kernel, or a
                log.info("%s was not run on the meta device to check its output (%s)", name, err)  # data-sized op
                return
            if len(clips) > 1:
                log.warning("%s failed on %s (run on the meta device): %s: %s", name, what, type(err).__name__, err)
                return
            raise ValueError(f"{name} failed on {what} (run on the meta device): {type(err).__name__}: {err}") from err
        rows = sum(compressor.num_tokens(n, grid, grid, m) for n, m in clips)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (rows, out_dim):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"{name} gave {shape} for {what}: forward_packed must return (sum of num_tokens, LLM width) = "
                f"({rows}, {out_dim}), each clip's tokens in clip order (num_tokens says how many without running it; "
                "the width is the out_dim it is built with)"
            )
