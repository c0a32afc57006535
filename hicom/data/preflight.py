"""Preflight: probe every sample of a corpus before training, and list the bad ones.

    python -m hicom.data.preflight SOURCE --data-root DIR --out DIR [--workers N] [--num-frames N] [--seed S]
        [--llm DIR --video-tokens N --image-tokens N [--max-length N] [--visual-token TOKEN]]

SOURCE is a mixture YAML (SPEC 5; its relative paths are taken from --data-root) or one LLaVA-format JSON / JSONL
file (its media paths relative to --data-root). Every sample is checked in parallel: its conversation (roles,
turns, placeholder), and its video or image (exists, decodes the sampled frames, frame count, fps, duration).
Writes OUT/quarantine.jsonl, one line per bad sample {source, index, id, path, reason, error}, which training
takes as `data.quarantine=OUT/quarantine.jsonl`, and OUT/summary.json (counts per reason, frame / duration / size /
text-length statistics). With `--llm` (the run's model.llm.path) it also counts each sample's LLM tokens as
training encodes them (chat template, the clip's visual tokens: `--video-tokens` for a clip of --num-frames frames,
`--image-tokens` per image, as the run summary and the dry run print them) and how many exceed `--max-length`
(data.max_length): those are the samples `data.too_long` will skip or cut, not quarantined here. Exits 0 whatever
it finds: it reports, it does not judge. Stopped part-way, it goes on from OUT/progress.jsonl when run again.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from hicom.data.dataset import check_record, conversation_of, media_of, read_image
from hicom.data.index import MixtureEntry, SampleIndex, read_mixture
from hicom.data.template import ChatEncoder, MalformedSample, TooLongSample, check_placeholders
from hicom.data.video import FrameSampling, VideoDecodeError, load_video, within_time_limit
from hicom.utils.files import file_digest

_INDEX: SampleIndex | None = None
_SAMPLING: FrameSampling | None = None


@dataclass(frozen=True)
class TokenCount:
    """How a sample's LLM tokens are counted: the run's tokenizer and chat template with its visual placeholder, and
    the compressor's tokens for a clip and for an image. A conversation counts whole: with split turns its last
    exchange is a sample of that length, the earlier ones shorter. One over twice `max_length` is counted only to
    there (each message renders the conversation up to it again: thousands of exchanges would take minutes)."""

    encoder: ChatEncoder
    video_tokens: int
    image_tokens: int
    max_length: int

    def of(self, messages: list[dict], modality: str, images: int) -> int:
        visual = {"video": self.video_tokens, "image": self.image_tokens * images}.get(modality, 0)
        try:
            return len(self.encoder.encode(messages, visual, stop_after=2 * self.max_length)["input_ids"])
        except TooLongSample:  # its clip's placeholder lies beyond: over the limit, by at least this much
            return 2 * self.max_length + 1


_TOKENS: TokenCount | None = None


def _init(
    index: SampleIndex | Path, sampling: FrameSampling, tokens: TokenCount | None = None, parent: int | None = None
) -> None:
    """A worker's state: the index (or the folder it was saved to, memory-mapped here), the sampling, the count;
    and a watch on the `parent` process, whose end ends the worker (its children are the fork server's, which a
    kill of the preflight alone leaves running, holding their memory and the terminal's output)."""
    global _INDEX, _SAMPLING, _TOKENS
    _INDEX = SampleIndex.load(index) if isinstance(index, Path) else index
    _SAMPLING, _TOKENS = sampling, tokens
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(pid: int) -> None:
    while True:
        time.sleep(1.0)
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):  # gone, or another user's process under that number now
            os._exit(1)


def probe(i: int) -> dict:
    """One sample's facts, and `reason` / `error` when it cannot be trained on."""
    record = _INDEX.record_of(i)
    file, row = _INDEX.where(i)
    out = {"source": file, "index": row}
    try:
        check_record(record)
        out["id"] = str(record.get("id", row))
        out["path"] = record.get("video") or record.get("image")
        # the training dataset's own rules: its media fields, its placeholders (one per clip, or one per image)
        media = media_of(record, _INDEX.root_of(i))
        messages = conversation_of(record, media.modality)
        out["text_chars"] = sum(len(m["content"]) for m in messages)
        check_placeholders(messages, media.modality != "text")
        if _TOKENS is not None:
            out["tokens"] = _TOKENS.of(messages, media.modality, len(media.paths))
        if media.modality == "video":
            sizes = []

            def measured(frames: np.ndarray) -> torch.Tensor:  # the size noted, a pixel kept: not 796 MB of 4K
                sizes.append(frames.shape[1:3])
                return torch.from_numpy(frames[:, :1, :1].copy())

            sampled = load_video(media.paths[0], _SAMPLING, start=media.start, end=media.end, shrink=measured)
            out["frames_sampled"] = len(sampled.frames)
            out["frames"] = sampled.available
            out["fps"] = round(sampled.fps, 3)
            out["duration_s"] = round(sampled.duration, 3)
            out["height"], out["width"] = (int(n) for n in sizes[0])
        for path in media.paths if media.modality == "image" else ():
            within_time_limit(lambda p=path: read_image(p), _SAMPLING.time_limit, str(path))
    except VideoDecodeError as err:
        out.update(reason=err.reason, error=str(err))
    except MalformedSample as err:
        out.update(reason="malformed", error=str(err))
    except Exception as err:  # noqa: BLE001  as in training: one sample's failure is reported, not fatal
        out.update(reason="error", error=f"{type(err).__name__}: {err}")
    return out


