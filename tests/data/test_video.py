import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from hicom.data.synthetic import write_video
from hicom.data.transforms import FrameTransform
from hicom.data.video import Decoder, FrameSampling, VideoDecodeError, load_video, sample_indices, uniform_indices


def test_uniform_sampling_takes_segment_midpoints():
    assert uniform_indices(32, 4).tolist() == [4, 12, 20, 28]
    assert uniform_indices(10, 2).tolist() == [2, 7]
    # a short clip still gives 8 (SPEC 7's midpoints: repeats), or each of its frames once
    assert uniform_indices(3, 8).tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert uniform_indices(3, 8, repeat=False).tolist() == [0, 1, 2]
    assert uniform_indices(8, 8).tolist() == uniform_indices(8, 8, repeat=False).tolist() == list(range(8))
    # exactly floor((i + 1/2) n / N): a whole middle is that frame, not the one before (14 in 5: 7, not 6)
    assert uniform_indices(14, 5).tolist() == [1, 4, 7, 9, 12]
    for n in range(1, 400):
        for frames in (3, 5, 6, 7, 10, 12, 24, 32, 48):
            exact = [math.floor(Fraction(2 * i + 1, 2 * frames) * n) for i in range(frames)]
            assert uniform_indices(n, frames).tolist() == exact


def test_window_bounds_in_seconds_take_the_frames_they_name_despite_float_rounding():
    """4.6 s x 25 fps is 114.99999999999999 in floats and 2.2 x 25 is 55.00000000000001: frame 115 starts the
    window, and frame 55 is past its end."""
    five = FrameSampling(num_frames=5, repeat_frames=False)
    assert sample_indices(250, 25.0, five, start=4.6, end=4.8).tolist() == [115, 116, 117, 118, 119]
    assert sample_indices(250, 25.0, five, start=2.0, end=2.2).tolist() == [50, 51, 52, 53, 54]
    every = FrameSampling(num_frames=100, fps=0.9)  # a frame every 26.67 source frames: 80 is the fourth, not 79
    assert sample_indices(240, 24.0, every).tolist() == [0, 26, 53, 80, 106, 133, 160, 186, 213]
    with pytest.raises(VideoDecodeError, match="no frames") as error:  # a file cut before its first frame
        sample_indices(0, 25.0, five)
    assert error.value.reason == "empty"


def test_an_end_far_past_the_clip_is_its_end():
    """1e308 s (a placeholder for "to the end" in some conversions) times the frame rate overflowed, and the
    sample was skipped as undecodable."""
    five = FrameSampling(num_frames=5, repeat_frames=False)
    whole = sample_indices(250, 25.0, five).tolist()
    assert sample_indices(250, 25.0, five, start=0.0, end=1e308).tolist() == whole
    times = np.arange(250) / 25.0 + np.r_[0.0, np.full(249, 0.03)]  # uneven: by the frames' own times
    assert sample_indices(250, 25.0, five, end=1e308, times=times).tolist() == whole


@pytest.fixture
def clip(tmp_path):
    frames = np.zeros((12, 48, 64, 3), np.uint8)
    for t in range(12):
        frames[t, :, 4 * t : 4 * t + 8] = (200, 30, 30)
    path = tmp_path / "clip.mp4"
    write_video(path, frames, fps=6)
    return path, frames


@pytest.mark.parametrize("decoder", list(Decoder))
def test_decoders_return_the_sampled_frames(clip, decoder):
    path, frames = clip
    sampled = load_video(path, 4, decoder)
    assert sampled.indices.tolist() == [1, 4, 7, 10]
    assert np.allclose(sampled.timestamps, np.array([1, 4, 7, 10]) / 6)
    assert sampled.frames.shape == (4, 48, 64, 3)
    assert np.abs(sampled.frames.astype(int) - frames[[1, 4, 7, 10]]).mean() < 6


@pytest.mark.parametrize("decoder", list(Decoder))
def test_decoded_frames_are_freed_with_the_clip_not_left_for_the_garbage_collector(clip, decoder, no_gc):
    """PyAV keeps a frame whose side data was read (for its display matrix) in a reference cycle: each sampled
    frame, its picture and its converter's threads stayed until the collector ran, and a loader worker decoding
    720p clips grew by hundreds of threads and MB. Only the 2 x 2 copy the matrix is read from may wait for it."""
    import gc

    import av

    path, _ = clip
    for _ in range(3):
        load_video(path, 4, decoder)
    assert not [o for o in gc.get_objects() if isinstance(o, av.VideoFrame) and o.width > 2]


def test_a_clip_that_fails_within_its_time_limit_frees_what_its_decoding_held(no_gc):
    """The error crossed from the decoding thread in a box that its own traceback held: a cycle, in which a failed
    clip's containers, frames and decoder threads waited for the garbage collector (a worker peaked at 584 MB and
    34 threads on clips that failed mid-decode, 370 MB and 4 threads without a time limit)."""
    import weakref

    from hicom.data.video import within_time_limit

    class Held:  # what a decoder's frame holds (a container, decoded frames)
        pass

    refs = []

    def fails():
        held = Held()
        refs.append(weakref.ref(held))
        raise VideoDecodeError("frames of different sizes")

    try:
        within_time_limit(fails, 60, "clip.ts")
    except VideoDecodeError as err:
        assert "different sizes" in str(err)
    assert refs and refs[0]() is None


