import numpy as np
import pytest

from hicom.data.synthetic import write_video
from hicom.data.transforms import FrameTransform
from hicom.data.video import Decoder, VideoDecodeError, load_video, uniform_indices


def test_uniform_sampling_takes_segment_midpoints():
    assert uniform_indices(32, 4).tolist() == [4, 12, 20, 28]
    assert uniform_indices(10, 2).tolist() == [2, 7]
    assert uniform_indices(3, 8).tolist() == [0, 1, 2]  # a short clip is taken as it is


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
    assert out[0, :, 0].abs().max() < 1e-6  # padding rows are the mean colour, 0 after normalising
    assert out[0, :, 3].sub(1).abs().max() < 1e-6  # white is 1
