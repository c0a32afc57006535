"""The DataModule: sources prepared once, datasets and loaders built per stage."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader

from hicom.callbacks.interrupt import loader_worker_signals
from hicom.data.collate import Collator
from hicom.data.dataset import TooLong, VideoQADataset
from hicom.data.index import MixtureEntry, SampleIndex, iter_records, read_mixture
from hicom.data.sampler import ResumableLoader, TrainSampler
from hicom.data.template import ChatEncoder
from hicom.data.transforms import FrameTransform
from hicom.data.video import FrameSampling
from hicom.utils.checkpoints import load_guide_tokenizer, load_tokenizer
from hicom.utils.choices import flag, loader_start, whole_number

log = logging.getLogger(__name__)


def read_quarantine(path: str | Path) -> list[tuple[str, int, str | None, str | None]]:
    """(annotation file, record position, the record's id as preflight read it, the file's content digest) of a
    preflight quarantine.jsonl (the last two None where it has none)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"quarantine list '{path}' not found: set `data.quarantine=<quarantine.jsonl>` or null")
    pairs = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                source, row = str(entry["source"]), int(entry["index"])  # an entry that is no object fails here
                named, digest = entry.get("id"), entry.get("file_digest")
                pairs.append(
                    (source, row, None if named is None else str(named), None if digest is None else str(digest))
                )
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(
                    f"data.quarantine: {path} line {number} is not a preflight entry with 'source' and 'index' "
                    f"({type(err).__name__}: {err}): write it again with `python -m hicom.data.preflight`"
                ) from err
    return pairs


# where data paths come from by default; the real data is never generated or downloaded
DATA_DIR_HINT = " (data paths default to paths.data_dir, which the environment variable HICOM_DATA sets)"


@dataclass(frozen=True)
class Splits:
    """The annotation files (with their media folders and sampling) of each split."""

    train: tuple[MixtureEntry, ...]
    val: tuple[MixtureEntry, ...] = ()


@dataclass(frozen=True)
class JsonSource:
    """One LLaVA-format JSON / JSONL file per split, on disk (the real data): checked, never generated."""

    train_json: str
    data_root: str
    val_json: str | None = None
    # the held-out file's media folder where it is not data_root's (None: data_root)
    val_data_root: str | None = None

    def check(self) -> Splits:
        """A FileNotFoundError naming the key to set for each annotation file or media folder that is missing (all
        of them in one message); the splits otherwise."""
        missing = [f"data.source.{key} is null: set `data.source.{key}=<{kind}>`"
                   for key, kind in (("train_json", "file"), ("data_root", "dir")) if getattr(self, key) is None]  # fmt: skip
        for key, value in (("train_json", self.train_json), ("val_json", self.val_json)):
            if value is not None and not Path(value).is_file():
                missing.append(f"annotation file '{value}' not found: set `data.source.{key}=<file>`")
        for key, value in (("data_root", self.data_root), ("val_data_root", self.val_data_root)):
            if value is not None and not Path(value).is_dir():
                missing.append(f"media folder '{value}' not found: set `data.source.{key}=<dir>`")
        if missing:
            raise FileNotFoundError("\n".join(missing) + DATA_DIR_HINT)
        root_dir = Path(self.data_root)
        val_root = Path(self.val_data_root) if self.val_data_root is not None else root_dir
        val = (MixtureEntry(Path(self.val_json), val_root),) if self.val_json else ()
        return Splits(train=(MixtureEntry(Path(self.train_json), root_dir),), val=val)

    def prepare(self, root: str | Path | None = None) -> Splits:
        return self.check()