def entries_of(source: Path, data_root: Path) -> list[MixtureEntry]:
    """The annotation files `source` names; a FileNotFoundError that lists every one of them that is missing."""
    suffix = source.suffix.lower()
    if suffix in (".yaml", ".yml"):
        entries = read_mixture(source, data_root)
    elif suffix in (".json", ".jsonl"):
        entries = [MixtureEntry(source, data_root)]
    else:
        raise ValueError(f"{source}: expected a mixture .yaml or a .json / .jsonl annotation file")
    missing = list(dict.fromkeys(str(e.json_path) for e in entries if not e.json_path.is_file()))
    if missing:
        raise FileNotFoundError(f"{len(missing)} annotation file(s) of {source} not found: {', '.join(missing)}")
    return entries


def summarise(results: list[dict], max_length: int | None = None) -> dict:
    reasons = Counter(r["reason"] for r in results if "reason" in r)

    def stats(key: str) -> dict | None:
        values = np.array([r[key] for r in results if r.get(key) is not None], dtype=float)
        if not len(values):
            return None
        low, mid, high = np.percentile(values, [5, 50, 95])
        return {"min": values.min(), "p5": low, "median": mid, "p95": high, "max": values.max()}

    return {
        "samples": len(results),
        "bad": sum(reasons.values()),
        "by_reason": dict(reasons.most_common()),
        "frames": stats("frames"),
        "frames_sampled": stats("frames_sampled"),
        "duration_s": stats("duration_s"),
        "height": stats("height"),
        "width": stats("width"),
        "text_chars": stats("text_chars"),
        **(
            {}
            if max_length is None
            else {
                "tokens": stats("tokens"),
                "max_length": max_length,
                "over_max_length": sum(r.get("tokens", 0) > max_length for r in results),
            }
        ),
    }


