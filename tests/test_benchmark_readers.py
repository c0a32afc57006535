"""The benchmark readers on small hand-written files: a malformed record is a BenchmarkFormatError that names its file,
its record and what was expected, never a bare TypeError from deep inside; two questions under one id (whose replies
would be kept as one) are refused, naming the ids."""

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hicom.eval.benchmarks import MLVU, BenchmarkFormatError, EgoSchema, MVBench, OpenEndedQA, VideoMME

READERS = {
    "mvbench": lambda root: MVBench(root=str(root), tasks={"action_sequence": {"prefix": "star"}}),
    "mlvu": lambda root: MLVU(root=str(root), tasks=("1_plotQA",)),
    "egoschema": lambda root: EgoSchema(root=str(root)),
    "videomme": lambda root: VideoMME(root=str(root), parquet="test.parquet"),
    "open_ended": lambda root: OpenEndedQA(root=str(root)),
}


def _files(benchmark: str) -> dict:
    """Two well-formed questions of `benchmark`, as {path under its folder: content} (a list of rows for a parquet)."""
    choices = [{"video": f"v{i}.mp4", "question": "Which?", "candidates": ["a", "b"], "answer": "b"} for i in range(2)]
    if benchmark in ("mvbench", "mlvu"):
        return {"json/action_sequence.json" if benchmark == "mvbench" else "json/1_plotQA.json": choices}
    if benchmark == "egoschema":
        options = {f"option {j}": f"thing {j}" for j in range(5)}
        questions = [{"q_uid": f"u{i}", "question": "What is c doing?", **options} for i in range(2)]
        return {"questions.json": questions, "subset_answers.json": {"u0": 1, "u1": 4}}
    if benchmark == "videomme":
        row = {"duration": "short", "videoID": "vid", "task_type": "Counting", "question": "How many?", "answer": "B"}
        options = ["A. One.", "B. Two.", "C. Three.", "D. Four."]
        return {"test.parquet": [{**row, "question_id": f"001-{i}", "options": options} for i in range(2)]}
    asked = [{"video_name": f"x{i}", "question": "what is shown", "question_id": f"x{i}_0"} for i in range(2)]
    answered = [{"answer": "dog", "type": 0, "question_id": f"x{i}_0"} for i in range(2)]
    return {"test_q.json": asked, "test_a.json": answered}


def _write(root: Path, files: dict) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".parquet"):
            pq.write_table(pa.Table.from_pylist(content), path)
        else:
            path.write_text(json.dumps(content))


def _nine_options(files: dict) -> None:
    files["test.parquet"][0]["options"] = [f"{letter}. x" for letter in "ABCDEFGHI"]


@pytest.mark.parametrize("benchmark", READERS)
def test_well_formed_files_read_as_two_questions(benchmark, tmp_path):
    _write(tmp_path, _files(benchmark))
    questions = READERS[benchmark](tmp_path).read()
    assert len(questions) == 2 and len({q.question_id for q in questions}) == 2


