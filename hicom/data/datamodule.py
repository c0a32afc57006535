"""The DataModule: sources prepared once, datasets and loaders built per stage."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lightning import LightningDataModule
from torch.utils.data import DataLoader

from hicom.data.collate import Collator
from hicom.data.dataset import VideoQADataset, read_records
from hicom.data.template import ChatEncoder
from hicom.data.transforms import FrameTransform
from hicom.data.video import Decoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JsonSplits:
    """LLaVA-format annotation files and the folder their media paths are relative to."""

    train_json: Path
    val_json: Path | None
    video_root: Path


@dataclass(frozen=True)
class JsonSource:
    """Annotation files on disk (the real data): checked, never generated."""

    train_json: str
    data_root: str
    val_json: str | None = None

    def prepare(self, root: str | Path | None = None) -> JsonSplits:
        for key, value in (("data.source.train_json", self.train_json), ("data.source.val_json", self.val_json)):
            if value is not None and not Path(value).is_file():
                raise FileNotFoundError(f"annotation file '{value}' not found: set `{key}=<file>`")
        if not Path(self.data_root).is_dir():
            raise FileNotFoundError(f"media folder '{self.data_root}' not found: set `data.source.data_root=<dir>`")
        val = Path(self.val_json) if self.val_json else None
        return JsonSplits(train_json=Path(self.train_json), val_json=val, video_root=Path(self.data_root))


class VideoQADataModule(LightningDataModule):
    """Serves LLaVA-format video QA for training (loss), validation (loss) and test (greedy multiple choice).

    `source` is anything with `prepare(root) -> splits` (JsonSource, SyntheticVideoQA); `visual_tokens(T, modality)`
    is the network's token count, which the dataset needs to size the placeholder.
    """

    def __init__(
        self,
        *,
        source,
        root: str,
        llm_path: str,
        vision_path: str,
        visual_tokens: Callable[[int, str], int] | None = None,
        visual_token: str = "<|video_pad|>",
        num_frames: int = 8,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 2,
        decoder: Decoder = Decoder.DECORD,
        max_length: int = 4096,
    ) -> None:
        super().__init__()
        self.source = source
        self.root = root
        self.llm_path, self.vision_path = llm_path, vision_path
        self.visual_tokens = visual_tokens
        self.visual_token = visual_token
        self.num_frames = num_frames
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers = num_workers
        self.decoder = Decoder(decoder)
        self.max_length = max_length
        self.splits = None

    def prepare_data(self) -> None:
        self.source.prepare(self.root)

    def setup(self, stage: str | None = None) -> None:
        from transformers import AutoTokenizer

        if self.splits is not None:
            return
        if self.visual_tokens is None:
            raise ValueError("the data module needs the network's visual token count (visual_tokens)")
        self.splits = self.source.prepare(self.root)
        tokenizer = AutoTokenizer.from_pretrained(self.llm_path)
        guide_tokenizer = AutoTokenizer.from_pretrained(self.vision_path)
        common = dict(
            data_root=self.splits.video_root,
            encoder=ChatEncoder(tokenizer, self.visual_token),
            transform=FrameTransform.from_pretrained(self.vision_path),
            visual_tokens=self.visual_tokens,
            num_frames=self.num_frames,
            decoder=self.decoder,
            max_length=self.max_length,
        )
        self.train_set = VideoQADataset(records=read_records(self.splits.train_json), **common)
        val_records = read_records(self.splits.val_json) if self.splits.val_json else []
        self.val_set = VideoQADataset(records=val_records, **common)
        self.test_set = VideoQADataset(records=val_records, generation=True, **common)
        self.collate = Collator(pad_token_id=tokenizer.pad_token_id, guide_tokenizer=guide_tokenizer)
        self.collate_left = Collator(
            pad_token_id=tokenizer.pad_token_id, guide_tokenizer=guide_tokenizer, padding_side="left"
        )
        log.info("data: %d train / %d held-out samples", len(self.train_set), len(self.val_set))

    def _loader(self, dataset, batch_size: int, shuffle: bool, collate) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, True, self.collate)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, False, self.collate)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, False, self.collate_left)