@dataclass(frozen=True)
class MixtureSource:
    """Mixture YAMLs (SPEC 5) per split; their relative paths are taken from `data_dir`."""

    train: str
    data_dir: str
    val: str | None = None

    def check(self) -> Splits:
        """A FileNotFoundError naming what to set where a mixture file, or an annotation file or media folder it
        lists, is missing (the media are checked sample by sample: a missing clip skips its sample, but a missing
        folder would skip a whole dataset of the mix under the bad-sample limit); the splits otherwise."""
        if self.train is None:  # the training mixture has no default to fall back on: a stage's own is needed
            raise FileNotFoundError("data.source.train is null: set `data.source.train=<file.yaml>`")
        if self.data_dir is None:
            raise FileNotFoundError(f"data.source.data_dir is null: set `data.source.data_dir=<dir>`{DATA_DIR_HINT}")
        for key, value in (("data.source.train", self.train), ("data.source.val", self.val)):
            if value is not None and not Path(value).is_file():
                raise FileNotFoundError(f"mixture file '{value}' not found: set `{key}=<file.yaml>`")
        train = tuple(read_mixture(self.train, self.data_dir))
        val = tuple(read_mixture(self.val, self.data_dir)) if self.val else ()
        listed = [(e, self.train) for e in train] + [(e, self.val) for e in val]
        missing = [
            f"annotation file '{e.json_path}' (of {mixture})" for e, mixture in listed if not e.json_path.is_file()
        ]
        missing += sorted(  # a folder no record reads (a text-only file's, one of absolute paths) may be absent
            {
                f"media folder '{e.data_root}' (of {mixture})"
                for e, mixture in listed
                if not e.data_root.is_dir() and e.json_path.is_file() and _reads_its_root(e)
            }
        )
        if missing:  # every one at once: a mixture lists ten files, and a launch per missing one would be slow
            raise FileNotFoundError(
                f"{len(missing)} path(s) of the mixture not found, starting at data.source.data_dir "
                f"('{self.data_dir}'){DATA_DIR_HINT}:\n  " + "\n  ".join(missing)
            )
        return Splits(train=train, val=val)

    def prepare(self, root: str | Path | None = None) -> Splits:
        return self.check()


def _reads_its_root(entry: MixtureEntry) -> bool:
    """Whether a record of the entry's file names media relative to its data_root (a text-only file, or one that
    names its media by absolute paths, reads none). Read up to the first such record, and only for a missing root."""
    for record in iter_records(entry.json_path):
        if not isinstance(record, dict):
            continue
        names = record.get("video", record.get("image"))
        for name in names if isinstance(names, list) else [names]:
            if isinstance(name, str) and name.strip() and not Path(name).is_absolute():
                return True
    return False


def approximate_lengths(index: SampleIndex, visual_tokens: Callable[[int, str], int], num_frames: int) -> np.ndarray:
    """(samples,) each sample's LLM tokens, about, without reading its media: 4 bytes of its record's JSON per text
    token, plus its visual tokens (a video at `num_frames`, a list of images as one clip of them all)."""
    modalities, images = index.modalities(), index.image_counts()
    lengths = index.text_bytes() // 4
    lengths[modalities == 2] += visual_tokens(num_frames, "video")
    for count in np.unique(images[modalities == 1]).tolist():
        lengths[(modalities == 1) & (images == count)] += visual_tokens(max(count, 1), "image")  # [] is malformed
    return lengths


