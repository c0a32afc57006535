"""Frames as they are shown: display rotation, real frame times (variable rates, shared timestamps, edit lists),
the containers decord misnumbers, and 16-bit images."""

import struct
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from hicom.data.video import Decoder, FrameSampling, VideoDecodeError, load_video, read_rgb, uneven_times


def grey(i: int, height: int = 48, width: int = 64) -> np.ndarray:
    return np.full((height, width, 3), 8 * i, np.uint8)


def ids(frames: np.ndarray) -> list[int]:
    return [round(float(f.mean()) / 8) for f in frames]


def only(decoder: Decoder, **options) -> FrameSampling:
    return FrameSampling(decoder=decoder, fallback=None, **options)


def write(path, frames, codec="libx264", pts=None, time_base=None, options=None, shift=0):
    """Frames into `path`; `pts` (in `time_base`) set on the packets, `shift` subtracted from their timestamps."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10, options=options or {})
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if time_base is not None:
            stream.time_base = time_base
        packets = []
        for frame in frames:
            packets += stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24"))
        packets += stream.encode(None)
        for i, packet in enumerate(packets):
            if pts is not None:
                packet.pts = packet.dts = pts[i]
                packet.time_base = stream.time_base
            elif shift:
                packet.pts, packet.dts = packet.pts - shift, packet.dts - shift
            container.mux(packet)


U = 0x10000  # 1.0 in the track header's 16.16 fixed point


@pytest.mark.parametrize(
    ("matrix", "shape", "white"),
    [
        ((0, U, -U, 0), (64, 32), "top right"),  # a quarter turn clockwise (a phone held upright)
        ((-U, 0, 0, -U), (32, 64), "bottom right"),  # half a turn
        ((0, -U, U, 0), (64, 32), "bottom left"),  # a quarter turn counterclockwise
        ((-U, 0, 0, U), (32, 64), "top right"),  # mirrored left to right
        ((U, 0, 0, -U), (32, 64), "bottom left"),  # mirrored top to bottom
    ],
    ids=["90", "180", "270", "hflip", "vflip"],
)
def test_a_turned_or_mirrored_video_comes_out_as_shown_by_both_decoders(tmp_path, matrix, shape, white):
    """As ffmpeg's autorotate shows it. decord turns but does not mirror: it refuses a mirroring matrix, so that
    its fallback decodes the file."""
    frame = np.zeros((32, 64, 3), np.uint8)
    frame[:16, :32] = 255  # stored 32 high and 64 wide, the top-left quarter white
    write(tmp_path / "stored.mp4", np.stack([frame] * 4))
    data = bytearray((tmp_path / "stored.mp4").read_bytes())
    at = data.find(b"tkhd")
    start = at + 8 + (32 if data[at + 4] == 1 else 20) + 16  # the track header's 3 x 3 display matrix
    a, b, c, d = matrix
    data[start : start + 36] = struct.pack(">9i", a, b, 0, c, d, 0, 0, 0, 0x40000000)
    (tmp_path / "shown.mp4").write_bytes(bytes(data))
    for decoder in Decoder:
        shown = load_video(tmp_path / "shown.mp4", FrameSampling(num_frames=2, decoder=decoder, fallback=Decoder.PYAV))
        f = shown.frames[0]
        assert f.shape[:2] == shape, decoder
        h, w = shape[0] // 2, shape[1] // 2
        quarters = {"top left": f[:h, :w], "top right": f[:h, w:], "bottom left": f[h:, :w], "bottom right": f[h:, w:]}
        assert [name for name, q in quarters.items() if q.mean() > 200] == [white], decoder
    if matrix[0] * matrix[3] - matrix[1] * matrix[2] < 0:
        with pytest.raises(VideoDecodeError, match="mirrors the picture"):
            load_video(tmp_path / "shown.mp4", only(Decoder.DECORD, num_frames=2))


@pytest.mark.parametrize("decoder", list(Decoder))
def test_a_window_and_timestamps_go_by_the_frames_real_times_at_a_variable_rate(tmp_path, decoder):
    times = [0, 10, 20, 500, 510, 520, 530] + [2000 + 100 * i for i in range(21)]  # ms: bursts, then 10 fps
    write(tmp_path / "vfr.mkv", np.stack([grey(i) for i in range(len(times))]), "mjpeg", times, Fraction(1, 1000))
    sampled = load_video(tmp_path / "vfr.mkv", only(decoder, num_frames=4), start=2.0, end=4.05)
    window = list(range(7, 28))  # 2.0 s to 4.0 s: frames 7 to 27, not frames at 2 s of the average rate
    assert sampled.indices.tolist() == [window[(21 * (2 * i + 1)) // 8] for i in range(4)]
    assert ids(sampled.frames) == sampled.indices.tolist()
    assert sampled.timestamps.tolist() == pytest.approx([times[i] / 1000 for i in sampled.indices.tolist()])
    every = load_video(tmp_path / "vfr.mkv", only(decoder, num_frames=8, fps=2.0))  # one frame each 0.5 s
    assert every.indices.tolist() == [0, 3, 6, 7, 12, 17, 22, 27]  # frame 6 is on screen from 0.53 to 2 s


def test_even_frame_times_keep_the_frame_count_arithmetic():
    assert uneven_times(np.arange(10) * 0.04 + 7.0, 25.0) is None
    assert uneven_times(np.array([0.0, 0.04, 0.2, 0.24]), 25.0) is not None


@pytest.mark.parametrize("decoder", list(Decoder))
def test_frames_that_share_a_timestamp_are_decoded_in_order_not_seeked(tmp_path, decoder):
    """Two frames per timestamp: seeking by time would give the first of each pair; decord cannot tell them apart
    and refuses, so that the fallback decodes it."""
    write(tmp_path / "pairs.mkv", np.stack([grey(i) for i in range(30)]), "mjpeg", [(i // 2) * 200 for i in range(30)],
          Fraction(1, 1000))  # fmt: skip
    sampling = FrameSampling(num_frames=8, decoder=decoder, fallback=Decoder.PYAV)
    sampled = load_video(tmp_path / "pairs.mkv", sampling)
    assert ids(sampled.frames) == sampled.indices.tolist() == [1, 5, 9, 13, 16, 20, 24, 28]
    if decoder is Decoder.DECORD:
        with pytest.raises(VideoDecodeError, match="share timestamps"):
            load_video(tmp_path / "pairs.mkv", only(decoder, num_frames=8))


@pytest.mark.parametrize(("name", "match"), [("clip.ts", "mpegts"), ("clip.mpg", "mpeg"), ("trimmed.mp4", "edit list")])
def test_files_decord_misnumbers_go_to_pyav(tmp_path, name, match):
    frames = np.stack([grey(i) for i in range(30)])
    if name == "trimmed.mp4":  # an edit list hides the first 5 frames, as `-ss ... -c copy` writes
        write(tmp_path / name, frames, options={"bf": "0"}, shift=5)
        shown = list(range(5, 30))
    else:
        write(tmp_path / name, frames, "mpeg2video" if name.endswith(".mpg") else "libx264")
        shown = list(range(30))
    with pytest.raises(VideoDecodeError, match=match):
        load_video(tmp_path / name, only(Decoder.DECORD, num_frames=5))
    sampled = load_video(tmp_path / name, FrameSampling(num_frames=5, decoder=Decoder.DECORD, fallback=Decoder.PYAV))
    assert ids(sampled.frames) == [shown[i] for i in sampled.indices.tolist()]
    assert sampled.available == len(shown)


def test_a_16_bit_image_keeps_its_levels_and_a_float_one_is_refused(tmp_path):
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    rgb = read_rgb(tmp_path / "deep.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (16, 16, 3)
    assert rgb[..., 0].ravel().tolist() == list(range(256))
    Image.fromarray(np.ones((4, 4), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(VideoDecodeError, match="floating-point"):
        read_rgb(tmp_path / "float.tif")


def test_an_image_is_read_as_a_viewer_shows_it(tmp_path):
    """A phone's portrait photo is stored sideways with an EXIF orientation; transparent pixels have a colour
    under them that no viewer shows (black in a logo, a palette's key colour in a sprite). They were read as
    stored: the photo sideways, the background black or magenta."""
    from PIL import ExifTags

    stored = np.zeros((16, 24, 3), np.uint8)
    stored[:8, :8] = (255, 0, 0)  # red at the stored top left (a JPEG block)
    exif = Image.Image().getexif()
    exif[ExifTags.Base.Orientation] = 6  # shown turned 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "portrait.jpg", exif=exif, quality=100)
    shown = read_rgb(tmp_path / "portrait.jpg")
    assert shown.shape == (24, 16, 3) and shown[0, -1, 0] > 200 and shown[0, 0, 0] < 60  # red at the shown top right
    logo = np.zeros((4, 4, 4), np.uint8)
    logo[1:3, 1:3] = (0, 0, 255, 255)  # an opaque blue square on a transparent black background
    Image.fromarray(logo, "RGBA").save(tmp_path / "logo.png")
    assert read_rgb(tmp_path / "logo.png")[0, 0].tolist() == [255, 255, 255]
    assert read_rgb(tmp_path / "logo.png")[1, 1].tolist() == [0, 0, 255]
    sprite = Image.new("P", (4, 4), 1)
    sprite.putpalette([0, 255, 0, 255, 0, 255] + [0] * 762)  # 0: green, 1: magenta, the transparent key
    sprite.putpixel((0, 0), 0)
    sprite.save(tmp_path / "sprite.png", transparency=1)
    read = read_rgb(tmp_path / "sprite.png")
    assert read[0, 0].tolist() == [0, 255, 0] and read[3, 3].tolist() == [255, 255, 255]
    Image.fromarray(stored).save(tmp_path / "plain.png")  # nothing to turn or show through: as stored
    assert np.array_equal(read_rgb(tmp_path / "plain.png"), stored)