def run(
    source: Path,
    data_root: Path,
    out: Path,
    workers: int,
    sampling: FrameSampling,
    progress: bool,
    seed: int = 0,
    tokens: TokenCount | None = None,
) -> dict:
    """Probe the samples training would read: `seed` is the run's data.seed, with which `random:N` mixture
    entries pick their records; `tokens` counts their LLM tokens too.

    Each chunk's results go to OUT/progress.jsonl as it finishes: a preflight stopped part-way (a kill, a node's
    time limit) and run again with the same files and options probes only what it had not; the file goes once
    quarantine.jsonl and summary.json are written."""
    # as resolved here: the results name their files so, and a preflight run again from another folder goes on
    entries = [
        replace(e, json_path=e.json_path.resolve(), data_root=e.data_root.resolve())
        for e in entries_of(source, data_root)
    ]
    index = SampleIndex.build(entries, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    # Workers are started fresh (a fork server's children, or spawned), not forked from this process: a fork copies
    # the locks its other threads hold (a decoder's, an allocator's) and a child that needs one waits forever. They
    # memory-map the index from a copy saved under `out` (not the node's /tmp, which may be small or in memory),
    # sharing its pages, as forked children would.
    context = multiprocessing.get_context("forkserver" if sys.platform == "linux" else "spawn")
    if context.get_start_method() == "forkserver":  # the server imports what this does once, not each worker (not
        context.set_forkserver_preload(["hicom.data.dataset"])  # this module: `-m` runs it in each as __mp_main__)
    journal = Journal(out / PROGRESS, _options(source, data_root, entries, len(index), seed, sampling, tokens))
    if journal.done:
        print(f"preflight: {journal.probed} of {len(index)} samples probed before, in {journal.path}", file=sys.stderr)
    saved = out / ".index"
    shutil.rmtree(saved, ignore_errors=True)  # a copy an interrupted preflight left
    try:
        index.save(saved)
        results = _probe_all(
            context,
            workers,
            (saved, sampling, tokens, os.getpid()),
            len(index),
            source,
            progress,
            journal,
            partial(_crashed, index),
        )
    finally:
        shutil.rmtree(saved, ignore_errors=True)
        journal.close()
    digests: dict[str, str] = {}
    with (out / "quarantine.jsonl").open("w") as f:
        for result in results:
            if "reason" in result:
                keep = ("source", "index", "id", "path", "reason", "error")
                # the file as resolved here: training, launched from another folder, finds it all the same; and its
                # content, by which training finds it where the data has moved since (another mount, a copy)
                source = str(Path(result["source"]).resolve())
                if source not in digests:
                    digests[source] = file_digest(Path(source))
                entry = {**{k: result.get(k) for k in keep}, "source": source, "file_digest": digests[source]}
                f.write(json.dumps(entry) + "\n")
    summary = summarise(results, None if tokens is None else tokens.max_length)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    journal.path.unlink(missing_ok=True)
    return summary


PROGRESS = "progress.jsonl"  # under --out: the options, then each finished range's results, a line each


def _options(source, data_root, entries, n, seed, sampling, tokens) -> dict:
    """What a preflight's results follow from: its files (as they are now), their records' selection, the
    sampling, the token count's settings."""
    stats = [e.json_path.stat() for e in entries]
    files = [
        [str(e.json_path), st.st_size, st.st_mtime_ns, str(e.data_root), repr(e.sampling)]
        for e, st in zip(entries, stats, strict=True)
    ]
    counted = None
    if tokens is not None:
        encoder = tokens.encoder
        counted = [encoder.tokenizer.name_or_path, encoder.visual_token, tokens.video_tokens, tokens.image_tokens]
        counted.append(tokens.max_length)
    return {
        "source": str(Path(source).resolve()),
        "data_root": str(Path(data_root).resolve()),
        "files": files,
        "samples": n,
        "seed": seed,
        "sampling": repr(sampling),
        "tokens": counted,
    }


class Journal:
    """OUT/progress.jsonl: a first line with the options, then a line per finished range of samples, flushed as it
    is written. Opened on one that holds other options (files edited since, another --num-frames), it starts
    again; a line cut short by a kill is dropped."""

    def __init__(self, path: Path, options: dict) -> None:
        self.path, self.done = path, {}  # results by the first sample of their range
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        try:
            same = bool(lines) and json.loads(lines[0]) == {"options": options}
        except ValueError:
            same = False
        for line in lines[1:] if same else ():
            try:
                entry = json.loads(line)
                self.done[int(entry["start"])] = list(entry["results"])
            except (ValueError, KeyError, TypeError):  # the last line, cut short
                break
        tmp = path.with_name(path.name + ".tmp")  # what was read, and nothing cut short, to append to
        with tmp.open("w", encoding="utf-8") as f:
            f.write(json.dumps({"options": options}) + "\n")
            for start, results in self.done.items():
                f.write(json.dumps({"start": start, "results": results}) + "\n")
        tmp.replace(path)
        self._file = path.open("a", encoding="utf-8")

    @property
    def probed(self) -> int:
        return sum(len(results) for results in self.done.values())

    def add(self, start: int, results: list[dict]) -> None:
        self.done[start] = results
        self._file.write(json.dumps({"start": start, "results": results}, default=_plain) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _plain(value):
    """A numpy scalar as the Python number it holds, for JSON."""
    return value.item() if isinstance(value, np.generic) else str(value)


def _crashed(index: SampleIndex, i: int) -> dict:
    """Sample `i`'s entry where probing it alone ended its process while another process could probe."""
    record = index.record_of(i)
    file, row = index.where(i)
    out = {"source": file, "index": row, "reason": "crashed"}
    if isinstance(record, dict):
        out["id"] = str(record.get("id", row))
        out["path"] = record.get("video") or record.get("image")
    out["error"] = "its probe ended the process probing it alone, where another probed (a decoder crashing on it)"
    return out


# samples a worker probes per task; at most two tasks per worker are handed out at once
CHUNK = 16
# processes ended, each probing one sample alone, before any probe came back: workers that cannot start
MAX_CRASHES = 8


def _probe_range(start: int, stop: int) -> list[dict]:
    return [probe(i) for i in range(start, stop)]


def _probe_all(
    context,
    workers: int,
    initargs: tuple,
    n: int,
    source: Path,
    progress: bool,
    journal: Journal | None = None,
    crashed: Callable[[int], dict] | None = None,
) -> list[dict]:
    """Every sample's probe, in order, from `workers` processes, each given a new chunk as soon as it is done with
    one (a slow clip holds up its own chunk only, not the others behind it); those in `journal` already are not
    probed again. A worker that dies (a decoder crashing on a file, memory running out, a kill) loses the chunks
    then in flight: their samples are probed again one per task, and those in flight at a second loss each alone,
    in a process of its own: a death there is that sample's (`crashed(i)`, reason `crashed`) where another process
    then probes a sample that came back before. Where that one dies too, or MAX_CRASHES die alone before any probe
    came back (workers that cannot start), the preflight stops, naming them, with none of them recorded."""
    done = journal.done if journal is not None else {}
    covered = np.zeros(n, dtype=bool)
    for start, results in done.items():
        covered[start : start + len(results)] = True
    todo = deque(run for start in range(0, n, CHUNK) for run in _runs(covered, start, min(start + CHUNK, n)))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, initial=int(covered.sum()), desc="preflight", unit="sample")

    control: list[int] = []  # a sample whose probe came back: probed again, it tells a bad file from bad workers

    def note_control(start: int, results: list[dict]) -> None:
        if not control:
            control.extend([start + j for j, r in enumerate(results) if r.get("reason") != "crashed"][:1])

    def finish(start: int, results: list[dict]) -> None:
        if journal is not None:
            journal.add(start, results)
        else:
            done[start] = results
        if bar is not None:
            bar.update(len(results))
        note_control(start, results)

    for start, results in done.items():  # probed before a resume
        note_control(start, results)

    held: list[int] = []  # samples whose process died alone before any probe came back: said once one does
    while todo:
        lost = _pool_pass(context, workers, initargs, todo, finish)
        singles = deque((i, i + 1) for start, stop in sorted(lost) for i in range(start, stop))
        while singles:  # a lost chunk's samples, one per task: a loss then leaves only those in flight
            for start, _ in sorted(_pool_pass(context, workers, initargs, singles, finish)):
                results = _probe_alone(context, initargs, start)
                if results is not None:
                    for i in held:
                        finish(i, [crashed(i)])
                    held.clear()
                    finish(start, results)
                    continue
                # a death alone is the sample's only where a process can still probe another (`control`): workers
                # that cannot start (a script without the __main__ guard), memory taken by something else, a kill
                if crashed is not None and control and _probe_alone(context, initargs, control[0]) is not None:
                    finish(start, [crashed(start)])
                    continue
                held.append(start)
                if crashed is None or control or len(held) >= MAX_CRASHES:
                    raise RuntimeError(
                        f"preflight worker processes stopped on {len(held)} sample(s) probed alone (samples "
                        f"{', '.join(map(str, held))} of {source})"
                        + (f" and on sample {control[0]}, which they probed before" if control else "")
                        + ": a script that calls preflight outside `if __name__ == '__main__':`, which the worker "
                        "processes, started fresh, run again; memory running out; or a kill. What was probed is "
                        f"kept in {PROGRESS} under --out: run it again to go on"
                    )
    if bar is not None:
        bar.close()
    return [result for start in sorted(done) for result in done[start]]


def _runs(covered: np.ndarray, start: int, stop: int) -> list[tuple[int, int]]:
    """The ranges of samples in [start, stop) not yet covered."""
    runs, first = [], None
    for i in range(start, stop):
        if not covered[i] and first is None:
            first = i
        elif covered[i] and first is not None:
            runs.append((first, i))
            first = None
    return runs + ([(first, stop)] if first is not None else [])


def _pool_pass(context, workers: int, initargs: tuple, queue: deque, finish) -> list[tuple[int, int]]:
    """Probe the ranges in `queue` (taking them from it) with a pool of `workers`, two ranges per worker handed out
    at once, calling `finish(start, results)` for each, until the queue is done or a worker dies; then the ranges
    in flight, lost with the pool (those not handed out stay in the queue)."""
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init, initargs=initargs)
    pending: dict = {}
    try:
        return _hand_out(pool, workers, queue, pending, finish)
    except BaseException:  # Ctrl-C, a SIGTERM: what is done is kept, the rest is not waited for (a clip takes a minute)
        try:
            for future, chunk in list(pending.items()):
                if future.done() and not future.cancelled() and future.exception() is None:
                    del pending[future]
                    finish(chunk[0], future.result())
        finally:
            for process in list((getattr(pool, "_processes", None) or {}).values()):  # no public way in 3.11
                process.terminate()
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _hand_out(pool, workers: int, queue: deque, pending: dict, finish) -> list[tuple[int, int]]:
    """`_pool_pass`'s loop, on `pool`, with the futures in flight in `pending`."""
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    while queue or pending:
        broken = False
        while queue and len(pending) < 2 * workers:
            chunk = queue.popleft()
            try:
                pending[pool.submit(_probe_range, *chunk)] = chunk
            except BrokenProcessPool:  # a worker died since the last look: this chunk waits for the next pool
                queue.appendleft(chunk)
                broken = True
                break
        finished, _ = wait(pending, return_when=FIRST_COMPLETED) if pending else (set(), set())
        lost = []
        for future in finished:
            chunk = pending.pop(future)
            try:
                finish(chunk[0], future.result())
            except BrokenProcessPool:
                lost.append(chunk)
        if lost or broken:  # the others in flight: done before the loss, or lost with it
            for future, chunk in list(pending.items()):
                del pending[future]
                if future.done() and future.exception() is None:
                    finish(chunk[0], future.result())
                else:
                    lost.append(chunk)
            return lost
    return []


