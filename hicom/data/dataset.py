"""A dataset over LLaVA-format JSON / JSONL: conversations with a `<video>` (or `<image>`) placeholder."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from hicom.data.index import SampleIndex, unreadable_line
from hicom.data.template import (
    ChatEncoder,
    MalformedSample,
    TooLongSample,
    clip_first,
    cut_text,
    guide_text,
    to_messages,
    user_turns,
)
from hicom.data.transforms import FrameTransform
from hicom.data.video import (
    DEFAULT_SAMPLING,
    FrameSampling,
    VideoDecodeError,
    load_video,
    not_a_file,
    read_rgb,
    within_time_limit,
)
from hicom.eval.answers import parse_options
from hicom.utils.choices import Choice

log = logging.getLogger(__name__)


class TooLong(Choice):
    """What a training sample over `max_length` becomes: skipped and counted (`skip`: visual + text tokens are
    counted), or cut as the release cuts (`truncate`: its text, the visual tokens counting as one; see cut_text).
    A question asked for generation is never cut."""

    SKIP = "skip"
    TRUNCATE = "truncate"


def read_image(path: Path) -> np.ndarray:
    """One image as a (1, H, W, 3) uint8 clip, or VideoDecodeError."""
    if not path.is_file():
        raise not_a_file(path)
    return read_rgb(path)[None]


def merge_image_placeholders(messages: list[dict], images) -> list[dict]:
    """A multi-image sample may mark each image with its own <image> in the questions: its images form one clip of
    frames whose tokens (each image compressed on its own, then the global tokens) go where the first <image>
    stands."""
    if not isinstance(images, list) or len(images) < 2:
        return messages
    count = sum(m["content"].count("<image>") for m in messages)
    if count not in (0, 1, len(images)):  # none: clip_first puts one before the first question
        raise MalformedSample(f"{count} <image> placeholders for {len(images)} images (expected 1 or one each)")
    merged, seen = [], False
    for message in messages:
        if message["role"] != "user":  # one in an answer or a system turn stays, and is refused as malformed
            merged.append(message)
            continue
        parts = message["content"].split("<image>")
        text = parts[0]
        for part in parts[1:]:
            text += ("" if seen else "<image>") + part
            seen = True
        merged.append({**message, "content": text})
    return merged


def conversation_of(record: dict, modality: str) -> list[dict]:
    """A record's conversation as the chat messages training reads: its roles checked, a multi-image sample's
    placeholders merged, and the clip's placeholder first in its question (`modality`: the record's media)."""
    messages = merge_image_placeholders(to_messages(record.get("conversations")), record.get("image"))
    return clip_first(messages, {"video": "<video>", "image": "<image>"}.get(modality))


@dataclass(frozen=True)
class Media:
    """What a record shows: a video (one path, with its optional [start, end] seconds), images (one or more
    paths, one clip of frames) or nothing (text only)."""

    modality: str
    paths: tuple[Path, ...] = ()
    start: float | None = None
    end: float | None = None


def check_record(record) -> None:
    """MalformedSample unless `record` is a JSON object read from its file (not a JSONL line that failed to parse)."""
    what = unreadable_line(record)
    if what is not None:
        raise MalformedSample(what)
    if not isinstance(record, dict):
        raise MalformedSample("a sample is not a JSON object")


def media_of(record: dict, root: Path) -> Media:
    """The media a record names, under `root`; MalformedSample where 'video' is not one path or 'image' not a path
    or a list of them (an empty name would be the data folder itself), or where it names both (one of them would
    be left out without a word)."""
    if "video" in record and "image" in record:
        raise MalformedSample("it names both a 'video' and an 'image': a sample holds one kind of media")
    if "video" in record:
        if not isinstance(record["video"], str) or not record["video"].strip():
            raise MalformedSample(f"'video' must be a path, got {record['video']!r:.80}")
        return Media("video", (root / record["video"],), record.get("start"), record.get("end"))
    if "image" in record:
        names = record["image"] if isinstance(record["image"], list) else [record["image"]]
        if not names or not all(isinstance(name, str) and name.strip() for name in names):
            raise MalformedSample(f"'image' must be a path or a list of paths, got {record['image']!r:.80}")
        return Media("image", tuple(root / name for name in names))
    return Media("text")


class VideoQADataset(Dataset):
    """LLaVA-format samples as model inputs.

    Each item is a dict: `input_ids` / `labels` (L,), `pixel_values` (T, 3, S, S), `guide` (str), `num_frames`,
    `modality`, `id`; in generation mode also `answer` (the last assistant turn). A sample that cannot be used
    comes back as `{"skip": reason, "id", "path", "error", "source"}` so the collator can count it per reason
    without stopping the run. Reasons: missing, empty, no_video_stream, undecodable, timeout (the clip),
    malformed (the conversation, the media fields or the time window), too_long (visual + text tokens over
    max_length; with `too_long=truncate`, a sample whose cut would leave no answer or part of its clip), error
    (anything else one sample raised, with its exception: counted like the others, so the bad samples guard stops
    a run where it is every sample).

    With an index split per exchange (`SampleIndex.build(split_turns=True)`), sample j of a conversation is its
    j-th question and answer after the earlier turns as unlabelled context, guided by that question.
    """

    def __init__(
        self,
        *,
        index: SampleIndex,
        encoder: ChatEncoder,
        transform: FrameTransform,
        visual_tokens: Callable[[int, str], int],
        sampling: FrameSampling = DEFAULT_SAMPLING,
        max_length: int = 4096,
        too_long: TooLong = TooLong.SKIP,
        generation: bool = False,
    ) -> None:
        self.index = index
        self.encoder = encoder
        self.transform = transform
        self.visual_tokens = visual_tokens
        self.sampling = sampling
        self.max_length = max_length
        self.too_long = TooLong.of(too_long, "data.too_long")
        self.generation = generation

    def __len__(self) -> int:
        return len(self.index)

    def _load_visual(self, media: Media) -> tuple[torch.Tensor | None, str]:
        if media.modality == "video":
            # squared as they are decoded: a 4K clip's frames are never all held at full size
            sampled = load_video(
                media.paths[0], self.sampling, start=media.start, end=media.end, shrink=self.transform.squared
            )
            return sampled.frames, "video"
        if media.modality == "image":
            limit = self.sampling.time_limit
            frames = [within_time_limit(lambda p=path: read_image(p), limit, str(path)) for path in media.paths]
            # several images of different sizes: each is padded and resized on its own by the transform
            return torch.cat([self.transform.squared(frame) for frame in frames]), "image"
        return None, "text"

    def __getitem__(self, i: int) -> dict:
        record = self.index.record_of(i)
        turn = self.index.turn_of(i)
        sample_id = str(record.get("id", i)) if isinstance(record, dict) else str(i)
        if turn:  # the later exchanges of a split conversation: id#1, id#2, ...
            sample_id = f"{sample_id}#{turn}"
        media = (record.get("video") or record.get("image")) if isinstance(record, dict) else None
        try:
            check_record(record)
            shown = media_of(record, self.index.root_of(i))
            messages = conversation_of(record, shown.modality)
            pixels, modality = self._load_visual(shown)
            num_visual = self.visual_tokens(len(pixels), modality) if pixels is not None else 0
            # past this many text tokens (the placeholder one) a sample is too long, or cut to a prefix: no more
            # of a long conversation is encoded (generation: every prompt whole)
            truncating = self.too_long is TooLong.TRUNCATE
            stop_after = None if self.generation else self.max_length - (0 if truncating else max(num_visual - 1, 0))
            encoded = self.encoder.encode(
                messages, num_visual, generation=self.generation, turn=turn, stop_after=stop_after
            )
            if self.too_long is TooLong.TRUNCATE and not self.generation:
                try:
                    encoded = cut_text(encoded, self.encoder.visual_token_id, self.max_length)
                except MalformedSample as err:
                    return self._skip("too_long", sample_id, media, i, str(err))
            elif len(encoded["input_ids"]) > self.max_length:
                return self._skip(
                    "too_long",
                    sample_id,
                    media,
                    i,
                    f"over max_length {self.max_length}: {len(encoded['input_ids'])} tokens ({num_visual} visual) "
                    "counted",
                )
        except VideoDecodeError as err:
            return self._skip(err.reason, sample_id, media, i, str(err))
        except TooLongSample as err:  # raised by the encoding, once num_visual is known
            return self._skip(
                "too_long", sample_id, media, i, f"{err} ({num_visual} visual tokens, max_length {self.max_length})"
            )
        except MalformedSample as err:
            return self._skip("malformed", sample_id, media, i, str(err))
        except Exception as err:  # noqa: BLE001  whatever else one sample raises skips it, named, and is counted
            log.warning("sample %s raised %s", sample_id, type(err).__name__, exc_info=True)
            return self._skip("error", sample_id, media, i, f"{type(err).__name__}: {err}")
        questions = user_turns(messages)
        question = questions[turn if turn is not None else -1]
        sample = {
            "id": sample_id,
            **encoded,
            "pixel_values": pixels,
            "num_frames": 0 if pixels is None else len(pixels),
            "modality": modality,
            "guide": guide_text(question),
            "position": i,  # the sample's place in its set: ids need not be unique
        }
        if self.generation:
            sample["answer"] = messages[-1]["content"].strip()
            sample["options"] = parse_options(questions[-1])
        return sample

    def _skip(self, reason: str, sample_id: str, media, i: int, error: str) -> dict:
        file, row = self.index.where(i)
        return {"skip": reason, "id": sample_id, "path": media, "error": error, "source": [file, row]}
