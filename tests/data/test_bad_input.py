"""Every kind of bad input is skipped with its reason; decoding samples what the files hold; per-turn masking."""

import json

import av
import numpy as np
import pytest
import torch

from hicom.data.dataset import VideoQADataset
from hicom.data.index import MixtureEntry, SampleIndex
from hicom.data.synthetic import write_video
from hicom.data.template import IGNORE_INDEX, ChatEncoder, to_messages
from hicom.data.transforms import FrameTransform
from hicom.data.video import Decoder, FrameSampling, VideoDecodeError, load_video

QA = [{"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": "A circle."}]


def counting_frames(n: int, size: int = 32) -> np.ndarray:
    """Frames whose brightness encodes their index (10 * i), to check which frames come back."""
    frames = np.zeros((n, size, size, 3), dtype=np.uint8)
    frames += (np.arange(n, dtype=np.uint8) * 10)[:, None, None, None]
    return frames


def frame_ids(frames: np.ndarray) -> list[int]:
    return [round(float(f.mean()) / 10) for f in frames]


def write_with_cover(path, frames: np.ndarray | None) -> None:
    """An mp4 with a cover picture (`attached_pic`, as an audio download's or an embedded thumbnail is), `frames`
    as H.264 when given, and an audio track."""
    with av.open(str(path), "w") as container:
        cover = container.add_stream("mjpeg", rate=1)
        cover.width = cover.height = 32
        cover.pix_fmt = "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        video = None
        if frames is not None:
            video = container.add_stream("libx264", rate=10)
            video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        audio = container.add_stream("aac", rate=16000)
        still = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 250, dtype=np.uint8), format="rgb24")
        for packet in [*cover.encode(still), *cover.encode(None)]:
            container.mux(packet)
        for i, array in enumerate(frames if frames is not None else ()):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = i
            container.mux(video.encode(frame))
        if video is not None:
            container.mux(video.encode(None))
        sound = av.AudioFrame.from_ndarray(np.zeros((1, 16000), dtype=np.float32), format="fltp", layout="mono")
        sound.sample_rate = 16000
        container.mux([*audio.encode(sound), *audio.encode(None)])


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    write_video(root / "good.mp4", counting_frames(20), fps=10)
    (root / "empty.mp4").write_bytes(b"")
    data = (root / "good.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (root / "garbage.mp4").write_bytes(b"\x00\x01garbage" * 100)
    (root / "notes.txt").write_text("not a video")
    from PIL import Image

    Image.fromarray(counting_frames(1)[0]).save(root / "still.png")
    (root / "still.mp4").write_bytes((root / "still.png").read_bytes())
    with av.open(str(root / "audio.mp4"), "w") as container:  # an mp4 with only an audio stream
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    write_with_cover(root / "cover.mp4", None)  # an audio file with its cover picture: no video
    write_with_cover(root / "thumbnailed.mp4", counting_frames(20))  # a video with its thumbnail
    folder = root / "frames"
    folder.mkdir()
    for i, frame in enumerate(counting_frames(12)):
        Image.fromarray(frame).save(folder / f"{i + 1:05d}.jpg", quality=100)
    images = [Image.fromarray(f) for f in counting_frames(6)]
    images[0].save(root / "clip.gif", save_all=True, append_images=images[1:], duration=100, loop=0)
    images[0].save(root / "clip.webp", save_all=True, append_images=images[1:], duration=100, lossless=True)
    images[0].save(root / "still.webp", lossless=True)
    return root


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("nowhere.mp4", "missing"),
        ("empty.mp4", "empty"),
        ("truncated.mp4", "undecodable"),
        ("garbage.mp4", "undecodable"),
        ("notes.txt", "undecodable"),
        ("still.mp4", "wrong_extension"),
        ("still.webp", "wrong_extension"),
        ("audio.mp4", "no_video_stream"),
        ("cover.mp4", "no_video_stream"),
    ],
)
@pytest.mark.parametrize("decoder", list(Decoder))
def test_bad_files_fail_with_their_reason(media, name, reason, decoder):
    other = next(d for d in Decoder if d is not decoder)  # either decoder first, the other as the fallback
    with pytest.raises(VideoDecodeError) as error:
        load_video(media / name, FrameSampling(num_frames=4, decoder=decoder, fallback=other))
    assert error.value.reason == reason, str(error.value)


@pytest.mark.parametrize("decoder", list(Decoder))
def test_a_cover_picture_is_not_the_video(media, decoder):
    """A video with an embedded thumbnail: the frames come from the video, not the picture repeated (an audio file
    with a cover picture, whose one video stream is that picture, was read as a clip of one still frame)."""
    sampled = load_video(media / "thumbnailed.mp4", FrameSampling(num_frames=4, decoder=decoder, fallback=None))
    assert frame_ids(sampled.frames) == [2, 7, 12, 17] and sampled.available == 20 and sampled.fps == 10


def test_a_decoder_stuck_in_native_code_is_abandoned_not_waited_for(media, monkeypatch):
    import time

    from hicom.data import video

    def stuck(path, sampling, start, end, shrink):
        time.sleep(30)  # a call that never comes back to Python (it releases the GIL, as decoders do)

    monkeypatch.setitem(video._DECODERS, FrameSampling().decoder, stuck)
    began = time.perf_counter()
    with pytest.raises(VideoDecodeError) as error:
        load_video(media / "good.mp4", FrameSampling(num_frames=4, time_limit=0.3))
    assert error.value.reason == "timeout" and time.perf_counter() - began < 2