def _probe_alone(context, initargs: tuple, i: int) -> list[dict] | None:
    """Sample `i`'s probe in a process of its own; None where that process dies."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(1, mp_context=context, initializer=_init, initargs=initargs) as pool:
        try:
            return pool.submit(_probe_range, i, i + 1).result()
        except BrokenProcessPool:
            return None


def _default_workers() -> int:
    """The cores this process may use (SLURM's allocation, a taskset), less one: not the machine's count."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else multiprocessing.cpu_count()
    return max(1, cores - 1)


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a mixture .yaml or a .json / .jsonl annotation file")
    parser.add_argument("--data-root", type=Path, required=True, help="the folder relative paths start from")
    parser.add_argument("--out", type=Path, required=True, help="where quarantine.jsonl and summary.json go")
    parser.add_argument("--workers", type=int, default=_default_workers())
    parser.add_argument(
        "--num-frames",
        type=int,
        default=32,
        help="frames each video must decode (uniformly): the run's data.num_frames",
    )
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds one clip may take")
    parser.add_argument("--seed", type=int, default=0, help="the training run's data.seed (random:N picks with it)")
    parser.add_argument("--no-progress", action="store_true")
    tokens = parser.add_argument_group("token counts (all from the run's config; given --llm, the two counts too)")
    tokens.add_argument(
        "--llm", type=Path, help="the LLM folder whose tokenizer and chat template train: model.llm.path"
    )
    tokens.add_argument("--visual-token", default="<|video_pad|>", help="model.llm.visual_token")
    tokens.add_argument("--video-tokens", type=int, help="visual tokens of a clip of --num-frames frames (run summary)")
    tokens.add_argument(
        "--image-tokens",
        type=int,
        help="visual tokens of one image (the dry run's stage 1); a sample of several images counts each image's, "
        "an upper bound where the compressor's global tokens are shared",
    )
    tokens.add_argument("--max-length", type=int, default=4096, help="data.max_length")
    args = parser.parse_args(argv)
    try:  # what is missing or malformed in the listing, as a usage error before anything starts
        entries_of(args.source, args.data_root)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    sampling = FrameSampling(num_frames=args.num_frames, time_limit=args.time_limit)
    counts = None
    if args.llm is not None:
        missing = [f"--{name}-tokens" for name in ("video", "image") if getattr(args, f"{name}_tokens") is None]
        if missing:
            parser.error(f"--llm counts tokens with the compressor's visual tokens: give {' and '.join(missing)}")
        for name in ("video_tokens", "image_tokens", "max_length"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
        from hicom.utils.checkpoints import load_tokenizer

        encoder = ChatEncoder(load_tokenizer(args.llm), args.visual_token)
        counts = TokenCount(encoder, args.video_tokens, args.image_tokens, args.max_length)
    # a kill (a job's time limit) ends it as Ctrl-C does: the index copy removed, the journal closed, the pool shut
    previous = (
        signal.signal(signal.SIGTERM, _terminated) if threading.current_thread() is threading.main_thread() else None
    )
    try:
        summary = run(
            args.source, args.data_root, args.out, args.workers, sampling, not args.no_progress, args.seed, counts
        )
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(f"{summary['samples']} samples, {summary['bad']} bad: {summary['by_reason'] or 'none'}")
    if counts is not None:
        longest = summary["tokens"]["max"] if summary["tokens"] else 0
        print(
            f"{summary['over_max_length']} over max_length {counts.max_length} tokens (longest {longest:.0f}): "
            "data.too_long skips or cuts them"
        )
    print(f"wrote {args.out / 'quarantine.jsonl'} and {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
