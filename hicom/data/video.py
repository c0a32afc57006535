"""Video decoding and frame sampling: video files (PyAV, or decord), folders of frames, and GIFs.

A decoder is chosen by enum and imported lazily, so a worker only loads the library it uses; readers are opened
inside the calling process (a DataLoader worker) and released before the call returns. Every failure is a
VideoDecodeError with a `reason`, which the dataset counts per reason.

Sampling (`FrameSampling`): within the clip, or within [start, end] seconds when a sample gives them,
- uniform (fps None): the middle frame of each of `num_frames` equal segments;
- fps: frames `1 / fps` seconds apart, and uniformly `num_frames` of them when there are more.
A clip with fewer frames than the budget still gives `num_frames` under uniform sampling, some of them twice (the
middle frames of N equal segments, as SPEC 7 says; the release repeats frames too, from midpoints of (n - 1) / N
rounded, one frame off in about a quarter of the indices), so a short clip gets the token count the model was
trained with; `repeat_frames=False` gives each of its frames once instead. Under fps sampling
`num_frames` is a cap, never a count to reach.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

from hicom.utils.choices import Choice, flag, positive, whole_number

log = logging.getLogger(__name__)
T = TypeVar("T")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# What load_video's `shrink` does to decoded frames: (n, H, W, 3) uint8 to a tensor of n smaller ones (the
# transform's `squared`, which the vision tower sees), applied as they are decoded, so that a clip's full-size
# frames are never all held at once: 32 frames of 4K video are 796 MB, twice that while decord copies them out.
Shrink = Callable[[np.ndarray], "torch.Tensor"]
# decoded frames held at once before `shrink` makes them smaller, at most (one frame where that is larger)
SHRINK_BYTES = 64 * 2**20


class VideoDecodeError(RuntimeError):
    """A clip that cannot give frames. `reason`: missing, empty (also a [start, end] window after the clip's end),
    wrong_extension (a still image under a video name; other bytes that are no video are undecodable),
    no_video_stream, undecodable, timeout, or malformed (a window that is not one: not numbers, negative, or start
    after end)."""

    def __init__(self, message: str, reason: str = "undecodable") -> None:
        super().__init__(message)
        self.reason = reason


class Decoder(Choice):
    DECORD = "decord"
    PYAV = "pyav"


@dataclass(frozen=True)
class FrameSampling:
    """Which frames a clip gives, and how they are decoded.

    `decoder` first, then `fallback` (None: no second try) when the first cannot decode a file. PyAV is the
    default: decord's batched seek returns wrong frames, with no error, for AVI files and for MPEG-4 Part 2 video
    with B-frames (dmlc/decord#195, #252), and it numbers frames wrongly in MPEG transport streams and in trimmed
    MP4s; the decord path refuses those files (`_check_decord_reads`), so they go to the fallback. Seeking PyAV to
    keyframes is faster on long clips (2.0 against 3.7 s for 32 frames of a 2-minute 640 x 360 clip), slower on
    tiny ones (7 against 3 ms for 8 frames at 112 px);
    `frame_folder_fps`: the rate of folders of frames (3 fps, MVBench's); `time_limit`: seconds one clip may
    take before it is given up as a timeout (None: no limit; see `within_time_limit`); `repeat_frames`: a clip
    shorter than `num_frames` repeats frames to make them (uniform sampling; see the module's docstring)."""

    num_frames: int = 8
    fps: float | None = None
    repeat_frames: bool = True
    decoder: Decoder = Decoder.PYAV
    fallback: Decoder | None = Decoder.DECORD
    frame_folder_fps: float = 3.0
    time_limit: float | None = 60.0

    def __post_init__(self) -> None:
        whole_number("num_frames", self.num_frames)
        if self.fps is not None and (
            isinstance(self.fps, bool) or not isinstance(self.fps, int | float) or not 0 < self.fps < math.inf
        ):
            raise ValueError(f"fps must be positive and finite, or None (uniform), got {self.fps!r}")
        if self.time_limit is not None and (
            isinstance(self.time_limit, bool)
            or not isinstance(self.time_limit, int | float)
            or not 0 < self.time_limit < math.inf
        ):  # inf would overflow the wait (every clip an error), NaN likewise
            raise ValueError(f"time_limit must be positive and finite, or None (no limit), got {self.time_limit!r}")
        flag("repeat_frames", self.repeat_frames)
        positive("frame_folder_fps (frames per second of a folder of frames)", self.frame_folder_fps)
        object.__setattr__(self, "decoder", Decoder(self.decoder))
        if self.fallback is not None:
            object.__setattr__(self, "fallback", Decoder.of(self.fallback, "fallback"))


DEFAULT_SAMPLING = FrameSampling()


@dataclass(frozen=True)
class SampledFrames:
    """Frames of one clip: `frames` (T, H, W, 3) uint8 (or, given a `shrink`, the (T, ...) tensor it made of them),
    with the source indices and their times in seconds, and the clip's frame rate and frame count (what decodes,
    where the decoder can tell)."""

    frames: np.ndarray | torch.Tensor
    indices: np.ndarray
    timestamps: np.ndarray
    fps: float = 0.0
    available: int = 0
    decoded: int = 0  # frames the decoder produced to get these (0: not counted)

    @property
    def duration(self) -> float:
        return self.available / self.fps if self.fps else 0.0


def uniform_indices(num_available: int, num_frames: int, repeat: bool = True) -> np.ndarray:
    """The middle frame of each of `num_frames` equal segments of `num_available` frames: with fewer frames than
    that, some of them twice, or without `repeat` each of them once."""
    if num_available <= 0:
        raise VideoDecodeError("the video has no frames", "empty")
    if num_available <= num_frames and not repeat:
        return np.arange(num_available)
    # segment i's middle, (i + 1/2) n / N, floored in integers: in floats a whole middle can fall just short of
    # itself (14 frames in 5: 6.999... for 7)
    return (num_available * (2 * np.arange(num_frames, dtype=np.int64) + 1)) // (2 * num_frames)


def sample_indices(
    num_available: int,
    fps: float,
    sampling: FrameSampling,
    start: float | None = None,
    end: float | None = None,
    times: np.ndarray | None = None,
) -> np.ndarray:
    """Frame indices for a clip of `num_available` frames at `fps`, within [start, end] seconds if given (`end` past
    the clip is taken as its end, as annotations round; `start` past it is an error, never a substitute frame).

    `times`: each frame's time in seconds from the first, for a clip whose frames are not evenly spaced (see
    `uneven_times`); the window and fps sampling then go by those times rather than by frame counts over `fps`.
    Uniform sampling stays the middle frame of each of N equal segments of the window's frames."""
    if num_available <= 0:  # a file cut before its first frame: no window to take one from
        raise VideoDecodeError("the video has no frames", "empty")
    span = num_available / fps if times is None else float(times[-1]) + 1 / fps
    if start is not None and start >= span:
        raise VideoDecodeError(f"the window [{start}, {end}] s starts after the clip's end ({span:.2f} s)", "empty")
    first, stop = 0, num_available
    if end is not None:  # past the clip is its end (and 1e308 x fps would overflow)
        end = min(end, span)
    if times is None:  # with slack as below: 4.6 s x 25 fps is 114.99999999999999 in floats, frame 115's start
        if start is not None:
            first = int(math.floor((start + _TIME_SLACK) * fps))
        if end is not None:
            stop = int(math.ceil((end - _TIME_SLACK) * fps))
    else:  # the frame on screen at `start`; the frames that start before `end`
        if start is not None:
            first = max(int(np.searchsorted(times, start + _TIME_SLACK, side="right")) - 1, 0)
        if end is not None:
            stop = int(np.searchsorted(times, end - _TIME_SLACK, side="left"))
    stop = max(min(stop, num_available), first + 1)
    window = stop - first
    if sampling.fps is None:
        return first + uniform_indices(window, sampling.num_frames, sampling.repeat_frames)
    if times is None:
        step = fps / sampling.fps  # source frames per sampled frame; the slack as for the window
        candidates = np.unique(np.floor(np.arange(0, window, max(step, 1.0)) + 1e-6).astype(np.int64))
    else:  # the frame on screen every 1 / fps seconds from the window's first
        shown = times[first:stop]
        ticks = np.arange(shown[0], shown[-1] + _TIME_SLACK, 1 / sampling.fps)
        candidates = np.unique(np.searchsorted(shown, ticks + _TIME_SLACK, side="right") - 1)
    chosen = candidates[uniform_indices(len(candidates), sampling.num_frames, repeat=False)]  # a cap
    return first + chosen


_TIME_SLACK = 1e-6  # seconds: frame times come from integer timestamps, windows from annotations


def uneven_times(times, fps: float) -> np.ndarray | None:
    """Frame times in seconds (sorted, from any origin) as seconds from the first frame, where they are not evenly
    spaced at `fps`: some frame more than half a frame off its place at that rate (a variable frame rate, a phone's
    recording, frames dropped); None where they are, and where there are none."""
    if times is None or len(times) == 0 or not fps:
        return None
    times = np.asarray(times, dtype=np.float64)
    times = times - times[0]
    return times if np.abs(times - np.arange(len(times)) / fps).max() > 0.5 / fps else None


def frame_times(indices: np.ndarray, fps: float, times: np.ndarray | None) -> np.ndarray:
    """The sampled frames' times in seconds: from the clip's own frame times where they are uneven."""
    return indices / fps if times is None else times[indices]


def check_window(start, end) -> None:
    """A sample's [start, end] seconds: each a number >= 0 or absent, start not after end."""
    for name, value in (("start", start), ("end", end)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf
        ):
            raise VideoDecodeError(f"'{name}' must be a number of seconds >= 0, got {value!r:.40}", "malformed")
    if start is not None and end is not None and start > end:
        raise VideoDecodeError(f"the window [{start}, {end}] s ends before it starts", "malformed")


_decoding = threading.local()  # in a thread of within_time_limit: `stop`, set once its caller has given up


class _GivenUp(BaseException):
    """Ends a decoding thread whose caller stopped waiting; a BaseException, so that no decoder's `except
    Exception` takes it for a decoding error (or tries its fallback decoder)."""


def _go_on() -> None:
    """Called between packets and frames by the decoders that loop in Python (PyAV, GIF, frame folders): raises
    _GivenUp in a thread whose caller has given up on it (see within_time_limit)."""
    stop = getattr(_decoding, "stop", None)
    if stop is not None and stop.is_set():
        raise _GivenUp


class _ShrinkFailed(BaseException):
    """Carries an error of load_video's `shrink` (a transform's bug, memory running out) past the decoders' `except
    Exception`, which would take it for an undecodable file and try the fallback decoder; load_video raises the
    error itself."""


class _Keeper:
    """How a decoder keeps the frames it decodes: as they are, or made smaller at once by `shrink` (see Shrink).
    Frames of another size than the first (a stream whose size changes part-way) are refused, as stacking them
    would refuse them (and squaring them one by one would pad each its own way)."""

    def __init__(self, path: Path, shrink: Shrink | None) -> None:
        self.path, self.shrink, self.size = path, shrink, None

    def __call__(self, frames: np.ndarray):
        """(n, H, W, 3) frames as kept: those frames, or what `shrink` made of them."""
        if self.size is None:
            self.size = frames.shape[1:]
        elif frames.shape[1:] != self.size:
            raise VideoDecodeError(
                f"{self.path}: frames of different sizes ({self.size[1]} x {self.size[0]}, then "
                f"{frames.shape[2]} x {frames.shape[1]})"
            )
        if self.shrink is None:
            return frames
        try:
            return self.shrink(frames)
        except Exception as err:
            raise _ShrinkFailed(err) from err

    def one(self, frame: np.ndarray):
        """One (H, W, 3) frame as kept."""
        return self(frame[None])[0]

    @staticmethod
    def stack(frames: list):
        """Frames kept one by one as one array, or one tensor where `shrink` made them tensors."""
        if frames and not isinstance(frames[0], np.ndarray):
            import torch

            return torch.stack(frames)
        return np.stack(frames)


def within_time_limit(fn: Callable[[], T], seconds: float | None, what: str) -> T:
    """`fn()`, or VideoDecodeError(reason="timeout") once it has run `seconds`.

    `fn` runs in a daemon thread and the caller waits for it with a timeout, so a decoder stuck inside native
    code (decord and PyAV release the GIL while they decode) or a read blocked on a dead mount cannot stall the
    DataLoader worker: the sample is skipped and the worker goes on. A decoder that is slow rather than stuck
    (PyAV, GIF, a folder of frames) stops at its next packet or frame once the caller has given up, so timed-out
    clips do not pile up threads that keep decoding; a thread stuck inside one native call cannot be killed and
    is left behind, to end with the worker.
    """
    if seconds is None:
        return fn()
    box: dict = {}
    stop = threading.Event()

    def target() -> None:
        _decoding.stop = stop
        try:
            value = fn()
        except BaseException as err:  # re-raised in the caller's thread, where it still waits
            if not stop.is_set():
                box["error"] = err
        else:  # a clip finished after its caller gave up is not kept (the timeout's traceback holds the box)
            if not stop.is_set():
                box["value"] = value

    thread = threading.Thread(target=target, name=f"decode {what}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        stop.set()
        raise VideoDecodeError(f"{what}: gave up after {seconds:g} s", "timeout")
    # The error is taken out of the box and dropped from this frame as it leaves: its traceback holds `target`'s
    # frame, which holds the box, and this one, and in either cycle a failed clip's decoder state (containers,
    # decoder threads, full-size frames) waited for the garbage collector.
    error = box.pop("error", None)
    if error is not None:
        try:
            raise error
        finally:
            del error
    return box.pop("value")


# Containers in which decord's frame index is not the display order: it returns other frames than those asked
# for, without an error (AVI: dmlc/decord#195, #252; MPEG transport and program streams count and order frames
# wrongly too). They are left to PyAV, as is MPEG-4 Part 2 video with B-frames (dmlc/decord#195).
DECORD_MISREADS = frozenset({"avi", "mpegts", "mpeg"})


def _check_decord_reads(path: Path) -> float | None:
    """A VideoDecodeError for a file whose frames decord would misnumber or mis-show: a container in
    DECORD_MISREADS, MPEG-4 Part 2 video with B-frames, a stream whose first frames an edit list hides (a clip
    trimmed without re-encoding; decord counts and returns the hidden frames), open GOPs (`_leading_frames`), or a
    display matrix that mirrors (decord turns frames but does not mirror them). Frames that share a timestamp are refused once decord has
    read them (`_decode_decord`). A file PyAV cannot open is left to decord. Returns the video's duration in
    seconds as its header declares it (None if none, or if PyAV cannot open the file), for
    `_check_whole_by_header`, so that a whole file is opened the PyAV way once."""
    import av

    try:
        with av.open(str(path)) as container:
            name, codec, reordered, first, matrix, declared = container.format.name, None, False, None, None, None
            leading = False
            if container.streams.video:
                stream = video_stream(container, path)  # only a cover picture: decord would read it as the video
                declared = _declared_seconds(container, stream)
                codec, reordered = stream.codec_context.name, bool(stream.codec_context.has_b_frames)
                first = next((p.pts for p in container.demux(stream) if p.pts is not None), None)
                container.seek(0, stream=stream)
                leading = reordered and _leading_frames(container.demux(stream))
                container.seek(0, stream=stream)
                matrix = _display_matrix(next(container.decode(stream), None))
    except VideoDecodeError:
        raise
    except Exception:  # noqa: BLE001  not readable the PyAV way: decord may still read it
        return None
    if matrix is not None and int(matrix[0]) * int(matrix[4]) - int(matrix[1]) * int(matrix[3]) < 0:
        raise VideoDecodeError(
            f"{path}: its display matrix mirrors the picture, which decord does not; decode it with pyav"
        )
    if set(name.split(",")) & DECORD_MISREADS or (codec == "mpeg4" and reordered):
        what = f"{name} files" if set(name.split(",")) & DECORD_MISREADS else "MPEG-4 Part 2 video with B-frames"
        raise VideoDecodeError(f"{path}: decord misnumbers the frames of {what}; decode it with pyav")
    if first is not None and first < 0:
        raise VideoDecodeError(
            f"{path}: an edit list hides its first frames, which decord returns; decode it with pyav"
        )
    if leading:
        raise VideoDecodeError(
            f"{path}: open GOPs (frames decoded after a keyframe but shown before it), where decord returns other "
            "frames than those asked for; decode it with pyav"
        )
    return declared


def _leading_frames(packets, most: int = 2000) -> bool:
    """Whether a frame decoded after a keyframe other than the first is shown before it: the leading frames of an
    open GOP (x265's default, broadcast H.264), across which decord's seeks land on other frames. An encoder
    setting, so the first `most` packets tell (demuxed, not decoded: about a minute of video at 30 fps); every
    keyframe among them is looked at, since an encoder may close the first GOPs and open later ones (x264's
    open-gop with short keyframe intervals, whose sixth keyframe was the first open one in a test clip)."""
    first, key = True, None  # the stream's first keyframe has nothing before it to show
    for packet in itertools.islice(packets, most):
        if packet.pts is None:
            continue
        if packet.is_keyframe:
            key, first = None if first else packet.pts, False
        elif key is not None and packet.pts < key:
            return True
    return False


def _decode_decord(path: Path, sampling: FrameSampling, start, end, keep: _Keeper) -> SampledFrames:
    import decord

    declared = _check_decord_reads(path)
    try:
        reader = decord.VideoReader(str(path), num_threads=1)
    except Exception as err:  # decord raises its own DECORDError, or RuntimeError, for unreadable files
        raise VideoDecodeError(f"{path}: {err}") from err
    try:
        fps = reader.get_avg_fps() or 1.0
        times = None
        if len(reader):  # decord reads what is left of a file cut short without a word: compare with its header
            spans = reader.get_frame_timestamp(np.arange(len(reader)))  # (n, 2): each frame's start, end in seconds
            _check_whole_by_header(path, declared, float(spans[-1, 1]), len(reader) / fps, fps)
            if len(np.unique(spans[:, 0])) < len(spans):  # decord finds frames by time: it returns a neighbour
                raise VideoDecodeError(f"{path}: frames share timestamps, which decord confuses; decode it with pyav")
            times = uneven_times(spans[:, 0], fps)
        indices = sample_indices(len(reader), fps, sampling, start, end, times)
        frames = _decord_frames(reader, indices.tolist(), keep)
    except VideoDecodeError:
        raise
    except Exception as err:  # frames the container claims but cannot decode, among others
        raise VideoDecodeError(f"{path}: {err}") from err
    finally:
        count = len(reader)
        del reader
    return SampledFrames(frames, indices, frame_times(indices, fps, times), fps, count)


def _decord_frames(reader, indices: list[int], keep: _Keeper):
    """decord's frames at `indices`, kept: all at once, or where they are shrunk a few at a time (SHRINK_BYTES),
    each batch shrunk before the next is decoded (the first frame, decoded alone, tells their size)."""
    if keep.shrink is None:
        return keep(reader.get_batch(indices).asnumpy())
    import torch

    first = reader.get_batch(indices[:1]).asnumpy()
    step = max(1, SHRINK_BYTES // max(first.nbytes, 1))
    parts = [keep(first)]
    for at in range(1, len(indices), step):
        _go_on()  # a clip given up on stops here, not after its last batch
        parts.append(keep(reader.get_batch(indices[at : at + step]).asnumpy()))
    return torch.cat(parts)


def _decode_pyav(path: Path, sampling: FrameSampling, start, end, keep: _Keeper) -> SampledFrames:
    """Reads the stream's packets without decoding them: their count, and the timestamps of the frames and of the
    keyframes. Each sampled frame is then reached by seeking to the keyframe before it whenever one lies between
    the last decoded frame and it, so a long video is not decoded end to end. When a sampled frame does not come
    out of the decoder (a truncated or damaged file), the frames are decoded in order and the sample is taken
    again from those that do decode."""
    import av

    try:
        with av.open(str(path)) as container:
            if container.format.name == "image2" or container.format.name.endswith("_pipe"):
                raise VideoDecodeError(f"{path}: holds a still image ({container.format.name})", "wrong_extension")
            stream = video_stream(container, path)
            fps = float(stream.average_rate or stream.guessed_rate or 1.0)
            time_base = stream.time_base
            packets, covered = _scan_packets(stream)
            check_whole(path, covered, _declared_seconds(container, stream), fps)
        timestamps = sorted(pts for pts, _ in packets if pts is not None)
        keyframes = np.array(sorted(pts for pts, key in packets if key and pts is not None))
        # seeking finds a frame by its timestamp: only where every frame has its own
        seekable = len(timestamps) == len(packets) and len(set(timestamps)) == len(timestamps)
        times = uneven_times(np.array(timestamps) * float(time_base), fps) if seekable and time_base else None
        indices = sample_indices(len(packets), fps, sampling, start, end, times)
        damaged = _Damaged(path)
        if seekable:
            frames, decoded = _pyav_seek(path, [timestamps[i] for i in indices.tolist()], keyframes, keep, damaged)
            if frames is not None:
                damaged.say()
                return SampledFrames(
                    keep.stack(frames), indices, frame_times(indices, fps, times), fps, len(packets), decoded
                )
        keep = _Keeper(path, keep.shrink)
        sampled = _pyav_in_order(path, sampling, start, end, fps, len(packets), times, keep, damaged)
        damaged.say()
        return sampled
    except VideoDecodeError:
        raise
    except Exception as err:
        raise VideoDecodeError(f"{path}: {err}") from err


class _Damaged:
    """The packets of one clip the decoder refused (a damaged packet: InvalidDataError), which `frames` passes over
    as ffmpeg does rather than give up the clip; said once per clip, with how many."""

    def __init__(self, path: Path) -> None:
        self.path, self.count = path, 0

    def frames(self, container, stream) -> Iterator:
        """The stream's frames from the container's position on, as container.decode gives them but for the
        packets the decoder refuses (the frames after one may show its damage, as in any player)."""
        import av

        for packet in container.demux(stream):
            try:
                decoded = packet.decode()
            except av.error.InvalidDataError:
                self.count += 1
                continue
            yield from decoded

    def say(self) -> None:
        if self.count:
            log.warning("%s: %d damaged packet(s) passed over, as a player does", self.path, self.count)


def video_stream(container, path: Path):
    """The container's first video stream that moves: a cover picture (an audio file's or a download's embedded
    thumbnail, which PyAV lists as a one-frame video stream marked `attached_pic`) is not the video; a
    VideoDecodeError (no_video_stream) where there is none other."""
    import av

    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    covers = " (only a cover picture)" if container.streams.video else ""
    raise VideoDecodeError(f"{path}: no video stream{covers}", "no_video_stream")


def _scan_packets(stream) -> tuple[list[tuple[int | None, bool]], float | None]:
    """The stream's frame packets as (timestamp, is keyframe), read without decoding, and the seconds they cover."""
    packets, first, last = [], 0, None  # not start / end: those are the sample's window
    for p in stream.container.demux(stream):
        _go_on()
        if p.pts is not None:
            first = min(first, p.pts)
            last = max(last if last is not None else p.pts, p.pts + (p.duration or 0))
        if p.size:  # empty ones: the flush packet, and an AVI writer's fill for a variable frame rate
            packets.append((p.pts, p.is_keyframe))
    # to the last frame's end, from the first frame's time where it is negative (an edit list's pre-roll) and from 0
    # otherwise: headers declare either span (stream.start_time can even be seconds off), and the longer reading is
    # taken, so that only a file ending early is called cut
    covered = float((last - first) * stream.time_base) if last is not None and stream.time_base else None
    return packets, covered


def _check_whole_by_header(path: Path, declared: float | None, last_end: float, counted: float, fps: float) -> None:
    """check_whole for a file decord read: `declared`, the duration its header declares (`_check_decord_reads`),
    `last_end`, its last frame's end, and `counted`, its frames over its rate, in seconds. decord's frame times
    start at the stream's start, AVI frames get none and a cut Matroska file can end on one of 10^15 s, so a time
    past the declared duration is no reading, and a file the longer reading calls short is read again the PyAV way
    (packets, no decoding) before it is called cut; a whole one costs nothing more."""
    if not declared:
        return
    readings = [counted] + ([last_end] if math.isfinite(last_end) and last_end <= 1.05 * declared else [])
    if not _short(max(readings), declared, fps):
        return
    import av

    try:
        with av.open(str(path)) as container:
            covered = _scan_packets(video_stream(container, path))[1]
    except Exception:  # noqa: BLE001  a file PyAV cannot read is not called cut: decord decoded it
        return
    check_whole(path, covered, declared, fps)


def _declared_seconds(container, stream) -> float | None:
    """The video stream's duration as the file's header declares it: the stream's own, or Matroska's DURATION
    tag, or the file's where the video is its only stream (an audio track may outlast the video); None if none."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if match := re.fullmatch(r"(\d+):(\d+):(\d+(?:\.\d+)?)", str(stream.metadata.get("DURATION", "")).strip()):
        return int(match[1]) * 3600 + int(match[2]) * 60 + float(match[3])
    if container.duration and len(container.streams) == 1:  # microseconds
        return container.duration / 1e6
    return None


def _short(covered: float, declared: float, fps: float) -> bool:
    return declared - covered > max(2 / fps, 0.05 * declared)


def check_whole(path: Path, covered: float | None, declared: float | None, fps: float) -> None:
    """A file cut short (a copy interrupted, a download stopped) is skipped as truncated, not sampled from the
    part that is left: its annotation describes the whole clip. Time, not frame counts, is compared (the end of
    the last packet against the declared duration), so variable frame rates and dropped frames pass; headers
    round, so a shortfall of up to 2 frames or 5 % passes too."""
    if covered is not None and declared and _short(covered, declared, fps):
        raise VideoDecodeError(
            f"{path}: truncated: its frames cover {covered:.2f} s of the {declared:.2f} s its header declares",
            "truncated",
        )


def _pyav_seek(
    path: Path, targets: list[int], keyframes: np.ndarray, keep: _Keeper, damaged: _Damaged
) -> tuple[list | None, int]:
    """The frames whose timestamps are `targets` (sorted), each kept, or None when one of them does not decode;
    and how many frames were decoded."""
    import av

    found: dict[int, np.ndarray] = {}
    count, shown = 0, _Shown()
    with av.open(str(path)) as container:
        stream = video_stream(container, path)
        position = None  # timestamp of the last frame decoded
        decoded = None  # one frame iterator, kept across targets until a seek (a second one would flush twice)
        for target in targets:
            if target in found:
                continue
            skip = position is None or position >= target
            if not skip:  # a keyframe after the decoder's position and at or before the target: jump to it
                after = np.searchsorted(keyframes, position, side="right")
                skip = after < len(keyframes) and keyframes[after] <= target
            if skip:
                container.seek(int(target), stream=stream, backward=True, any_frame=False)
                decoded = damaged.frames(container, stream)
            for frame in decoded:
                _go_on()
                count += 1
                position = frame.pts
                if frame.pts is None or frame.pts > target:
                    return None, count
                if frame.pts == target:
                    found[target] = keep.one(shown.rgb(frame))
                    break
            else:
                return None, count
    return [found[t] for t in targets], count


class _Shown:
    """A clip's decoded frames as (H, W, 3) uint8, shown as its stream's display matrix says (a phone's portrait
    video is stored landscape; an editor may mirror it): what a player shows, and what ffmpeg's autorotate makes.
    The matrix is read once, from the clip's first frame. The conversion runs on the calling thread: a loader's
    workers are the parallelism, as decord's one thread each."""

    def __init__(self) -> None:
        self.read, self.matrix, self.rotation = False, None, 0

    def rgb(self, frame) -> np.ndarray:
        if not self.read:
            self.read, self.matrix, self.rotation = True, _display_matrix(frame), getattr(frame, "rotation", 0) or 0
        return _as_displayed(frame.to_ndarray(format="rgb24", threads=1), self.matrix, self.rotation)


def _display_matrix(frame) -> np.ndarray | None:
    """The frame's display matrix (ffmpeg's 3 x 3, 16.16 fixed point, row-major), or None; read from a 2 x 2 copy,
    which carries the frame's side data. PyAV holds a frame whose side data was read in a reference cycle with it,
    so that the frame, its picture and its converter's threads lived until the garbage collector ran: a loader
    worker decoding 720p clips grew to hundreds of threads and 800 MB more memory between collections."""
    if frame is None:
        return None
    for data in frame.reformat(width=2, height=2, format="rgb24", threads=1).side_data:
        if str(getattr(data, "type", "")).endswith("DISPLAYMATRIX"):
            return np.frombuffer(bytes(data), dtype=np.int32)
    return None


def _as_displayed(rgb: np.ndarray, matrix: np.ndarray | None, rotation: float) -> np.ndarray:
    """`rgb` turned and mirrored as ffmpeg's autorotate does for a display matrix whose rotation (counterclockwise,
    as PyAV reads it) is `rotation` degrees: a quarter turn (mirrored where the matrix's second row says so), half
    a turn as two mirrors, or a mirror alone."""
    if matrix is None and not rotation:
        return rgb
    theta = round(-rotation / 90) % 4  # quarter turns clockwise
    # with a quarter turn, the sign of the matrix's second row picks ffmpeg's mirrored turn (transpose *_flip)
    if theta == 1:
        out = np.rot90(rgb, 1)[::-1] if matrix is not None and matrix[3] > 0 else np.rot90(rgb, -1)
    elif theta == 3:
        out = np.rot90(rgb, -1)[::-1] if matrix is not None and matrix[3] < 0 else np.rot90(rgb, 1)
    else:
        out = rgb
        if theta == 2 and (matrix is None or matrix[0] < 0):
            out = out[:, ::-1]
        if (theta == 2 and matrix is None) or (matrix is not None and matrix[4] < 0):
            out = out[::-1]
    return out if out is rgb else np.ascontiguousarray(out)


def _pyav_in_order(
    path: Path,
    sampling: FrameSampling,
    start,
    end,
    fps: float,
    counted: int,
    times: np.ndarray | None,
    keep: _Keeper,
    damaged: _Damaged,
) -> SampledFrames:
    """Decodes in order up to the last sampled frame, converting only the sampled ones; samples again from what
    decodes when that is fewer frames than counted (by frame counts then: the frame times were the container's)."""
    import av

    for _ in range(2):
        indices = sample_indices(counted, fps, sampling, start, end, times)
        wanted = set(indices.tolist())
        frames, decoded, shown = {}, 0, _Shown()
        damaged.count = 0  # this pass's
        with av.open(str(path)) as container:
            for frame in damaged.frames(container, video_stream(container, path)):
                _go_on()
                if decoded in wanted:
                    frames[decoded] = keep.one(shown.rgb(frame))
                decoded += 1
                if decoded > indices[-1]:
                    break
        if len(frames) == len(wanted):  # a short clip's indices repeat
            stacked = keep.stack([frames[i] for i in indices])
            return SampledFrames(stacked, indices, frame_times(indices, fps, times), fps, counted, decoded)
        if decoded == 0:
            raise VideoDecodeError(f"{path}: no frame decodes", "undecodable")
        counted, times = decoded, None  # what decodes, not what the container holds
    raise VideoDecodeError(f"{path}: frames keep failing to decode")


def _animated(path: Path) -> bool:
    """Whether Pillow reads more than one frame from an image file (False where it cannot read it)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return bool(getattr(image, "is_animated", False))
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def _decode_gif(path: Path, sampling: FrameSampling, start, end, keep: _Keeper) -> SampledFrames:
    from PIL import Image, ImageSequence

    try:
        with Image.open(path) as image:
            durations = [frame.info.get("duration", 100) or 100 for frame in ImageSequence.Iterator(image)]
            fps = 1000.0 / (sum(durations) / len(durations))
            times = uneven_times(np.cumsum([0, *durations[:-1]]) / 1000.0, fps)
            indices = sample_indices(len(durations), fps, sampling, start, end, times)
            frames = []
            for i in indices.tolist():
                _go_on()
                image.seek(i)
                frames.append(keep.one(_shown_rgb(image)))  # a transparent background over white, as an image's
    except (OSError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise VideoDecodeError(f"{path}: {err}") from err
    return SampledFrames(keep.stack(frames), indices, frame_times(indices, fps, times), fps, len(durations))


def frame_order(path: Path) -> list:
    """Frames in time order: numbers within names compare as numbers (2.jpg before 10.jpg)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", path.name) if part]


def _shown_rgb(image) -> np.ndarray:
    """A PIL image's RGB pixels, any transparent ones over white (see read_rgb)."""
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def read_rgb(path: Path) -> np.ndarray:
    """One image file as (H, W, 3) uint8, as a viewer shows it: turned as its EXIF orientation says (a phone's
    portrait photo is stored sideways), and transparent pixels over white, as transformers' image processors
    (`convert_to_rgb`) put them (their colour under the transparency, black or a palette's key colour, is no part
    of the picture); or a VideoDecodeError naming it."""
    from PIL import ExifTags, Image, ImageOps

    try:
        with Image.open(path) as image:
            if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit grey (PNG): convert() would clip at 255
                grey = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
                return np.repeat(((grey * 255 + 32767) // 65535).astype(np.uint8)[..., None], 3, axis=-1)
            if image.mode == "F":
                raise VideoDecodeError(f"{path}: floating-point pixels (mode F) have no 8-bit colour to read")
            return _shown_rgb(image)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise VideoDecodeError(f"{path}: {err}") from err


def _read_folder(path: Path, sampling: FrameSampling, start, end, keep: _Keeper) -> SampledFrames:
    files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=frame_order)
    if not files:
        raise VideoDecodeError(f"{path}: a folder without frames", "empty")
    fps = sampling.frame_folder_fps
    found = [re.findall(r"\d+", p.stem) for p in files]
    numbers = np.array([int(n[-1]) for n in found]) if all(found) else None
    times = None  # where the names number the frames in order, a frame's time is its number's: a gap is time passed
    if numbers is not None and np.all(np.diff(numbers) > 0):
        times = uneven_times((numbers - numbers[0]) / fps, fps)
    indices = sample_indices(len(files), fps, sampling, start, end, times)
    frames = []
    for i in indices.tolist():
        _go_on()
        frames.append(keep.one(read_rgb(files[i])))
    return SampledFrames(keep.stack(frames), indices, frame_times(indices, fps, times), fps, len(files))


_DECODERS = {Decoder.DECORD: _decode_decord, Decoder.PYAV: _decode_pyav}


def not_a_file(path: Path) -> VideoDecodeError:
    """The error for a media path that is not a regular file: absent, or a pipe, socket or device (never opened:
    reading a pipe could block)."""
    return VideoDecodeError(f"{path}: {'not a regular file' if path.exists() else 'file not found'}", "missing")


def _load(
    path: Path, sampling: FrameSampling, start: float | None, end: float | None, shrink: Shrink | None
) -> SampledFrames:
    if path.is_dir():
        return _read_folder(path, sampling, start, end, _Keeper(path, shrink))
    if not path.is_file():
        raise not_a_file(path)
    if path.stat().st_size == 0:
        raise VideoDecodeError(f"{path}: empty file", "empty")
    if path.suffix.lower() == ".gif" or path.suffix.lower() == ".webp" and _animated(path):  # FFmpeg: no animated WebP
        return _decode_gif(path, sampling, start, end, _Keeper(path, shrink))
    try:  # each decoder keeps its frames afresh
        return _DECODERS[sampling.decoder](path, sampling, start, end, _Keeper(path, shrink))
    except VideoDecodeError as first:
        if sampling.fallback is None or sampling.fallback is sampling.decoder or first.reason == "truncated":
            raise  # a file cut short is so for every decoder
        try:
            return _DECODERS[sampling.fallback](path, sampling, start, end, _Keeper(path, shrink))
        except VideoDecodeError as second:
            reason = second.reason if second.reason != "undecodable" else first.reason
            raise VideoDecodeError(f"{first}; {sampling.fallback.value}: {second}", reason) from second


def load_video(
    path: str | Path,
    sampling: FrameSampling | int = DEFAULT_SAMPLING,
    decoder: Decoder | None = None,
    *,
    start: float | None = None,
    end: float | None = None,
    shrink: Shrink | None = None,
) -> SampledFrames:
    """Sampled frames of a video file, a folder of frames, a GIF or an animated WebP, or VideoDecodeError.

    `sampling` may be a frame count (uniform sampling with the default decoders); `decoder` overrides its decoder.
    `shrink` (see `Shrink`), where given, is applied to the frames as they are decoded, and `frames` is what it
    made of them: the same values as applying it to the whole clip's frames afterwards, for a function of each
    frame alone, without holding them all at full size.
    """
    if isinstance(sampling, int):
        sampling = FrameSampling(num_frames=sampling)
    if decoder is not None:
        sampling = FrameSampling(**{**sampling.__dict__, "decoder": Decoder(decoder)})
    check_window(start, end)
    path = Path(path)
    try:
        sampled = within_time_limit(lambda: _load(path, sampling, start, end, shrink), sampling.time_limit, str(path))
    except _ShrinkFailed as failed:  # not the file's fault: the sample fails as an error, the clip is not retried
        raise failed.args[0] from None
    frames = sampled.frames
    if len(frames) == 0 or (shrink is None and (frames.ndim != 4 or frames.shape[-1] != 3)):
        raise VideoDecodeError(f"{path}: decoded an unexpected array of shape {tuple(frames.shape)}")
    return sampled
