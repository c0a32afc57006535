"""Tests of the synthetic video QA generator: files on disk, caching, determinism and correct answers."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from dataclasses import fields, replace
from pathlib import Path

import decord
import numpy as np
import pytest

import hicom.data.synthetic as synthetic
from hicom.data.synthetic import (
    SyntheticSplits,
    SyntheticVideoQA,
    build_sample,
    mark_size,
    render_clip,
    sample_rng,
    shape_mask,
)

# The canonical option orders, spelled out here so that the test does not trust the module's constants.
OPTIONS = {
    "colour_of_shape": ["red", "green", "blue", "yellow"],
    "shape_of_colour": ["circle", "square", "triangle", "cross"],
    "direction_of_colour": ["left", "right", "up", "down"],
    "mark_of_colour": ["white", "cyan", "magenta", "black"],
}
QUESTION_PATTERNS = {
    "colour_of_shape": (re.compile(r"What colour is the (\w+)\?"), "shape", "colour"),
    "shape_of_colour": (re.compile(r"What shape is the (\w+) object\?"), "colour", "shape"),
    "direction_of_colour": (re.compile(r"Which direction does the (\w+) object move\?"), "colour", "direction"),
    "mark_of_colour": (re.compile(r"What colour is the mark on the (\w+) object\?"), "colour", "mark"),
}
SMALL = SyntheticVideoQA(num_train=24, num_val=8)
TINY = SyntheticVideoQA(num_train=3, num_val=2)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSplits:
    return SMALL.prepare(tmp_path_factory.mktemp("synthetic"))


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def decode(path: Path) -> np.ndarray:
    """All frames of a video as (T, H, W, 3) uint8 RGB, through decord as the data loader reads them."""
    reader = decord.VideoReader(str(path))
    return reader.get_batch(list(range(len(reader)))).asnumpy()


def split_and_index(record: dict) -> tuple[str, int]:
    split, index = record["id"].split("-")
    return split, int(index)


def file_mtimes(directory: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in directory.rglob("*")}


def test_prepare_writes_decodable_videos_close_to_the_rendered_frames(small: SyntheticSplits) -> None:
    assert small.root.name == f"synthetic_videoqa-{SMALL.key()}"
    assert (small.train_json, small.val_json, small.video_root) == (
        small.root / "train.json",
        small.root / "val.json",
        small.root / "videos",
    )
    for json_path, split, count in ((small.train_json, "train", 24), (small.val_json, "val", 8)):
        records = load(json_path)
        assert [r["id"] for r in records] == [f"{split}-{i:06d}" for i in range(count)]
        for record in records:
            assert record["video"] == f"{record['id'].replace('-', '/')}.mp4"
            frames = decode(small.video_root / record["video"])
            assert frames.shape == (SMALL.num_frames, SMALL.size, SMALL.size, 3)
            rendered, expected_record = build_sample(SMALL, *split_and_index(record))
            assert record == expected_record
            assert np.abs(frames.astype(np.int16) - rendered).mean() < 8


def test_records_follow_the_llava_format(small: SyntheticSplits) -> None:
    for record in load(small.train_json) + load(small.val_json):
        options = OPTIONS[record["question_type"]]
        assert record["options"] == options
        human, gpt = record["conversations"]
        assert human == {
            "from": "human",
            "value": f"<video>\n{record['question']}\nOptions:\n(A) {options[0]}\n(B) {options[1]}\n"
            f"(C) {options[2]}\n(D) {options[3]}\nAnswer with the option's letter from the given choices directly.",
        }
        assert gpt == {"from": "gpt", "value": record["answer"]}
        assert record["answer"] in "ABCD" and len(record["answer"]) == 1


def test_answers_name_the_attribute_of_the_questioned_object(small: SyntheticSplits) -> None:
    for record in load(small.train_json) + load(small.val_json):
        split, index = split_and_index(record)
        _, objects = render_clip(sample_rng(SMALL.seed, split, index), SMALL)
        assert len({o.shape for o in objects}) == len({o.colour for o in objects}) == SMALL.num_objects
        pattern, named_by, asked = QUESTION_PATTERNS[record["question_type"]]
        named = pattern.fullmatch(record["question"]).group(1)
        (target,) = [o for o in objects if getattr(o, named_by) == named]
        expected = "ABCD"[OPTIONS[record["question_type"]].index(getattr(target, asked))]
        assert record["answer"] == expected


def colour_centroid(frame: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """(x, y) centroid of the pixels close to `rgb` in one (H, W, 3) frame."""
    close = np.abs(frame.astype(np.int16) - np.array(rgb)).sum(axis=-1) < 60
    ys, xs = np.nonzero(close)
    assert len(xs) > 20, f"colour {rgb} not found in the frame"
    return np.array([xs.mean(), ys.mean()])


def test_the_named_colour_moves_in_the_answered_direction_in_the_decoded_video(tmp_path: Path) -> None:
    spec = SyntheticVideoQA(num_train=12, num_val=1, question_types=["direction_of_colour"])
    splits = spec.prepare(tmp_path)
    steps = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    colours = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 230), "yellow": (230, 210, 40)}
    answered = Counter()
    for record in load(splits.train_json):
        colour = QUESTION_PATTERNS["direction_of_colour"][0].fullmatch(record["question"]).group(1)
        direction = OPTIONS["direction_of_colour"]["ABCD".index(record["answer"])]
        frames = decode(splits.video_root / record["video"])
        shift = colour_centroid(frames[-1], colours[colour]) - colour_centroid(frames[0], colours[colour])
        along = shift @ np.array(steps[direction])
        across = abs(shift @ np.array(steps[direction][::-1]))
        assert along > 10 and across < 3, (record["id"], direction, shift)
        answered[direction] += 1
    assert len(answered) >= 3


def test_prepare_twice_returns_at_once_and_touches_nothing(tmp_path: Path) -> None:
    first = TINY.prepare(tmp_path)
    before = file_mtimes(first.root)
    assert len(before) == 5 + 3 + 3  # mp4s; videos/, videos/train/, videos/val/; train, val and spec json
    second = TINY.prepare(tmp_path)
    assert second == first
    assert file_mtimes(first.root) == before
    assert [p.name for p in tmp_path.iterdir()] == [first.root.name]


def test_another_nodes_writer_with_the_same_process_id_keeps_its_folder(tmp_path: Path) -> None:
    """Each node's first process prepares the data on a shared file system, and containers give them the same
    process ids: the folder named by this process's id used to be taken for a crashed run's and deleted."""
    import os
    import stat

    name = TINY.splits(tmp_path).root.name
    other = tmp_path / f"{name}.tmp-{os.getpid()}"
    (other / "videos").mkdir(parents=True)
    splits = TINY.prepare(tmp_path)
    assert (other / "videos").is_dir() and TINY.is_prepared(tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(splits.root.stat().st_mode) == 0o777 & ~mask  # not mkdtemp's 0700


def test_a_changed_field_changes_the_key_and_the_directory(tmp_path: Path) -> None:
    changed = {
        "num_train": 4,
        "num_val": 3,
        "num_frames": 9,
        "size": 64,
        "fps": 4,
        "num_objects": 2,
        "question_types": ("shape_of_colour",),
        "seed": 1,
    }
    assert set(changed) == {f.name for f in fields(SyntheticVideoQA)}
    keys = {TINY.key()} | {replace(TINY, **{name: value}).key() for name, value in changed.items()}
    assert len(keys) == len(changed) + 1
    assert all(re.fullmatch(r"[0-9a-f]{12}", key) for key in keys)
    assert TINY.key() == SyntheticVideoQA(num_train=3, num_val=2).key()
    assert replace(TINY, seed=1).prepare(tmp_path).root != TINY.prepare(tmp_path).root


def test_two_roots_get_byte_identical_annotations(tmp_path: Path) -> None:
    a = TINY.prepare(tmp_path / "a")
    b = TINY.prepare(tmp_path / "b")
    assert a.train_json.read_bytes() == b.train_json.read_bytes()
    assert a.val_json.read_bytes() == b.val_json.read_bytes()


def test_a_sample_does_not_depend_on_the_split_sizes() -> None:
    frames, record = build_sample(SMALL, "train", 5)
    bigger_frames, bigger_record = build_sample(replace(SMALL, num_train=5000, num_val=1), "train", 5)
    assert record == bigger_record
    np.testing.assert_array_equal(frames, bigger_frames)
    assert not np.array_equal(build_sample(SMALL, "val", 5)[0], frames)


def test_the_loser_of_a_race_keeps_the_winners_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    winner = TINY.prepare(tmp_path / "elsewhere")
    (winner.root / "winner").touch()
    final = TINY.splits(tmp_path / "root").root
    generate = SyntheticVideoQA._generate

    def generate_while_another_process_finishes(self: SyntheticVideoQA, directory: Path) -> None:
        generate(self, directory)
        shutil.copytree(winner.root, final)

    monkeypatch.setattr(SyntheticVideoQA, "_generate", generate_while_another_process_finishes)
    splits = TINY.prepare(tmp_path / "root")
    assert splits.root == final
    assert (final / "winner").exists()
    assert [p.name for p in final.parent.iterdir()] == [final.name]


def test_a_failed_generation_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_encoder(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(synthetic, "write_video", broken_encoder)
    with pytest.raises(OSError, match="disk full"):
        TINY.prepare(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_answer_letters_are_balanced() -> None:
    spec = SyntheticVideoQA()
    records = [build_sample(spec, "train", i)[1] for i in range(400)]
    letters = Counter(r["answer"] for r in records)
    assert set(letters) == set("ABCD")
    assert all(0.10 <= n / len(records) <= 0.40 for n in letters.values()), letters
    assert set(Counter(r["question_type"] for r in records)) == set(OPTIONS)


@pytest.mark.parametrize(
    "spec",
    [
        SyntheticVideoQA(size=64, num_frames=16, num_objects=4),
        SyntheticVideoQA(size=128, num_frames=16, num_objects=4),
        SyntheticVideoQA(size=64, num_frames=8, num_objects=2),
    ],
    ids=["small-long-crowded", "large-long-crowded", "small-short-sparse"],
)
def test_objects_stay_inside_the_frame_and_never_occlude_each_other(spec: SyntheticVideoQA) -> None:
    colours = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 230), "yellow": (230, 210, 40)}
    for index in range(20):
        frames, objects = render_clip(sample_rng(spec.seed, "train", index), spec)
        assert frames.shape == (spec.num_frames, spec.size, spec.size, 3) and frames.dtype == np.uint8
        assert len(objects) == spec.num_objects
        for obj in objects:
            path = obj.path(spec.num_frames)
            assert path.min() >= 0 and path.max() <= spec.size - obj.size
            assert 3 <= obj.speed <= 5
            painted = (frames == np.array(colours[obj.colour], dtype=np.uint8)).all(axis=-1).sum(axis=(1, 2))
            body = shape_mask(obj.shape, obj.size).copy()
            inner = mark_size(obj.size)  # the centred mark covers part of the body
            lo = (obj.size - inner) // 2
            body[lo : lo + inner, lo : lo + inner] = False
            assert (painted == body.sum()).all()


def test_question_types_from_a_hydra_list_become_a_tuple() -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    config = OmegaConf.create(
        {"_target_": "hicom.data.synthetic.SyntheticVideoQA", "question_types": ["shape_of_colour", "colour_of_shape"]}
    )
    spec = instantiate(config)
    assert spec.question_types == ("shape_of_colour", "colour_of_shape")
    assert hash(spec) == hash(SyntheticVideoQA(question_types=("shape_of_colour", "colour_of_shape")))
    assert spec.key() == SyntheticVideoQA(question_types=["shape_of_colour", "colour_of_shape"]).key()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_train", 0),
        ("num_val", -1),
        ("num_frames", 7),
        ("num_frames", 17),
        ("num_frames", 8.0),
        ("size", 32),
        ("size", 130),
        ("size", 101),
        ("fps", 0),
        ("num_objects", 1),
        ("num_objects", 5),
        ("num_objects", True),
        ("seed", -1),
        ("question_types", ()),
        ("question_types", "colour_of_shape"),
        ("question_types", ("colour_of_shape", "size_of_colour")),
        ("question_types", ("colour_of_shape", "colour_of_shape")),
    ],
)
def test_invalid_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        SyntheticVideoQA(**{field: value})


def test_generated_clips_are_lossless_so_their_frames_depend_on_the_frames_alone(tmp_path: Path) -> None:
    """The dataset's clips decode to exactly the YUV that write_video computed from the rendered frames (x264 at
    qp 0): nothing of the encoding process (libswscale's conversion, x264's rate control) reaches the frames a run
    trains on. Lossy clips went through libswscale, whose result depended on the process."""
    import av

    frames, _ = build_sample(TINY, "train", 1)
    path = tmp_path / "clip.mp4"
    synthetic.write_video(path, frames, TINY.fps, lossless=True)
    with av.open(str(path)) as container:
        decoded = [frame.to_ndarray(format="yuv420p") for frame in container.decode(video=0)]
    assert len(decoded) == len(frames)
    assert all(np.array_equal(got, synthetic.yuv420(want)) for got, want in zip(decoded, frames, strict=True))
    with pytest.raises(ValueError, match="even frame size, got 5 x 6"):
        synthetic.write_video(tmp_path / "odd.mp4", np.zeros((2, 5, 6, 3), np.uint8), 4, lossless=True)
