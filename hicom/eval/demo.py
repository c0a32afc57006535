"""Small stand-ins for the benchmarks, to try evaluate.py before the real ones are on disk: for every benchmark
configs/evaluate.yaml configures, two questions per task in the layout its reader takes (SPEC 7: JSON, parquet,
subtitles, folders of frames), over generated clips that the real decoders read.

    python -m hicom.eval.demo                      # writes <paths.cache_dir>/demo_benchmarks/eval/<name>/
    python evaluate.py ckpt=<run> paths.data_dir=.cache/demo_benchmarks benchmark=[mvbench,videomme,mlvu]

The clips are noise and the answers arbitrary, so the scores are chance; what runs is the real path, from reading
the benchmark files to results.md. The folder is marked as the demo's, with the files it wrote: a folder holding
anything else (or a file changed since) is refused, as is a benchmark whose root lies outside it, so that real
benchmark files are never written over.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from hicom.data.synthetic import write_video
from hicom.eval.answers import LETTERS
from hicom.eval.benchmarks import (
    MLVU,
    AnswerIs,
    EgoSchema,
    Kind,
    MVBench,
    MVBenchTask,
    OpenEndedQA,
    QuestionFile,
    VideoMME,
)
from hicom.eval.runner import content_digest

MARK = ".hicom-demo"  # in the data folder: written by this module, safe to write again


def _dump(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


class Media:
    """Generated clips of 48 x 64 noise: an mp4 of 12 frames at 4 fps, or a folder of numbered JPEG frames (as
    MVBench ships episodic_reasoning)."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def clip(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_video(path, self.rng.integers(0, 255, (12, 48, 64, 3), dtype=np.uint8), 4)

    def frames(self, folder: Path, count: int = 9) -> None:
        from PIL import Image

        folder.mkdir(parents=True, exist_ok=True)
        for i in range(1, count + 1):
            Image.fromarray(self.rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / f"{i:05d}.jpg")


def _mvbench(reader: MVBench, media: Media) -> None:
    root = Path(reader.root)
    for name, spec in reader.tasks.items():
        spec = spec if isinstance(spec, MVBenchTask) else MVBenchTask(**spec)
        records = []
        for i in range(2):
            video = f"{name}_{i}" if spec.frames else f"{name}_{i}.mp4"
            target = root / "video" / spec.prefix / video
            if spec.frames:
                media.frames(target)
            else:
                media.clip(target)
            record = {"video": video, "question": f"What happens in clip {i}?", "candidates": ["a", "b", "c"],
                      "answer": ["a", "b", "c"][i]}  # fmt: skip
            if spec.bounded:
                record |= {"start": 0.5, "end": 2.5}
            records.append(record)
        _dump(root / "json" / f"{name}.json", records)


def _videomme(reader: VideoMME, media: Media) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(reader.root)
    rows = []
    for i, (video, duration) in enumerate((("demo0", "short"), ("demo1", "medium"))):
        media.clip(root / reader.video_dir / f"{video}.mp4")
        srt = root / reader.subtitle_dir / f"{video}.srt"
        srt.parent.mkdir(parents=True, exist_ok=True)
        srt.write_text("1\n00:00:00,000 --> 00:00:02,000\nA line of dialogue.\n")
        rows.append(
            {
                "video_id": f"{i:03d}",
                "duration": duration,
                "domain": "Demo",
                "sub_category": "Demo",
                "videoID": video,
                "question_id": f"{i:03d}-1",
                "task_type": "Object Recognition",
                "question": "What is shown?",
                "options": [f"{x}. Option {x}." for x in LETTERS[:4]],
                "answer": LETTERS[i],
            }  # fmt: skip
        )
    path = root / reader.parquet
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _egoschema(reader: EgoSchema, media: Media) -> None:
    root = Path(reader.root)
    questions = []
    for i in range(2):
        media.clip(root / reader.video_dir / f"demo{i}.mp4")
        questions.append({"q_uid": f"demo{i}", "question": "What is c doing?",
                          **{f"option {j}": f"thing {j}" for j in range(5)}})  # fmt: skip
    _dump(root / "questions.json", questions)
    _dump(root / "subset_answers.json", {"demo0": 1, "demo1": 3})


def _mlvu(reader: MLVU, media: Media) -> None:
    root = Path(reader.root)
    for stem in reader.tasks:
        records = []
        for i in range(2):
            media.clip(root / "video" / stem / f"{stem}_{i}.mp4")
            records.append({"video": f"{stem}_{i}.mp4", "duration": 3.0, "question": "Which one?",
                            "candidates": ["1", "2", "3", "4"], "answer": str(i + 1), "question_type": stem})  # fmt: skip
        _dump(root / "json" / f"{stem}.json", records)


def _open_ended(reader: OpenEndedQA, media: Media) -> None:
    root = Path(reader.root)
    for i in range(2):
        media.clip(root / reader.video_dir / f"{reader.video_prefix}demo{i}{reader.extensions[0]}")
    _dump(root / "test_q.json", [{"video_name": f"demo{i}", "question": "what is shown", "question_id": f"demo{i}_0"}
                                 for i in range(2)])  # fmt: skip
    _dump(root / "test_a.json", [{"answer": ["dog", "man"][i], "type": i, "question_id": f"demo{i}_0"}
                                 for i in range(2)])  # fmt: skip


