"""Frame preprocessing with the settings of a checkpoint's image processor (preprocessor_config.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# PIL resample codes used by HF image processors, mapped to torch interpolation modes.
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
# the padded copies of a clip's frames held at once, at most (one frame's where it is larger)
SQUARING_BYTES = 256 * 2**20
# the longest side a frame is padded to square at; a longer frame (beyond 4K, or a strip such as 2 x 16000) is
# resized to it first, keeping its aspect
MAX_SQUARE_SIDE = 4096


def image_side(cfg: dict, file: Path) -> int:
    """The side of the square the vision tower sees, from an image processor's config: its `crop_size` where it
    centre-crops, else its `size`. Each is a number in the older format (openai/clip-vit-large-patch14-336 ships
    `"size": 336, "crop_size": 336`) or a dict of height / width or shortest_edge in the newer one."""

    def side(key: str) -> int | None:
        value = cfg.get(key)
        if isinstance(value, dict):
            value = value.get("height", value.get("shortest_edge"))
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{file}: '{key}' must give a side of at least 1 pixel, got {cfg.get(key)!r}")
        return value

    crop = side("crop_size") if cfg.get("do_center_crop", True) else None
    found = crop or side("size")
    if found is None:
        raise ValueError(
            f"{file}: no image side in 'size' or 'crop_size' ({cfg.get('size')!r}, {cfg.get('crop_size')!r})"
        )
    return found


def normalise(
    pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], rescale: float = 1 / 255
) -> torch.Tensor:
    """Frames (N, 3, S, S) of bytes as an image processor normalises them: byte x rescale / std - mean / std per
    channel, in float32 (the ops of the HF processors' float path, so bit for bit on any device). Float frames are
    taken as normalised already and returned as they are."""
    if pixels.dtype != torch.uint8:
        return pixels
    out = pixels.float()
    for channel, (m, s) in enumerate(zip(mean, std, strict=True)):
        out[:, channel].mul_(rescale / s).add_(-m / s)
    return out


@dataclass(frozen=True)
class FrameTransform:
    """Pad to square with the mean colour (or, without `pad_to_square`, stretch), resize to `size` x `size`,
    rescale and normalise.

    Call on frames (T, H, W, 3) uint8; returns (T, 3, size, size) float32. `squared` stops before the rescale:
    (T, 3, size, size) uint8, what the data loaders hand over (a quarter of the bytes: 108 instead of 432 MiB for a
    batch of 8 x 32 frames at 384 px), normalised by the vision tower on the device (`normalise`).
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float = 1 / 255
    mode: str = "bicubic"
    pad_to_square: bool = True

    @classmethod
    def from_pretrained(cls, path: str | Path, pad_to_square: bool = True) -> FrameTransform:
        file = Path(path) / "preprocessor_config.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing: the vision checkpoint must carry its image-processor config")
        try:
            cfg = json.loads(file.read_text())
        except ValueError as err:
            raise ValueError(f"{file} is not JSON ({err}): copy it again from the checkpoint") from err
        side = image_side(cfg, file)
        return cls(
            size=side,
            mean=tuple(cfg.get("image_mean", (0.5, 0.5, 0.5))),
            std=tuple(cfg.get("image_std", (0.5, 0.5, 0.5))),
            rescale=float(cfg.get("rescale_factor", 1 / 255)),
            mode=_RESAMPLE.get(int(cfg.get("resample", 3)), "bicubic"),
            pad_to_square=pad_to_square,
        )

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        return normalise(self.squared(frames), self.mean, self.std, self.rescale)

    def squared(self, frames: np.ndarray) -> torch.Tensor:
        """(T, H, W, 3) uint8 to (T, 3, size, size) uint8, contiguous. Padding and resizing stay in uint8 and
        channels-last, as the HF processors' PIL path does: torch's antialiased uint8 resize matches PIL to one
        grey level, and is several times faster than resizing floats. Frames are squared a few at a time
        (`SQUARING_BYTES`), so that a clip's padded copies are never all held at once, and a frame longer than
        `MAX_SQUARE_SIDE` is first resized to it: a 2 x 16000 clip would otherwise pad to 768 MB a frame."""
        x = torch.from_numpy(np.require(frames, requirements=("C", "W")))  # (T, H, W, 3) uint8; PIL's are read-only
        n, h, w, _ = x.shape
        per_frame = max(h, w, self.size) ** 2 * 3
        step = max(1, SQUARING_BYTES // per_frame)
        out = torch.empty((n, 3, self.size, self.size), dtype=torch.uint8)
        for start in range(0, n, step):
            out[start : start + step].copy_(self._square(x[start : start + step]))  # contiguous (T, 3, S, S)
        return out

    def _resize(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(T, 3, H, W) uint8 to (T, 3, h, w), antialiased where the mode smooths."""
        smooth = {"antialias": True, "align_corners": False} if self.mode in ("bilinear", "bicubic") else {}
        return F.interpolate(x, size=(h, w), mode=self.mode, **smooth)

    def _square(self, x: torch.Tensor) -> torch.Tensor:
        """(T, H, W, 3) uint8 frames to (T, 3, size, size) uint8: padded to square (or stretched), resized."""
        n, h, w, _ = x.shape
        if h != w and self.pad_to_square:
            if max(h, w) > MAX_SQUARE_SIDE:
                ratio = MAX_SQUARE_SIDE / max(h, w)
                h, w = max(1, round(h * ratio)), max(1, round(w * ratio))
                x = self._resize(x.permute(0, 3, 1, 2), h, w).permute(0, 2, 3, 1)
            side = max(h, w)
            fill = torch.tensor([int(m / self.rescale) for m in self.mean], dtype=torch.uint8)  # LLaVA's expand2square
            top, left = (side - h) // 2, (side - w) // 2
            canvas = torch.empty((n, side, side, 3), dtype=torch.uint8)
            canvas[:, top : top + h, left : left + w] = x
            for rows, cols in (
                (slice(0, top), slice(None)),
                (slice(top + h, side), slice(None)),
                (slice(top, top + h), slice(0, left)),
                (slice(top, top + h), slice(left + w, side)),
            ):
                canvas[:, rows, cols] = fill  # the bands around the frame
            x = canvas
        x = x.permute(0, 3, 1, 2)  # (T, 3, H, W), channels-last in memory: the fast layout for uint8 resizing
        if x.shape[-2:] != (self.size, self.size):
            x = self._resize(x, self.size, self.size)
        return x
