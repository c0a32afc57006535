"""evaluate.py end to end: small benchmark folders in each distributed format (generated videos, frame folders,
start / end times, subtitles, a parquet), a tiny trained checkpoint, every benchmark, resume and shards; and the
scoring rules on hand-made predictions."""

import fcntl
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from hicom.data.synthetic import write_video
from hicom.eval.judge import Verdict, judge_predictions, parse_verdict
from hicom.eval.score import main as score_main
from hicom.eval.score import normalize_answer, score_multiple_choice, score_open_ended
from tests.conftest import CONFIGS, SMALL, compose_train

ALL = ["mvbench", "videomme", "videomme_subs", "egoschema", "mlvu", "activitynet_qa", "msvd_qa", "msrvtt_qa", "own"]


def _clip(path: Path, seed: int, frames: int = 12, fps: int = 4) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, rng.integers(0, 255, (frames, 48, 64, 3), dtype=np.uint8), fps)


def _dump(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="session")
def bench_data(tmp_path_factory) -> Path:
    """data_dir/eval/<benchmark> for all eight benchmarks, small, in the layouts they are distributed in."""
    from PIL import Image

    root = tmp_path_factory.mktemp("data")
    ev = root / "eval"
    # MVBench: a bounded task with start / end, a folder-of-frames task, one video missing
    mv = ev / "mvbench"
    _clip(mv / "video/star/Charades_v1_480/a.mp4", 1, frames=20)
    _clip(mv / "video/star/Charades_v1_480/b.mp4", 2)
    seq = [
        {"video": "a.mp4", "question": "What did the person do first?", "candidates": ["sat", "ran", "ate"],
         "answer": "ran", "start": 1.0, "end": 4.0},
        {"video": "b.mp4", "question": "What happened next?", "candidates": ["opened", "closed"], "answer": "closed",
         "start": 0.0, "end": 2.5},
        {"video": "gone.mp4", "question": "Which object?", "candidates": ["cup", "box"], "answer": "cup"},
    ]  # fmt: skip
    _dump(mv / "json/action_sequence.json", seq)
    frames = mv / "video/tvqa/frames_fps3_hq/clip1"
    frames.mkdir(parents=True)
    for i in range(1, 10):
        Image.fromarray(np.full((40, 60, 3), 20 * i, np.uint8)).save(frames / f"{i:05d}.jpg")
    _dump(
        mv / "json/episodic_reasoning.json",
        [{"video": "clip1", "question": "Why did she leave?", "candidates": ["late", "tired", "bored", "sick"],
          "answer": "tired", "start": 0.5, "end": 2.5}],
    )  # fmt: skip
    # Video-MME: a parquet, two videos, one with subtitles
    import pyarrow as pa
    import pyarrow.parquet as pq

    vm = ev / "videomme"
    _clip(vm / "videos/vidA.mp4", 3, frames=16)
    _clip(vm / "videos/vidB.mp4", 4)
    (vm / "subtitle").mkdir(parents=True)
    (vm / "subtitle/vidA.srt").write_text(
        "1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n2\n00:00:02,000 --> 00:00:03,900\n<i>Where is the cat?</i>\n"
    )
    rows = [
        ("001", "short", "Knowledge", "Humanity", "vidA", "001-1", "Counting Problem", "How many people speak?",
         ["A. One.", "B. Two.", "C. Three.", "D. Four."], "B"),
        ("001", "short", "Knowledge", "Humanity", "vidA", "001-2", "Object Recognition", "What animal is mentioned?",
         ["A. Dog.", "B. Cat.", "C. Bird.", "D. Fish."], "B"),
        ("002", "long", "Sports", "Football", "vidB", "002-1", "Action Reasoning", "Why does the crowd cheer?",
         ["A. A goal.", "B. A foul.", "C. Rain.", "D. Music."], "A"),
    ]  # fmt: skip
    names = ["video_id", "duration", "domain", "sub_category", "videoID", "question_id", "task_type", "question",
             "options", "answer"]  # fmt: skip
    (vm / "videomme").mkdir()
    pq.write_table(
        pa.table({n: [r[i] for r in rows] for i, n in enumerate(names)}), vm / "videomme/test-00000-of-00001.parquet"
    )
    # EgoSchema: three questions, two in the public subset
    eg = ev / "egoschema"
    qs = []
    for k, uid in enumerate(["u1", "u2", "u3"]):
        _clip(eg / f"videos/{uid}.mp4", 10 + k)
        qs.append(
            {
                "q_uid": uid,
                "question": f"What is c doing in video {k}?",
                **{f"option {j}": f"thing {j}" for j in range(5)},
            }
        )
    _dump(eg / "questions.json", qs)
    _dump(eg / "subset_answers.json", {"u1": 3, "u3": 0})
    # MLVU dev: two task files of different sizes
    ml = ev / "mlvu"
    _clip(ml / "video/1_plotQA/p.mp4", 20)
    _clip(ml / "video/4_count/c.mp4", 21)
    cand = ["red", "green", "blue", "yellow"]
    _dump(ml / "json/1_plotQA.json", [{"video": "p.mp4", "duration": 12.0, "question": "What colour is the car?",
                                        "candidates": cand, "answer": "blue", "question_type": "plotQA"}])  # fmt: skip
    _dump(ml / "json/4_count.json", [{"video": "c.mp4", "duration": 9.5, "question": f"How many {x}?",
                                       "candidates": ["1", "2", "3", "4"], "answer": "2", "question_type": "count"}
                                      for x in ("cars", "dogs", "cats")])  # fmt: skip
    # a benchmark of one's own: one JSON file of records, answers as candidate texts
    _clip(ev / "own/videos/o1.mp4", 32)
    _dump(ev / "own/questions.json", [{"video": "o1.mp4", "question": q, "candidates": ["left", "right"],
                                       "answer": "right", "task": "side"} for q in ("Where?", "Which side?")])  # fmt: skip
    # open-ended QA: test_q / test_a aligned by index; ActivityNet names its files v_<name>
    for name, prefix, ext in (("activitynet_qa", "v_", ".mp4"), ("msvd_qa", "", ".avi"), ("msrvtt_qa", "", ".mp4")):
        oq = ev / name
        _clip(oq / f"videos/{prefix}x1{ext}", 30)
        _clip(oq / f"videos/{prefix}x2{ext}", 31)
        _dump(oq / "test_q.json", [{"video_name": "x1", "question": "what is shown", "question_id": "x1_0"},
                                   {"video_name": "x2", "question": "who is there", "question_id": "x2_0"}])  # fmt: skip
        _dump(oq / "test_a.json", [{"answer": "dog", "type": 0, "question_id": "x1_0"},
                                   {"answer": "man", "type": 1, "question_id": "x2_0"}])  # fmt: skip
    return root


@pytest.fixture(scope="session")
def trained_run(cache_dir, tmp_path_factory) -> Path:
    from hicom.training import train

    out = tmp_path_factory.mktemp("trained") / "run"
    train(compose_train(cache_dir, out, [*SMALL, "evaluate=false"]))
    return out


def compose_eval(cache: Path, data: Path, out: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            "evaluate",
            overrides=[
                f"paths.cache_dir={cache}",
                f"paths.data_dir={data}",
                "num_workers=0",
                "batch_size=3",
                "sampling.num_frames=8",
                "max_new_tokens=4",
                "~benchmarks.mvbench.tasks",  # a dict override would merge: replace it instead
                "+benchmarks.mvbench.tasks={action_sequence: {prefix: star/Charades_v1_480, bounded: true}, "
                "episodic_reasoning: {prefix: tvqa/frames_fps3_hq, frames: true, bounded: true}}",
                "benchmarks.mlvu.tasks=[1_plotQA,4_count]",
                *overrides,
            ],
        )
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


def test_every_benchmark_end_to_end_then_resume(cache_dir, bench_data, trained_run, tmp_path, caplog):
    from hicom.eval.runner import evaluate

    out = tmp_path / "eval"
    cfg = compose_eval(cache_dir, bench_data, out, [f"ckpt={trained_run}", f"benchmark=[{','.join(ALL)}]"])
    results = evaluate(cfg)
    assert sorted(results) == sorted(ALL)
    sizes = {"mvbench": 4, "videomme": 3, "videomme_subs": 3, "egoschema": 2, "mlvu": 4}
    for name in ALL:
        rows = [json.loads(line) for line in (out / name / "predictions.jsonl").read_text().splitlines()]
        assert len(rows) == sizes.get(name, 2) == results[name]["n"]
        for row in rows:
            assert {"question_id", "task", "answer", "pred", "reply"} <= set(row)
        on_disk = json.loads((out / name / "results.json").read_text())
        assert on_disk["settings"]["frames"] == 8 and "prompts" in on_disk["settings"]
    mv = results["mvbench"]
    assert mv["n_failed"] == 1 and set(mv["per_task"]) == {"action_sequence", "episodic_reasoning"}
    assert results["videomme"]["per_duration"]["short"]["n"] == 2 and "acc_answered" in results["videomme"]
    assert results["egoschema"]["n"] == 2  # the public subset only
    assert results["mlvu"]["per_task"]["count"]["n"] == 3 and "m_avg" in results["mlvu"]
    assert "per_duration" not in results["mlvu"]  # its durations are lengths in seconds, not classes
    assert "exact_match" in results["activitynet_qa"]
    for r in results.values():
        assert r["seconds_per_question"] > 0
    table = (out / "results.md").read_text()
    assert table.count("\n|") == len(ALL) + 2  # header, rule, one row each
    for name, metric in (("videomme", "accuracy over answered"), ("mlvu", "M-Avg"), ("msvd_qa", "exact match")):
        assert f"| {name} | {100 * results[name][results[name]['metric']]:.1f} | {metric} |" in table
    assert results["videomme"]["metric"] == "acc_answered" and results["mvbench"]["metric"] == "acc"
    for name in ("videomme", "mlvu"):  # beside the official metric, the plain accuracy the release prints
        r = results[name]
        assert f"{name}: accuracy over all {r['n']} questions {100 * r['acc']:.1f}" in table
    assert "mvbench: accuracy over all" not in table
    settings = json.loads((out / "settings.json").read_text())
    assert settings["visual_tokens_per_video"] == 8 // 4 * 3 * 3 + 32
    assert settings["compressor"] == "local 4x3x3 direct + global 32 coarse"
    assert table.startswith(f"ckpt `{settings['ckpt']}`, compressor local 4x3x3 direct + global 32 coarse, 8 frames")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()  # the scores under the STYLE's names
    assert events.Scalars("eval/mlvu/m_avg")[0].value == pytest.approx(results["mlvu"]["m_avg"])
    assert events.Scalars("eval/mvbench/per_task/action_sequence/acc")[0].value == pytest.approx(
        results["mvbench"]["per_task"]["action_sequence"]["acc"]
    )

    # the subtitles at the sampled frames reach the Video-MME prompt
    from hicom.eval.benchmarks import read_srt, subtitles_at

    subs = {r["question_id"]: r["prompt"] for r in map(json.loads, (out / "videomme_subs/predictions.jsonl").open())}
    assert "subtitles are listed below:\nHello there." in subs["001-1"]
    asked = "Select the best answer to the following multiple-choice question based on the video."
    # a video without an .srt file: the header, no lines (as the release asks), then the question
    assert subs["002-1"].startswith(f"<video>\nThis video's subtitles are listed below:\n\n{asked}")
    plain = [json.loads(line)["prompt"] for line in (out / "videomme/predictions.jsonl").open()]
    assert plain[0].startswith(f"<video>\n{asked} Respond with only the letter (A, B, C, or D) of the correct option.")
    assert "\nHow many people speak?\nA. One.\nB. " in plain[0] and plain[0].endswith("The best answer is: ")
    mvbench = [r["prompt"] for r in map(json.loads, (out / "mvbench/predictions.jsonl").open()) if "prompt" in r]
    assert "\nOptions:\n(A) " in mvbench[0] and mvbench[0].endswith("directly and only give the best option.")
    cues = read_srt(bench_data / "eval/videomme/subtitle/vidA.srt")
    assert cues[1][2] == "Where is the cat?" and subtitles_at(cues, [0.4, 3.0]) == ["Hello there.", "Where is the cat?"]
    # how many questions had subtitles to show: vidB has none, as some of Video-MME's videos have none
    assert results["videomme_subs"]["n_with_subtitles"] == 2 and "n_with_subtitles" not in results["videomme"]
    assert json.loads((out / "videomme_subs/results.json").read_text())["n_with_subtitles"] == 2
    assert "\nvideomme_subs: subtitles for 2 of 3 questions\n" in table
    assert f"videomme_subs: 1 of 3 questions have no subtitle file in {bench_data / 'eval/videomme/subtitle'}" in (
        caplog.text
    )

    again = evaluate(cfg)  # resumed: everything answered is skipped; the missing video is tried again
    assert all(again[name]["answered_this_run"] == 0 for name in ALL)
    for name in ALL:  # the timing measured when the questions were answered stays
        assert again[name]["seconds_per_question"] == results[name]["seconds_per_question"]
    assert again["mvbench"]["n_failed"] == 1 and again["mvbench"]["n"] == 4