def test_a_clip_that_finishes_after_its_caller_gave_up_is_not_kept_by_the_timeout(no_gc):
    """The timeout's traceback holds the box the decoding thread fills: frames put there after the caller gave up
    lived as long as the error."""
    import threading
    import weakref

    from hicom.data.video import within_time_limit

    class Frames:  # what a slow decode returns
        pass

    refs, finished = [], threading.Event()

    def slow():
        finished.wait(5)
        frames = Frames()
        refs.append(weakref.ref(frames))
        return frames

    try:
        within_time_limit(slow, 0.05, "slow.mp4")
    except VideoDecodeError as err:
        timeout = err  # kept, as a report of the skipped sample may keep it
    assert timeout.reason == "timeout"
    finished.set()
    for _ in range(100):  # the thread returns its frames and ends
        if refs and refs[0]() is None:
            break
        threading.Event().wait(0.02)
    assert refs and refs[0]() is None


@pytest.mark.parametrize("decoder", list(Decoder))
def test_bad_files_raise_a_decode_error(tmp_path, decoder):
    with pytest.raises(VideoDecodeError, match="not found"):
        load_video(tmp_path / "missing.mp4", 4, decoder)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoDecodeError, match="empty"):
        load_video(tmp_path / "empty.mp4", 4, decoder)
    (tmp_path / "junk.mp4").write_bytes(b"\x00not a video" * 100)
    with pytest.raises(VideoDecodeError):
        load_video(tmp_path / "junk.mp4", 4, decoder)


def test_transform_pads_with_the_mean_colour_then_normalises():
    transform = FrameTransform(size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), mode="nearest")
    frames = np.full((1, 4, 8, 3), 255, np.uint8)
    out = transform(frames)
    assert out.shape == (1, 3, 8, 8)
    # padding rows are the mean colour as LLaVA's expand2square writes it, int(0.5 * 255) = 127
    torch.testing.assert_close(out[0, :, 0], torch.full((3, 8), 127 / 127.5 - 1))
    assert out[0, :, 3].sub(1).abs().max() < 1e-6  # white is 1


def test_transform_squares_a_few_frames_at_a_time_and_a_strip_at_a_bounded_size(monkeypatch):
    """The padded copies are made a few frames at a time (the same output); a frame longer than MAX_SQUARE_SIDE is
    resized to it before padding, keeping its aspect: a 2 x 16000 frame pads to 4096^2, not to 16000^2 (768 MB)."""
    import hicom.data.transforms as transforms

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(5, 30, 50, 3), dtype=np.uint8)
    transform = FrameTransform(size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    whole = transform(frames)
    monkeypatch.setattr(transforms, "SQUARING_BYTES", 2 * 50 * 50 * 3)  # two frames at a time
    assert torch.equal(transform(frames), whole)
    made = []
    empty = torch.empty
    monkeypatch.setattr(transforms.torch, "empty", lambda size, **kw: made.append(tuple(size)) or empty(size, **kw))
    assert transform(np.zeros((1, 2, 16000, 3), np.uint8)).shape == (1, 3, 16, 16)
    assert (1, 4096, 4096, 3) in made and max(s[1] for s in made if len(s) == 4) <= 4096
    out = transform(np.full((1, 1000, 16000, 3), 255, np.uint8))  # 256 x 4096 on the mean colour, then 16 x 16
    assert out[0, :, 8].min() > 0.5 and out[0, :, 0].abs().max() < 0.01  # the frame, on the bands


def test_transform_without_padding_stretches_to_square_as_the_releases_stage_1():
    from PIL import Image

    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(60, 120, 3), dtype=np.uint8)  # 2:1, no band of the mean colour
    transform = FrameTransform(size=48, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), pad_to_square=False)
    pil = np.asarray(Image.fromarray(frame).resize((48, 48), Image.BICUBIC)).astype(np.float32) / 127.5 - 1
    out = transform(frame[None])[0].permute(1, 2, 0).numpy()
    assert np.abs(out - pil).max() <= 1 / 127.5 + 1e-6


def test_transform_resizes_like_the_hf_processors_pil_path():
    from PIL import Image

    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(120, 120, 3), dtype=np.uint8)
    transform = FrameTransform(size=48, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), mode="bicubic")
    pil = np.asarray(Image.fromarray(frame).resize((48, 48), Image.BICUBIC)).astype(np.float32) / 127.5 - 1
    out = transform(frame[None])[0].permute(1, 2, 0).numpy()
    assert np.abs(out - pil).max() <= 1 / 127.5 + 1e-6  # within one grey level of PIL


@pytest.mark.parametrize(
    ("processor", "side"),
    [
        ({"size": 336, "crop_size": 336, "do_center_crop": True}, 336),  # openai/clip-vit-large-patch14-336's format
        ({"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}, 336),  # the newer one
        ({"size": {"height": 384, "width": 384}}, 384),  # SigLIP's
        ({"size": {"shortest_edge": 400}, "crop_size": {"height": 336, "width": 336}}, 336),  # the crop is seen
        ({"size": {"shortest_edge": 400}, "crop_size": 336, "do_center_crop": False}, 400),
    ],
)
def test_the_image_side_is_read_from_either_image_processor_format(tmp_path, processor, side):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**processor, "image_mean": [0.5] * 3}))
    assert FrameTransform.from_pretrained(tmp_path).size == side


@pytest.mark.parametrize("processor", [{"size": "336"}, {"size": {"width": 336}}, {"crop_size": 0}, {}])
def test_an_image_processor_without_a_side_names_its_file(tmp_path, processor):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    with pytest.raises(ValueError, match=r"preprocessor_config\.json: .*(side|'size')"):
        FrameTransform.from_pretrained(tmp_path)
