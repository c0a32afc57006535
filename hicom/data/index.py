"""Sample indexes that scale: millions of LLaVA-format records held in a few numpy arrays, and data mixtures.

A Python list of dicts costs about 1 KB per record and, in forked DataLoader workers, is slowly copied into every
worker as reference counts touch its pages. `SampleIndex` keeps each record as UTF-8 JSON in one byte buffer with
int64 offsets, plus one small integer row per sample (source, record, turn): arrays whose pages no worker writes,
so forked workers share them, and a sample is decoded only when it is read.

Mixtures follow SPEC 5: a YAML list (or a `datasets:` list) of {json_path, data_root, sampling_strategy}, the
strategy `all`, `first:N`, `end:N` or `random:N`, N a count or a percentage such as `50%`; relative paths are
taken from the configured data folder.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from hicom.utils.files import file_digest, write_atomically

# a temporary index folder this old is a killed writer's leftover: removed by the next writer (a live one is minutes old)
STALE_SECONDS = 24 * 3600

log = logging.getLogger(__name__)

INDEX_VERSION = 3  # bump when the saved layout or the build's rules change (2: text-only samples stay whole;
# 3: the images of each record)


class Strategy(str, enum.Enum):
    ALL = "all"
    FIRST = "first"
    END = "end"
    RANDOM = "random"


@dataclass(frozen=True)
class Sampling:
    """How many records of a file a mixture takes: all, or `count` / `percent` of them from the start, the
    end, or at random (seeded)."""

    strategy: Strategy = Strategy.ALL
    count: int | None = None
    percent: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> Sampling:
        """`all`, `first:N`, `end:N`, `random:N`, N a count or `P%` (the mixture files' format)."""
        if text is None or str(text).strip() == "all":
            return cls()
        kind, sep, amount = str(text).strip().partition(":")
        if not sep or kind not in {s.value for s in Strategy} - {"all"}:
            raise ValueError(f"sampling_strategy {text!r}: expected all, first:N, end:N or random:N (N or N%)")
        try:
            if amount.endswith("%"):
                percent = float(amount[:-1])
                if not 0 <= percent <= 100:
                    raise ValueError
                sampling = cls(Strategy(kind), percent=percent)
            else:
                count = int(amount)
                if count < 0:
                    raise ValueError
                sampling = cls(Strategy(kind), count=count)
        except ValueError:
            raise ValueError(f"sampling_strategy {text!r}: N must be a count >= 0 or a percentage 0-100%") from None
        if sampling.strategy is Strategy.END and not (sampling.count or sampling.percent):
            raise ValueError(  # the release sliced `[-0:]`, which is every record; N from the end is none
                f"sampling_strategy {text!r} is ambiguous: the release's reading takes every record, the last N none; "
                "write `all`, or leave the entry out"
            )
        return sampling

    def size(self, n: int) -> int:
        """How many records of a file of n records this sampling takes."""
        if self.strategy is Strategy.ALL:
            return n
        if self.count is not None:
            return min(self.count, n)
        # in exact fractions: 2.2% of 1,500 is 33, where floats make it 33.000000000000004 and take 34
        return min(math.ceil(n * Fraction(repr(self.percent)) / 100), n)

    def select(self, n: int, seed: int) -> np.ndarray:
        """Indices of the records taken from a file of n records, in file order (random: a seeded subset)."""
        if self.strategy is Strategy.ALL:
            return np.arange(n)
        k = self.size(n)
        if self.strategy is Strategy.FIRST:
            return np.arange(k)
        if self.strategy is Strategy.END:
            return np.arange(n - k, n)
        return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


@dataclass(frozen=True)
class MixtureEntry:
    """One annotation file of a mixture and the folder its media paths are relative to."""

    json_path: Path
    data_root: Path
    sampling: Sampling = Sampling()


def read_mixture(path: str | Path, data_dir: str | Path | None = None) -> list[MixtureEntry]:
    """The entries of a mixture YAML, paths resolved against `data_dir` (default: the YAML's folder)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mixture file not found: {path}")
    spec = yaml.safe_load(path.read_bytes())  # bytes: YAML's own encoding rules, not the locale's
    items = spec.get("datasets") if isinstance(spec, dict) else spec
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a list of {{json_path, data_root, sampling_strategy}} (or datasets: [...])")
    base = Path(data_dir) if data_dir is not None else path.parent
    entries = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "json_path" not in item:
            raise ValueError(f"{path}: entry {i} has no json_path")
        unknown = set(item) - {"json_path", "data_root", "sampling_strategy"}
        if unknown:
            raise ValueError(f"{path}: entry {i} has unknown fields {sorted(unknown)}")
        for key in ("json_path", "data_root"):  # `data_root:` left empty reads as null
            if key in item and not isinstance(item[key], str) or item.get(key) == "":
                raise ValueError(f"{path}: entry {i}: {key} must be a path, got {item[key]!r}")
        try:
            sampling = Sampling.parse(item.get("sampling_strategy"))
        except ValueError as err:
            raise ValueError(f"{path}: entry {i} ({item['json_path']}): {err}") from err
        entries.append(
            MixtureEntry(
                json_path=base / item["json_path"], data_root=base / item.get("data_root", "."), sampling=sampling
            )
        )
    return entries


UNREADABLE = "__unreadable_line__"  # the one key of the record that stands for a JSONL line that is not JSON


def unreadable_line(record) -> str | None:
    """What was wrong with the JSONL line that `record` stands for, None for a record that was read."""
    if isinstance(record, dict) and set(record) == {UNREADABLE}:
        return str(record[UNREADABLE])
    return None


def iter_records(path: str | Path) -> Iterator:
    """The records of a .json list or a .jsonl file, one at a time for JSONL. A JSONL line that is not JSON (a
    torn write, a stray edit) is one bad sample, not a bad file: it comes out as `{UNREADABLE: what}` in its place,
    so the rows of the lines after it keep their numbers, and the dataset skips it as malformed (logged, counted,
    named by file and row). A .json file that does not parse has no samples to keep and fails here."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    if path.suffix.lower() == ".jsonl":
        with path.open("rb") as f:  # bytes: a line that is not UTF-8 is one bad line too
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError; nested too deep
                        yield {UNREADABLE: f"line {number} is not JSON ({type(err).__name__}: {err})"}
        return
    try:  # bytes: UTF-8 (a byte-order mark allowed) whatever the locale
        records = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError; nested too deep
        raise ValueError(f"{path}: not JSON ({type(err).__name__}: {err})") from err
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of samples")
    yield from records


def count_records(path: str | Path, seen_dir: str | Path | None = None) -> int:
    """The records of an annotation file, read through as the index build reads it: a .json file that is not JSON,
    or not a list, fails here with its path, as does a file none of whose records is a JSON object (a JSONL line
    that is not JSON counts as one record, a bad one). With `seen_dir`, the count of a file read before
    (same path, size and modification time) is taken from there, and a new count is written there."""
    path = Path(path)
    stat = path.stat()
    key = json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    stamp = Path(seen_dir) / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json" if seen_dir is not None else None
    if stamp is not None and stamp.is_file():
        try:
            seen = json.loads(stamp.read_text())
            if seen["key"] == key:
                return int(seen["records"])
        except (ValueError, KeyError, TypeError):
            pass  # a damaged stamp: read the file again
    count = objects = 0
    first_bad = None
    for record in iter_records(path):
        count += 1
        what = unreadable_line(record)
        if isinstance(record, dict) and what is None:
            objects += 1
        elif first_bad is None:
            first_bad = what or f"record {count - 1} is not a JSON object"
    if count and not objects:  # not a file with bad lines but a file of another kind (a JSON list saved as .jsonl)
        raise ValueError(f"{path}: no record is a JSON object ({first_bad}): not a LLaVA-format JSON / JSONL file")
    if stamp is not None:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(stamp, json.dumps({"key": key, "records": count}))
    return count


def check_annotations(entries: Iterable[MixtureEntry], seen_dir: str | Path | None = None) -> int:
    """Read every entry's annotation file through (count_records) and return how many records their sampling
    selects: run before any weights load (and, in a staged run, before the first stage trains), a file that cannot
    be read fails in seconds, not once the training of its stage starts. A file without a record fails too: a
    source of a mixture that adds nothing (a download cut short) would otherwise go untrained in silence."""
    total = 0
    for entry in entries:
        count = count_records(entry.json_path, seen_dir)
        if count == 0:
            raise ValueError(
                f"{entry.json_path} holds no record: a source that would add nothing to the data (a download or "
                "a conversion cut short?); fill it, or drop it from data.source"
            )
        total += entry.sampling.size(count)
    return total


MODALITIES = ("text", "image", "video")


def modality_of(record) -> int:
    """The MODALITIES code of a record (text for anything unreadable: the dataset reports it)."""
    if isinstance(record, dict):
        if "video" in record:
            return 2
        if "image" in record:
            return 1
    return 0


def image_count(record) -> int:
    """The images a record shows (a list of them forms one clip), 0 for anything else."""
    if modality_of(record) != 1:
        return 0
    return len(record["image"]) if isinstance(record["image"], list) else 1


def count_turns(record) -> int:
    """Exchanges (user question + answer) in a record's conversation, 1 when it cannot tell (the dataset then
    reports the record as malformed)."""
    conversations = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(conversations, list):
        return 1
    answers = sum(1 for t in conversations if isinstance(t, dict) and t.get("from") in ("gpt", "assistant"))
    return max(answers, 1)


def _check_excluded(path: Path, records: list, excluded: dict[int, str | None]) -> None:
    """Refuse a quarantine written for another version of the annotation file `path`: a position past its end, or
    whose record has another id than preflight read there (its id, else its position, as preflight writes it)."""
    for row, expected in sorted(excluded.items()):
        if row >= len(records):
            found = "no record"
        elif expected is None:
            continue
        else:
            record = records[row]
            found = str(record.get("id", row)) if isinstance(record, dict) else None
            if found is None or found == expected:
                continue
            found = f"the record {found!r}"
        raise ValueError(
            f"data.quarantine: {path} has {found} at position {row}, where its preflight quarantined "
            f"{expected!r}: the file changed since, and the positions would leave out other samples; run "
            "`python -m hicom.data.preflight` on it again"
        )


class SampleIndex:
    """Samples of one or more annotation files: records as JSON bytes in one buffer, and per sample its source,
    its record and, when conversations are split into one sample per exchange, its turn (-1: the whole conversation).
    """

    def __init__(
        self,
        blob: np.ndarray,
        offsets: np.ndarray,
        source: np.ndarray,
        record: np.ndarray,
        turn: np.ndarray,
        origin: np.ndarray,
        roots: tuple[str, ...],
        files: tuple[str, ...],
        modality: np.ndarray | None = None,
        images: np.ndarray | None = None,
    ) -> None:
        self.origin = origin
        self.modality = modality if modality is not None else np.zeros(len(origin), dtype=np.int8)
        self.images = images if images is not None else np.zeros(len(origin), dtype=np.int32)
        self.blob, self.offsets = blob, offsets
        self.source, self.record, self.turn = source, record, turn
        self.roots, self.files = roots, files
        self.folder: Path | None = None  # where `load` mapped it from, if it did

    def __reduce__(self):
        """A loaded index pickles as its folder, so that a spawned or forkserver DataLoader worker maps the same
        files again instead of receiving a private copy of every array (numpy pickles a memory map by value)."""
        if self.folder is None or not (self.folder / "meta.json").is_file():  # deleted since: by value, from the map
            return super().__reduce__()
        return type(self).load, (str(self.folder),)

    @classmethod
    def build(
        cls,
        entries: Iterable[MixtureEntry],
        *,
        split_turns: bool = False,
        seed: int = 0,
        exclude: Iterable[tuple] = (),
    ) -> SampleIndex:
        """Read every entry's file, keep the records its sampling selects, and split conversations per exchange
        when `split_turns` (guided training: one sample per question). `exclude`: (annotation file, record
        position in that file[, the record's id as preflight read it[, the file's content digest]]) to leave out,
        e.g. a preflight's quarantine; a file whose record at a position has another id (or that has no record
        there) was edited since, and is refused: the positions would leave out other samples. A file named by a
        path this data does not read is found by its digest (the data moved since its preflight: another mount)."""
        excluded: dict[str, dict[int, str | None]] = {}
        digests: dict[str, str] = {}  # a quarantined file's content digest -> its path as the quarantine names it
        relocated: dict[str, str] = {}  # a file read here -> the quarantine's path for it, where they differ
        for file, row, *more in exclude:
            key = str(Path(file).resolve())
            excluded.setdefault(key, {})[int(row)] = more[0] if more else None
            if len(more) > 1 and more[1] is not None:
                digests[more[1]] = key
        chunks: list[bytes] = []
        lengths: list[int] = []
        origin: list[int] = []
        modality: list[int] = []
        images: list[int] = []
        rows: list[tuple[int, int, int]] = []
        roots, files = [], []
        read: set[str] = set()  # the annotation files, resolved
        for source, entry in enumerate(entries):
            records = list(iter_records(entry.json_path))
            chosen = entry.sampling.select(len(records), seed + source)
            roots.append(str(entry.data_root))
            files.append(str(entry.json_path))
            resolved = str(Path(entry.json_path).resolve())
            if resolved in relocated:
                resolved = relocated[resolved]
            elif resolved not in excluded and set(digests.values()) - read:
                moved = digests.get(file_digest(entry.json_path))
                if moved is not None:
                    log.info("the quarantine's %s is %s here (the same content)", moved, entry.json_path)
                    relocated[resolved] = resolved = moved
            skip = excluded.get(resolved, {})
            _check_excluded(entry.json_path, records, skip)
            read.add(resolved)
            unreadable = []
            for row in chosen.tolist():
                if row in skip:
                    continue
                record = records[row]
                try:
                    data = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
                except UnicodeEncodeError as err:  # "\ud83d", an emoji cut in two: JSON can say it, UTF-8 cannot
                    record = {UNREADABLE: f"a lone surrogate {err.object[err.start : err.end]!r} in its text"}
                    data = json.dumps(record).encode()
                what = unreadable_line(record)
                if what is not None:
                    unreadable.append(what)
                origin.append(row)
                modality.append(modality_of(record))
                images.append(image_count(record))
                position = len(lengths)
                chunks.append(data)
                lengths.append(len(data))
                # a text-only conversation stays whole, every answer labelled: there is no clip for a question to
                # guide (as the release keeps it), and splitting would repeat its context once per turn
                split = split_turns and modality[-1] != 0
                turns = range(count_turns(record)) if split else (-1,)
                rows.extend((source, position, turn) for turn in turns)
            if unreadable:
                log.warning(
                    "%s: %d record(s) cannot be read and will be skipped as malformed samples; the first: %s",
                    entry.json_path,
                    len(unreadable),
                    unreadable[0],
                )
            del records
        unread = sorted(set(excluded) - read)
        if unread:  # never silently: a quarantine of other files (or of these under other paths) leaves out nothing
            log.warning(
                "%d quarantined sample(s) name annotation files this data does not read, and are not left out of "
                "it: %s; a quarantine names each file as its preflight resolved it",
                sum(len(excluded[file]) for file in unread),
                unread[:3],
            )
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        blob = np.frombuffer(b"".join(chunks), dtype=np.uint8) if chunks else np.zeros(0, dtype=np.uint8)
        table = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
        return cls(
            blob=blob,
            offsets=offsets,
            source=table[:, 0].astype(np.int32),
            record=table[:, 1],
            turn=table[:, 2].astype(np.int32),
            origin=np.asarray(origin, dtype=np.int64),
            roots=tuple(roots),
            files=tuple(files),
            modality=np.asarray(modality, dtype=np.int8),
            images=np.asarray(images, dtype=np.int32),
        )

    def __len__(self) -> int:
        return len(self.record)

    def modalities(self) -> np.ndarray:
        """(samples,) MODALITIES code of each sample."""
        return self.modality[self.record]

    def image_counts(self) -> np.ndarray:
        """(samples,) the images each sample shows (0 for a video or text)."""
        return self.images[self.record]

    def text_bytes(self) -> np.ndarray:
        """(samples,) the size of each sample's record in bytes: a proxy for its text length."""
        return np.diff(self.offsets)[self.record]

    def record_of(self, i: int):
        """The decoded record of sample i."""
        r = int(self.record[i])
        return json.loads(self.blob[self.offsets[r] : self.offsets[r + 1]].tobytes())

    def root_of(self, i: int) -> Path:
        return Path(self.roots[int(self.source[i])])

    def turn_of(self, i: int) -> int | None:
        turn = int(self.turn[i])
        return None if turn < 0 else turn

    def where(self, i: int) -> tuple[str, int]:
        """(annotation file, record position in that file) of sample i, for reports and quarantine lists."""
        return self.files[int(self.source[i])], int(self.origin[self.record[i]])

    _ARRAYS = ("blob", "offsets", "source", "record", "turn", "origin", "modality", "images")

    def save(self, folder: str | Path) -> Path:
        """Write the index as .npy files plus meta.json, atomically (a temporary sibling renamed into place). The
        first rank of each node may build the same index into a shared folder at once (Lightning's
        prepare_data_per_node), and containers give their processes the same ids on every node: each writes into
        a sibling of its own (mkdtemp), and the first rename wins."""
        import tempfile

        folder = Path(folder)
        tmp = None
        for leftover in folder.parent.glob(f"{folder.name}.tmp-*"):  # of a writer killed a day or more ago
            with contextlib.suppress(OSError):
                if time.time() - leftover.stat().st_mtime > STALE_SECONDS:
                    shutil.rmtree(leftover, ignore_errors=True)
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f"{folder.name}.tmp-", dir=folder.parent))
            for name in self._ARRAYS:
                np.save(tmp / f"{name}.npy", getattr(self, name))
            (tmp / "meta.json").write_text(json.dumps({"roots": self.roots, "files": self.files}))
        except OSError as err:  # numpy names neither the file nor the folder ("Not enough free space to write")
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            free = shutil.disk_usage(folder.parent).free / 2**30 if folder.parent.is_dir() else 0.0
            raise OSError(
                f"writing the sample index into {folder.parent} failed ({err}; {free:.1f} GiB free there): free "
                "space, or point data.index_dir at another folder"
            ) from err
        try:
            tmp.rename(folder)  # atomic; onto a folder another process wrote first it fails
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (folder / "meta.json").is_file():  # not that: a rename that failed for its own reason
                raise
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> SampleIndex:
        """Memory-map a saved index: every process that loads it shares its pages through the page cache."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / "meta.json").read_text())
            arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in cls._ARRAYS}
            index = cls(**arrays, roots=tuple(meta["roots"]), files=tuple(meta["files"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"the sample index {folder} is damaged ({type(err).__name__}: {err}): delete that folder, and the "
                "next run builds it again from the annotation files"
            ) from err
        index.folder = folder.resolve()  # a worker may start in another working directory
        return index

    @classmethod
    def cached(cls, cache_dir: str | Path, entries: list[MixtureEntry], **options) -> SampleIndex:
        """`build(entries, **options)` once per content: saved under `cache_dir`, keyed by the annotation files'
        paths, sizes and modification times and by the options, then memory-mapped by every caller (every DDP
        rank and DataLoader worker), so the corpus is parsed once, not once per process."""
        key = {
            "version": INDEX_VERSION,
            "entries": [
                [str(e.json_path), e.json_path.stat().st_size, e.json_path.stat().st_mtime_ns, str(e.data_root),
                 repr(e.sampling)]
                for e in entries
            ],
            "options": {k: sorted(v, key=repr) if k == "exclude" else v for k, v in options.items()},
        }  # fmt: skip
        digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        folder = Path(cache_dir) / f"index-{digest}"
        if not (folder / "meta.json").is_file():
            cls.build(entries, **options).save(folder)
        return cls.load(folder)

    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in self._ARRAYS)