def test_subtitles_in_no_place_the_reader_looks_are_refused_before_the_model_loads(
    cache_dir, bench_data, trained_run, tmp_path, monkeypatch
):
    """A subtitle folder under another name would give a "w/ subs" score with no subtitles at all: refused, naming
    the folder looked in and the setting that moves it."""
    from hicom.eval.benchmarks import BenchmarkFormatError
    from hicom.eval.runner import evaluate

    data = tmp_path / "data"
    shutil.copytree(bench_data / "eval/videomme", data / "eval/videomme")
    (data / "eval/videomme/subtitle").rename(data / "eval/videomme/subtitles")
    monkeypatch.setattr("hicom.eval.runner.load_model", lambda *a: pytest.fail("the model was loaded"))
    said = (
        f"videomme_subs: none of the 3 questions' subtitle files is in {data / 'eval/videomme/subtitle'} (the "
        "first: vidA.srt): put the benchmark's .srt files there, or set benchmarks.videomme_subs.subtitle_dir="
    )
    with pytest.raises(BenchmarkFormatError, match=re.escape(said)):
        evaluate(compose_eval(cache_dir, data, tmp_path / "out", [f"ckpt={trained_run}", "benchmark=videomme_subs"]))


def test_an_answer_asked_without_its_subtitles_is_asked_again_once_they_are_there(tmp_path):
    """The digest of what was asked holds what the prompt showed of the subtitles: whether the .srt file was there
    and what it said, not its name alone."""
    import hashlib

    from hicom.eval.benchmarks import Question
    from hicom.eval.runner import _answered, _row, asked

    srt = tmp_path / "subtitle/vidA.srt"
    q = Question(
        "001-1", "Counting", str(tmp_path / "vidA.mp4"), "How many?", ("One.", "Two."), "B", subtitles=str(srt)
    )
    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps(_row(q, "B", "(B)")) + "\n")  # answered while the subtitles were elsewhere
    assert _answered([path], {q.question_id: q}) == {"001-1"}
    srt.parent.mkdir()
    srt.write_text("1\n00:00:00,000 --> 00:00:01,500\nHello there.\n")
    assert _answered([path], {q.question_id: q}) == set()  # asked again, with its subtitles
    shown = asked(q)
    srt.write_text("1\n00:00:00,000 --> 00:00:01,500\nGeneral Kenobi.\n")
    assert asked(q) != shown
    # a question without subtitles has the digest of earlier versions: folders answered before keep their answers
    plain = Question("001-2", "Counting", str(tmp_path / "vidA.mp4"), "How many?", ("One.", "Two."), start=1.0, end=4.0)
    fields = ["vidA.mp4", 1.0, 4.0, "How many?", ["One.", "Two."], None]
    assert asked(plain) == hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]


def test_a_missing_open_ended_video_is_named_by_its_stem_and_every_extension_tried(tmp_path):
    """MSVD's videos are .avi: a missing one reported as <name>.mp4, the first extension tried, would send the user
    looking for a file the benchmark never had."""
    from hicom.data.video import FrameSampling
    from hicom.eval.benchmarks import OpenEndedQA
    from hicom.eval.runner import BenchmarkDataset

    _clip(tmp_path / "videos/x1.avi", 30)
    _dump(tmp_path / "test_q.json", [{"video_name": f"x{i}", "question": "what is shown", "question_id": f"x{i}_0"}
                                     for i in (1, 2)])  # fmt: skip
    _dump(tmp_path / "test_a.json", [{"answer": "dog", "type": 0, "question_id": f"x{i}_0"} for i in (1, 2)])
    questions = OpenEndedQA(root=str(tmp_path)).read()
    assert questions[0].video == str(tmp_path / "videos/x1.avi") and questions[0].not_found is None
    dataset = BenchmarkDataset(
        questions, encoder=None, transform=None, sampling=FrameSampling(num_frames=4), visual_tokens=None, prompts={}
    )
    skipped = dataset[1]  # the clip is looked for before anything else: the encoder and transform are not needed
    assert skipped["skip"] == "missing"
    assert skipped["error"] == f"{tmp_path / 'videos/x2'}: no file with any of the extensions .mp4, .mkv, .webm, .avi"


def test_the_questions_of_a_clip_that_fails_free_what_its_reading_held(tmp_path, monkeypatch, no_gc):
    """A batch's clips are read once for all of their questions, and a failed read's error kept for the others:
    its traceback held the batch's clip table, which held it, a cycle in which the failed read's decoder state
    (containers, frames, threads) waited for the garbage collector (+124 MB and 37 threads over 100 batches)."""
    import weakref

    from hicom.data.video import FrameSampling, VideoDecodeError
    from hicom.eval.benchmarks import Question
    from hicom.eval.runner import BenchmarkDataset

    class Held:
        pass

    refs = []

    def fails(self, q):
        held = Held()
        refs.append(weakref.ref(held))
        raise VideoDecodeError(f"{q.video}: frames of different sizes")

    questions = [Question(f"q{i}", "t", str(tmp_path / "a.ts"), "What?", ("a", "b")) for i in range(3)]
    dataset = BenchmarkDataset(
        questions, encoder=None, transform=None, sampling=FrameSampling(num_frames=4), visual_tokens=None, prompts={}
    )
    monkeypatch.setattr(BenchmarkDataset, "_clip", fails)
    items = dataset.__getitems__([0, 1, 2])
    assert [item["skip"] for item in items] == ["undecodable"] * 3 and len(refs) == 1  # read once
    assert refs[0]() is None


def test_the_folder_report_holds_every_benchmark_evaluated_into_the_folder(
    cache_dir, bench_data, trained_run, tmp_path
):
    """Two launches into one folder, one benchmark each: the top-level results.json and results.md hold both."""
    from hicom.eval.runner import evaluate

    for name in ("msvd_qa", "mlvu"):
        evaluate(compose_eval(cache_dir, bench_data, tmp_path, [f"ckpt={trained_run}", f"benchmark={name}", "limit=1"]))
    report = json.loads((tmp_path / "results.json").read_text())
    assert list(report) == ["mlvu", "msvd_qa"]
    assert all(report[name] == json.loads((tmp_path / name / "results.json").read_text()) for name in report)
    table = (tmp_path / "results.md").read_text()
    assert "\n| mlvu | " in table and "\n| msvd_qa | " in table