@pytest.mark.parametrize(("name", "num_frames"), [("good.mp4", 8), ("clip.gif", 6), ("frames", 8)])
def test_a_slow_decode_given_up_on_stops_at_its_next_frame(media, monkeypatch, name, num_frames):
    """Timed-out clips must not pile up threads that go on decoding in the worker: a decoder that loops in Python
    stops at its next packet or frame once the caller has given up."""
    import threading
    import time

    from hicom.data import video

    go_on = video._go_on

    def slowly() -> None:  # each packet or frame takes 0.25 s: the whole clip would take 1.5-5 s
        time.sleep(0.25)
        go_on()

    monkeypatch.setattr(video, "_go_on", slowly)
    path = media / name
    before = set(threading.enumerate())  # an earlier test's stuck decoder may still be sleeping
    with pytest.raises(VideoDecodeError) as error:
        load_video(path, FrameSampling(num_frames=num_frames, time_limit=0.3, decoder=Decoder.PYAV))
    assert error.value.reason == "timeout"
    (thread,) = [t for t in set(threading.enumerate()) - before if t.name == f"decode {path}"]
    thread.join(0.5)
    assert not thread.is_alive()


def test_a_clip_over_its_time_limit_is_given_up(media):
    with pytest.raises(VideoDecodeError) as error:
        load_video(media / "good.mp4", FrameSampling(num_frames=4, time_limit=1e-6, decoder=Decoder.PYAV))
    assert error.value.reason == "timeout"
    assert len(load_video(media / "good.mp4", FrameSampling(num_frames=4)).frames) == 4  # the alarm is gone


@pytest.mark.parametrize("decoder", list(Decoder))
def test_both_decoders_sample_the_same_frames(media, decoder):
    uniform = load_video(media / "good.mp4", FrameSampling(num_frames=4, decoder=decoder, fallback=None))
    assert uniform.indices.tolist() == [2, 7, 12, 17]  # the middle frame of each of 4 segments of 20
    assert frame_ids(uniform.frames) == [2, 7, 12, 17]
    rate = load_video(media / "good.mp4", FrameSampling(num_frames=32, fps=2, decoder=decoder, fallback=None))
    assert rate.indices.tolist() == [0, 5, 10, 15]  # 2 fps of a 10 fps clip
    window = load_video(media / "good.mp4", FrameSampling(num_frames=2, decoder=decoder), start=1.0, end=1.4)
    assert window.indices.tolist() == [11, 13] and frame_ids(window.frames) == [11, 13]
    short = load_video(media / "good.mp4", FrameSampling(num_frames=32, decoder=decoder, fallback=None))
    expected = [int((k + 0.5) * 20 / 32) for k in range(32)]  # fewer frames than the budget: some twice
    assert short.indices.tolist() == expected and frame_ids(short.frames) == expected
    once = FrameSampling(num_frames=32, decoder=decoder, fallback=None, repeat_frames=False)
    assert load_video(media / "good.mp4", once).indices.tolist() == list(range(20))
    window = load_video(media / "good.mp4", FrameSampling(num_frames=8, decoder=decoder), start=1.0, end=1.4)
    assert frame_ids(window.frames) == [10, 10, 11, 11, 12, 12, 13, 13]  # a window of 4 frames
    for folder in (media / "frames", media / "clip.gif"):  # 12 and 6 frames, 16 asked
        assert len(load_video(folder, FrameSampling(num_frames=16)).frames) == 16
    assert load_video(media / "good.mp4", FrameSampling(num_frames=32, fps=2)).indices.tolist() == [0, 5, 10, 15]


