"""A synthetic, instruction-dependent video QA dataset: the project's built-in default training data.

Each clip shows a few small coloured shapes (distinct shapes, distinct colours) drifting in straight
lines over a dark background.  Each question names one object, by its shape or its colour, and asks for
another attribute of that same object, with the four options always in the same canonical order.  At
full token resolution the answer is easy to read off; after heavy uniform pooling (several frames times
several patch cells averaged together) the colours and shapes of neighbouring objects mix and the
binding between "which object" and "which attribute" is lost.  That makes the dataset a small, fast
probe of whether a token compressor keeps what the instruction asks for.

`SyntheticVideoQA(...).prepare(root)` renders the clips to mp4 once, writes LLaVA-style JSON records,
and returns the paths as a `SyntheticSplits`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import av
import numpy as np

from hicom.data.index import MixtureEntry
from hicom.utils.files import as_created_here

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "DIRECTIONS",
    "QUESTION_TYPES",
    "SHAPES",
    "MovingObject",
    "SyntheticSplits",
    "SyntheticVideoQA",
    "build_sample",
    "mark_size",
    "render_clip",
    "render_frames",
    "sample_objects",
    "sample_rng",
    "write_video",
]

log = logging.getLogger(__name__)

# Bump whenever the rendering, the encoding or the question logic changes, so that datasets cached on disk by
# an older version get a new key instead of being silently reused. 4: lossless clips (write_video), the same
# decoded frames in every process.
GENERATOR_VERSION = 4

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 230),
    "yellow": (230, 210, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Each object carries a centred mark in a second palette: a patch token over an object holds both colours, so
# "the mark on the red object" is readable from one token at full resolution, while pooling over several objects
# mixes bodies and marks of different objects and loses which mark belongs to which body.
MARKS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "cyan": (0, 220, 220),
    "magenta": (220, 0, 220),
    "black": (0, 0, 0),
}
# Unit step (dx, dy) in image coordinates: y grows downwards.
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
BACKGROUND: tuple[int, int, int] = (40, 40, 40)
LETTERS = "ABCD"
SPLITS: tuple[str, ...] = ("train", "val")

# Objects keep at least this many pixels between their bounding boxes in every frame, so that none
# is ever occluded and every attribute stays readable at full resolution.
_MIN_GAP = 2
_MIN_SPEED, _MAX_SPEED = 3, 5  # px per frame
_MAX_PLACEMENT_TRIES = 100  # per object, before the whole layout is redrawn
_MAX_LAYOUT_TRIES = 1_000
_ANSWER_INSTRUCTION = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class MovingObject:
    """One shape in a clip: it sits with its top-left corner at (x0, y0) in frame 0 and moves
    `speed` px per frame in `direction`; its bounding box is `size` x `size` px."""

    shape: str
    colour: str
    direction: str
    x0: int
    y0: int
    speed: int
    size: int
    mark: str = "white"

    def position(self, t: int) -> tuple[int, int]:
        """Top-left corner (x, y) of the bounding box in frame t."""
        dx, dy = DIRECTIONS[self.direction]
        return self.x0 + dx * self.speed * t, self.y0 + dy * self.speed * t

    def path(self, num_frames: int) -> np.ndarray:
        """Top-left corners (x, y) in frames 0..num_frames-1: int array of shape (num_frames, 2)."""
        step = np.array(DIRECTIONS[self.direction]) * self.speed
        return np.array([self.x0, self.y0]) + np.arange(num_frames)[:, None] * step


@dataclass(frozen=True)
class SyntheticSplits:
    """Where a prepared dataset lies; video paths in the JSON files are relative to `video_root`."""

    root: Path
    train_json: Path
    val_json: Path
    video_root: Path

    @property
    def train(self) -> tuple[MixtureEntry, ...]:
        return (MixtureEntry(self.train_json, self.video_root),)

    @property
    def val(self) -> tuple[MixtureEntry, ...]:
        return (MixtureEntry(self.val_json, self.video_root),)


def _question_colour_of_shape(obj: MovingObject) -> tuple[str, tuple[str, ...], str]:
    return f"What colour is the {obj.shape}?", tuple(COLOURS), obj.colour


def _question_shape_of_colour(obj: MovingObject) -> tuple[str, tuple[str, ...], str]:
    return f"What shape is the {obj.colour} object?", SHAPES, obj.shape


def _question_mark_of_colour(obj: MovingObject) -> tuple[str, tuple[str, ...], str]:
    return f"What colour is the mark on the {obj.colour} object?", tuple(MARKS), obj.mark


def _question_direction_of_colour(obj: MovingObject) -> tuple[str, tuple[str, ...], str]:
    return f"Which direction does the {obj.colour} object move?", tuple(DIRECTIONS), obj.direction


# Each builder maps the questioned object to (question, options in canonical order, correct option).
_QUESTION_BUILDERS: dict[str, Callable[[MovingObject], tuple[str, tuple[str, ...], str]]] = {
    "colour_of_shape": _question_colour_of_shape,
    "shape_of_colour": _question_shape_of_colour,
    "direction_of_colour": _question_direction_of_colour,
    "mark_of_colour": _question_mark_of_colour,
}
QUESTION_TYPES: tuple[str, ...] = tuple(_QUESTION_BUILDERS)


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    # bool is an int subclass, but `num_objects: true` in a YAML file is surely a mistake.
    in_range = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if high is not None:
        in_range = in_range and value <= high
    if not in_range:
        allowed = f"an int in [{low}, {high}]" if high is not None else f"an int >= {low}"
        raise ValueError(f"SyntheticVideoQA.{name} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class SyntheticVideoQA:
    """Spec of the generated dataset; `prepare(root)` writes it once and returns where it lies.

    Clips are `num_frames` frames of `size` x `size` RGB px at `fps`, each with `num_objects` objects.
    Sample i of a split depends only on (seed, split, i), never on `num_train` / `num_val`.
    """

    num_train: int = 2000
    num_val: int = 200
    num_frames: int = 8
    size: int = 112
    fps: int = 8
    num_objects: int = 3
    question_types: tuple[str, ...] = QUESTION_TYPES
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("num_train", self.num_train, 1)
        _check_int("num_val", self.num_val, 1)
        _check_int("num_frames", self.num_frames, 8, 16)
        _check_int("size", self.size, 64, 128)
        if self.size % 2:
            # yuv420p subsamples chroma 2x2, so libx264 needs even frame sizes.
            raise ValueError(f"SyntheticVideoQA.size must be even, got {self.size}")
        _check_int("fps", self.fps, 1, 60)
        _check_int("num_objects", self.num_objects, 2, len(SHAPES))
        _check_int("seed", self.seed, 0)
        # Hydra hands over lists (or OmegaConf ListConfigs); keep a tuple so the spec stays hashable.
        question_types = self.question_types
        if isinstance(question_types, str) or not hasattr(question_types, "__iter__"):
            raise ValueError(
                f"SyntheticVideoQA.question_types must be a sequence of names from {QUESTION_TYPES}, "
                f"got {question_types!r}"
            )
        question_types = tuple(question_types)
        unknown = [name for name in question_types if name not in _QUESTION_BUILDERS]
        if not question_types or unknown or len(set(question_types)) != len(question_types):
            raise ValueError(
                "SyntheticVideoQA.question_types must be a non-empty sequence of distinct names from "
                f"{QUESTION_TYPES}, got {question_types!r}"
            )
        object.__setattr__(self, "question_types", question_types)

    def _spec_dict(self) -> dict[str, Any]:
        """The spec as it is hashed and stored in spec.json (JSON types only)."""
        spec = asdict(self)
        spec["question_types"] = list(self.question_types)
        spec["generator_version"] = GENERATOR_VERSION
        return spec

    def key(self) -> str:
        """Short stable hash of the spec (12 hex chars); changes whenever any field changes."""
        text = json.dumps(self._spec_dict(), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def splits(self, root: str | os.PathLike) -> SyntheticSplits:
        """The paths this spec is (or would be) prepared at under `root`; touches nothing."""
        directory = Path(root) / f"synthetic_videoqa-{self.key()}"
        return SyntheticSplits(
            root=directory,
            train_json=directory / "train.json",
            val_json=directory / "val.json",
            video_root=directory / "videos",
        )

    def is_prepared(self, root: str | os.PathLike) -> bool:
        """Whether `root` already holds this dataset, complete (spec.json is written last)."""
        spec_path = self.splits(root).root / "spec.json"
        try:
            stored = json.loads(spec_path.read_text())
        except (OSError, ValueError):
            return False
        return stored == self._spec_dict()

    def prepare(self, root: str | os.PathLike) -> SyntheticSplits:
        """Generate the dataset under `root` unless it is already there; return its paths.

        Safe against concurrent callers: each writes into its own temporary sibling directory and
        renames it into place atomically; a loser of the race discards its copy.
        """
        splits = self.splits(root)
        if self.is_prepared(root):
            return splits
        final = splits.root
        final.parent.mkdir(parents=True, exist_ok=True)
        # a folder of its own: the process id alone is not (each node's first process may have the same one in its
        # container, on a shared file system)
        tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
        as_created_here(tmp)  # mkdtemp's 0700 would keep the cache from the rest of a shared cluster
        start = time.perf_counter()
        try:
            self._generate(tmp)
            # Written last: its presence marks the directory as complete.
            (tmp / "spec.json").write_text(json.dumps(self._spec_dict(), indent=2, sort_keys=True) + "\n")
            try:
                os.rename(tmp, final)
            except OSError:
                if not self.is_prepared(root):
                    raise RuntimeError(
                        f"{final} exists but does not hold this dataset spec; delete it and retry"
                    ) from None
                shutil.rmtree(tmp)
                return splits
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info(
            "Generated %d train + %d val synthetic clips in %s (%.1f s)",
            self.num_train,
            self.num_val,
            final,
            time.perf_counter() - start,
        )
        return splits

    def _generate(self, directory: Path) -> None:
        """Render, encode and describe every sample of both splits into `directory`."""
        for split, count in zip(SPLITS, (self.num_train, self.num_val), strict=True):
            (directory / "videos" / split).mkdir(parents=True)
            records = []
            for index in range(count):
                frames, record = build_sample(self, split, index)
                write_video(directory / "videos" / record["video"], frames, self.fps, lossless=True)
                records.append(record)
            with open(directory / f"{split}.json", "w") as f:
                json.dump(records, f, indent=1)
                f.write("\n")


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator that sample `index` of `split` is drawn from."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def shape_size(frame_size: int) -> int:
    """Side of an object's bounding box in px: about 2x2 patches of 16 px at a 112 px frame."""
    return round(0.23 * frame_size)