def test_shards_answer_their_share_and_the_last_one_merges(cache_dir, bench_data, trained_run, tmp_path):
    from hicom.eval.runner import evaluate

    out = tmp_path / "sharded"
    first = evaluate(
        compose_eval(cache_dir, bench_data, out, [f"ckpt={trained_run}", "benchmark=mlvu", "shard=0", "num_shards=2"])
    )
    assert first == {} and (out / "mlvu/predictions.shard-0-of-2.jsonl").is_file()
    second = evaluate(
        compose_eval(cache_dir, bench_data, out, [f"ckpt={trained_run}", "benchmark=mlvu", "shard=1", "num_shards=2"])
    )
    rows = [json.loads(line) for line in (out / "mlvu/predictions.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["1_plotQA/0", "4_count/0", "4_count/1", "4_count/2"]
    assert second["mlvu"]["n"] == 4 and not list((out / "mlvu").glob("*.shard-*"))
    # a launch split 3 ways that stopped before merging: another split is refused until it finishes or is deleted
    (out / "mlvu/predictions.shard-1-of-3.jsonl").write_text((out / "mlvu/predictions.jsonl").read_text())
    with pytest.raises(ValueError, match=r"unmerged answers of a launch split another number of ways \(\['predictions"):
        evaluate(
            compose_eval(
                cache_dir, bench_data, out, [f"ckpt={trained_run}", "benchmark=mlvu", "num_shards=1", "shard=0"]
            )
        )


def test_shards_merge_under_the_lock_merging_again_changes_nothing_and_the_report_holds_every_benchmark(
    cache_dir, bench_data, trained_run, tmp_path, monkeypatch
):
    from hicom.eval import runner

    out = tmp_path / "together"
    merges, merge = [], runner._merge

    def locked_merge(name, *args):
        with (out / name / "merge.lock").open("a") as f, pytest.raises(BlockingIOError):  # a shard finishing now waits
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        merges.append(name)
        return merge(name, *args)

    monkeypatch.setattr(runner, "_merge", locked_merge)

    def shard(i: int) -> dict:
        overrides = [f"ckpt={trained_run}", "benchmark=[mlvu,videomme]", f"shard={i}", "num_shards=2"]
        return runner.evaluate(compose_eval(cache_dir, bench_data, out, overrides))

    assert shard(1) == {}
    first = shard(0)
    assert list(first) == merges == ["mlvu", "videomme"]
    rows = {name: (out / name / "predictions.jsonl").read_text() for name in first}
    (out / "mlvu/shard-0-of-2.done").unlink()  # shard 0 relaunched and still answering mlvu: no one merges it
    again = shard(1)  # every videomme shard done: shard 1 merges it again, with nothing new
    assert list(again) == ["videomme"] and merges[2:] == ["videomme"] and again["videomme"]["answered_this_run"] == 0
    timing = ("answered_this_run", "seconds_per_question")
    assert {k: v for k, v in again["videomme"].items() if k not in timing} == {
        k: v for k, v in first["videomme"].items() if k not in timing
    }
    assert all((out / name / "predictions.jsonl").read_text() == text for name, text in rows.items())
    report = json.loads((out / "results.json").read_text())
    assert list(report) == ["mlvu", "videomme"]  # mlvu as shard 0 merged it before
    assert all(report[name] == json.loads((out / name / "results.json").read_text()) for name in report)


def test_a_relaunched_shard_retries_its_failed_clip_and_merges_the_new_answer(
    cache_dir, bench_data, trained_run, tmp_path
):
    from hicom.eval.runner import evaluate

    data = tmp_path / "data"
    shutil.copytree(bench_data / "eval/mlvu", data / "eval/mlvu")
    video = data / "eval/mlvu/video/1_plotQA/p.mp4"
    moved = video.rename(tmp_path / "p.mp4")  # shard 0's first question (1_plotQA/0) cannot be read
    out = tmp_path / "out"

    def shard(i: int) -> dict | None:
        overrides = [f"ckpt={trained_run}", "benchmark=mlvu", f"shard={i}", "num_shards=2"]
        return evaluate(compose_eval(cache_dir, data, out, overrides)).get("mlvu")

    assert shard(0) is None  # shard 1 never finishes this launch
    moved.rename(video)
    first = shard(1)  # relaunched, it finishes first: every shard has finished once, so it merges
    assert first["n_failed"] == 1
    last = shard(0)  # relaunched: it retries the clip and, finishing last, merges again
    assert last["answered_this_run"] == 1 and last["n_failed"] == 0 and last["n"] == 4
    rows = {r["question_id"]: r for r in map(json.loads, (out / "mlvu/predictions.jsonl").open())}
    assert len(rows) == 4 and "error" not in rows["1_plotQA/0"] and rows["1_plotQA/0"]["reply"] is not None
    assert not list((out / "mlvu").glob("predictions.shard-*"))


def test_a_question_that_fails_is_answered_with_its_error_and_a_changed_one_is_asked_again(
    cache_dir, bench_data, trained_run, tmp_path
):
    """One question whose prompt cannot be encoded (a second visual placeholder) gets an error row; the others are
    answered. A question edited in the benchmark's file between runs into one folder is asked again, not scored
    with the reply to the old one; a corrected gold answer re-scores the reply kept."""
    from hicom.eval.runner import evaluate

    data = tmp_path / "data"
    shutil.copytree(bench_data / "eval/mlvu", data / "eval/mlvu")
    counts = data / "eval/mlvu/json/4_count.json"
    records = json.loads(counts.read_text())
    records[1]["question"] = "How many <image> dogs?"
    counts.write_text(json.dumps(records))

    def run() -> tuple[dict, dict]:
        results = evaluate(compose_eval(cache_dir, data, tmp_path / "out", [f"ckpt={trained_run}", "benchmark=mlvu"]))
        rows = {r["question_id"]: r for r in map(json.loads, (tmp_path / "out/mlvu/predictions.jsonl").open())}
        return results["mlvu"], rows

    first, rows = run()
    assert first["answered_this_run"] == 3 and first["n_failed"] == 1
    assert rows["4_count/1"]["error"].startswith("error: MalformedSample: ") and rows["4_count/1"]["reply"] is None
    records[1]["question"] = "How many dogs?"  # mended: asked again, as a failed clip is
    records[2]["question"] = "How many birds?"  # changed: asked again
    records[0]["answer"] = "3"  # a corrected gold answer: the reply stands, scored against it
    counts.write_text(json.dumps(records))
    second, again = run()
    assert second["answered_this_run"] == 2 and second["n_failed"] == 0
    assert (
        again["4_count/2"]["question"] == "How many birds?"
        and again["4_count/0"]["reply"] == rows["4_count/0"]["reply"]
    )
    assert again["4_count/0"]["answer"] == "C"
    # an answer of a version before the digest: kept, and given it at the next merge
    path = tmp_path / "out/mlvu/predictions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "asked"}) + "\n" for r in rows))
    third, kept = run()
    assert third["answered_this_run"] == 0 and all(kept[qid]["asked"] == again[qid]["asked"] for qid in again)


def test_a_merge_that_finds_questions_unanswered_scores_nothing_and_names_the_shards_that_owe_them(
    cache_dir, bench_data, trained_run, tmp_path, caplog
):
    """Shard 1's .done left by a launch that asked 2 questions; a launch of all 4 whose shard 0 finishes first
    would have scored 2 answers as the benchmark's. It withdraws shard 1's mark; shard 1's run merges all 4."""
    from hicom.eval.runner import evaluate

    out = tmp_path / "out"

    def shard(i: int, *more: str) -> dict | None:
        overrides = [f"ckpt={trained_run}", "benchmark=mlvu", f"shard={i}", "num_shards=2", *more]
        return evaluate(compose_eval(cache_dir, bench_data, out, overrides)).get("mlvu")

    assert shard(1, "limit=2") is None  # question 1 of the first 2 (the first of c.mp4's, the second clip)
    assert shard(0) is None  # question 0: questions 2 and 3, c.mp4's as well, are shard 1's and have no answer
    assert "2 of 4 questions have no answer (4_count/1, 4_count/2): not scored; run shards [1] of 2" in caplog.text
    assert not (out / "mlvu/shard-1-of-2.done").exists() and not (out / "mlvu/results.json").exists()
    last = shard(1)
    assert last["n"] == 4 and last["answered_this_run"] == 2


def test_a_limited_run_scores_its_questions_and_keeps_every_answer(cache_dir, bench_data, trained_run, tmp_path):
    from hicom.eval.runner import evaluate

    def run(*overrides: str) -> dict:
        cfg = compose_eval(cache_dir, bench_data, tmp_path, [f"ckpt={trained_run}", "benchmark=mlvu", *overrides])
        return evaluate(cfg)["mlvu"]

    assert run()["n"] == 4
    path = tmp_path / "mlvu/predictions.jsonl"
    rows = path.read_text()
    limited = run("limit=2")
    assert limited["n"] == limited["n_questions"] == 2 and limited["answered_this_run"] == 0
    assert path.read_text() == rows
    again = run()
    assert again["answered_this_run"] == 0 and again["n"] == 4 and path.read_text() == rows

    # a run killed while writing its last answer: that line is cut off and the question answered again
    lines = rows.splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))
    (tmp_path / "mlvu/predictions.shard-0-of-1.jsonl").write_text(lines[-1][: len(lines[-1]) // 2])
    resumed = run()
    assert resumed["answered_this_run"] == 1 and resumed["n"] == 4 and resumed["n_failed"] == 0
    assert [json.loads(line)["question_id"] for line in path.read_text().splitlines()] == [
        json.loads(line)["question_id"] for line in lines
    ]
    with pytest.raises(ValueError, match=r"holds answers made otherwise(.|\n)*frames: 8 there, 4 now"):
        run("sampling.num_frames=4")  # the folder's answers were made at 8 frames: not kept and scored with these
    assert path.read_text() == rows
    # more visual tokens than the LLM has positions (the tiny Qwen2's 1024): refused, not answered past them
    with pytest.raises(ValueError, match=r"sampling.num_frames=512 gives 1184 visual tokens .* 1024 positions"):
        run("sampling.num_frames=512")


def test_answers_of_other_weights_or_run_overrides_are_not_mixed_and_a_shard_is_answered_by_one_process(
    cache_dir, bench_data, trained_run, tmp_path, monkeypatch
):
    """The same run folder trained on (another hand-off in it) or loaded with other run_overrides answers otherwise:
    its answers are not kept and scored with the earlier ones. Two processes on one shard of one folder: the
    second is refused at once, rather than merging and removing the shard file the first appends to."""
    import shutil

    from safetensors.torch import load_file, save_file

    from hicom.eval.runner import evaluate
    from hicom.stages import MANIFEST, file_sha256
    from hicom.utils.files import Busy, held_alone

    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    out = tmp_path / "out"

    def run(*overrides: str) -> dict:
        cfg = compose_eval(cache_dir, bench_data, out, [f"ckpt={run_dir}", "benchmark=mlvu", "limit=2", *overrides])
        return evaluate(cfg)

    assert run()["mlvu"]["n"] == 2
    settings = json.loads((out / "settings.json").read_text())
    # the same run named by a relative path: the same weights, so its answers are kept
    monkeypatch.chdir(tmp_path)
    relative = compose_eval(cache_dir, bench_data, out, ["ckpt=run", "benchmark=mlvu", "limit=2"])
    assert evaluate(relative)["mlvu"]["answered_this_run"] == 0
    assert settings["weights"] == json.loads((run_dir / MANIFEST).read_text())["sha256"]
    with pytest.raises(ValueError, match=r"holds answers made otherwise(.|\n)*run_overrides: \[\] there"):
        run("run_overrides=['model.lr.compressor=0.5']")
    with held_alone(out / "mlvu" / "shard-0-of-1.lock", "the test"), pytest.raises(Busy, match="shard 0 of 1"):
        run()
    # a folder's settings from before the weights were recorded: kept
    legacy = {k: v for k, v in settings.items() if k not in ("weights", "run_overrides")}
    (out / "settings.json").write_text(json.dumps(legacy))
    assert run()["mlvu"]["answered_this_run"] == 0
    # the run trained on: another hand-off, its manifest's digest with it
    tensors = load_file(run_dir / "handoff.safetensors")
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, run_dir / "handoff.safetensors")
    manifest = json.loads((run_dir / MANIFEST).read_text())
    (run_dir / MANIFEST).write_text(json.dumps({**manifest, "sha256": file_sha256(run_dir / "handoff.safetensors")}))
    with pytest.raises(ValueError, match=r"holds answers made otherwise(.|\n)*weights: "):
        run()


def test_model_overrides_of_a_run_folder_are_refused_for_run_overrides(cache_dir, bench_data, trained_run, tmp_path):
    """`model` in evaluate's config builds a release-layout folder's model; a run folder is built from its own
    config.yaml, so `model/compressor=avgpool` there would evaluate the run's HICom in silence."""
    from hydra.core.hydra_config import HydraConfig

    from hicom.eval.runner import evaluate

    for override in ("model/compressor=avgpool", "model.compressor.global_.num_queries=8", "+model.x=1"):
        overrides = [f"ckpt={trained_run}", "benchmark=mlvu", override]
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            HydraConfig.instance().set_config(compose("evaluate", overrides=overrides, return_hydra_config=True))
        try:
            with pytest.raises(ValueError, match=rf"is a training run.*\['{re.escape(override)}'\].*run_overrides"):
                evaluate(compose_eval(cache_dir, bench_data, tmp_path, overrides))
        finally:
            HydraConfig.instance().cfg = None


def test_a_bad_checkpoint_or_benchmark_is_a_clear_error(
    cache_dir, bench_data, trained_run, tmp_path, monkeypatch, caplog
):
    from hicom.eval.runner import evaluate

    for folder in (tmp_path, tmp_path / "nowhere"):  # named before any benchmark file is read
        with pytest.raises(FileNotFoundError, match="neither a training run"):
            evaluate(compose_eval(cache_dir, bench_data, tmp_path, [f"ckpt={folder}", "benchmark=nope"]))
    with pytest.raises(ValueError, match="unknown benchmarks"):
        evaluate(compose_eval(cache_dir, bench_data, tmp_path, [f"ckpt={trained_run}", "benchmark=nope"]))
    for override, message in [
        ("benchmark=[]", r"benchmark=\[\] names nothing to evaluate"),
        ("limit=0", r"limit \(questions per benchmark; null: all\) must be a whole number >= 1, got 0"),
        ("max_new_tokens=0", r"max_new_tokens must be a whole number >= 1, got 0"),
        ("num_workers=-1", r"num_workers must be a whole number >= 0, got -1"),
        (
            "multiprocessing_context=threads",
            r"multiprocessing_context must be one of \['fork', 'forkserver', 'spawn'\]",
        ),
        ("precision=half", r"precision must be one of \['auto', 'bf16', 'fp32', 'fp16'\], got 'half'"),
        ("shard=2", r"shard=2 of num_shards=1: shards count from 0 to 0"),
        ("num_shards=4", r"num_shards=4 needs shard=<i> \(this process's share, from 0\)"),
        (  # a misspelt field, a template that is not one, a lone brace: named with the benchmark
            "benchmarks.mvbench.prompts.multiple_choice='Q: {questoin}'",
            r"mvbench: prompts.multiple_choice='Q: \{questoin\}' names \['questoin'\]: it may use \['\{options\}', '\{question\}'\]",
        ),
        ("+benchmarks.mvbench.prompts.mc='{question}'", r"mvbench: prompts.mc: no such template; the templates are"),
        (
            "prompts.open_ended='{question'",
            r"mvbench: prompts.open_ended='\{question': .*\(a literal brace is written twice\)",
        ),
        ("benchmarks.mvbench.prompts.multiple_choice='{question:d} {options}'", r"mvbench: .*Unknown format code 'd'"),
        ("~benchmarks.mvbench.prompts", r"mvbench: no prompt template for \['multiple_choice'\]: set benchmarks"),
        # an on / off value that is neither: `no` read as true
        ("benchmarks.mvbench.tasks.action_sequence.bounded=no", r"mvbench: bounded must be true or false, got 'no'"),
        ("benchmarks.mvbench.root=null", r"mvbench: (.|\n)*root must be the benchmark.s folder, got None"),
        *(
            [("device=cuda", r"device=cuda, and this torch .* sees no CUDA GPU")]
            if not torch.cuda.is_available()
            else []
        ),
    ]:  # all before the model loads
        with pytest.raises(ValueError, match=message):
            evaluate(compose_eval(cache_dir, bench_data, tmp_path, [f"ckpt={trained_run}", override]))
    from hicom.utils.config import run_stamp

    for name in ("HICOM_RUN_STAMP", "WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    own = tmp_path / run_stamp()  # the default folder of a launch without a shared name: this process's alone
    with pytest.raises(ValueError, match="give every shard the same output_dir=<folder>"):
        evaluate(compose_eval(cache_dir, bench_data, own, [f"ckpt={trained_run}", "shard=0", "num_shards=2"]))
    assert not own.exists()
    from hicom.eval.benchmarks import BenchmarkFormatError, MVBench

    tasks = {"action_sequence": {"prefix": "x"}, "fine_action": {"prefix": "y"}}
    with pytest.raises(BenchmarkFormatError, match="2 of 2 task files missing .*action_sequence.json, fine_action"):
        MVBench(root=str(tmp_path), tasks=tasks).read()
    # every benchmark's files are read before the model loads, and every one missing is named at once
    missing = [f"ckpt={trained_run}", "benchmark=[mvbench,egoschema]", f"benchmarks.egoschema.root={tmp_path}/none"]
    missing.append(f"benchmarks.mvbench.root={tmp_path}/none")
    with pytest.raises(BenchmarkFormatError, match=r"cannot read the benchmarks:\n  mvbench: .*\n  egoschema: "):
        evaluate(compose_eval(cache_dir, bench_data, tmp_path, missing))
    from hicom.eval.benchmarks import EgoSchema, VideoMME

    with pytest.raises(ValueError, match="subtitles must be true or false, got 'no'"):
        VideoMME(root=str(tmp_path), subtitles="no")
    with pytest.raises(ValueError, match="subset must be true or false, got 'no'"):
        EgoSchema(root=str(tmp_path), subset="no")
    bad = tmp_path / "videomme/test.parquet"
    bad.parent.mkdir()
    bad.write_bytes((bench_data / "eval/videomme/videomme/test-00000-of-00001.parquet").read_bytes()[:100])
    with pytest.raises(BenchmarkFormatError, match="not a readable parquet"):
        VideoMME(root=str(tmp_path), parquet="videomme/test.parquet").read()
    (tmp_path / "json").mkdir()
    records = [{"video": "a.mp4", "question": "q?", "candidates": ["x", "y "], "answer": answer}
               for answer in ("z", "y")]  # fmt: skip
    (tmp_path / "json/action_sequence.json").write_text(json.dumps(records))
    # an answer that is none of the candidates: asked, not scored, and named; one with other spaces is found
    read = MVBench(root=str(tmp_path), tasks={"action_sequence": {"prefix": "x"}}).read()
    assert [q.answer for q in read] == [None, "B"]
    assert "record 0: the answer 'z' is not one of the candidates ['x', 'y ']: asked, not scored" in caplog.text


def _mc(qid, task, answer, pred, **extra):
    return {"question_id": qid, "task": task, "answer": answer, "pred": pred, "reply": str(pred), **extra}


def test_multiple_choice_rules():
    rows = [
        _mc("1", "a", "A", "A", duration="short"),
        _mc("2", "a", "B", None, duration="short"),  # unparsed: wrong in acc, left out of acc_answered
        _mc("3", "b", "C", "C", duration="long"),
        _mc("4", "b", "D", "A", duration="long"),
        _mc("5", "b", "A", None, error="missing: file not found", duration="long"),  # failed clip: wrong
        _mc("6", "b", None, "B"),  # no public answer (EgoSchema outside its subset): not scored
    ]
    r = score_multiple_choice(rows, mean_of_tasks=True)
    assert r["n"] == 5 and r["n_unparsed"] == 1 and r["n_failed"] == 1 and r["n_unscored"] == 1
    assert r["acc"] == pytest.approx(2 / 5) and r["acc_answered"] == pytest.approx(2 / 3)
    assert r["per_task"]["a"]["acc"] == 0.5 and r["per_task"]["b"]["acc"] == pytest.approx(1 / 3)
    assert r["m_avg"] == pytest.approx((0.5 + 1 / 3) / 2)  # MLVU: mean of task accuracies, not of questions
    assert r["per_duration"]["short"]["acc_answered"] == 1.0 and r["per_duration"]["long"]["n"] == 3
    assert r["n_failed_unscored"] == 0
    r = score_multiple_choice([*rows, _mc("7", "b", None, None, error="missing: file not found")])
    assert r["n_unscored"] == 2 and r["n_failed_unscored"] == 1 and r["n_failed"] == 1  # counted, not dropped


def test_mvbench_windows_are_read_as_the_release_reads_them(tmp_path):
    """A negative bound is 0, reversed bounds swap, an empty window is the second from its start: the question is
    asked about a clip, not skipped and scored wrong; a bound that is no number names the record."""
    from hicom.eval.benchmarks import BenchmarkFormatError, MVBench

    (tmp_path / "json").mkdir()
    windows = [(1.0, 4.0), (-0.5, 2.0), (5.0, 3.0), (2.0, 2.0), (1, None)]
    records = [
        {"video": "v.mp4", "question": "Q?", "candidates": ["a", "b"], "answer": "a", "start": s, "end": e}
        for s, e in windows
    ]
    (tmp_path / "json/action_sequence.json").write_text(json.dumps(records))
    reader = MVBench(root=str(tmp_path), tasks={"action_sequence": {"prefix": "star", "bounded": True}})
    read = [(q.start, q.end) for q in reader.read()]
    assert read == [(1.0, 4.0), (0.0, 2.0), (3.0, 5.0), (2.0, 3.0), (None, None)]  # no end: the whole clip
    records[0]["end"] = "soon"
    (tmp_path / "json/action_sequence.json").write_text(json.dumps(records))
    with pytest.raises(BenchmarkFormatError, match=r"action_sequence.json record 0: start / end 1.0, 'soon'"):
        reader.read()
    # fields of the wrong type are named, not read as something else ("abc" as the options a, b, c; null as "None")
    wrong = [("candidates", "abc", "'candidates' is 'abc', not a list of texts"),
             ("candidates", None, "'candidates' is None"), ("question", None, "'question' is None")]  # fmt: skip
    for key, value, said in wrong:
        bad = [{**records[1], key: value}]
        (tmp_path / "json/action_sequence.json").write_text(json.dumps(bad))
        with pytest.raises(BenchmarkFormatError, match=f"action_sequence.json record 0: {re.escape(said)}"):
            reader.read()


def test_subtitle_times_read_fractions_of_any_length(tmp_path):
    from hicom.eval.benchmarks import read_srt

    (tmp_path / "a.srt").write_text("1\n00:00:01,5 --> 00:00:02,25\nHi.\n\n2\n00:01:00.040 --> 00:01:02,000\nYo.\n")
    assert read_srt(tmp_path / "a.srt") == [(1.5, 2.25, "Hi."), (60.04, 62.0, "Yo.")]


def test_subtitle_cues_without_a_blank_line_between_stay_apart_and_only_tags_are_dropped(tmp_path):
    from hicom.eval.benchmarks import read_srt, subtitles_at

    srt = (
        "\ufeff1\n00:00:01,000 --> 00:00:02,000\n<i>Hello</i>\n2\n00:00:05,000 --> 00:00:06,000\nWorld\n\n"
        '3\n00:00:07,000 --> 00:00:08,000\n{\\an8}if x < 3 and y > 2 then\n<font color="#fff">go</font>\n\n'
        "4\n00:00:09,000 --> 00:00:10,000\nRoom\n101\n"
    )
    (tmp_path / "a.srt").write_text(srt, encoding="utf-8")
    cues = read_srt(tmp_path / "a.srt")
    assert cues == [
        (1.0, 2.0, "Hello"),
        (5.0, 6.0, "World"),
        (7.0, 8.0, "if x < 3 and y > 2 then go"),
        (9.0, 10.0, "Room 101"),  # a number in the last cue is its text
    ]
    assert subtitles_at(cues, [5.5]) == ["World"]


@pytest.mark.parametrize(
    ("reply", "options", "letter"),
    [
        ("The answer is C", ["x", "y", "z"], "C"),  # the word 'answer' removed, then the first letter
        ("(B) blue", ["red", "blue"], "B"),
        ("Answer: D.", ["p", "q", "r", "s"], "D"),
        ("It is blue.", ["red", "green", "blue"], "C"),  # no letter: the option whose text appears
        ("dark red", ["red", "dark red", "blue"], "B"),  # 'red' only inside the longer option
        ("red, red", ["red", "dark red"], "A"),
        ("10", ["1", "10", "100"], "B"),  # whole words: '1' is not in '10'
        ("50%", ["5%", "50%"], "B"),
        ("I don't know", ["yes", "no"], None),  # 'no' is not in 'know'
        ("The person is not moving", ["yes", "no"], None),
        ("cup", ["up", "down"], None),
        ("red and blue", ["red", "green", "blue"], None),  # two options: unparsed, not guessed
        ("b", ["red", "blue"], "B"),  # a lowercase letter alone is an answer
        ("Answer: (c).", ["x", "y", "z"], "C"),
        ("a dog", ["cat", "dog"], "B"),  # but not the article 'a': the option's text decides
        ("e", ["x", "y", "z"], None),  # no option E
        ("C washes the dishes.", ["C picks up a knife", "C washes the dishes", "C sits"], "B"),  # EgoSchema's C
        ("Plan A", ["Plan B", "Plan A"], "B"),  # a reply that is one option's whole text names it
        ("(B) C washes the dishes", ["C sits", "C washes the dishes"], "B"),  # the letter given first
        ("The answer is b.", ["x", "y", "z"], "B"),
        ("The correct option is (b).", ["x", "y"], "B"),
        ("I choose option c", ["x", "y", "z"], "C"),
        ("The answer is a dog", ["cat", "dog"], "B"),  # 'is a' ends nothing: the article again
        ("The best option a hiker has is to turn back.", ["walk on", "turn back"], "B"),  # 'option a': the article
        ("(B)", ["B", "A", "C"], "B"),  # a lone letter is the letter, whatever an option's text
        ("option b is correct", ["run", "walk", "sit"], "B"),  # only 'a' after 'option' must end a clause
        ("I'd go with option c since he sits", ["run", "walk", "sit"], "C"),
        ("he is washing the car, as shown", ["He is washing the car.", "He is cooking."], "A"),  # less its period
        ("答案是B", ["x", "y", "z"], "B"),  # "the answer is B": Chinese characters are not a word around it
        ("最佳选项是(C)。", ["x", "y", "z"], "C"),
        ("B选项", ["x", "y"], "B"),
        ("视频中的人在washing the car", ["washing the car", "cooking"], "A"),
        ("Día", ["x", "y", "z", "w"], None),  # an accented Latin word is a word: no D in it
        ("He jumps 3× in the clip.", ["2", "3", "4"], "B"),  # × is a sign, not a letter of the word
        ("不是", ["是", "否"], None),  # "is not": the option 是 (yes) inside other Chinese text is not named
        ("是", ["是", "否"], "A"),
        ("Cậu bé đang chạy.", ["run", "walk", "sit", "jump"], None),  # Vietnamese letters are word characters
    ],
)
def test_a_reply_names_an_option_by_letter_or_by_its_whole_text(reply, options, letter):
    from hicom.eval.answers import parse_choice

    assert parse_choice(reply, options) == letter


def test_options_are_read_from_a_prompt_in_letter_order_up_to_h():
    from hicom.eval.answers import parse_options

    assert parse_options("What?\n(A) red\nB. blue\n(D) skipped\nC: green") == ["red", "blue", "green"]
    many = "What?\n" + "\n".join(f"({letter}) option {letter}" for letter in "ABCDEFGH") + "\n(A) again"
    assert parse_options(many) == [f"option {letter}" for letter in "ABCDEFGH"]  # nothing after H (it failed)


def test_open_ended_exact_match_and_judge(tmp_path):
    assert normalize_answer("The Dog.") == "dog" == normalize_answer(" dog ")
    rows = [
        {"question_id": "1", "task": 0, "answer": "dog", "pred": "A dog!", "reply": "A dog!"},
        {"question_id": "2", "task": 1, "answer": "man", "pred": "woman", "reply": "woman"},
    ]
    assert score_open_ended(rows)["exact_match"] == 0.5
    assert parse_verdict("Sure: {'pred': 'yes', 'score': 4}") == Verdict(True, 4.0, "Sure: {'pred': 'yes', 'score': 4}")
    assert parse_verdict('{"pred": "no", "score": 1}').correct is False
    with pytest.raises(ValueError, match="not a"):
        parse_verdict("I think it is right")
    with pytest.raises(ValueError, match="score': 0-5"):  # a score off the scale is no verdict
        parse_verdict("{'pred': 'yes', 'score': 40}")
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    calls = []

    def judge(question, answer, reply):  # stands in for the remote judge, which tests never call
        calls.append(reply)
        hit = answer in normalize_answer(reply).split()
        return Verdict(correct=hit, score=5.0 if hit else 1.0, raw="")

    assert judge_predictions(path, judge) == 2 and judge_predictions(path, judge) == 0  # resumable
    scored = score_open_ended([json.loads(line) for line in path.read_text().splitlines()])
    assert scored["judge_acc"] == 0.5 and scored["judge_score"] == 3.0 and len(calls) == 2
    failed = {"question_id": "3", "task": 1, "answer": "cat", "pred": None, "reply": None, "error": "missing"}
    with path.open("a") as f:
        f.write(json.dumps(failed) + "\n")
    assert judge_predictions(path, judge) == 0  # a failed clip has no reply to judge
    scored = score_open_ended([json.loads(line) for line in path.read_text().splitlines()])
    assert scored["judge_acc"] == scored["exact_match"] == pytest.approx(1 / 3)  # the failed clip wrong in both
    assert scored["judge_score"] == pytest.approx(6 / 3) and scored["n_judged"] == 2 and scored["n_failed"] == 1

    # a judge that stops on its second call (an endpoint error): the verdict before it is in the file
    unjudged = [{k: v for k, v in r.items() if k != "judge"} for r in map(json.loads, path.read_text().splitlines())]
    path.write_text("".join(json.dumps(r) + "\n" for r in unjudged))
    answered = []

    def failing_judge(question, answer, reply):
        if answered:
            raise ConnectionError("the endpoint went away")
        answered.append(reply)
        return judge(question, answer, reply)

    with pytest.raises(ConnectionError):
        judge_predictions(path, failing_judge)
    assert sum("judge" in json.loads(line) for line in path.read_text().splitlines()) == 1

    # an evaluation merging new answers into the file while the judge runs: its lines stay, unjudged
    fresh = [{**rows[0], "question_id": "4", "judge": None}, {**rows[1], "question_id": "5"}]
    fresh[0].pop("judge")
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, fresh[0]]))

    def merging_judge(question, answer, reply):
        with path.open("a") as f:  # what a merge of another shard adds meanwhile
            f.write(json.dumps(fresh[1]) + "\n")
        return judge(question, answer, reply)

    assert judge_predictions(path, merging_judge, save_every=1) == 3  # rows 1 and 2 again (rewritten above), 4
    lines = {r["question_id"]: r for r in map(json.loads, path.read_text().splitlines())}
    assert sorted(lines) == ["1", "2", "4", "5"] and "judge" in lines["4"] and "judge" not in lines["5"]

    # a judge's reply that holds no verdict: that line is kept as refused (wrong), the lines after it judged; at
    # temperature 0 a stop there would stop every resume at the same line
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + [{**rows[0], "question_id": "6"}]))

    def odd_judge(question, answer, reply):
        return parse_verdict("{'pred': 'yes', 'score': '4/5'}") if answer == "man" else judge(question, answer, reply)

    assert judge_predictions(path, odd_judge) == 3 and judge_predictions(path, odd_judge) == 0
    scored = score_open_ended([json.loads(line) for line in path.read_text().splitlines()])
    assert scored["n_judged"] == 3 and scored["n_judge_refused"] == 1 and scored["judge_acc"] == pytest.approx(2 / 3)

    # the benchmark's gold answer corrected since: the reply is kept, its verdict (given against the old answer)
    # is not, so the judge sees the reply again; a verdict from before verdicts kept their answer stays
    from hicom.eval.benchmarks import Question
    from hicom.eval.runner import _rows

    questions = {q.question_id: q for q in (Question("1", "0", "a.mp4", "", answer="cat"),
                                            Question("2", "1", "b.mp4", "", answer="man"))}  # fmt: skip
    kept = _rows([path], questions)
    assert kept["1"]["answer"] == "cat" and kept["1"]["reply"] == "A dog!" and "judge" not in kept["1"]
    assert kept["2"]["judge"]["answer"] == "man"
    older = [{**r, "judge": {"correct": True, "score": 5.0, "raw": ""}} for r in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in older))
    assert all("judge" in row for row in _rows([path], questions).values())