MALFORMED = [
    ("mvbench", lambda f: f["json/action_sequence.json"][0].update(video=None),
     "action_sequence.json record 0: 'video' is None, not a text"),
    ("mvbench", lambda f: f["json/action_sequence.json"][1].update(video=7),
     "action_sequence.json record 1: 'video' is 7, not a text"),
    ("mvbench", lambda f: f.update({"json/action_sequence.json": 5}),
     "action_sequence.json: expected a list of records, found 5"),
    ("mvbench", lambda f: f["json/action_sequence.json"][0].update(answer=None),
     "action_sequence.json record 0: 'answer' is None, not a text or a number"),
    ("mvbench", lambda f: f["json/action_sequence.json"][0].update(candidates=[*"abcdefghi"]),
     "action_sequence.json record 0: 9 candidates (2-8 expected)"),
    ("mlvu", lambda f: f["json/1_plotQA.json"][0].update(video=None),
     "1_plotQA.json record 0: 'video' is None, not a text"),
    ("mlvu", lambda f: f.update({"json/1_plotQA.json": None}),
     "1_plotQA.json: expected a list of records, found None"),
    # a task filtered to nothing: MLVU's M-Avg was a mean over the other tasks, with no word (review)
    ("mlvu", lambda f: f.update({"json/1_plotQA.json": []}),
     "1_plotQA.json holds no records"),
    ("egoschema", lambda f: f.update({"questions.json": []}), "questions.json holds no records"),
    ("egoschema", lambda f: f.update({"questions.json": None}),
     "questions.json: expected a list of records, found None"),
    ("egoschema", lambda f: f.update({"subset_answers.json": [1, 4]}),
     "subset_answers.json: expected an object, found [1, 4]"),
    ("egoschema", lambda f: f["questions.json"][1].update({"option 3": None}),
     "questions.json record 1: 'option 3' is None, not a text"),
    ("egoschema", lambda f: f["questions.json"][0].update(q_uid=None),
     "questions.json record 0: 'q_uid' is None, not a text or a number"),
    ("open_ended", lambda f: f.update({"test_q.json": 3}),
     "test_q.json: expected a list of records, found 3"),
    ("open_ended", lambda f: f["test_q.json"][1].update(question=3),
     "test_q.json entry 1: 'question' is 3, not a text"),
    ("open_ended", lambda f: f["test_q.json"][0].update(video_name=["x0"]),
     "test_q.json entry 0: 'video_name' is ['x0'], not a text"),
    ("open_ended", lambda f: f["test_a.json"][1].update(answer=None),
     "test_a.json entry 1: 'answer' is None, not a text or a number"),
    ("videomme", lambda f: f["test.parquet"][0].update(options=None),
     "test.parquet row 0: 'options' is None, not a list of texts"),
    ("videomme", _nine_options, "test.parquet row 0: 9 options (2-8 expected)"),
    ("videomme", lambda f: f["test.parquet"][1].update(videoID=None),
     "test.parquet row 1: 'videoID' is None, not a text"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("benchmark", "spoil", "said"), MALFORMED, ids=[re.sub(r"\W+", "_", said)[:60] for *_, said in MALFORMED]
)
def test_a_malformed_record_names_its_file_and_what_was_expected(benchmark, spoil, said, tmp_path):
    files = _files(benchmark)
    spoil(files)
    _write(tmp_path, files)
    with pytest.raises(BenchmarkFormatError, match=re.escape(said)):
        READERS[benchmark](tmp_path).read()
    assert issubclass(BenchmarkFormatError, ValueError)  # evaluate gathers every benchmark's ValueError at once


@pytest.mark.parametrize(
    ("benchmark", "share", "said"),
    [
        ("egoschema", lambda f: (f["questions.json"][1].update(q_uid="u0", question="Another question?"),
                                 f.update({"subset_answers.json": {"u0": 1}})),  # u1's answer: no question asks it
         "questions.json: question ids given to more than one question (1: 'u0')"),
        ("egoschema", lambda f: (f["questions.json"][0].update(q_uid=7), f["questions.json"][1].update(q_uid="7"),
                                 f.update({"subset_answers.json": {"7": 0}})),
         "questions.json: question ids given to more than one question (1: '7')"),  # the same id once read
        ("open_ended", lambda f: (f["test_q.json"][1].update(question_id="x0_0"),
                                  f["test_a.json"][1].update(question_id="x0_0")),
         "test_q.json: question ids given to more than one question (1: 'x0_0')"),
        ("videomme", lambda f: f["test.parquet"][1].update(question_id="001-0"),
         "test.parquet: question ids given to more than one question (1: '001-0')"),
    ],
    ids=["egoschema", "egoschema-number-and-text", "open_ended", "videomme"],
)  # fmt: skip
def test_two_questions_under_one_id_are_refused(benchmark, share, said, tmp_path):
    """The runner keeps replies by question id: a shared one would lose one question's reply and score the other's
    twice."""
    files = _files(benchmark)
    share(files)
    _write(tmp_path, files)
    with pytest.raises(BenchmarkFormatError, match=re.escape(said)):
        READERS[benchmark](tmp_path).read()


def test_shared_ids_are_counted_and_a_few_named(tmp_path):
    asked = [{"video_name": "x", "question": f"what is shown {i}", "question_id": f"q{i // 2}"} for i in range(14)]
    answered = [{"answer": "dog", "question_id": q["question_id"]} for q in asked]
    _write(tmp_path, {"test_q.json": asked, "test_a.json": answered})
    said = "(7: 'q0', 'q1', 'q2', 'q3', 'q4', ...); every question needs an id of its own"
    with pytest.raises(BenchmarkFormatError, match=re.escape(said)):
        OpenEndedQA(root=str(tmp_path)).read()


def test_a_task_listed_twice_is_refused_not_read_twice(tmp_path):
    _write(tmp_path, _files("mlvu"))
    with pytest.raises(BenchmarkFormatError, match=re.escape("(2: '1_plotQA/0', '1_plotQA/1')")):
        MLVU(root=str(tmp_path), tasks=("1_plotQA", "1_plotQA")).read()


@pytest.mark.parametrize(
    ("benchmark", "remove", "said"),
    [
        ("mlvu", ["json/1_plotQA.json", "json/2_needle.json"],
         "2 of 2 files missing under {root}: json/1_plotQA.json, json/2_needle.json (put MLVU's dev files there; "
         "to run some tasks only: benchmarks.mlvu.tasks="),
        ("egoschema", ["questions.json", "subset_answers.json"],
         "2 of 2 files missing under {root}: questions.json, subset_answers.json"),
        ("open_ended", ["test_q.json", "test_a.json"], "2 of 2 files missing under {root}: test_q.json, test_a.json"),
    ],
    ids=["mlvu", "egoschema", "open_ended"],
)  # fmt: skip
def test_every_missing_file_of_a_benchmark_is_named_at_once(benchmark, remove, said, tmp_path):
    """All that is missing in one error, as MVBench's task files are: not one file per run."""
    _write(tmp_path, _files(benchmark))
    for name in remove:
        (tmp_path / name).unlink(missing_ok=True)
    reader = MLVU(root=str(tmp_path), tasks=("1_plotQA", "2_needle")) if benchmark == "mlvu" else None
    with pytest.raises(BenchmarkFormatError, match=re.escape(said.format(root=tmp_path))):
        (reader or READERS[benchmark](tmp_path)).read()


def test_egoschema_subset_answers_that_no_question_asks_are_refused(tmp_path):
    """The subset's answers name the 500 questions scored: one missing from questions.json would change the
    denominator in silence."""
    files = _files("egoschema")
    files["subset_answers.json"].update({f"gone{i}": 0 for i in range(6)})
    _write(tmp_path, files)
    said = "answers 6 of its 8 q_uids that {} does not ask (gone0, gone1, gone2, gone3, gone4, ...)"
    with pytest.raises(BenchmarkFormatError, match=re.escape(said.format(tmp_path / "questions.json"))):
        EgoSchema(root=str(tmp_path)).read()
    with pytest.raises(BenchmarkFormatError, match="does not ask"):  # the full set is scored on them too
        EgoSchema(root=str(tmp_path), subset=False).read()