def mark_size(side: int) -> int:
    """Side in px of the centred square mark on an object of side `side`: half of it, so that the mark fills
    a good part of the patch tokens over the object rather than a corner of one."""
    return side // 2


@cache
def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean (side, side) mask of `shape` filling a side x side box."""
    centre = (side - 1) / 2
    ys, xs = np.mgrid[0:side, 0:side]
    if shape == "circle":
        mask = (xs - centre) ** 2 + (ys - centre) ** 2 <= (side / 2) ** 2
    elif shape == "square":
        mask = np.ones((side, side), dtype=bool)
    elif shape == "triangle":
        # Apex at the top centre, base along the bottom row.
        mask = np.abs(xs - centre) <= (ys + 1) / 2
    elif shape == "cross":
        half_arm = side / 6
        mask = (np.abs(xs - centre) <= half_arm) | (np.abs(ys - centre) <= half_arm)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    mask.setflags(write=False)
    return mask


def _speed_range(spec: SyntheticVideoQA) -> tuple[int, int]:
    """Inclusive px-per-frame range that keeps a whole traverse inside the frame."""
    fit = (spec.size - shape_size(spec.size)) // (spec.num_frames - 1)
    high = min(_MAX_SPEED, fit)
    return min(_MIN_SPEED, high), high


def _apart(path_a: np.ndarray, path_b: np.ndarray, side: int) -> bool:
    """Whether two side x side boxes moving along (T, 2) corner paths keep _MIN_GAP px apart throughout."""
    return bool((np.abs(path_a - path_b) >= side + _MIN_GAP).any(axis=-1).all())


def _place(
    rng: np.random.Generator, spec: SyntheticVideoQA, shape: str, colour: str, mark: str, placed: list[MovingObject]
) -> MovingObject | None:
    """Draw a motion for one object whose path stays inside the frame and clear of `placed`;
    None when the frame looks too crowded for it."""
    side = shape_size(spec.size)
    low_speed, high_speed = _speed_range(spec)
    placed_paths = [other.path(spec.num_frames) for other in placed]
    for _ in range(_MAX_PLACEMENT_TRIES):
        direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
        speed = int(rng.integers(low_speed, high_speed + 1))
        travel = speed * (spec.num_frames - 1)
        dx, dy = DIRECTIONS[direction]
        # Start far enough from the edge the object heads for that its last frame is still inside.
        x_low, x_high = max(0, -dx * travel), spec.size - side - max(0, dx * travel)
        y_low, y_high = max(0, -dy * travel), spec.size - side - max(0, dy * travel)
        obj = MovingObject(
            shape=shape,
            colour=colour,
            direction=direction,
            x0=int(rng.integers(x_low, x_high + 1)),
            y0=int(rng.integers(y_low, y_high + 1)),
            speed=speed,
            size=side,
            mark=mark,
        )
        path = obj.path(spec.num_frames)
        if all(_apart(path, other, side) for other in placed_paths):
            return obj
    return None


def sample_objects(rng: np.random.Generator, spec: SyntheticVideoQA) -> list[MovingObject]:
    """Draw `spec.num_objects` objects with distinct shapes and distinct colours whose whole paths
    stay inside the frame and never touch each other."""
    for _ in range(_MAX_LAYOUT_TRIES):
        shapes = rng.choice(SHAPES, size=spec.num_objects, replace=False)
        colours = rng.choice(list(COLOURS), size=spec.num_objects, replace=False)
        marks = rng.choice(list(MARKS), size=spec.num_objects, replace=False)
        objects: list[MovingObject] = []
        for shape, colour, mark in zip(shapes, colours, marks, strict=True):
            obj = _place(rng, spec, str(shape), str(colour), str(mark), objects)
            if obj is None:
                break
            objects.append(obj)
        if len(objects) == spec.num_objects:
            return objects
    raise RuntimeError(f"could not place {spec.num_objects} non-touching objects for {spec}")


def render_frames(objects: list[MovingObject], spec: SyntheticVideoQA) -> np.ndarray:
    """Draw `objects` over the background: uint8 frames of shape (num_frames, size, size, 3)."""
    frames = np.empty((spec.num_frames, spec.size, spec.size, 3), dtype=np.uint8)
    frames[...] = BACKGROUND
    for obj in objects:
        mask = shape_mask(obj.shape, obj.size)
        inner = mark_size(obj.size)
        lo, hi = (obj.size - inner) // 2, (obj.size - inner) // 2 + inner
        for t in range(spec.num_frames):
            x, y = obj.position(t)
            frames[t, y : y + obj.size, x : x + obj.size][mask] = COLOURS[obj.colour]
            frames[t, y + lo : y + hi, x + lo : x + hi] = MARKS[obj.mark]
    return frames


def render_clip(rng: np.random.Generator, spec: SyntheticVideoQA) -> tuple[np.ndarray, list[MovingObject]]:
    """Draw a clip's objects from `rng` and render them: ((T, H, W, 3) uint8 frames, objects)."""
    objects = sample_objects(rng, spec)
    return render_frames(objects, spec), objects