def _question_file(reader: QuestionFile, media: Media) -> None:
    """Two questions of two tasks, answered as the reader's `answer_is` says (multiple choice) or by a text."""
    root = Path(reader.root)
    options = ["red", "green", "blue"]
    answers = {AnswerIs.TEXT: options, AnswerIs.LETTER: list(LETTERS), AnswerIs.INDEX: [0, 1, 2]}[reader.answer_is]
    records = []
    for i in range(2):
        media.clip(root / reader.video_dir / f"demo{i}.mp4")
        record = {"question_id": f"demo{i}", "video": f"demo{i}.mp4", "task": f"task{i}", "question": "Which colour?"}
        if reader.kind is Kind.MULTIPLE_CHOICE:
            record |= {"candidates": options, "answer": answers[i]}
        else:
            record["answer"] = options[i]
        records.append(record)
    _dump(root / reader.file, records)


WRITERS = {
    MVBench: _mvbench,
    VideoMME: _videomme,
    EgoSchema: _egoschema,
    MLVU: _mlvu,
    OpenEndedQA: _open_ended,
    QuestionFile: _question_file,
}


def write_demo(cfg: DictConfig, seed: int = 0) -> Path:
    """Write every configured benchmark's stand-in under cfg.paths.data_dir (refused where that folder holds
    anything the demo did not write, or where a benchmark's root lies outside it); returns the folder."""
    data_dir = Path(cfg.paths.data_dir)
    readers = {name: instantiate(cfg.benchmarks[name]) for name in cfg.benchmarks}
    outside = [
        f"benchmarks.{name}.root={reader.root}"
        for name, reader in readers.items()
        if not Path(reader.root).resolve().is_relative_to(data_dir.resolve())
    ]
    if outside:  # a root set to a real benchmark's folder: the marker below speaks for data_dir alone
        raise FileExistsError(
            f"the demo writes only under paths.data_dir ({data_dir}), and these benchmarks read from elsewhere (real "
            f"benchmarks?): {', '.join(outside)}; leave their roots at their defaults, or leave those benchmarks out"
        )
    if data_dir.exists() and any(data_dir.iterdir()):
        foreign = _not_written(data_dir)
        if foreign:
            raise FileExistsError(
                f"{data_dir} holds files the demo did not write (real benchmarks?), e.g. {foreign[:3]}: give "
                "paths.data_dir=<an empty or new folder>"
            )
    data_dir.mkdir(parents=True, exist_ok=True)
    # files: null while writing (a run stopped part-way leaves a folder the next run may write over)
    (data_dir / MARK).write_text(json.dumps({"written_by": "python -m hicom.eval.demo", "files": None}))
    media = Media(seed)
    for name, reader in readers.items():
        writer = WRITERS.get(type(reader))
        if writer is None:
            raise TypeError(f"benchmarks.{name}: no demo writer for {type(reader).__name__}")
        writer(reader, media)
    files = {str(path.relative_to(data_dir)): content_digest(path) for path in _files(data_dir)}
    (data_dir / MARK).write_text(json.dumps({"written_by": "python -m hicom.eval.demo", "files": files}, indent=1))
    return data_dir


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARK)


def _not_written(folder: Path) -> list[str]:
    """The files under `folder` that the demo's last writing there did not write as they are now (all of them
    where the folder is not the demo's): files put there since, or changed since, are someone's. A mark without
    the list (an earlier version's, or a writing stopped part-way) vouches for the whole folder, as it did."""
    if not (folder / MARK).is_file():
        return [str(p.relative_to(folder)) for p in folder.iterdir()]
    try:
        written = json.loads((folder / MARK).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        written = None
    if not isinstance(written, dict):
        return []
    return [
        name
        for name in (str(p.relative_to(folder)) for p in _files(folder))
        if written.get(name) != content_digest(folder / name)
    ]


def main(argv: list[str]) -> Path:
    """`python -m hicom.eval.demo [overrides of configs/evaluate.yaml]`: paths.data_dir defaults to
    <paths.cache_dir>/demo_benchmarks."""
    from hydra import compose, initialize_config_dir

    from hicom.utils.config import hydra_path, project_root

    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        raise SystemExit(0)
    overrides = list(argv)
    if not any(arg.startswith("paths.data_dir=") for arg in overrides):
        overrides.append("paths.data_dir=${paths.cache_dir}/demo_benchmarks")
    with initialize_config_dir(config_dir=str(Path(project_root()) / "configs"), version_base="1.3"):
        cfg = compose("evaluate", overrides=overrides)
    data_dir = write_demo(cfg)
    names = ",".join(cfg.benchmarks)
    print(f"wrote {len(cfg.benchmarks)} benchmarks' stand-ins under {data_dir / 'eval'}; try:\n"
          f"  python evaluate.py ckpt=<a run's folder> {shlex.quote(hydra_path('paths.data_dir', data_dir))} "
          f"'benchmark=[{names}]'")  # fmt: skip
    return data_dir


if __name__ == "__main__":
    main(sys.argv[1:])