def test_the_judge_asks_with_the_prompts_of_the_config(tmp_path, monkeypatch):
    """configs/evaluate.yaml's judge.system and judge.user (the built-in text by default), or their overrides on
    the judge's command line, are what the endpoint is sent; a user prompt with a field it does not have is
    refused before any is."""
    import sys
    import types

    from hicom.eval.judge import JUDGE_SYSTEM, JUDGE_USER, OpenAICompatibleJudge, judge_config
    from hicom.eval.judge import main as judge_main

    sent = []

    class Endpoint:  # stands in for the openai client: tests never call a remote judge
        def __init__(self, **settings) -> None:
            self.chat = types.SimpleNamespace(completions=types.SimpleNamespace(create=self.create))

        def create(self, *, model, temperature, messages):
            sent.append(messages)
            message = types.SimpleNamespace(content="{'pred': 'yes', 'score': 5}")
            return types.SimpleNamespace(choices=[types.SimpleNamespace(message=message)])

    monkeypatch.setitem(sys.modules, "openai", types.SimpleNamespace(OpenAI=Endpoint))
    defaults = judge_config([])
    assert (defaults.system, defaults.user) == (JUDGE_SYSTEM, JUDGE_USER)
    path = tmp_path / "predictions.jsonl"
    row = {
        "question_id": "1",
        "task": 0,
        "question": "what is shown",
        "answer": "dog",
        "pred": "a dog",
        "reply": "a dog",
    }
    path.write_text(json.dumps(row) + "\n")
    prompts = ["judge.system='Be strict.'", "judge.user='Q: {question} | gold: {answer} | said: {reply}'"]
    judge_main([f"predictions={path}", "model=judge", "base_url=http://localhost:1", *prompts])
    assert sent == [
        [
            {"role": "system", "content": "Be strict."},
            {"role": "user", "content": "Q: what is shown | gold: dog | said: a dog"},
        ]
    ]
    assert json.loads(path.read_text())["judge"]["correct"] is True
    for user, said in (
        ("{answer} {reply}, e.g. {'pred': 'yes'}", "names [\"'pred'\"]: it may use {question}, {answer} and {reply}"),
        ("{question} {reply}", "it must show the judge {answer} and {reply}"),
        ("{answer} {reply", "(a literal brace is written twice)"),
    ):
        with pytest.raises(ValueError, match=re.escape(said)):
            OpenAICompatibleJudge(model="judge", base_url="http://localhost:1", user=user)
    assert len(sent) == 1