def _human_turn(question: str, options: tuple[str, ...]) -> str:
    lines = ["<video>", question, "Options:"]
    lines += [f"({letter}) {option}" for letter, option in zip(LETTERS, options, strict=True)]
    lines.append(_ANSWER_INSTRUCTION)
    return "\n".join(lines)


def build_sample(spec: SyntheticVideoQA, split: str, index: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Sample `index` of `split`: its (T, H, W, 3) uint8 frames and its JSON record (without encoding).

    The clip is drawn first and the question second from the same generator, `sample_rng(...)`.
    """
    rng = sample_rng(spec.seed, split, index)
    frames, objects = render_clip(rng, spec)
    question_type = spec.question_types[rng.integers(len(spec.question_types))]
    target = objects[rng.integers(len(objects))]
    question, options, correct = _QUESTION_BUILDERS[question_type](target)
    answer = LETTERS[options.index(correct)]
    name = f"{index:06d}"
    record = {
        "id": f"{split}-{name}",
        "video": f"{split}/{name}.mp4",
        "conversations": [
            {"from": "human", "value": _human_turn(question, options)},
            {"from": "gpt", "value": answer},
        ],
        "question_type": question_type,
        "answer": answer,
        "options": list(options),
        "question": question,
    }
    return frames, record


def yuv420(rgb: np.ndarray) -> np.ndarray:
    """One (H, W, 3) uint8 RGB frame (H, W even) as yuv420p planes stacked (3H/2, W): BT.601 limited range, as
    decoders read H.264 without colour tags, chroma averaged over 2 x 2 pixels."""
    x = rgb.astype(np.float64)
    y = 16 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255
    cb = 128 + (-37.797 * x[..., 0] - 74.203 * x[..., 1] + 112.0 * x[..., 2]) / 255
    cr = 128 + (112.0 * x[..., 0] - 93.786 * x[..., 1] - 18.214 * x[..., 2]) / 255
    height, width = y.shape

    def quarter(plane: np.ndarray) -> np.ndarray:  # one row of the planar layout holds two of its rows
        return plane.reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3)).reshape(height // 4, width)

    planes = np.concatenate([y, quarter(cb), quarter(cr)])
    return np.clip(np.rint(planes), 0, 255).astype(np.uint8)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int, lossless: bool = False) -> None:
    """Encode (T, H, W, 3) uint8 RGB frames (H, W even) to an H.264 mp4 at `fps`.

    `lossless`: x264 at qp 0 from YUV computed here (`yuv420`), so that the decoded frames depend on `frames`
    alone. Lossy (crf 18) takes libswscale's RGB-to-YUV, whose result depended on the process: the same 300
    generated clips encoded in two train.py-like processes (torch imported) decoded differently in 36, and x264's
    rate control differed in 2 of 300 between a process with torch and one without (the tiny default's accuracy
    then varied with the clone that generated its data)."""
    height, width = frames.shape[1:3]
    if lossless and (height % 2 or width % 2):
        raise ValueError(f"lossless clips need an even frame size, got {height} x {width}")
    options = {"qp": "0", "preset": "veryfast"} if lossless else {"crf": "18", "preset": "veryfast"}
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options=options)
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        # At these tiny frame sizes x264's worker threads cost more time than they save.
        stream.codec_context.thread_count = 1
        for array in frames:
            if lossless:
                frame = av.VideoFrame.from_ndarray(yuv420(array), format="yuv420p")
            else:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