class VideoQADataModule(LightningDataModule):
    """Serves LLaVA-format video QA for training (loss), validation (loss) and test (greedy multiple choice).

    `source` is anything with `prepare(root) -> splits` whose `train` / `val` are MixtureEntry tuples (JsonSource,
    MixtureSource, SyntheticVideoQA); `visual_tokens(T, modality)` is the network's token count, which the dataset
    needs to size the placeholder. `split_turns`: one training sample per exchange of a conversation (SPEC 5, for
    guided compressors); None follows `guided`. `build` makes the data module before the model, so that its values
    are checked before any weights load, and then gives it both from the network (`use_network`). `quarantine`: a
    preflight's quarantine.jsonl, whose samples are left out. `index_dir`: where the sample indexes are saved
    once (by `prepare_data`) and memory-mapped by every rank and worker; None builds them in memory per process.
    `group_by_length`: training batches of one modality
    and similar length (TrainSampler). `pad_to_square`: frames padded to square with the mean colour before the
    resize (the release's "pad"), else stretched (its stage 1). `too_long`: a training sample over `max_length`
    tokens is skipped and counted (`skip`), or its text cut as the release cut it (`truncate`; see TooLong).
    `multiprocessing_context`: how the loaders start their workers (MultiprocessingContext); None: torch's default.
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
        sampling: dict | None = None,
        pad_to_square: bool = True,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 2,
        multiprocessing_context: str | None = None,
        max_length: int = 4096,
        too_long: str = "skip",
        split_turns: bool | None = None,
        guided: bool = False,
        quarantine: str | None = None,
        group_by_length: bool = False,
        index_dir: str | None = None,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        sizes = (
            ("data.batch_size", batch_size),
            ("data.eval_batch_size", eval_batch_size),
            ("data.max_length", max_length),
        )
        for key, value in sizes:
            whole_number(key, value)
        whole_number("data.num_workers", num_workers, least=0)
        whole_number("data.seed", seed, least=0)
        self.worker_start = loader_start("data.multiprocessing_context", multiprocessing_context, num_workers)
        for key, value in (
            ("data.pad_to_square", pad_to_square),
            ("data.group_by_length", group_by_length),
            ("data.shuffle", shuffle),
        ):
            flag(key, value)
        if split_turns is not None:
            flag("data.split_turns", split_turns)
        self.source = source
        self.root = root
        self.llm_path, self.vision_path = llm_path, vision_path
        self.visual_tokens = visual_tokens
        self.visual_token = visual_token
        self.num_frames = num_frames
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers = num_workers
        self.sampling = FrameSampling(num_frames=num_frames, **(sampling or {}))
        self.pad_to_square = pad_to_square
        self.max_length = max_length
        self.too_long = TooLong.of(too_long, "data.too_long")
        self._split_turns, self.guided = split_turns, guided
        self.quarantine = quarantine
        self.group_by_length = group_by_length
        self.index_dir = index_dir
        self.shuffle = shuffle
        self.seed = seed
        self.splits = None
        self._train_loader: ResumableLoader | None = None
        self._train_state: dict | None = None  # a checkpoint's loader state, for the loader not made yet
        self._said_left_out: tuple[int, int] | None = None  # the cut last said (`_say_left_out`)

    @property
    def split_turns(self) -> bool:
        return self.guided if self._split_turns is None else self._split_turns

    def use_network(self, visual_tokens: Callable[[int, str], int], guided: bool) -> None:
        """The network's token count and whether its compressor reads the instruction (see the class)."""
        if self.splits is not None:
            raise RuntimeError("use_network comes before setup: the datasets are sized by the network")
        self.visual_tokens, self.guided = visual_tokens, guided

    def prepare_data(self) -> None:
        """Once per node: generate or check the source, and build the sample indexes into `index_dir`."""
        splits = self.source.prepare(self.root)
        if self.index_dir is not None:
            self._indexes(splits)

    def _indexes(self, splits) -> tuple[SampleIndex, SampleIndex, SampleIndex]:
        """Training, validation and test indexes. Validation is split per exchange as training is (its loss is
        then measured as it is trained: each answer under its own question's guide); the test asks each held-out
        conversation's last question."""
        exclude = read_quarantine(self.quarantine) if self.quarantine else []

        def index(entries, **options) -> SampleIndex:
            if self.index_dir is None:
                return SampleIndex.build(entries, seed=self.seed, **options)
            return SampleIndex.cached(self.index_dir, list(entries), seed=self.seed, **options)

        train = index(splits.train, split_turns=self.split_turns, exclude=exclude)
        val = index(splits.val, split_turns=self.split_turns)
        return train, val, index(splits.val) if self.split_turns else val

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        if self.visual_tokens is None:
            raise ValueError("the data module needs the network's visual token count (visual_tokens)")
        self.splits = self.source.prepare(self.root)
        tokenizer = load_tokenizer(self.llm_path)
        guide_tokenizer = load_guide_tokenizer(self.vision_path)
        common = dict(
            encoder=ChatEncoder(tokenizer, self.visual_token),
            transform=FrameTransform.from_pretrained(self.vision_path, pad_to_square=self.pad_to_square),
            visual_tokens=self.visual_tokens,
            sampling=self.sampling,
            max_length=self.max_length,
            too_long=self.too_long,
        )
        train, val, test = self._indexes(self.splits)
        self.train_set = VideoQADataset(index=train, **common)
        self.val_set = VideoQADataset(index=val, **common)
        self.test_set = VideoQADataset(index=test, generation=True, **common)
        self.collate = Collator(pad_token_id=tokenizer.pad_token_id, guide_tokenizer=guide_tokenizer)
        self.collate_left = Collator(
            pad_token_id=tokenizer.pad_token_id, guide_tokenizer=guide_tokenizer, padding_side="left"
        )
        log.info("data: %d train / %d held-out samples", len(self.train_set), len(self.val_set))
        if stage == "fit" and len(self.train_set) == 0:
            raise ValueError(f"the training data holds no samples ({self.source}): check data.source")

    def _loader(self, dataset, batch_size: int, shuffle: bool, collate) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),  # the batch goes to the GPU by DMA, without a pageable copy
            worker_init_fn=loader_worker_signals,
            **self.worker_start,
        )

    def train_dataloader(self) -> ResumableLoader:
        """The training batches in `TrainSampler`'s order (this process's shard under DDP, `shuffle` and `seed`
        honoured there too), grouped by modality and length with `group_by_length`; resumable mid-epoch. Under a
        strategy that accumulates gradients inside its engine, whole optimizer steps only (`_step_samples`)."""
        world, rank = 1, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        grouping = {}
        if self.group_by_length:
            index = self.train_set.index
            lengths = approximate_lengths(index, self.visual_tokens, self.num_frames)
            grouping = dict(batch_size=self.batch_size, lengths=lengths, groups=index.modalities())
        step = self._step_samples()
        sampler = TrainSampler(
            self.train_set,
            num_replicas=world,
            rank=rank,
            shuffle=self.shuffle,
            seed=self.seed,
            multiple_of=step,
            **grouping,
        )
        if len(sampler) < sampler.num_samples:
            self._say_left_out(sampler, step, world)
        elif sampler.total_size > len(self.train_set) and self._said_left_out != (len(sampler), world):
            self._said_left_out = (len(sampler), world)  # said once, as the cut is
            repeats = sampler.total_size - len(self.train_set)
            (log.warning if len(self.train_set) < world else log.info)(
                "%d training samples on %d processes: each epoch trains %d of them twice (or more), so that every "
                "process has %d", len(self.train_set), world, repeats, sampler.num_samples,
            )  # fmt: skip
        loader = self._train_loader = ResumableLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),  # the batch goes to the GPU by DMA, without a pageable copy
            worker_init_fn=loader_worker_signals,
            **self.worker_start,
            epochs_done=lambda: (
                None if self.trainer is None else self.trainer.fit_loop.epoch_progress.current.processed
            ),
            batches_per_epoch=lambda: None if self.trainer is None else self.trainer.num_training_batches,
        )
        if self._train_state is not None:  # once: a loader made again (reload_dataloaders_every_n_epochs) starts anew
            loader.load_state_dict(self._train_state)
            self._train_state = None
        return loader

    def _step_samples(self) -> int:
        """This process's samples per optimizer step where the trainer's strategy accumulates gradients inside its
        engine (Lightning's `handles_gradient_accumulation`: DeepSpeed), else 1 (no cut).

        Such an engine steps on every accumulation-th batch since the fit began, while Lightning counts from each
        epoch's start and sizes the schedule (estimated_stepping_batches) for a partial last step per epoch, which
        the engine never takes: the last epoch's partial accumulation is never applied, and an earlier one's joins
        the next epoch's first step, after which the engine steps batches away from where Lightning steps its
        scheduler, saves its checkpoints and stops on SIGTERM. An epoch of whole accumulations keeps them together.
        """
        trainer = self.trainer
        if trainer is None or not trainer.strategy.handles_gradient_accumulation:
            return 1
        return self.batch_size * trainer.accumulate_grad_batches

    def _say_left_out(self, sampler: TrainSampler, step: int, world: int) -> None:
        """The samples an epoch leaves out to end on an optimizer step (`_step_samples`), said, or a ValueError
        where not one step is left."""
        accumulation = step // self.batch_size
        if len(sampler) == 0:
            raise ValueError(
                f"each process has {sampler.num_samples} training samples an epoch, fewer than one optimizer step "
                f"takes from it (data.batch_size {self.batch_size} x {accumulation} accumulation = {step}), and the "
                "strategy accumulates inside its engine (DeepSpeed), which never steps on a partial accumulation: "
                "lower global_batch_size, or train on more samples"
            )
        if self._said_left_out == (len(sampler), sampler.num_samples):
            return  # DeepSpeedStrategy makes a loader of its own before the fit's, to read its batch size
        self._said_left_out = (len(sampler), sampler.num_samples)
        left_out = max(len(self.train_set) - len(sampler) * world, 0)  # the shards' padding repeats come off first
        log.warning(
            "the strategy accumulates gradients inside its engine (DeepSpeed), which steps on whole accumulations "
            "only: each epoch takes %d of each process's %d training samples (optimizer steps of data.batch_size %d x "
            "%d accumulation), leaving out %d of the %d samples an epoch (other ones each epoch where shuffled)",
            len(sampler), sampler.num_samples, self.batch_size, accumulation, left_out, len(self.train_set),
        )  # fmt: skip

    def state_dict(self) -> dict:
        """The training loader's place, which Lightning keeps in its checkpoints: it restores a data module's state
        whatever the strategy, where its own loader state is loaded after the trainer has started the loader
        when the schedule is sized first (estimated_stepping_batches), and then never applies."""
        if self._train_loader is None:
            return {} if self._train_state is None else {"train_loader": self._train_state}
        return {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._train_state = state.get("train_loader")
        if self._train_loader is not None and self._train_state is not None:
            self._train_loader.load_state_dict(self._train_state)
            self._train_state = None

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, False, self.collate)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, False, self.collate_left)
