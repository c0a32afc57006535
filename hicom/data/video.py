"""Video decoding and frame sampling.

A decoder is chosen by enum and imported lazily, so a worker only loads the library it uses. Readers are
opened inside the calling process (a DataLoader worker) and released before the call returns.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class VideoDecodeError(RuntimeError):
    """A video that cannot give the requested frames: missing, empty, corrupt, or without a video stream."""


class Decoder(str, enum.Enum):
    DECORD = "decord"
    PYAV = "pyav"


@dataclass(frozen=True)
class SampledFrames:
    """Frames of one clip: `frames` (T, H, W, 3) uint8, with the source indices and their times in seconds."""

    frames: np.ndarray
    indices: np.ndarray
    timestamps: np.ndarray


def uniform_indices(num_available: int, num_frames: int) -> np.ndarray:
    """The middle frame of each of `num_frames` equal segments of `num_available` frames.

    A clip shorter than the budget gives each of its frames once (no repeats): the model sees the clip as it is.
    """
    if num_available <= 0:
        raise VideoDecodeError("the video has no frames")
    if num_available <= num_frames:
        return np.arange(num_available)
    edges = np.linspace(0, num_available, num_frames + 1)
    return ((edges[:-1] + edges[1:]) / 2).astype(np.int64)


def _decode_decord(path: Path, num_frames: int) -> SampledFrames:
    import decord

    try:
        reader = decord.VideoReader(str(path), num_threads=1)
    except Exception as err:  # decord raises its own DECORDError, or RuntimeError, for unreadable files
        raise VideoDecodeError(f"{path}: {err}") from err
    try:
        indices = uniform_indices(len(reader), num_frames)
        fps = reader.get_avg_fps() or 1.0
        frames = reader.get_batch(indices.tolist()).asnumpy()
    except VideoDecodeError:
        raise
    except Exception as err:
        raise VideoDecodeError(f"{path}: {err}") from err
    finally:
        del reader
    return SampledFrames(frames=frames, indices=indices, timestamps=indices / fps)


def _decode_pyav(path: Path, num_frames: int) -> SampledFrames:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{path}: no video stream")
            stream = container.streams.video[0]
            decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
            fps = float(stream.average_rate or 1.0)
    except VideoDecodeError:
        raise
    except Exception as err:
        raise VideoDecodeError(f"{path}: {err}") from err
    indices = uniform_indices(len(decoded), num_frames)
    return SampledFrames(frames=np.stack([decoded[i] for i in indices]), indices=indices, timestamps=indices / fps)


def load_video(path: str | Path, num_frames: int, decoder: Decoder = Decoder.DECORD) -> SampledFrames:
    """Decode `num_frames` uniformly sampled frames of a video file, or raise VideoDecodeError."""
    path = Path(path)
    if not path.is_file():
        raise VideoDecodeError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise VideoDecodeError(f"{path}: empty file")
    decode = _decode_decord if Decoder(decoder) is Decoder.DECORD else _decode_pyav
    sampled = decode(path, num_frames)
    if sampled.frames.ndim != 4 or sampled.frames.shape[-1] != 3 or len(sampled.frames) == 0:
        raise VideoDecodeError(f"{path}: decoded an unexpected array of shape {sampled.frames.shape}")
    return sampled