def test_the_score_command_recomputes_results_beside_the_predictions(tmp_path, capsys):
    path = tmp_path / "mlvu" / "predictions.jsonl"
    path.parent.mkdir()
    rows = [_mc("1", "count", "A", "A"), _mc("2", "count", "B", "C"), _mc("3", "plotQA", "A", "A")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = score_main(["benchmark=mlvu", f"predictions={path}"])
    assert results["m_avg"] == pytest.approx(0.75) and results["acc"] == pytest.approx(2 / 3)
    assert json.loads((path.parent / "results.json").read_text()) == results
    assert json.loads(capsys.readouterr().out)["m_avg"] == pytest.approx(0.75)
    # evaluate.py's results.json keeps the settings and timings that produced it; a re-score replaces the scores
    stale = {**results, "m_avg": 0.0, "judge_acc": 0.9, "settings": {"frames": 32}, "seconds_per_question": 0.5}
    (path.parent / "results.json").write_text(json.dumps(stale))
    rescored = score_main(["benchmark=mlvu", f"predictions={path}"])
    assert rescored["m_avg"] == pytest.approx(0.75) and rescored["settings"] == {"frames": 32}
    assert rescored["seconds_per_question"] == 0.5 and "judge_acc" not in rescored  # scores are the new ones only
    assert rescored["metric"] == "m_avg"


def test_an_official_folder_evaluates_like_the_run_it_was_exported_from(cache_dir, bench_data, trained_run, tmp_path):
    from hicom.compat.official import export_official
    from hicom.eval.runner import evaluate, load_model

    moved = ["run_overrides=['model.max_new_tokens=7']"]  # the run's config, overridden where it must differ here
    module, _ = load_model(trained_run, compose_eval(cache_dir, bench_data, tmp_path, moved))
    assert module.max_new_tokens == 7
    official = export_official(module.net, tmp_path / "official")
    replies = {}
    # the folder's config.json decides the compressor, whatever model.compressor says (here: an average pooling)
    for name, ckpt, model in (("run", trained_run, []), ("official", official, ["model/compressor=avgpool"])):
        out = tmp_path / name
        results = evaluate(compose_eval(cache_dir, bench_data, out, [f"ckpt={ckpt}", "benchmark=mlvu", *model]))
        replies[name] = [json.loads(line)["reply"] for line in (out / "mlvu/predictions.jsonl").open()]
        assert results["mlvu"]["settings"]["format"] == name
    assert replies["run"] == replies["official"]
    # the folder is an HF folder of its LLM too, under the release's model type: the LLM comes from it
    config = json.loads((official / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("hicom_qwen2", ["HIComQwen2ForCausalLM"])
    module, _ = load_model(official, compose_eval(cache_dir, bench_data, tmp_path, ["model/compressor=avgpool"]))
    assert module.net.llm.path == str(official) and type(module.net.compressor).__name__ == "HICom"
    llm = pickle.loads(pickle.dumps(module.net.llm.model))  # as DataLoader workers started by spawn receive it
    assert type(llm).__name__ == "HIComQwen2ForCausalLM" and llm.config.model_type == "hicom_qwen2"
    again = export_official(module.net, tmp_path / "again")  # what was loaded from a release folder exports again
    assert json.loads((again / "config.json").read_text()) == config
    # the tower takes the layer the folder's compressor was trained on, whatever model.vision says
    (official / "config.json").write_text(json.dumps({**config, "mm_vision_select_layer": -1}))
    module, _ = load_model(official, compose_eval(cache_dir, bench_data, tmp_path, []))
    assert module.net.vision.select_layer == -1
    # the command line's export of the run: the same weights, at the frames it was trained at
    from safetensors.torch import load_file

    from hicom.compat.export import main as export_main

    cli = export_main([str(trained_run), str(tmp_path / "cli"), f"paths.cache_dir={cache_dir}"])
    assert (
        json.loads((cli / "config.json").read_text())["num_frames"]
        == OmegaConf.load(trained_run / "config.yaml").data.num_frames
    )
    ours, theirs = load_file(str(cli / "model.safetensors")), load_file(str(official / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_run_whose_handoff_is_cut_short_stops_before_the_model_loads(cache_dir, bench_data, trained_run, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    import shutil

    from hicom.eval.runner import load_model
    from hicom.stages import HandoffError

    run = shutil.copytree(trained_run, tmp_path / "run")
    handoff = run / "handoff.safetensors"
    handoff.write_bytes(handoff.read_bytes()[:-64])
    monkeypatch.setattr("hicom.eval.runner.instantiate", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(HandoffError, match=r"is not a whole safetensors file"):
        load_model(run, compose_eval(cache_dir, bench_data, tmp_path, []))


def test_frames_default_to_the_checkpoints_own(cache_dir, bench_data, trained_run, tmp_path, monkeypatch):
    from hicom.compat.official import export_official, folder_compressor
    from hicom.eval.runner import evaluate, load_model

    def frames(ckpt, name, *more):
        cfg = compose_eval(cache_dir, bench_data, tmp_path / name, [f"ckpt={ckpt}", "benchmark=mlvu", "limit=1", *more])
        with open_dict(cfg):
            cfg.sampling.num_frames = None  # compose_eval's 8 taken back: the default
        return evaluate(cfg)["mlvu"]["settings"]["frames"]

    assert frames(trained_run, "run") == 8  # the run's data.num_frames
    module, _ = load_model(trained_run, compose_eval(cache_dir, bench_data, tmp_path, []))
    official = export_official(module.net, tmp_path / "official")
    assert frames(official, "release") == 32  # an export given no frames names the release's 32
    config = json.loads((official / "config.json").read_text())
    # what the release's own inference reads from config.json (model_init): without them it stretches clips
    assert config["num_frames"] == 32 and config["image_aspect_ratio"] == "pad"
    assert (config["mm_patch_merge_type"], config["mm_newline_position"]) == ("flat", "no_token")
    assert frames(export_official(module.net, tmp_path / "named", num_frames=5), "named") == 5
    with pytest.raises(ValueError, match="reproduce_defect_1 is true, false or null"):  # "'false'" is a string
        folder_compressor(official, reproduce_defect_1="false")
    # towers of other widths than config.json's are refused, naming the parts to pick
    compose = folder_compressor(official)
    width = config["hidden_size"]
    assert compose(in_dim=config["mm_hidden_size"], out_dim=width) is compose(
        in_dim=config["mm_hidden_size"], out_dim=width
    )
    with pytest.raises(ValueError, match="model/vision=siglip_so400m"):
        compose(in_dim=config["mm_hidden_size"], out_dim=width + 1)
    monkeypatch.setattr("hicom.eval.runner.load_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(
        ValueError, match="num_frames must be a whole number >= 1"
    ):  # bad values stop the run before loading
        evaluate(compose_eval(cache_dir, bench_data, tmp_path / "bad", [f"ckpt={official}", "sampling.num_frames=0"]))
    bad_fps = compose_eval(cache_dir, bench_data, tmp_path / "bad", [f"ckpt={official}", "sampling.fps=-1"])
    with open_dict(bad_fps):
        bad_fps.sampling.num_frames = None
    with pytest.raises(ValueError, match="fps must be positive"):
        evaluate(bad_fps)


def test_egoschema_full_set_writes_the_submission_file(cache_dir, bench_data, trained_run, tmp_path):
    from hicom.eval.runner import evaluate

    cfg = compose_eval(
        cache_dir,
        bench_data,
        tmp_path,
        [f"ckpt={trained_run}", "benchmark=egoschema", "benchmarks.egoschema.subset=false"],
    )
    r = evaluate(cfg)["egoschema"]
    assert r["n"] == 2 and r["n_unscored"] == 1  # u2 has no public answer
    submission = json.loads((tmp_path / "egoschema/submission.json").read_text())
    assert sorted(submission) == ["u1", "u2", "u3"] and all(v in range(-1, 5) for v in submission.values())

    data = tmp_path / "data"  # u2's clip cannot be read: its failure is counted and shown, though it is not scored
    shutil.copytree(bench_data / "eval/egoschema", data / "eval/egoschema")
    (video,) = (data / "eval/egoschema").rglob("u2.mp4")
    video.unlink()
    cfg = compose_eval(cache_dir, data, tmp_path / "gone", [f"ckpt={trained_run}", "benchmark=egoschema",
                                                            "benchmarks.egoschema.subset=false"])  # fmt: skip
    r = evaluate(cfg)["egoschema"]
    assert r["n_failed"] == 0 and r["n_failed_unscored"] == 1
    assert "| 0 (+1 unscored) |" in (tmp_path / "gone/results.md").read_text()


def test_batched_generation_with_left_padding_answers_as_one_at_a_time(
    cache_dir, bench_data, trained_run, tmp_path, monkeypatch
):
    """Batches of 4 pad prompts of different lengths on the left, and hold questions about one clip (MLVU's c.mp4
    has 3, Video-MME's vidA 2), which read it and run the vision tower on it once: the replies are those of
    questions asked one at a time, from 4 reads of the 4 clips instead of 7."""
    import hicom.eval.runner as runner

    reads = []

    def load_video(path, *args, **kwargs):
        reads.append(Path(path).name)
        return real(path, *args, **kwargs)

    real = runner.load_video
    monkeypatch.setattr(runner, "load_video", load_video)
    replies, read = {}, {}
    for size in (1, 4):
        out = tmp_path / f"batch{size}"
        overrides = [f"ckpt={trained_run}", "benchmark=[mlvu,videomme]", f"batch_size={size}", "max_new_tokens=8"]
        reads.clear()
        runner.evaluate(compose_eval(cache_dir, bench_data, out, overrides))
        read[size] = sorted(reads)
        replies[size] = [
            json.loads(line)["reply"]
            for name in ("mlvu", "videomme")
            for line in (out / name / "predictions.jsonl").open()
        ]
    assert replies[1] == replies[4] and len(set(replies[1])) > 1  # prompts of different lengths, padded on the left
    assert read[1] == ["c.mp4"] * 3 + ["p.mp4", "vidA.mp4", "vidA.mp4", "vidB.mp4"]
    assert read[4] == ["c.mp4", "p.mp4", "vidA.mp4", "vidB.mp4"]


def test_a_clips_questions_go_to_one_shard_and_are_answered_together():
    """Sharding by clip, in the order of each clip's first question: a `limit` run's first questions go where the
    whole run's would, and a shard asks a clip's questions one after the other, each clip's in their order."""
    from hicom.eval.benchmarks import Question
    from hicom.eval.runner import shard_of, shard_order

    videos = ["a", "b", "a", "c", "b", "a", "d"]
    questions = [Question(f"q{i}", "t", f"{v}.mp4", f"question {i}?", ()) for i, v in enumerate(videos)]
    assert shard_of(questions, 2) == [0, 1, 0, 0, 1, 0, 1]
    assert shard_of(questions[:4], 2) == shard_of(questions, 2)[:4]
    assert [q.question_id for q in shard_order(questions, 0, 2)] == ["q0", "q2", "q5", "q3"]
    assert [q.question_id for q in shard_order(questions, 1, 2)] == ["q1", "q4", "q6"]
    bounded = [Question(f"q{i}", "t", "a.mp4", "why?", (), start=s, end=s + 1.0) for i, s in enumerate((0.0, 5.0))]
    assert shard_of(bounded, 2) == [0, 1]  # other bounds of one file are other frames


def test_a_bf16_evaluation_answers_every_question(cache_dir, bench_data, trained_run, tmp_path):
    """What a GPU evaluates in (precision=auto picks bf16 there), on the CPU."""
    from hicom.eval.runner import evaluate

    overrides = [f"ckpt={trained_run}", "benchmark=[mlvu,videomme]", "precision=bf16"]
    results = evaluate(compose_eval(cache_dir, bench_data, tmp_path, overrides))
    for name, result in results.items():
        assert result["settings"]["dtype"] == "bfloat16" and result["n_failed"] == 0
        rows = [json.loads(line) for line in (tmp_path / name / "predictions.jsonl").open()]
        assert len(rows) == result["n"] and all(row["reply"] for row in rows)


def test_a_bf16_load_is_the_fp32_load_cast(cache_dir, bench_data, trained_run, tmp_path):
    """Evaluation loads the towers and the LLM in its own dtype (half the host memory of fp32 masters): every
    weight and buffer equals the fp32 load cast to bf16, and the computed RoPE frequencies stay fp32."""
    from hicom.eval.runner import load_model
    from hicom.utils.checkpoints import computed_buffers, loading_dtype, restore_computed_buffers

    cfg = compose_eval(cache_dir, bench_data, tmp_path, [])
    cast, _ = load_model(trained_run, cfg)
    computed = computed_buffers(cast.net)
    cast.net.to(torch.bfloat16)
    restore_computed_buffers(cast.net, computed)
    with loading_dtype(torch.bfloat16):
        direct, _ = load_model(trained_run, cfg)
    rotary = direct.net.llm.model.model.rotary_emb
    assert (
        rotary.inv_freq.dtype == torch.float32
        and direct.net.llm.model.model.embed_tokens.weight.dtype == torch.bfloat16
    )
    computed = computed_buffers(direct.net)
    direct.net.to(torch.bfloat16)
    restore_computed_buffers(direct.net, computed)
    expected = dict(cast.net.named_parameters()) | dict(cast.net.named_buffers())
    loaded = dict(direct.net.named_parameters()) | dict(direct.net.named_buffers())
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) and loaded[k].dtype == expected[k].dtype for k in expected)


def test_a_staged_run_is_evaluated_from_its_last_stage(tmp_path):
    from hicom.eval.runner import find_handoff

    parents = {"first": None, "second": "first", "a_third": "second"}  # folder names do not sort in stage order
    for name, parent in parents.items():
        folder = tmp_path / "stages" / name
        folder.mkdir(parents=True)
        recorded = str(tmp_path / "stages" / parent) if parent else None
        (folder / "manifest.json").write_text(json.dumps({"stage": name, "parent": recorded, "parts": ["compressor"]}))
        (folder / "config.yaml").write_text("{}")
    assert find_handoff(tmp_path) == tmp_path / "stages" / "a_third"  # the stage no other stage names as parent


def test_a_staged_run_is_found_by_a_relative_path_and_after_a_move(tmp_path, monkeypatch):
    from hicom.eval.runner import find_handoff

    trained_at = tmp_path / "old" / "run"  # the manifests record where the stages were trained
    for name, parent in {"alignment": None, "conditional": "alignment", "instruction": "conditional"}.items():
        folder = tmp_path / "new" / "run" / "stages" / name
        folder.mkdir(parents=True)
        recorded = str(trained_at / "stages" / parent) if parent else None
        (folder / "manifest.json").write_text(json.dumps({"stage": name, "parent": recorded, "parts": ["compressor"]}))
        (folder / "config.yaml").write_text("{}")
    monkeypatch.chdir(tmp_path / "new")
    assert find_handoff(Path("run")) == Path("run") / "stages" / "instruction"


def test_decoding_is_greedy_whatever_the_checkpoint_generation_config_says(cache_dir, tiny_paths, tmp_path):
    from hydra.utils import instantiate

    net = instantiate(compose_train(cache_dir, tmp_path).model).net.eval()
    lm = net.llm.model
    ids = net.llm.tokenizer("what is shown in the video", return_tensors="pt").input_ids
    greedy = ids
    with torch.no_grad():
        for _ in range(16):
            greedy = torch.cat([greedy, lm(input_ids=greedy).logits[:, -1:].argmax(-1)], dim=1)
    # Qwen2.5-Instruct's generation_config.json, with a penalty strong enough to change this tiny model's argmax,
    # and settings other LLMs ship that greedy decoding leaves unset, each enough to change the reply
    first = greedy[0, ids.shape[1]].item()
    settings = dict(do_sample=True, repetition_penalty=2.0, temperature=0.7, top_p=0.8, top_k=20)
    lm.generation_config.update(**settings, no_repeat_ngram_size=1, suppress_tokens=[first])
    tokens = net.generate({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, max_new_tokens=16)
    assert tokens.tolist() == greedy[:, ids.shape[1] :].tolist()
    assert lm.generation_config.repetition_penalty == 2.0 and lm.generation_config.suppress_tokens == [first]
    embeds = lm.get_input_embeddings()(ids)
    inherited = lm.generate(
        inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False
    )
    assert inherited.tolist() != tokens.tolist()  # do_sample=False alone keeps the checkpoint's penalty


def test_the_demo_benchmarks_run_every_configured_benchmark_end_to_end(cache_dir, trained_run, tmp_path, capsys):
    from hicom.eval.demo import main as demo_main
    from hicom.eval.runner import evaluate

    with pytest.raises(SystemExit) as stopped:  # usage, not a Hydra traceback over "--help" as an override
        demo_main(["--help"])
    assert stopped.value.code == 0 and "python -m hicom.eval.demo" in capsys.readouterr().out
    data = demo_main([f"paths.data_dir={tmp_path / 'demo'}"])
    assert "python evaluate.py ckpt=<a run's folder>" in capsys.readouterr().out
    assert demo_main([f"paths.data_dir={data}"]) == data  # its own folder: written again
    # ... but not over what was put or changed there since (a benchmark's real files copied in)
    task = data / "eval" / "mvbench" / "json" / "action_sequence.json"
    kept = task.read_text()
    task.write_text('[{"my": "real annotations"}]')
    (data / "eval" / "mvbench" / "extra.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds files the demo did not write .*action_sequence.json"):
        demo_main([f"paths.data_dir={data}"])
    assert task.read_text() == '[{"my": "real annotations"}]'
    task.write_text(kept)
    (data / "eval" / "mvbench" / "extra.txt").unlink()
    assert demo_main([f"paths.data_dir={data}"]) == data
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            "evaluate",
            overrides=[f"paths.cache_dir={cache_dir}", f"paths.data_dir={data}", f"ckpt={trained_run}",
                       f"benchmark=[{','.join(ALL)}]", "num_workers=0", "max_new_tokens=4"],
        )  # fmt: skip
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "eval")
    results = evaluate(cfg)
    assert sorted(results) == sorted(ALL)
    assert {name: r["n"] for name, r in results.items()} == {
        "mvbench": 40, "videomme": 2, "videomme_subs": 2, "egoschema": 2, "mlvu": 14,
        "activitynet_qa": 2, "msvd_qa": 2, "msrvtt_qa": 2, "own": 2,
    }  # fmt: skip
    assert all(r["n_failed"] == 0 for r in results.values())  # every clip decodes, frame folders and bounds included
    assert results["videomme"]["settings"]["frames"] == 8  # the run's own frames
    real = tmp_path / "real"
    (real / "eval" / "mvbench").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="holds files the demo did not write"):
        demo_main([f"paths.data_dir={real}"])
    # a benchmark pointed at its real folder: refused before anything is written, there or in the demo's folder
    (real / "mvbench.json").write_text("[]")
    with pytest.raises(FileExistsError, match=r"benchmarks.mvbench.root=.*real.*leave their roots"):
        demo_main([f"paths.data_dir={tmp_path / 'fresh'}", f"benchmarks.mvbench.root={real}"])
    assert sorted(p.name for p in real.rglob("*")) == ["eval", "mvbench", "mvbench.json"]
    assert not (tmp_path / "fresh").exists()


def test_a_run_fine_tuned_from_a_release_folder_starts_from_every_weight_of_it(
    cache_dir, bench_data, trained_run, tmp_path, monkeypatch
):
    """init_from=<release folder>: the LLM loads from it, the rest is imported; evaluating the run rebuilds the parts
    it did not train from the folder and the trained ones from its hand-off."""
    from hicom.compat.official import export_official
    from hicom.eval.runner import load_model
    from hicom.stages import run_stages
    from hicom.training import train

    source, _ = load_model(trained_run, compose_eval(cache_dir, bench_data, tmp_path, []))
    release = export_official(source.net, tmp_path / "release", num_frames=8)
    monkeypatch.setattr("hicom.training.build", lambda *a, **k: pytest.fail("the model was built"))
    for other, differs in (
        ("model/compressor=avgpool", "model.compressor builds {'type': 'AvgPool"),
        (
            "model.compressor.global_.guide=direct",
            "builds {'mm_projector_type': 'local43_guidedirect_global32_guidedirect'",
        ),
        ("model.compressor.global_.num_heads=2", "global_.num_heads=2"),  # the same weights, other attention
        ("model.compressor.local.readout_depth=1", "unexpected ['local_compressor.readout.2.bias'"),
    ):  # each refused before anything loads, saying what differs
        with pytest.raises(ValueError, match=rf"(?s)not the compressor of .*release.*{re.escape(differs)}"):
            train(compose_train(cache_dir, tmp_path / "bad", [*SMALL, f"init_from={release}", other]))
    with pytest.raises(FileNotFoundError, match=r"init_from=.*nowhere is not an HF folder in the release's layout"):
        train(compose_train(cache_dir, tmp_path / "bad", [*SMALL, f"init_from={tmp_path / 'nowhere'}"]))
    broken = shutil.copytree(release, tmp_path / "broken", ignore=shutil.ignore_patterns("*.safetensors"))
    (broken / "config.json").write_text("{not json")  # named, not the tokenizer that reads it next
    with pytest.raises(ValueError, match=r"cannot read .*broken/config\.json: "):
        train(compose_train(cache_dir, tmp_path / "bad", [*SMALL, f"init_from={broken}"]))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="set stages=null to fine-tune the release in one fit"):
        run_stages(compose_train(cache_dir, tmp_path / "staged", ["experiment=tiny_stages", f"init_from={release}"]))
    run = tmp_path / "tuned"
    relative = os.path.relpath(release)  # config.yaml names it absolutely, for evaluate.py launched anywhere
    overrides = [*SMALL, "model.trainable=[compressor]", "trainer.max_steps=2", "evaluate=false"]
    assert train(compose_train(cache_dir, run, [*overrides, f"init_from={relative}"]))["steps"] == 2
    assert OmegaConf.load(run / "config.yaml").init_from == str(release)
    tuned, _ = load_model(run, compose_eval(cache_dir, bench_data, tmp_path, []))
    assert tuned.net.llm.path == str(release)
    for part in ("vision", "llm"):  # not trained: the release's
        expected = getattr(source.net, part).state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in getattr(tuned.net, part).state_dict().items()), part
    trained = source.net.compressor.state_dict()
    assert any(not torch.equal(v, trained[k]) for k, v in tuned.net.compressor.state_dict().items())  # two steps
    # no step at all: the compressor the run hands off is the release's (the fit started from it)
    train(compose_train(cache_dir, tmp_path / "still", [*overrides, f"init_from={release}", "trainer.max_steps=0"]))
    still, _ = load_model(tmp_path / "still", compose_eval(cache_dir, bench_data, tmp_path, []))
    assert all(torch.equal(v, trained[k]) for k, v in still.net.compressor.state_dict().items())
    # its checkpoint resumes with a release folder only; a stage from it, or the folder gone, are refused by name
    last = run / "checkpoints" / "last.ckpt"

    def not_built(*args, **kwargs):
        raise AssertionError("the model was built before the checkpoint's start was checked")

    monkeypatch.setattr("hicom.training.build", not_built)  # both are refused before the towers and the LLM load
    with pytest.raises(ValueError, match="started from .*release: resume it with init_from"):
        train(compose_train(cache_dir, tmp_path / "resumed", [*overrides, f"ckpt_path={last}", "trainer.max_steps=3"]))
    plain = [*overrides, f"ckpt_path={trained_run}", f"init_from={release}", "trainer.max_steps=6"]
    with pytest.raises(ValueError, match="did not start from a release folder: resume it without init_from"):
        train(compose_train(cache_dir, tmp_path / "resumed", plain))
    monkeypatch.undo()
    staged = ["experiment=tiny_stages", *SMALL, "stage=instruction", f"stage_parent={run}"]
    with pytest.raises(ValueError, match=r"fine-tuned from the release folder .*release \(init_from\)"):
        run_stages(compose_train(cache_dir, tmp_path / "next", staged))
    typo = compose_eval(cache_dir, bench_data, tmp_path, ["run_overrides=['model.vison.path=/x']"])
    with pytest.raises(ValueError, match=r"run_overrides: \['model.vison.path'\] are not keys of .*config.yaml"):
        load_model(run, typo)
    gone = compose_eval(cache_dir, bench_data, tmp_path, [f"run_overrides=['init_from={tmp_path / 'moved'}']"])
    with pytest.raises(FileNotFoundError, match=r"not found here: run_overrides=\['init_from=<that folder>'\]"):
        load_model(run, gone)


def test_a_run_folder_is_checked_before_its_weights_load(cache_dir, bench_data, trained_run, tmp_path, monkeypatch):
    """evaluate.py checks a run's config as training does (check_model): here a tower folder whose image processor
    gives another side than the tower takes, refused before the towers load."""
    import shutil

    import hicom.eval.runner as runner
    from hicom.eval.runner import load_model

    config = OmegaConf.load(trained_run / "config.yaml")
    vision = shutil.copytree(config.model.vision.path, tmp_path / "siglip")
    processor = json.loads((vision / "preprocessor_config.json").read_text())
    processor["size"] = {"height": 96, "width": 96}
    (vision / "preprocessor_config.json").write_text(json.dumps(processor))
    cfg = compose_eval(cache_dir, bench_data, tmp_path / "out", [f"run_overrides=['model.vision.path={vision}']"])
    monkeypatch.setattr(runner, "instantiate", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(ValueError, match=r"siglip/preprocessor_config\.json resizes frames to 96 px"):
        load_model(trained_run, cfg)


def test_an_evaluation_sweep_writes_one_table_of_its_jobs_and_benchmarks(cache_dir, bench_data, trained_run, tmp_path):
    """`evaluate.py -m`: a row per job and benchmark with the swept frames, its score and its visual tokens."""
    import subprocess
    import sys

    env = {**os.environ, "HICOM_CACHE": str(cache_dir), "HICOM_DATA": str(bench_data), "HICOM_LOGS": str(tmp_path)}
    env.pop("HICOM_RUN_STAMP", None)
    cmd = [sys.executable, "evaluate.py", "-m", f"ckpt={trained_run}", "benchmark=[mlvu,msvd_qa]", "limit=2",
           "num_workers=0", "max_new_tokens=4", "benchmarks.mlvu.tasks=[1_plotQA]", "sampling.num_frames=4,8",
           "~logger"]  # fmt: skip
    subprocess.run(cmd, cwd=CONFIGS.parent, env=env, check=True, capture_output=True, text=True, timeout=600)
    (sweep,) = tmp_path.glob("evaluate/multiruns/*")
    rows = json.loads((sweep / "summary.json").read_text())
    assert [(row["job"], row["benchmark"]) for row in rows] == [
        ("0", "mlvu"),
        ("0", "msvd_qa"),
        ("1", "mlvu"),
        ("1", "msvd_qa"),
    ]
    for row in rows:
        assert row["metrics"] == json.loads((sweep / row["job"] / "results.json").read_text())[row["benchmark"]]
    table = (sweep / "summary.md").read_text().splitlines()
    assert table[0] == (
        "| job | sampling.num_frames | benchmark | score | metric | n | unparsed | failed | frames "
        "| visual_tokens_per_video |"
    )
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    assert [row[:3] + row[4:6] + row[7:] for row in cells] == [
        ["0", "4", "mlvu", "M-Avg", "1", "0", "4", "41"],  # frames and visual tokens of each job's clips
        ["0", "4", "msvd_qa", "exact match", "2", "0", "4", "41"],
        ["1", "8", "mlvu", "M-Avg", "1", "0", "8", "50"],
        ["1", "8", "msvd_qa", "exact match", "2", "0", "8", "50"],
    ]


def test_answers_of_a_compressor_built_otherwise_are_not_kept(tmp_path):
    """A release folder read with and without `official.reproduce_defect_1` has one file identity and two
    compressors: the answers of one are not scored with the other's. A settings.json without the label (older)
    is not compared on it."""
    from hicom.eval.runner import check_same_answers

    settings = {"ckpt": "release", "format": "release", "weights": "w", "frames": 32, "decoding": {"max_new_tokens": 8}}
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({**settings, "compressor": "local 4x3x3 direct + global 32 direct"}))
    with pytest.raises(ValueError, match=r"holds answers made otherwise(.|\n)*compressor: 'local 4x3x3 direct \+"):
        check_same_answers(path, {**settings, "compressor": "local 4x3x3 direct + global 32 unguided"})
    check_same_answers(path, {**settings, "compressor": "local 4x3x3 direct + global 32 direct"})
    path.write_text(json.dumps(settings))
    check_same_answers(path, {**settings, "compressor": "local 4x3x3 direct + global 32 unguided"})


def test_a_run_over_some_tasks_keeps_the_answers_to_the_others(cache_dir, bench_data, trained_run, tmp_path):
    """A re-run into the same folder over part of a benchmark (some tasks; EgoSchema's subset after its full set)
    answers and scores its questions and leaves the others' answers in predictions.jsonl: the full run after it
    asks nothing again."""
    from hicom.eval.runner import evaluate

    out = tmp_path / "out"

    def run(*overrides: str) -> dict:
        return evaluate(compose_eval(cache_dir, bench_data, out, [f"ckpt={trained_run}", "benchmark=mlvu", *overrides]))

    assert run()["mlvu"]["n"] == 4
    before = (out / "mlvu/predictions.jsonl").read_text()
    part = run("benchmarks.mlvu.tasks=[4_count]")["mlvu"]
    assert part["n"] == 3 and part["answered_this_run"] == 0
    lines = (out / "mlvu/predictions.jsonl").read_text().splitlines()
    assert sorted(lines) == sorted(before.splitlines())  # the other task's answer kept, as it was
    again = run()["mlvu"]
    assert again["n"] == 4 and again["answered_this_run"] == 0
    assert (out / "mlvu/predictions.jsonl").read_text() == before


def test_a_run_evaluated_with_its_tower_moved_writes_nothing_at_the_old_path(
    cache_dir, bench_data, trained_run, tmp_path
):
    """On another machine (another cache folder) a tiny run's towers are given by run_overrides; its config's
    assets still name the training machine's cache, where nothing is to be written (as another user it fails)."""
    import shutil

    from omegaconf import OmegaConf

    from hicom.eval.runner import evaluate

    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    here = shutil.copytree(cfg.model.vision.path, tmp_path / "bob" / "siglip")
    cfg.assets.siglip.out_dir = str(tmp_path / "alice" / "siglip")  # the training machine's, absent here
    cfg.model.vision.path = cfg.assets.siglip.out_dir
    OmegaConf.save(cfg, run_dir / "config.yaml")
    overrides = [f"ckpt={run_dir}", "benchmark=mlvu", "limit=1", f"run_overrides=['model.vision.path={here}']"]
    assert evaluate(compose_eval(cache_dir, bench_data, tmp_path / "out", overrides))["mlvu"]["n"] == 1
    assert not (tmp_path / "alice").exists()


def test_evaluate_under_srun_takes_its_shard_and_gpu_from_slurm(monkeypatch):
    """Launched with srun (no torchrun), every task answered every question on cuda:0 in one shared folder, and all
    but one stopped on the shard's lock."""
    from hicom.eval.runner import _local_rank, _shard

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert _shard() == (0, 1) and _local_rank() == 0
    srun = {"SLURM_JOB_ID": "777", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"}
    for name, value in srun.items():
        monkeypatch.setenv(name, value)
    assert _shard() == (3, 4) and _local_rank() == 1
    monkeypatch.setenv("RANK", "0")  # torchrun inside the step: its own variables
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert _shard() == (0, 2) and _local_rank() == 0


def compose_ask(cache: Path, out: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("ask", overrides=[f"paths.cache_dir={cache}", "max_new_tokens=4", *overrides])
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


def test_ask_replies_as_the_evaluation_does_to_the_same_question(cache_dir, bench_data, trained_run, tmp_path, capsys):
    """ask.py puts a question to the model the way evaluate.py does: asked with evaluate's template, the same
    question about the same clip gets the reply evaluate.py's predictions hold; several questions share one read."""
    from hicom.eval.ask import ask
    from hicom.eval.runner import evaluate

    evaluation = compose_eval(cache_dir, bench_data, tmp_path / "eval", [f"ckpt={trained_run}", "benchmark=msvd_qa"])
    evaluate(evaluation)
    rows = {row["question"]: row for row in map(json.loads, (tmp_path / "eval/msvd_qa/predictions.jsonl").open())}
    video = bench_data / "eval/msvd_qa/videos/x1.avi"
    questions = "question=['what is shown','who is there']"
    cfg = compose_ask(cache_dir, tmp_path / "ask", [f"ckpt={trained_run}", f"video={video}", questions,
                                                    "sampling.num_frames=8"])  # fmt: skip
    cfg.prompts.open_ended = evaluation.prompts.open_ended  # asked as evaluate asks, for its short answers
    records = ask(cfg)
    assert [r["question"] for r in records] == ["what is shown", "who is there"]
    assert (
        records[0]["reply"] == rows["what is shown"]["reply"]
        and records[0]["prompt"] == rows["what is shown"]["prompt"]
    )
    written = json.loads((tmp_path / "ask/answers.json").read_text())
    assert written["answers"] == records and written["settings"]["frames"] == 8
    assert written["settings"]["format"] == "run" and "choice" not in records[0]
    out = capsys.readouterr().out
    assert f"Q: what is shown\nA: {records[0]['reply'].strip()}\n" in out
    # options: asked as a multiple-choice question, the reply read for a letter; the frames default to the run's
    cfg = compose_ask(cache_dir, tmp_path / "mc", [f"ckpt={trained_run}", f"video={video}", "question=which?",
                                                   "options=[red,blue,1]"])  # fmt: skip
    (record,) = ask(cfg)
    assert record["options"] == ["red", "blue", "1"] and "(C) 1\n" in record["prompt"]
    assert record["choice"] in (None, "A", "B", "C")
    settings = json.loads((tmp_path / "mc/answers.json").read_text())["settings"]
    assert settings["frames"] == OmegaConf.load(trained_run / "config.yaml").data.num_frames


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        (["question=what?"], r"set video=<a video file or a folder of frames> or image=<an image file>"),
        (["video={video}", "image={video}", "question=what?"], r"\(one of them\), got video="),
        (["image={missing}", "question=what?"], r"image=.*gone\.mp4: no such file$"),
        (["image={video}", "question=what?", "start=1"], r"start, end and subtitles are a video's"),
        (["video={video}"], r"question=None: give a text or a list of texts"),
        (["video={missing}", "question=what?"], r"video=.*gone\.mp4: no such file or folder"),
        (["video={video}", "question=[what?,'  ']"], r"question=.*: give a text or a list of texts"),
        (["video={video}", "question=what?", "options=[red]"], r"options: 1 given; .* has 2 to 8"),
        (["video={video}", "question=what?", "options=[1.50,2.00]"], r"options: 1\.5 was read as a float, .*quote it"),
        (["video={video}", "question=what?", "options=[True,False]"], r"options: True was read as a bool"),
        (["video={video}", "question=what?", "start=4", "end=2"], r"start=4 is not before end=2"),
        (["video={video}", "question=what?", "start=-1"], r"start=-1: a time in seconds"),
        (["video={video}", "question=what?", "subtitles={missing}"], r"subtitles=.*: no such \.srt file"),
        (["video={video}", "question=what?", "prompts.open_ended='{{questoin}}'"], r"prompts\.open_ended=.*questoin"),
        (["video={video}", "question=what?", "max_new_tokens=0"], r"max_new_tokens"),
    ],
)
def test_ask_refuses_what_it_cannot_ask_before_the_model_loads(
    cache_dir, bench_data, tmp_path, monkeypatch, overrides, error
):
    import hicom.eval.ask as ask_module

    monkeypatch.setattr(ask_module, "answering_model", lambda cfg: pytest.fail("the model was loaded"))
    video, missing = bench_data / "eval/msvd_qa/videos/x1.avi", tmp_path / "gone.mp4"
    overrides = [o.format(video=video, missing=missing) for o in overrides]
    run = tmp_path / "run"
    (run / "config.json").parent.mkdir()
    (run / "config.json").write_text("{}")  # a release folder, as far as the first check goes
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        ask_module.ask(compose_ask(cache_dir, tmp_path / "out", [f"ckpt={run}", *overrides]))


def test_ask_reads_an_image_as_one_frame_as_training_reads_one(cache_dir, trained_run, tmp_path):
    from PIL import Image

    from hicom.eval.ask import ask

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    cfg = compose_ask(cache_dir, tmp_path / "out", [f"ckpt={trained_run}", f"image={tmp_path / 'a.png'}",
                                                    "question=What is shown?"])  # fmt: skip
    (record,) = ask(cfg)
    assert record["prompt"] == "<image>\nWhat is shown?" and isinstance(record["reply"], str)
    settings = json.loads((tmp_path / "out/answers.json").read_text())["settings"]
    assert settings["image"] == str(tmp_path / "a.png") and settings["frames"] == 1
    assert settings["visual_tokens"] == 3 * 3 + 32  # the tiny tower's 7 x 7 grid, k_t = 1, and the global tokens
    # the image's pixels are those a training sample of it gets
    from hicom.data.dataset import read_image
    from hicom.data.transforms import FrameTransform
    from hicom.eval.ask import questions_of
    from hicom.eval.runner import answering_model, question_inputs

    module, *_ = answering_model(cfg)
    dataset, _ = question_inputs(module.net, questions_of(cfg), cfg.sampling, {"open_ended": "{question}"})
    (item,) = dataset.__getitems__([0])
    trained = FrameTransform.from_pretrained(module.net.vision.path).squared(read_image(tmp_path / "a.png"))
    assert item["modality"] == "image" and torch.equal(item["pixel_values"], trained)


def test_ask_names_a_clip_that_does_not_decode(cache_dir, trained_run, tmp_path):
    from hicom.eval.ask import ask

    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    cfg = compose_ask(cache_dir, tmp_path / "out", [f"ckpt={trained_run}", f"video={broken}", "question=what?"])
    with pytest.raises(RuntimeError, match=r"cannot ask about .*broken\.mp4: .*broken\.mp4"):
        ask(cfg)
    assert not (tmp_path / "out/answers.json").exists()


def test_an_ask_sweep_writes_a_row_per_job_and_question(cache_dir, bench_data, trained_run, tmp_path):
    """`ask.py -m`: the command composes from evaluate's config and its own; a row per job and question with the
    swept value and the reply."""
    import subprocess
    import sys

    env = {**os.environ, "HICOM_CACHE": str(cache_dir), "HICOM_LOGS": str(tmp_path)}
    env.pop("HICOM_RUN_STAMP", None)
    video = bench_data / "eval/msvd_qa/videos/x1.avi"
    cmd = [sys.executable, "ask.py", "-m", f"ckpt={trained_run}", f"video={video}", "question=[what?,who?]",
           "max_new_tokens=4", "sampling.num_frames=4,8"]  # fmt: skip
    done = subprocess.run(cmd, cwd=CONFIGS.parent, env=env, check=True, capture_output=True, text=True, timeout=600)
    assert done.stdout.count("Q: what?\nA: ") == 2
    (sweep,) = tmp_path.glob("ask/multiruns/*")
    rows = json.loads((sweep / "summary.json").read_text())
    assert [(row["job"], row["asked"]) for row in rows] == [
        ("0", "what?"),
        ("0", "who?"),
        ("1", "what?"),
        ("1", "who?"),
    ]
    for row in rows:
        answers = json.loads((sweep / row["job"] / "answers.json").read_text())["answers"]
        assert row["metrics"] in answers
    table = (sweep / "summary.md").read_text().splitlines()
    assert table[0] == "| job | sampling.num_frames | asked | reply | choice |"
    assert table[2].startswith("| 0 | 4 | what? | ") and table[2].endswith(" |  |")  # no options: no choice


def _own(root: Path, records: list, **settings):
    from hicom.eval.benchmarks import QuestionFile

    _dump(root / "questions.json", records)
    return QuestionFile(root=str(root), **settings)


def test_a_question_file_reads_each_answer_form_and_kind(tmp_path):
    from hicom.eval.benchmarks import Kind

    options = ["red", "green", "blue"]
    base = {"video": "a.mp4", "question": "Which colour?", "candidates": options}
    for answer_is, answer in (("text", "blue"), ("letter", "C"), ("index", 2)):
        (q,) = _own(tmp_path, [{**base, "answer": answer}], answer_is=answer_is).read()
        assert (q.answer, q.options, q.question_id, q.task) == ("C", tuple(options), "0", "all")
        assert q.video == str(tmp_path / "videos/a.mp4") and (q.start, q.end, q.duration) == (None, None, None)
    record = {**base, "answer": None, "question_id": 7, "task": "colour", "start": 1, "end": 2.5, "duration": "short"}
    (q,) = _own(tmp_path, [record]).read()
    assert (q.answer, q.question_id, q.task, q.start, q.end, q.duration) == (None, "7", "colour", 1.0, 2.5, "short")
    reader = _own(tmp_path, [{"video": "a.mp4", "question": "What?", "answer": 3}], kind="open_ended")
    (q,) = reader.read()
    assert (reader.kind, reader.metric, q.answer, q.options) == (Kind.OPEN_ENDED, "exact_match", "3", ())
    assert _own(tmp_path, [], mean_of_tasks=True).metric == "m_avg" and _own(tmp_path, []).metric == "acc"
    numbers = {"video": "a.mp4", "question": "How many?", "candidates": [1, 2, 3], "answer": 2}  # numbers, as text
    assert _own(tmp_path, [numbers]).read()[0].answer == "B"


def test_a_question_file_names_the_keys_it_ignores(tmp_path, caplog):
    record = {"video": "a.mp4", "question": "q", "candidates": ["x", "y"], "answer": "x", "question_type": "t"}
    _own(tmp_path, [record, record | {"question_id": "b"}]).read()
    assert "keys read by no rule, ignored: question_type (2 records)" in caplog.text


@pytest.mark.parametrize(
    ("records", "settings", "error"),
    [
        ([{"video": "a.mp4", "question": "q", "answer": "x"}], {}, r"record 0: no 'candidates' field"),
        ([{"video": "a.mp4", "question": "q", "candidates": ["x", "y"], "answer": "x"}], {"kind": "open_ended"},
         r"record 0: candidates in an open-ended benchmark"),
        ([{"video": "a.mp4", "question": "q", "candidates": ["x", "y"], "answer": "C"}], {"answer_is": "letter"},
         r"record 0: 'answer' is 'C', not one of \['A', 'B'\]"),
        ([{"video": "a.mp4", "question": "q", "candidates": ["x", "y"], "answer": 2}], {"answer_is": "index"},
         r"record 0: 'answer' is 2, not an index from 0 to 1"),
        ([{"video": "a.mp4", "question": "q", "candidates": ["x", "y"], "answer": "x", "start": 3, "end": 2}], {},
         r"record 0: start 3.0 is not before end 2.0"),
        ([{"video": "a.mp4", "question": "q", "candidates": ["x", "y"], "answer": "x", "start": "1"}], {},
         r"record 0: 'start' is '1', not a number of seconds"),
        ([{"video": "a.mp4", "question": "q", "candidates": ["x", "y"]}], {}, r"record 0: no 'answer' field"),
        ([["a.mp4"]], {}, r"record 0: expected an object"),
        ([{"video": "a.mp4", "question": "q", "candidates": ["x", "y"], "answer": "x", "question_id": 1}] * 2, {},
         r"question ids given to more than one question \(1: '1'\)"),
        ([], {"kind": "yes_no"}, r"kind must be one of \['multiple_choice', 'open_ended'\], got 'yes_no'"),
        ([], {"answer_is": "number"}, r"answer_is must be one of \['text', 'letter', 'index'\], got 'number'"),
        ([], {"mean_of_tasks": "no"}, r"mean_of_tasks must be true or false"),
        ([], {"kind": "open_ended", "mean_of_tasks": True}, r"mean_of_tasks=true scores multiple-choice accuracy"),
        ([{"video": "a.mp4", "question": "q", "candidates": ["x", "y"], "answer": "X"}], {},
         r"record 0: 'answer' is 'X', not one of the candidates \['x', 'y'\] \(answer_is=text; an answer by letter"),
        ([{"video": "a.mp4", "question": "q", "candidates": ["1", "2", "3"], "answer": 2}], {},
         r"record 0: 'answer' is 2, not one of the candidates"),  # an index left under answer_is=text
        ([{"video": "a.mp4", "question": "q", "candidates": ["x", "x", "y"], "answer": "y"}], {},
         r"record 0: candidates .* repeat one"),
        ([{"video": "a.mp4", "question": "q", "candidates": ["x", "y"], "answer": "x", "duration": 183.4}], {},
         r"record 0: 'duration' is 183.4, not a text"),
        ([{"video": "a.mp4", "question": "q", "candidates": ["x", "y"], "answer": "x", "end": 0}], {},
         r"record 0: end 0 leaves nothing"),
        ([{"video": "a.mp4", "question": "q", "candidates": ["x", "y"], "answer": a} for a in "zzzzzzzzzzzz"], {},
         r"(?s)questions\.json: 12 records cannot be asked or scored:\n  record 0: 'answer' is 'z'.*\n  record 9: .*"
         r"\n  \.\.\. and 2 more$"),
    ],
)  # fmt: skip
def test_a_question_file_refuses_what_it_cannot_score_naming_the_record(tmp_path, records, settings, error):
    from hicom.eval.benchmarks import BenchmarkFormatError

    with pytest.raises((BenchmarkFormatError, ValueError), match=error):
        _own(tmp_path, records, **settings).read()


def test_a_question_file_evaluates_end_to_end_and_rescores_with_its_settings(cache_dir, trained_run, tmp_path):
    """benchmark=own over a file of one's own: asked, scored as its settings say (mean of tasks, answers by index),
    and re-scored alike where the same settings are given to the score command."""
    from hicom.eval.runner import evaluate

    data = tmp_path / "data"
    for i in range(3):
        _clip(data / f"eval/mine/clips/c{i}.mp4", 40 + i)
    records = [{"video": f"c{i}.mp4", "question": "Which colour?", "candidates": ["red", "green", "blue"],
                "answer": i, "task": ["t1", "t1", "t2"][i]} for i in range(3)]  # fmt: skip
    _dump(data / "eval/mine/questions.json", records)
    settings = ["benchmarks.own.root=${paths.data_dir}/eval/mine", "benchmarks.own.video_dir=clips",
                "benchmarks.own.answer_is=index", "benchmarks.own.mean_of_tasks=true"]  # fmt: skip
    results = evaluate(compose_eval(cache_dir, data, tmp_path / "out", [f"ckpt={trained_run}", "benchmark=own",
                                                                        *settings]))["own"]  # fmt: skip
    assert results["metric"] == "m_avg" and results["n"] == 3 and set(results["per_task"]) == {"t1", "t2"}
    rows = [json.loads(line) for line in (tmp_path / "out/own/predictions.jsonl").open()]
    assert [row["answer"] for row in rows] == ["A", "B", "C"] and rows[0]["prompt"].startswith("<video>\nQuestion: ")
    predictions = f"predictions={tmp_path / 'out/own/predictions.jsonl'}"
    assert score_main(["benchmark=own", predictions, *settings])["m_avg"] == results["m_avg"]
    # without overrides, scored as the evaluation scored them (results.json records it), whatever the config says
    assert score_main(["benchmark=own", predictions])["metric"] == "m_avg"
    assert score_main(["benchmark=own", predictions, *settings[:3]])["metric"] == "acc"  # overrides: the config's
    with pytest.raises(SystemExit, match=r"scored these replies as benchmark=own, not mlvu"):
        score_main(["benchmark=mlvu", predictions])


def test_an_open_ended_question_without_an_answer_is_asked_not_scored_nor_judged(tmp_path):
    from hicom.eval.score import read_predictions, score

    rows = [{"question_id": str(i), "task": "t", "question": "q", "answer": a, "pred": "dog", "reply": "dog",
             "duration": d} for i, (a, d) in enumerate([("dog", "short"), ("cat", "long"), (None, "long")])]  # fmt: skip
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    asked = []
    judge_predictions(path, lambda q, a, r: asked.append(a) or Verdict(a == r, 5, "{}"))
    assert asked == ["dog", "cat"]
    results = score({"kind": "open_ended", "mean_of_tasks": False, "metric": "exact_match"}, read_predictions(path))
    assert (results["n"], results["n_unscored"], results["exact_match"], results["n_judged"]) == (2, 1, 0.5, 2)
    assert results["per_duration"] == {"long": {"exact_match": 0.0, "n": 1}, "short": {"exact_match": 1.0, "n": 1}}


def test_loader_workers_started_by_a_forkserver_answer_as_the_process_itself(
    cache_dir, bench_data, trained_run, tmp_path
):
    """multiprocessing_context=forkserver: each worker unpickles the questions' dataset, which carries the network's
    token count without the network; the LLM under gradient checkpointing, as the real configs have it (its input
    hook cannot be pickled, and the network was sent whole with the count)."""
    from hicom.eval.runner import evaluate

    replies = {}
    for name, extra in {"here": [], "served": ["num_workers=1", "multiprocessing_context=forkserver"]}.items():
        overrides = [
            f"ckpt={trained_run}",
            "benchmark=[msvd_qa]",
            "run_overrides=['model.llm.gradient_checkpointing=true']",
        ]
        results = evaluate(compose_eval(cache_dir, bench_data, tmp_path / name, [*overrides, *extra]))
        assert results["msvd_qa"]["n"] == 2 and results["msvd_qa"]["n_failed"] == 0
        rows = (tmp_path / name / "msvd_qa" / "predictions.jsonl").read_text().splitlines()
        replies[name] = [json.loads(row)["reply"] for row in rows]
    assert replies["served"] == replies["here"]
