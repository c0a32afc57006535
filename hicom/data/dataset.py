"""A dataset over LLaVA-format JSON / JSONL: conversations with a `<video>` (or `<image>`) placeholder."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from hicom.data.template import ChatEncoder, MalformedSample, guide_text, to_messages
from hicom.data.transforms import FrameTransform
from hicom.data.video import Decoder, VideoDecodeError, load_video
from hicom.eval.answers import parse_options

log = logging.getLogger(__name__)


def read_records(path: str | Path) -> list[dict]:
    """Records of a LLaVA-format .json (a list) or .jsonl (one object per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    if path.suffix == ".jsonl":
        with path.open() as f:
            return [json.loads(line) for line in f if line.strip()]
    records = json.loads(path.read_text())
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of samples")
    return records


class VideoQADataset(Dataset):
    """LLaVA-format samples as model inputs.

    Each item is a dict: `input_ids` / `labels` (L,), `pixel_values` (T, 3, S, S), `guide` (str), `num_frames`,
    `modality`, `id`; in generation mode also `answer` (the last assistant turn). A sample that cannot be used
    comes back as `{"skip": reason, "id", "path", "error"}` so the collator can count it without stopping the run.
    """

    def __init__(
        self,
        *,
        records: list[dict],
        data_root: str | Path,
        encoder: ChatEncoder,
        transform: FrameTransform,
        visual_tokens: Callable[[int, str], int],
        num_frames: int = 8,
        decoder: Decoder = Decoder.DECORD,
        max_length: int = 4096,
        generation: bool = False,
    ) -> None:
        self.records = records
        self.data_root = Path(data_root)
        self.encoder = encoder
        self.transform = transform
        self.visual_tokens = visual_tokens
        self.num_frames = num_frames
        self.decoder = Decoder(decoder)
        self.max_length = max_length
        self.generation = generation

    def __len__(self) -> int:
        return len(self.records)

    def _load_visual(self, record: dict) -> tuple[torch.Tensor | None, str]:
        if "video" in record:
            sampled = load_video(self.data_root / record["video"], self.num_frames, self.decoder)
            return self.transform(sampled.frames), "video"
        if "image" in record:
            from PIL import Image

            path = self.data_root / record["image"]
            try:
                with Image.open(path) as image:
                    frame = np.asarray(image.convert("RGB"))[None]
            except (OSError, ValueError) as err:
                raise VideoDecodeError(f"{path}: {err}") from err
            return self.transform(frame), "image"
        return None, "text"

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        sample_id = str(record.get("id", index)) if isinstance(record, dict) else str(index)
        media = (record.get("video") or record.get("image")) if isinstance(record, dict) else None
        try:
            if not isinstance(record, dict):
                raise MalformedSample("a sample is not a JSON object")
            messages = to_messages(record.get("conversations"))
            pixels, modality = self._load_visual(record)
            num_visual = self.visual_tokens(len(pixels), modality) if pixels is not None else 0
            encoded = self.encoder.encode(messages, num_visual, generation=self.generation)
            if len(encoded["input_ids"]) > self.max_length:
                raise MalformedSample(f"{len(encoded['input_ids'])} tokens exceed max_length {self.max_length}")
        except VideoDecodeError as err:
            return {"skip": "bad_video", "id": sample_id, "path": media, "error": str(err)}
        except MalformedSample as err:
            return {"skip": "malformed", "id": sample_id, "path": media, "error": str(err)}
        user_turns = [m["content"] for m in messages if m["role"] == "user"]
        sample = {
            "id": sample_id,
            **encoded,
            "pixel_values": pixels,
            "num_frames": 0 if pixels is None else len(pixels),
            "modality": modality,
            # Multi-turn samples are guided by their last question until per-turn splitting lands.
            "guide": guide_text(user_turns[-1]),
        }
        if self.generation:
            sample["answer"] = messages[-1]["content"].strip()
            sample["options"] = parse_options(user_turns[-1])
        return sample