def test_pyav_seeks_through_long_videos_instead_of_decoding_them_whole(tmp_path):
    frames = (
        np.zeros((300, 32, 32, 3), dtype=np.uint8) + ((np.arange(300) % 25) * 10).astype(np.uint8)[:, None, None, None]
    )
    with av.open(str(tmp_path / "long.mp4"), "w") as container:  # a keyframe every 30 frames
        stream = container.add_stream("libx264", rate=30, options={"g": "30", "crf": "10", "preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    sampling = FrameSampling(num_frames=4, decoder=Decoder.PYAV, fallback=None)
    sampled = load_video(tmp_path / "long.mp4", sampling)
    assert sampled.indices.tolist() == [37, 112, 187, 262] and sampled.available == 300
    assert frame_ids(sampled.frames) == [i % 25 for i in sampled.indices.tolist()]
    assert 0 < sampled.decoded < 150  # from the keyframe before each sampled frame, not all 300
    decord = load_video(tmp_path / "long.mp4", FrameSampling(num_frames=4, decoder=Decoder.DECORD, fallback=None))
    assert np.abs(decord.frames.astype(int) - sampled.frames.astype(int)).max() <= 2


def _encode(path, frames: np.ndarray, codec: str, **options: str) -> None:
    with av.open(str(path), "w", options={"movflags": "faststart"} if path.suffix == ".mp4" else {}) as container:
        stream = container.add_stream(codec, rate=10, options=options)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


@pytest.mark.parametrize(
    ("name", "codec", "options"),
    [("h264.avi", "libx264", {"bf": "3", "g": "8"}), ("mpeg4.mp4", "mpeg4", {"bf": "2", "g": "8", "qscale": "2"})],
)
def test_files_decord_seeks_wrongly_in_give_the_sampled_frames_by_default(tmp_path, name, codec, options):
    """decord's batched seek returns other frames, without an error, from these files (dmlc/decord#195, #252):
    the default decoder is PyAV, and the decord path refuses them, so that they go to its fallback."""
    _encode(tmp_path / name, counting_frames(24), codec, **options)
    sampled = load_video(tmp_path / name, FrameSampling(num_frames=6))
    assert frame_ids(sampled.frames) == sampled.indices.tolist() == [2, 6, 10, 14, 18, 22]
    decord_first = load_video(
        tmp_path / name, FrameSampling(num_frames=6, decoder=Decoder.DECORD, fallback=Decoder.PYAV)
    )
    assert frame_ids(decord_first.frames) == [2, 6, 10, 14, 18, 22]
    with pytest.raises(VideoDecodeError, match="decord misnumbers the frames"):
        load_video(tmp_path / name, FrameSampling(num_frames=6, decoder=Decoder.DECORD, fallback=None))


def binary_frames(n: int) -> np.ndarray:
    """64 x 64 frames that show their index in binary, a 16 x 16 block per bit (white 1, black 0), for clips of
    more frames than a brightness can count."""
    frames = np.full((n, 64, 64, 3), 16, dtype=np.uint8)
    for i in range(n):
        for bit in range(10):
            if i >> bit & 1:
                row, col = divmod(bit, 4)
                frames[i, 16 * row : 16 * row + 16, 16 * col : 16 * col + 16] = 235
    return frames


def binary_ids(frames: np.ndarray) -> list[int]:
    return [
        sum(1 << b for b in range(10) if f[16 * (b // 4) + 4 : 16 * (b // 4) + 12, 16 * (b % 4) + 4 : 16 * (b % 4) + 12].mean() > 125)
        for f in frames
    ]  # fmt: skip


def test_open_gops_which_decord_seeks_wrongly_in_go_to_pyav_and_closed_ones_stay_with_decord(tmp_path):
    """Open GOPs (x265's default, broadcast H.264): frames decoded after a keyframe but shown before it, across
    which decord returns other frames than those asked for, without an error; closed GOPs with B-frames it reads."""
    gops = "keyint=12:min-keyint=12:scenecut=0"
    _encode(tmp_path / "open.mkv", binary_frames(240), "libx264", bf="3", **{"x264-params": f"open-gop=1:{gops}"})
    _encode(tmp_path / "closed.mkv", binary_frames(240), "libx264", bf="3", **{"x264-params": gops})
    with pytest.raises(VideoDecodeError, match="open GOPs"):
        load_video(tmp_path / "open.mkv", FrameSampling(num_frames=32, decoder=Decoder.DECORD, fallback=None))
    for name, fallback in (("open.mkv", Decoder.PYAV), ("closed.mkv", None)):
        sampled = load_video(tmp_path / name, FrameSampling(num_frames=32, decoder=Decoder.DECORD, fallback=fallback))
        assert binary_ids(sampled.frames) == sampled.indices.tolist() and sampled.available == 240, name
    # the first GOPs closed, later ones open (x264's open-gop with scene cuts): its first six keyframes, all the
    # check looked at, said closed, and decord returned frame 286 for 285
    ramp = np.zeros((300, 48, 64, 3), dtype=np.uint8)
    for i in range(300):
        ramp[i] = (7 * i % 256, i // 37 * 20 % 256, 128)
    _encode(tmp_path / "later.mkv", ramp, "libx264", bf="3", **{"x264-params": "open-gop=1:keyint=30"})
    with pytest.raises(VideoDecodeError, match="open GOPs"):
        load_video(tmp_path / "later.mkv", FrameSampling(num_frames=32, decoder=Decoder.DECORD, fallback=None))


@pytest.mark.parametrize("name", ["cut.mp4", "cut.webm"])
def test_a_file_cut_short_is_skipped_as_truncated_not_sampled_from_what_is_left(tmp_path, name):
    codec = "libx264" if name.endswith(".mp4") else "libvpx-vp9"
    _encode(tmp_path / name, counting_frames(24), codec, g="4")
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    orders = [(Decoder.PYAV, fallback) for fallback in Decoder]  # the fallback is not tried: cut for every decoder
    # decord first: it reads the first half of the WebM without an error (the MP4 it cannot open, and PyAV says why)
    orders += [(Decoder.DECORD, Decoder.PYAV), *([(Decoder.DECORD, None)] if name.endswith(".webm") else [])]
    for decoder, fallback in orders:
        with pytest.raises(
            VideoDecodeError, match=r"truncated: its frames cover [\d.]+ s of the 2.40 s its header declares"
        ) as error:
            load_video(tmp_path / name, FrameSampling(num_frames=4, decoder=decoder, fallback=fallback))
        assert error.value.reason == "truncated"
    whole = tmp_path / f"whole{name[3:]}"
    _encode(whole, counting_frames(24), codec, g="4")
    for decoder in Decoder:
        assert frame_ids(load_video(whole, FrameSampling(num_frames=4, decoder=decoder)).frames) == [3, 9, 15, 21]


def test_a_cut_matroska_file_whose_last_frame_decord_times_at_10_to_the_15_is_still_cut(tmp_path):
    """decord gives the last frame it reads from this cut file the time 9.2e15 s: no reading of how much is left."""
    _encode(tmp_path / "cut.mkv", counting_frames(48, size=64), "libx264")
    data = (tmp_path / "cut.mkv").read_bytes()
    (tmp_path / "cut.mkv").write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError, match=r"truncated: its frames cover 0.50 s of the 4.80 s") as error:
        load_video(tmp_path / "cut.mkv", FrameSampling(num_frames=4, decoder=Decoder.DECORD, fallback=None))
    assert error.value.reason == "truncated"


@pytest.mark.parametrize(
    ("name", "times"),
    [
        *[
            (f"vfr.{ext}", [k * 100 for k in range(20)] + [2000 + 1000 * k for k in range(5)])
            for ext in ("mkv", "avi", "mp4")
        ],
        ("1fps.mkv", list(range(25))),  # seconds: at 1 fps a frame missing from the sum is a second of it
        ("late.mkv", [2000 + 100 * k for k in range(25)]),  # starts at 2 s, and its DURATION tag says where it ends
    ],
)
def test_a_variable_frame_rate_is_not_taken_for_a_cut(tmp_path, name, times):
    """20 frames at 10 fps, then 5 one second apart (milliseconds): far fewer frames than duration x average rate
    (and AVI's writer fills the gaps with empty packets). The frames cover the declared time: whole."""
    from fractions import Fraction

    with av.open(str(tmp_path / name), "w") as container:
        unit = Fraction(1, 1) if name == "1fps.mkv" else Fraction(1, 1000)
        stream = container.add_stream("libx264", rate=1 if name == "1fps.mkv" else 10, options={"g": "4", "bf": "0"})
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.codec_context.time_base = unit
        for frame, at in zip(counting_frames(25), times, strict=True):
            video = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video.pts, video.time_base = at, unit
            container.mux(stream.encode(video))
        container.mux(stream.encode(None))
    sampled = load_video(tmp_path / name, FrameSampling(num_frames=5, fallback=None))
    assert len(sampled.frames) == 5 and frame_ids(sampled.frames) == sampled.indices.tolist()
    try:  # decord first: it may fail on such a file in its own way, but must not call it cut
        load_video(tmp_path / name, FrameSampling(num_frames=5, decoder=Decoder.DECORD, fallback=None))
    except VideoDecodeError as err:
        assert err.reason != "truncated", err


def test_frame_folders_and_gifs(media):
    folder = load_video(media / "frames", FrameSampling(num_frames=3))
    assert folder.indices.tolist() == [2, 6, 10] and frame_ids(folder.frames) == [2, 6, 10]
    assert folder.timestamps.tolist() == pytest.approx([2 / 3, 2, 10 / 3])  # 3 fps
    gif = load_video(media / "clip.gif", FrameSampling(num_frames=3))
    assert gif.indices.tolist() == [1, 3, 5] and frame_ids(gif.frames) == [1, 3, 5]
    # an animated WebP, which FFmpeg reads as a still image (it was skipped as one): read as a GIF is
    webp = load_video(media / "clip.webp", FrameSampling(num_frames=3))
    assert webp.indices.tolist() == [1, 3, 5] and frame_ids(webp.frames) == [1, 3, 5] and webp.fps == 10


@pytest.mark.parametrize(
    ("name", "decoder"),
    [("good.mp4", Decoder.PYAV), ("good.mp4", Decoder.DECORD), ("frames", Decoder.PYAV), ("clip.gif", Decoder.PYAV)],
)
def test_frames_squared_as_they_decode_equal_the_clip_squared_whole(media, name, decoder, monkeypatch):
    """load_video's `shrink` (the dataset's and the evaluation's squaring) runs on a few frames at a time as they
    decode, so that a 4K clip's 32 full-size frames (796 MB) are never held at once: the same values, and no call
    given more than SHRINK_BYTES of frames (here two frames' worth) or, one frame at a time, more than one."""
    import hicom.data.video as video

    transform = FrameTransform(size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    sampling = FrameSampling(num_frames=7, decoder=decoder, fallback=None)
    whole = load_video(media / name, sampling)
    calls = []

    def shrink(frames):
        calls.append(len(frames))
        return transform.squared(frames)

    monkeypatch.setattr(video, "SHRINK_BYTES", 2 * whole.frames[0].nbytes)
    shrunk = load_video(media / name, sampling, shrink=shrink)
    assert torch.equal(shrunk.frames, transform.squared(whole.frames)) and shrunk.frames.shape == (7, 3, 16, 16)
    assert shrunk.indices.tolist() == whole.indices.tolist() and max(calls) <= 2
    assert sum(calls) in (7, len(set(whole.indices.tolist())))  # PyAV keeps a repeated frame once


def test_a_failing_shrink_is_its_own_error_not_a_bad_file(media):
    """An error of the transform (a bug, memory running out) is not the video's: it is raised as it is, neither
    quarantined as undecodable nor retried with the fallback decoder."""
    calls = []

    def shrink(frames):
        calls.append(len(frames))
        raise MemoryError("out of memory")

    for decoder in Decoder:
        calls.clear()
        with pytest.raises(MemoryError, match="out of memory"):
            load_video(media / "good.mp4", FrameSampling(num_frames=4, decoder=decoder), shrink=shrink)
        assert len(calls) == 1  # the other decoder was not tried


def test_decord_given_up_on_stops_shrinking_at_its_next_batch(media, monkeypatch):
    import threading
    import time

    import hicom.data.video as video

    monkeypatch.setattr(video, "SHRINK_BYTES", 1)  # a frame a batch
    calls = []

    def slow(frames):
        calls.append(len(frames))
        time.sleep(0.2)
        return torch.from_numpy(frames.copy())

    path = media / "good.mp4"
    before = set(threading.enumerate())
    with pytest.raises(VideoDecodeError, match="gave up"):
        sampling = FrameSampling(num_frames=8, decoder=Decoder.DECORD, fallback=None, time_limit=0.3)
        load_video(path, sampling, shrink=slow)
    (thread,) = [t for t in set(threading.enumerate()) - before if t.name == f"decode {path}"]
    thread.join(2)
    assert not thread.is_alive() and len(calls) <= 3  # not all 8


def test_a_stream_whose_frames_change_size_is_refused_squared_or_not(tmp_path):
    """Two MPEG-TS pieces of 64 x 48 and 64 x 96 in one file: stacking the frames whole refuses them, and so does
    squaring them as they decode (which would pad each its own way)."""
    parts = []
    for i, height in enumerate((48, 96)):
        write = tmp_path / f"{i}.ts"
        with av.open(str(write), "w", format="mpegts") as container:
            stream = container.add_stream("mpeg2video", rate=8)
            stream.width, stream.height, stream.pix_fmt = 64, height, "yuv420p"
            for t in range(8):
                frame = np.full((height, 64, 3), 30 * t, np.uint8)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode(None))
        parts.append(write.read_bytes())
    (tmp_path / "both.ts").write_bytes(b"".join(parts))
    transform = FrameTransform(size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    for shrink in (None, transform.squared):
        with pytest.raises(VideoDecodeError, match="frames of different sizes"):
            load_video(tmp_path / "both.ts", FrameSampling(num_frames=8), shrink=shrink)


@pytest.fixture(scope="module")
def make_dataset(media, tiny_paths, tmp_path_factory):
    from transformers import AutoTokenizer

    encoder = ChatEncoder(AutoTokenizer.from_pretrained(tiny_paths["qwen2"]))
    transform = FrameTransform.from_pretrained(tiny_paths["siglip"])

    def make(records, max_length=4096, split_turns=False, too_long="skip"):
        path = tmp_path_factory.mktemp("ann") / "train.json"
        path.write_text(json.dumps(records))
        index = SampleIndex.build([MixtureEntry(path, media)], split_turns=split_turns)
        return VideoQADataset(
            index=index,
            encoder=encoder,
            transform=transform,
            visual_tokens=lambda t, modality: 3 * t,
            sampling=FrameSampling(num_frames=4),
            max_length=max_length,
            too_long=too_long,
        )

    return make


def test_every_bad_sample_is_skipped_with_its_reason_and_source(make_dataset):
    records = [
        {"id": "ok", "video": "good.mp4", "conversations": QA},
        {"id": "missing", "video": "nowhere.mp4", "conversations": QA},
        {"id": "empty", "video": "empty.mp4", "conversations": QA},
        {"id": "truncated", "video": "truncated.mp4", "conversations": QA},
        {"id": "no-stream", "video": "audio.mp4", "conversations": QA},
        {"id": "still", "video": "still.mp4", "conversations": QA},
        {"id": "odd", "video": "good.mp4", "conversations": QA[:1]},
        {"id": "order", "video": "good.mp4", "conversations": QA[::-1]},
        {"id": "answered-clip", "video": "good.mp4", "conversations": [QA[0], {"from": "gpt", "value": "<video>"}]},
        {"id": "role", "video": "good.mp4", "conversations": [{"from": "robot", "value": "x"}, QA[1]]},
        "not an object",
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi?"}, QA[1]]},
        {"__unreadable_line__": "line 13 is not JSON (Expecting value)"},  # what a torn JSONL line reads as
    ]
    dataset = make_dataset(records)
    reasons = [dataset[i].get("skip") for i in range(len(records))]
    assert reasons == [
        None, "missing", "empty", "undecodable", "no_video_stream", "wrong_extension",
        "malformed", "malformed", "malformed", "malformed", "malformed", None, "malformed",
    ]  # fmt: skip
    assert dataset[12]["error"] == "line 13 is not JSON (Expecting value)" and dataset[12]["source"][1] == 12
    assert dataset[1]["source"][1] == 1 and dataset[1]["path"] == "nowhere.mp4"
    too_long = make_dataset(records[:1], max_length=10)[0]
    assert too_long["skip"] == "too_long" and "12 visual" in too_long["error"]


def test_a_long_sample_is_cut_as_the_release_cuts_it_with_too_long_truncate(make_dataset):
    long_answer = {"from": "gpt", "value": " ".join(["circle"] * 40)}
    record = {"id": "long", "video": "good.mp4", "conversations": [QA[0], long_answer]}
    whole = make_dataset([record])[0]
    visual = 12  # the fixture's 4 frames x 3 tokens
    assert len(whole["input_ids"]) > 40 + visual
    assert make_dataset([record], max_length=40)[0]["skip"] == "too_long"
    cut = make_dataset([record], max_length=40, too_long="truncate")[0]
    assert "skip" not in cut and len(cut["input_ids"]) == 40 + visual - 1  # the text is 40 tokens, clip as one
    assert torch.equal(cut["input_ids"], whole["input_ids"][: 40 + visual - 1])
    assert torch.equal(cut["labels"], whole["labels"][: 40 + visual - 1]) and (cut["labels"] != -100).any()
    # a cut before the answer leaves nothing to learn, a cut before the clip's end would break it: both skipped
    answer_at = int((whole["labels"] != -100).nonzero()[0])  # the text tokens before it: answer_at - visual + 1
    for max_length, why in ((answer_at - visual + 1, "no answer token"), (answer_at - visual, "no answer token"),
                            (8, "the visual tokens would be cut")):  # fmt: skip
        skipped = make_dataset([record], max_length=max_length, too_long="truncate")[0]
        assert skipped["skip"] == "too_long" and why in skipped["error"], (max_length, skipped)
    kept = make_dataset([record], max_length=answer_at - visual + 2, too_long="truncate")[0]
    assert (kept["labels"] != -100).sum() == 1  # the answer's first token
    with pytest.raises(ValueError, match=r"data.too_long must be one of \['skip', 'truncate'\], got 'cut'"):
        make_dataset([record], too_long="cut")


def test_media_fields_and_windows_of_the_wrong_kind_are_malformed_not_fatal(make_dataset, media):
    """A training run reads each record in a DataLoader worker: a TypeError there would end the run."""
    from PIL import Image

    # an empty name would be the media folder itself, read as a folder of frames (it holds still.png)
    bad = {"video": [5, None, ["good.mp4"], "", " "], "image": ["", [], ["still.png", 3]]}
    records = [{"id": f"{key}{i}", key: value, "conversations": QA} for key, values in bad.items()
               for i, value in enumerate(values)]  # fmt: skip
    records += [
        {"id": "role", "video": "good.mp4", "conversations": [{"from": ["human"], "value": "<video>\nQ?"}, QA[1]]},
        {"id": "start-text", "video": "good.mp4", "start": "1", "conversations": QA},
        {"id": "reversed", "video": "frames", "start": 3, "end": 1, "conversations": QA},
        {"id": "negative", "video": "clip.gif", "start": -1, "conversations": QA},
        {"id": "endless", "video": "good.mp4", "end": float("inf"), "conversations": QA},
        {"id": "after-the-end", "video": "frames", "start": 20, "end": 25, "conversations": QA},  # a 4 s folder
        {"id": "end-rounded", "video": "good.mp4", "start": 1.0, "end": 2.05, "conversations": QA},  # a 2 s clip
        # both kinds: the image was left out without a word (and never opened: a missing one went unseen)
        {"id": "both", "video": "good.mp4", "image": "nowhere.png", "conversations": QA},
    ]
    Image.new("1", (20000, 10000)).save(media / "bomb.png")  # 24 KB, 200 M pixels: PIL's decompression-bomb guard
    records.append({"id": "bomb", "image": "bomb.png", "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                                                          QA[1]]})  # fmt: skip
    dataset = make_dataset(records)
    items = {item["id"]: item for item in (dataset[i] for i in range(len(records)))}
    expected = {**{r["id"]: "malformed" for r in records[:9]}, "role": "malformed", "start-text": "malformed",
                "reversed": "malformed", "negative": "malformed", "endless": "malformed", "after-the-end": "empty",
                "end-rounded": None, "both": "malformed", "bomb": "undecodable"}  # fmt: skip
    assert {key: item.get("skip") for key, item in items.items()} == expected
    assert "both a 'video' and an 'image'" in items["both"]["error"]
    assert "starts after the clip's end" in items["after-the-end"]["error"]
    assert items["end-rounded"]["num_frames"] == 4


def test_frames_of_a_folder_come_in_the_order_of_their_numbers(tmp_path):
    from PIL import Image

    for i, frame in enumerate(counting_frames(12)):  # 1.jpg ... 12.jpg: as text, 10.jpg would come second
        Image.fromarray(frame).save(tmp_path / f"{i + 1}.jpg", quality=100)
    sampled = load_video(tmp_path, FrameSampling(num_frames=12))
    assert frame_ids(sampled.frames) == list(range(12))


def test_a_folder_whose_numbers_have_a_gap_times_its_frames_by_their_numbers(tmp_path):
    """00011 to 00020 missing at 3 fps: the frames after the gap are 10 frames' time later than their place in the
    folder says, and a window goes by that time."""
    from PIL import Image

    numbers = [*range(1, 11), *range(21, 31)]
    for n, frame in zip(numbers, counting_frames(20), strict=True):
        Image.fromarray(frame).save(tmp_path / f"{n:05d}.png")
    sampled = load_video(tmp_path, FrameSampling(num_frames=4), start=5.0, end=9.0)
    assert [numbers[i] for i in sampled.indices.tolist()] == [21, 23, 25, 27]  # 00016 (5 s) to 00027 (8.67 s)
    assert np.allclose(sampled.timestamps, [(n - 1) / 3 for n in (21, 23, 25, 27)])
    assert frame_ids(sampled.frames) == [numbers.index(n) for n in (21, 23, 25, 27)]


def test_whatever_else_one_sample_raises_skips_it_by_name(media, tiny_paths, tmp_path):
    from transformers import AutoTokenizer

    def visual_tokens(frames: int, modality: str) -> int:
        if modality == "image":
            raise ArithmeticError("no count for images")
        return 3 * frames

    path = tmp_path / "train.json"
    image_qa = [{"from": "human", "value": "<image>\nQ?"}, QA[1]]
    path.write_text(json.dumps([{"id": "v", "video": "good.mp4", "conversations": QA},
                                {"id": "i", "image": "still.png", "conversations": image_qa}]))  # fmt: skip
    dataset = VideoQADataset(
        index=SampleIndex.build([MixtureEntry(path, media)]),
        encoder=ChatEncoder(AutoTokenizer.from_pretrained(tiny_paths["qwen2"])),
        transform=FrameTransform.from_pretrained(tiny_paths["siglip"]),
        visual_tokens=visual_tokens,
        sampling=FrameSampling(num_frames=4),
    )
    assert "skip" not in dataset[0]
    assert dataset[1]["skip"] == "error" and dataset[1]["error"] == "ArithmeticError: no count for images"


def test_each_exchange_is_one_sample_with_only_its_answer_labelled(make_dataset):
    turns = [
        {"from": "human", "value": "<video>\nWhat moves?\nOptions:\n(A) circle\n(B) square"},
        {"from": "gpt", "value": "A circle."},
        {"from": "human", "value": "Which way?"},
        {"from": "gpt", "value": "Left."},
        {"from": "human", "value": "How fast?"},
        {"from": "gpt", "value": "Slowly."},
    ]
    dataset = make_dataset([{"id": "c", "video": "good.mp4", "conversations": turns}], split_turns=True)
    assert len(dataset) == 3
    tokenizer = dataset.encoder.tokenizer
    end = tokenizer.eos_token + "\n"  # an answer is labelled to the end of its turn
    for turn, (answer, guide) in enumerate([("A circle.", "What moves?"), ("Left.", "Which way?"),
                                            ("Slowly.", "How fast?")]):  # fmt: skip
        sample = dataset[turn]
        assert sample["id"] == ("c" if turn == 0 else f"c#{turn}")
        assert sample["guide"] == guide
        labelled = sample["labels"][sample["labels"] != IGNORE_INDEX]
        assert tokenizer.decode(labelled) == answer + end
        # the context is the conversation so far, and nothing after this answer
        assert tokenizer.decode(sample["input_ids"]).endswith(answer + end)
    whole = make_dataset([{"id": "c", "video": "good.mp4", "conversations": turns}])[0]
    labelled = whole["labels"][whole["labels"] != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "".join(a + end for a in ("A circle.", "Left.", "Slowly."))


def test_a_turn_out_of_range_is_malformed(make_dataset):
    from hicom.data.template import MalformedSample

    encoder = make_dataset([]).encoder
    with pytest.raises(MalformedSample, match="turn 1"):
        encoder.encode(to_messages(QA), 12, turn=1)


def test_sampling_config_values_are_checked():
    for bad in (dict(num_frames=0), dict(fps=0.0), dict(time_limit=-1.0), dict(decoder="opencv")):
        with pytest.raises(ValueError):
            FrameSampling(**bad)


def test_images_several_images_videos_and_text_share_a_batch(make_dataset, media, tiny_paths):
    from transformers import AutoTokenizer

    from hicom.data.collate import Collator

    two = [{"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "No."}]
    records = [
        {"id": "img", "image": "still.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, QA[1]]},
        {"id": "imgs", "image": ["still.png", "still.png"], "conversations": two},
        {"id": "vid", "video": "good.mp4", "conversations": QA},
        {"id": "txt", "conversations": [{"from": "human", "value": "Hi?"}, QA[1]]},
        {"id": "bad", "image": ["still.png"] * 3, "conversations": two},
        # no placeholder for two images: one clip, put before the question as for one image
        {"id": "unmarked", "image": ["still.png"] * 2, "conversations": [{"from": "human", "value": "Same?"}, QA[1]]},
    ]
    dataset = make_dataset(records)
    items = [dataset[i] for i in range(len(records))]
    assert items[-2]["skip"] == "malformed" and "2 <image> placeholders for 3 images" in items[-2]["error"]
    assert "skip" not in items[-1] and items[-1]["num_frames"] == 2
    items = items[:-1]
    collate = Collator(pad_token_id=0, guide_tokenizer=AutoTokenizer.from_pretrained(tiny_paths["siglip"]))
    batch = collate(items)
    assert batch["num_frames"].tolist() == [1, 2, 4, 0]
    assert batch["modalities"] == ["image", "image", "video", "text"]
    visual = dataset.encoder.visual_token_id
    assert (batch["input_ids"] == visual).sum(1).tolist() == [3, 6, 12, 0]  # the test's 3 tokens per frame
    assert batch["pixel_values"].shape[0] == 7


def test_an_annotation_file_that_is_not_json_names_itself(tmp_path):
    from hicom.data.index import iter_records

    path = tmp_path / "train.json"
    path.write_text('[{"id": "a"}, {"id": ')
    with pytest.raises(ValueError, match=r"train\.json: not JSON"):
        list(iter_records(path))


def test_an_annotation_file_read_once_is_not_read_again_until_it_changes(tmp_path, monkeypatch):
    import os

    from hicom.data import index
    from hicom.data.index import MixtureEntry, Sampling, check_annotations

    path = tmp_path / "train.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n\n{"id": "c"}\n')
    seen = tmp_path / "seen"
    assert index.count_records(path, seen) == 3
    reads = []
    real = index.iter_records
    monkeypatch.setattr(index, "iter_records", lambda p: reads.append(p) or real(p))
    entries = [MixtureEntry(path, tmp_path), MixtureEntry(path, tmp_path, Sampling.parse("end:50%"))]
    assert check_annotations(entries, seen) == 3 + 2
    assert reads == []
    path.write_text('{"id": "a"}\n{"id": "b"}\n')
    os.utime(path, ns=(1, 1))  # whatever the clock's resolution: another version of the file
    assert index.count_records(path, seen) == 2 and reads == [path]
    for stamp in seen.glob("*.json"):
        stamp.write_text("{damaged")
    assert index.count_records(path, seen) == 2 and len(reads) == 2


def test_a_damaged_stage_manifest_names_itself(tmp_path):
    from hicom.stages import HandoffError, read_manifest

    for text in ("{not json", "[]", '{"stage": "a"}'):
        (tmp_path / "manifest.json").write_text(text)
        with pytest.raises(
            HandoffError,
            match=r"manifest\.json .*copy the stage's folder again; or, where it is a stage of this run, delete",
        ):
            read_manifest(tmp_path / "manifest.json")


def test_a_path_that_is_not_a_regular_file_says_so(tmp_path):
    import os

    from hicom.data.video import VideoDecodeError, load_video

    os.mkfifo(tmp_path / "pipe.mp4")  # opening it would block: it is refused before any open
    with pytest.raises(VideoDecodeError, match=r"pipe\.mp4: not a regular file") as error:
        load_video(tmp_path / "pipe.mp4", 4)
    assert error.value.reason == "missing"
    with pytest.raises(VideoDecodeError, match=r"gone\.mp4: file not found"):
        load_video(tmp_path / "gone.mp4", 4)


def test_a_conversation_of_thousands_of_exchanges_is_given_up_at_max_length_not_encoded_whole(make_dataset):
    """Each message renders the conversation up to it again, so a record of 2,000 exchanges (a bad conversion)
    took seconds per sample, and with split turns each of its 2,000 samples did: the encoding now stops once the
    sample is over max_length. Skipped as too_long, or cut to the same tokens as a whole encoding cuts it."""
    turns = [QA[0], QA[1]]
    for i in range(2000):
        turns += [{"from": "human", "value": f"and question {i}?"}, {"from": "gpt", "value": f"answer {i}."}]
    record = {"id": "chatty", "video": "good.mp4", "conversations": turns}
    dataset = make_dataset([record], max_length=64)
    renders = []
    render = dataset.encoder._render
    dataset.encoder._render = lambda *args, **kwargs: renders.append(1) or render(*args, **kwargs)
    skipped = dataset[0]
    assert skipped["skip"] == "too_long" and "over max_length 64" in skipped["error"] and len(renders) < 40
    split = make_dataset([record], max_length=64, split_turns=True)
    assert len(split) == 2001 and split[2000]["skip"] == "too_long"
    short = {"id": "short", "video": "good.mp4", "conversations": turns[:24]}  # encoded whole, then cut
    whole = make_dataset([short], max_length=4096)[0]
    for records in ([short], [record]):
        cut = make_dataset(records, max_length=64, too_long="truncate")[0]
        visual = 12
        assert torch.equal(cut["input_ids"], whole["input_ids"][: 64 + visual - 1])
        assert torch.equal(cut["labels"], whole["labels"][: 64 + visual - 1])


def test_an_image_placeholder_in_an_answer_is_malformed_in_a_multi_image_sample_too(make_dataset):
    """Extra <image> placeholders of a multi-image sample are merged into the first: in the questions. One in an
    answer was deleted from the labelled text; it is malformed, as for one image or a video."""
    asked = {"from": "human", "value": "<image>\nWhich is darker?"}
    answer = {"from": "gpt", "value": "The second, <image>, is darker."}
    skipped = make_dataset([{"id": "two", "image": ["still.png", "still.png"], "conversations": [asked, answer]}])[0]
    assert skipped["skip"] == "malformed" and "assistant" in skipped["error"], skipped


@pytest.mark.parametrize("decoder", ["pyav", "decord"])
def test_one_damaged_packet_is_passed_over_at_any_frame_count(tmp_path, caplog, decoder):
    """A clip with one damaged P-frame packet read at 8 frames but was refused at 16 and more (PyAV's decoder raised
    on the packet, which the frame loop did not survive), so a 64-frame evaluation lost clips a 32-frame one read.
    decord gives the damaged frame at another size: PyAV, its fallback, reads the clip."""
    path = tmp_path / "damaged.mp4"
    write_video(path, np.random.default_rng(0).integers(0, 255, (240, 32, 48, 3), dtype=np.uint8), 8)
    with av.open(str(path)) as container:
        packets = [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size and not p.is_keyframe]
    data = bytearray(path.read_bytes())
    pos, size = packets[len(packets) // 2]
    data[pos + 4 : pos + size] = b"\xff" * (size - 4)
    path.write_bytes(bytes(data))
    for n in (8, 16, 64):
        with caplog.at_level("WARNING", logger="hicom.data.video"):
            sampled = load_video(path, FrameSampling(num_frames=n, decoder=decoder, fallback="pyav"))
        assert sampled.frames.shape == (n, 32, 48, 3)
    assert "1 damaged packet(s) passed over" in caplog.text
