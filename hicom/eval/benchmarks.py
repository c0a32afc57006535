"""The benchmarks as distributed (SPEC 7), read into one question type.

Each reader takes the benchmark's folder and returns `Question`s, each under an id of its own; a missing or
malformed file is an error that names the file, the record and what it expected. Multiple-choice answers become
letters (A, B, ...), the option texts keep their order; open-ended answers stay text. A reader class also says how
its benchmark is scored: `kind`, `mean_of_tasks` and `metric`, the official headline figure (a key of
hicom.eval.score's results).
"""

from __future__ import annotations

import enum
import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from hicom.eval.answers import LETTERS
from hicom.utils.choices import Choice, flag

log = logging.getLogger(__name__)


class Kind(str, enum.Enum):
    MULTIPLE_CHOICE = "multiple_choice"
    OPEN_ENDED = "open_ended"


def check_flags(spec) -> None:
    """Refuse a dataclass whose true / false fields hold anything else: `no` would read as true."""
    for item in fields(spec):
        if item.type in ("bool", bool):
            flag(item.name, getattr(spec, item.name))


@dataclass
class Reader:
    """What every reader takes: `root`, the benchmark's folder, and `prompts`, the templates its benchmark is asked
    with where they differ from evaluate's `prompts` (the keys it sets; see hicom.eval.runner.PROMPT_FIELDS)."""

    root: str
    prompts: dict[str, str] | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if not isinstance(self.root, str | Path) or not str(self.root).strip():
            raise ValueError(f"root must be the benchmark's folder, got {self.root!r}")
        check_flags(self)

    def read(self) -> list[Question]:
        """The benchmark's questions. Replies are kept by question id, so an id given to two questions would lose
        one's reply and score the other's twice: it is an error that names the ids."""
        questions = self._read()
        shared = [qid for qid, n in Counter(q.question_id for q in questions).items() if n > 1]
        if shared:
            named = ", ".join(repr(qid) for qid in shared[:5]) + (", ..." if len(shared) > 5 else "")
            raise BenchmarkFormatError(
                f"{self._ids_from()}: question ids given to more than one question ({len(shared)}: {named}); "
                "every question needs an id of its own"
            )
        return questions

    def _read(self) -> list[Question]:
        raise NotImplementedError

    def _ids_from(self) -> Path:
        """The file the question ids come from (the folder, where they are positions in task files)."""
        return Path(self.root)


@dataclass(frozen=True)
class Question:
    """One question about one clip. `video` is a file or a folder of frames; `start` / `end` bound the clip in
    seconds; `answer` is a letter (multiple choice) or text (open-ended), None where the benchmark withholds it;
    `duration` is the benchmark's duration class (Video-MME's short / medium / long), by which scores are also
    grouped; `subtitles` an .srt file; `not_found`, where the reader found no file for the clip, what it looked for
    (open-ended QA tries several extensions, and `video` is only the first), for the clip's error to name;
    `modality` "image" where `video` is a still image (ask.py's), read as one frame as training reads images."""

    question_id: str
    task: str
    video: str
    question: str
    options: tuple[str, ...] = ()
    answer: str | None = None
    start: float | None = None
    end: float | None = None
    duration: str | None = None
    subtitles: str | None = None
    not_found: str | None = None
    modality: str = "video"


class BenchmarkFormatError(ValueError):
    """A benchmark file that is missing or not in the distributed format."""


def _read_json(path: Path, container: type[list | dict] = list) -> list | dict:
    """A JSON file's content: a list of records, or an object where `container` is dict."""
    if not path.is_file():
        raise BenchmarkFormatError(f"{path} is missing: put the benchmark's files under {path.parent}")
    try:
        value = json.loads(path.read_bytes())  # bytes: UTF-8 whatever the locale
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise BenchmarkFormatError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(value, container):
        expected = "a list of records" if container is list else "an object"
        raise BenchmarkFormatError(f"{path}: expected {expected}, found {value!r:.80}")
    if not value:  # a file cut short or filtered to nothing: its task would be left out of the score in silence
        raise BenchmarkFormatError(f"{path} holds no records: put the benchmark's file there whole")
    return value


def _require_files(root: Path, names: list[str], fix: str) -> None:
    """Every file of `names` under `root`, or one error that names all that are missing (not one per run); `fix`
    says what to do about them."""
    missing = [name for name in names if not (root / name).is_file()]
    if missing:
        raise BenchmarkFormatError(
            f"{len(missing)} of {len(names)} files missing under {root}: {', '.join(missing)} ({fix})"
        )


def _field(record: dict, key: str, where: str):
    if not isinstance(record, dict) or key not in record:
        raise BenchmarkFormatError(f"{where}: no {key!r} field in {str(record)[:120]}")
    return record[key]


def _typed(record: dict, key: str, where: str, ok: Callable[[object], bool], expected: str):
    """`record[key]` where `ok` holds of it; else an error naming the record, the value and what was expected (a
    value of another type would be read as something else: null as the text "None", "abc" as the options a, b, c)."""
    value = _field(record, key, where)
    if not ok(value):
        raise BenchmarkFormatError(f"{where}: {key!r} is {value!r:.80}, not {expected}")
    return value


def _is_scalar(value) -> bool:
    return isinstance(value, str | int | float) and not isinstance(value, bool)


def _text(record: dict, key: str, where: str) -> str:
    return _typed(record, key, where, lambda value: isinstance(value, str), "a text")


def _scalar(record: dict, key: str, where: str) -> str | int | float:
    """A text or a number: an id, a candidate answer."""
    return _typed(record, key, where, _is_scalar, "a text or a number")


def _options(record: dict, key: str, where: str, *, numbers: bool = True) -> list:
    """A list of 2-8 options, one per letter: texts, or numbers too where `numbers`."""
    item = _is_scalar if numbers else (lambda value: isinstance(value, str))
    value = _typed(record, key, where, lambda v: isinstance(v, list) and all(map(item, v)), "a list of texts")
    if not 2 <= len(value) <= len(LETTERS):
        raise BenchmarkFormatError(f"{where}: {len(value)} {key} (2-{len(LETTERS)} expected)")
    return value


def _letter(candidates: list, answer: str | int | float, where: str) -> str | None:
    """The letter of the candidate that is the answer: the same text, else the same but for surrounding spaces.
    A question whose answer is none of its candidates is asked but not scored (None), and named in the log: one
    such record must not stop a benchmark of thousands (the release scores it wrong whatever the reply)."""
    if answer in candidates:
        return LETTERS[candidates.index(answer)]
    stripped = [str(c).strip() for c in candidates]
    if stripped.count(str(answer).strip()) == 1:
        return LETTERS[stripped.index(str(answer).strip())]
    log.warning("%s: the answer %r is not one of the candidates %s: asked, not scored", where, answer, candidates)
    return None


@dataclass(frozen=True)
class MVBenchTask:
    """Where one MVBench task's videos live under video/, whether they are folders of frames, and whether its
    start / end times bound the clip."""

    prefix: str
    frames: bool = False
    bounded: bool = False

    def __post_init__(self) -> None:
        check_flags(self)


@dataclass
class MVBench(Reader):
    """json/<task>.json records {video, question, candidates, answer (text), start?, end?}; videos under
    video/<task prefix>/."""

    tasks: dict[str, MVBenchTask] = field(default_factory=dict)
    kind = Kind.MULTIPLE_CHOICE
    mean_of_tasks = False
    metric = "acc"
    submission = False  # writes the benchmark server's submission file

    def _read(self) -> list[Question]:
        root = Path(self.root)
        if not self.tasks:
            raise BenchmarkFormatError("mvbench: no tasks configured")
        missing = [f"{name}.json" for name in self.tasks if not (root / "json" / f"{name}.json").is_file()]
        if missing:  # all at once, not one per run
            raise BenchmarkFormatError(
                f"mvbench: {len(missing)} of {len(self.tasks)} task files missing under {root / 'json'}: "
                f"{', '.join(missing)} (to run some tasks only: '~benchmarks.mvbench.tasks' "
                "'+benchmarks.mvbench.tasks={<task>: {prefix: <folder under video/>}}')"
            )
        questions = []
        for name, spec in self.tasks.items():
            spec = spec if isinstance(spec, MVBenchTask) else MVBenchTask(**spec)
            path = root / "json" / f"{name}.json"
            for i, record in enumerate(_read_json(path)):
                where = f"{path} record {i}"
                candidates = _options(record, "candidates", where)
                bounded = spec.bounded and record.get("start") is not None and record.get("end") is not None
                start, end = _mvbench_window(record["start"], record["end"], where) if bounded else (None, None)
                questions.append(
                    Question(
                        question_id=f"{name}/{i}",
                        task=name,
                        video=str(root / "video" / spec.prefix / _text(record, "video", where)),
                        question=_text(record, "question", where),
                        options=tuple(str(c) for c in candidates),
                        answer=_letter(candidates, _scalar(record, "answer", where), where),
                        start=start,
                        end=end,
                    )
                )
        return questions


def _mvbench_window(start, end, where: str) -> tuple[float, float]:
    """A bounded MVBench question's [start, end] seconds, read as the release's evaluation reads them: a negative
    bound is 0, reversed bounds are swapped, and an empty window is the second from its start."""
    try:
        start, end = float(start), float(end)
    except (TypeError, ValueError) as err:
        raise BenchmarkFormatError(f"{where}: start / end {start!r}, {end!r} are not numbers of seconds") from err
    start, end = sorted((max(start, 0.0), max(end, 0.0)))
    return start, end if end > start else start + 1.0


_VIDEOMME_OPTION = re.compile(r"^\s*([A-H])[\.\)]\s*")


@dataclass
class VideoMME(Reader):
    """A parquet of 2,700 rows (video_id, duration, domain, sub_category, videoID, question_id, task_type,
    question, options ["A. ..."], answer letter); videos <video_dir>/<videoID>.mp4, subtitles
    <subtitle_dir>/<videoID>.srt where `subtitles` is on (a question's `subtitles` is then that path, whether or
    not the file exists: not every video has one, and its prompt still says that its subtitles follow)."""

    parquet: str = "videomme/test-00000-of-00001.parquet"
    video_dir: str = "videos"
    subtitle_dir: str = "subtitle"
    subtitles: bool = False
    kind = Kind.MULTIPLE_CHOICE
    mean_of_tasks = False
    metric = "acc_answered"  # SPEC 7: accuracy over the answered questions
    submission = False  # writes the benchmark server's submission file

    def _read(self) -> list[Question]:
        import pyarrow.parquet as pq

        root = Path(self.root)
        path = root / self.parquet
        if not path.is_file():
            raise BenchmarkFormatError(f"{path} is missing: put Video-MME's parquet there (or set its `parquet`)")
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow's errors for truncated or foreign files
            raise BenchmarkFormatError(f"{path}: not a readable parquet file ({err})") from err
        questions = []
        for i, row in enumerate(rows):
            where = f"{path} row {i}"
            options = []
            for j, option in enumerate(_options(row, "options", where, numbers=False)):
                match = _VIDEOMME_OPTION.match(option)
                if not match or match.group(1) != LETTERS[j]:
                    raise BenchmarkFormatError(f"{where}: option {j} {option!r} is not of the form '{LETTERS[j]}. ...'")
                options.append(option[match.end() :].strip())
            answer = str(_field(row, "answer", where)).strip()
            if answer not in LETTERS[: len(options)]:
                raise BenchmarkFormatError(f"{where}: the answer {answer!r} is not an option letter")
            video_id = _text(row, "videoID", where)
            srt = root / self.subtitle_dir / f"{video_id}.srt"
            questions.append(
                Question(
                    question_id=str(_scalar(row, "question_id", where)),
                    task=str(_field(row, "task_type", where)),
                    video=str(root / self.video_dir / f"{video_id}.mp4"),
                    question=_text(row, "question", where),
                    options=tuple(options),
                    answer=answer,
                    duration=str(_field(row, "duration", where)),
                    subtitles=str(srt) if self.subtitles else None,
                )
            )
        return questions

    def _ids_from(self) -> Path:
        return Path(self.root) / self.parquet


@dataclass
class EgoSchema(Reader):
    """questions.json [{q_uid, question, "option 0".."option 4"}], subset_answers.json {q_uid: 0-4}, videos
    <video_dir>/<q_uid>.mp4. `subset`: only the 500 questions with public answers (scored offline); off: all of
    them, the others without an answer (for the submission file)."""

    video_dir: str = "videos"
    subset: bool = True
    kind = Kind.MULTIPLE_CHOICE
    mean_of_tasks = False
    metric = "acc"

    @property
    def submission(self) -> bool:
        """The full set has no public answers: its replies go to submission.json for the benchmark's server."""
        return not self.subset

    def _read(self) -> list[Question]:
        root = Path(self.root)
        _require_files(root, ["questions.json", "subset_answers.json"], "put EgoSchema's files there, as distributed")
        answers = _read_json(root / "subset_answers.json", dict)  # {q_uid: answer index}
        questions, uids = [], set()
        for i, record in enumerate(_read_json(root / "questions.json")):
            where = f"{root / 'questions.json'} record {i}"
            uid = str(_scalar(record, "q_uid", where))
            uids.add(uid)
            if self.subset and uid not in answers:
                continue
            options = tuple(_text(record, f"option {j}", where) for j in range(5))
            index = answers.get(uid)
            if index is not None and not (isinstance(index, int) and 0 <= index < 5):
                raise BenchmarkFormatError(f"subset_answers.json: {uid} -> {index!r}, expected 0-4")
            questions.append(
                Question(
                    question_id=uid,
                    task="egoschema",
                    video=str(root / self.video_dir / f"{uid}.mp4"),
                    question=_text(record, "question", where),
                    options=options,
                    answer=LETTERS[index] if index is not None else None,
                )
            )
        unasked = [uid for uid in answers if uid not in uids]
        if unasked:  # the subset's questions would be scored as fewer, its score over another denominator
            named = ", ".join(unasked[:5]) + (", ..." if len(unasked) > 5 else "")
            raise BenchmarkFormatError(
                f"{root / 'subset_answers.json'} answers {len(unasked)} of its {len(answers)} q_uids that "
                f"{root / 'questions.json'} does not ask ({named}): put the questions.json distributed with these "
                "answers there"
            )
        return questions

    def _ids_from(self) -> Path:
        return Path(self.root) / "questions.json"


MLVU_DEV_TASKS = (
    "1_plotQA",
    "2_needle",
    "3_ego",
    "4_count",
    "5_order",
    "6_anomaly_reco",
    "7_topic_reasoning",
)


@dataclass
class MLVU(Reader):
    """MLVU dev, multiple choice: json/<stem>.json records {video, duration, question, candidates, answer (text),
    question_type}; videos video/<stem>/<video>. Scored by M-Avg, the mean of the task accuracies."""

    tasks: tuple[str, ...] = MLVU_DEV_TASKS
    kind = Kind.MULTIPLE_CHOICE
    mean_of_tasks = True
    metric = "m_avg"
    submission = False

    def _read(self) -> list[Question]:
        root = Path(self.root)
        _require_files(
            root,
            [f"json/{stem}.json" for stem in self.tasks],
            "put MLVU's dev files there; to run some tasks only: benchmarks.mlvu.tasks=[<task>, ...]",
        )
        questions = []
        for stem in self.tasks:
            path = root / "json" / f"{stem}.json"
            for i, record in enumerate(_read_json(path)):
                where = f"{path} record {i}"
                candidates = _options(record, "candidates", where)
                questions.append(
                    Question(
                        question_id=f"{stem}/{i}",
                        task=str(record.get("question_type") or stem),
                        video=str(root / "video" / stem / _text(record, "video", where)),
                        question=_text(record, "question", where),
                        options=tuple(str(c) for c in candidates),
                        # MLVU's duration is a length in seconds, not a class to group scores by
                        answer=_letter(candidates, _scalar(record, "answer", where), where),
                    )
                )
        return questions


@dataclass
class OpenEndedQA(Reader):
    """ActivityNet-QA, MSVD-QA, MSRVTT-QA: test_q.json [{video_name, question, question_id}] and test_a.json
    [{answer, type, question_id}], aligned by index; the video is <video_dir>/<video_prefix><video_name> with the
    first of `extensions` that exists (where none does, its question's `not_found` names them all)."""

    video_dir: str = "videos"
    video_prefix: str = ""
    extensions: tuple[str, ...] = (".mp4", ".mkv", ".webm", ".avi")
    kind = Kind.OPEN_ENDED
    mean_of_tasks = False
    metric = "exact_match"
    submission = False

    def _video(self, name: str) -> tuple[str, str | None]:
        """The clip's file, and where none of the candidates exists, what was looked for: the first candidate alone
        would name an .mp4 where the benchmark's videos are .avi. A missing clip is reported on decoding."""
        stem = Path(self.root) / self.video_dir / f"{self.video_prefix}{name}"
        candidates = [Path(f"{stem}{ext}") for ext in self.extensions]
        found = next((path for path in candidates if path.exists()), None)
        if found is None:
            return str(candidates[0]), f"{stem}: no file with any of the extensions {', '.join(self.extensions)}"
        return str(found), None

    def _read(self) -> list[Question]:
        root = Path(self.root)
        _require_files(root, ["test_q.json", "test_a.json"], "put the benchmark's files there, as distributed")
        asked, answered = _read_json(root / "test_q.json"), _read_json(root / "test_a.json")
        if len(asked) != len(answered):
            raise BenchmarkFormatError(f"{root}: test_q.json has {len(asked)} entries, test_a.json {len(answered)}")
        questions = []
        for i, (q, a) in enumerate(zip(asked, answered, strict=True)):
            asked_at, answered_at = (f"{root / name} entry {i}" for name in ("test_q.json", "test_a.json"))
            qid = str(_scalar(q, "question_id", asked_at))
            if str(_scalar(a, "question_id", answered_at)) != qid:
                raise BenchmarkFormatError(
                    f"{root} entry {i}: question_id {qid} in test_q.json, {a['question_id']} in test_a.json"
                )
            video, not_found = self._video(_text(q, "video_name", asked_at))
            questions.append(
                Question(
                    question_id=qid,
                    task=str(a.get("type", "all")),
                    video=video,
                    question=_text(q, "question", asked_at),
                    answer=str(_scalar(a, "answer", answered_at)),
                    not_found=not_found,
                )
            )
        return questions

    def _ids_from(self) -> Path:
        return Path(self.root) / "test_q.json"


class AnswerIs(Choice):
    """How a question file's `answer` names the right candidate: its text (MVBench's and MLVU's way), its letter
    (Video-MME's) or its index from 0 (EgoSchema's)."""

    TEXT = "text"
    LETTER = "letter"
    INDEX = "index"


def _seconds(record: dict, key: str, where: str) -> float | None:
    """An optional time in seconds (absent or null: none), a number >= 0."""
    value = record.get(key)
    if value is None:
        return None
    if not _is_scalar(value) or isinstance(value, str) or value < 0:
        raise BenchmarkFormatError(f"{where}: {key!r} is {value!r:.80}, not a number of seconds >= 0")
    return float(value)


# A question file's multiple-choice questions are asked as MVBench's are, unless its entry's `prompts` say otherwise
QUESTION_FILE_MULTIPLE_CHOICE = (
    "Question: {question}\nOptions:\n{options}\nAnswer with the option's letter from the given choices directly and "
    "only give the best option."
)
QUESTION_FILE_KEYS = {"video", "question", "answer", "candidates", "question_id", "task", "duration", "start", "end"}


@dataclass
class QuestionFile(Reader):
    """A benchmark of one's own: `file` under `root`, a JSON list of records {video, question, answer, and for
    multiple choice candidates (2-8 different texts); optional question_id (else the record's position), task,
    duration (a class such as short / medium / long, by which scores are grouped), start and end (seconds of the
    clip to read)}; videos (files or folders of frames) under `video_dir`. `kind` says whether the questions are
    multiple-choice or open-ended (their answers are texts, scored by exact match and by a judge); `answer_is` how
    a multiple-choice answer names its candidate; an answer of null is asked, not scored. `mean_of_tasks`: the
    headline score is the mean of the tasks' accuracies (as MLVU's M-Avg), else the accuracy over questions.
    Every record that breaks these rules is named (the first ten, with the count), and keys of no meaning here
    (another format's `question_type`, say) are named in the log."""

    file: str = "questions.json"
    video_dir: str = "videos"
    kind: Kind = Kind.MULTIPLE_CHOICE
    answer_is: AnswerIs = AnswerIs.TEXT
    mean_of_tasks: bool = False
    submission = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind not in {k.value for k in Kind}:
            raise ValueError(f"kind must be one of {[k.value for k in Kind]}, got {self.kind!r}")
        self.kind = Kind(self.kind)
        self.answer_is = AnswerIs.of(self.answer_is, "answer_is")
        if self.kind is Kind.OPEN_ENDED and self.mean_of_tasks:  # exact match and the judge are over questions
            raise ValueError(
                "mean_of_tasks=true scores multiple-choice accuracy; kind=open_ended is scored by questions"
            )
        if self.kind is Kind.MULTIPLE_CHOICE and "multiple_choice" not in (self.prompts or {}):
            self.prompts = {**(self.prompts or {}), "multiple_choice": QUESTION_FILE_MULTIPLE_CHOICE}

    @property
    def metric(self) -> str:
        if self.kind is Kind.OPEN_ENDED:
            return "exact_match"
        return "m_avg" if self.mean_of_tasks else "acc"

    def _read(self) -> list[Question]:
        path = Path(self.root) / self.file
        questions, problems, unknown = [], [], Counter()
        for i, record in enumerate(_read_json(path)):
            try:
                questions.append(self._question(record, i, f"{path} record {i}"))
            except BenchmarkFormatError as error:
                problems.append(str(error).removeprefix(f"{path} "))  # the file is named once, above them
                continue
            unknown.update(set(record) - QUESTION_FILE_KEYS)
        if problems:
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise BenchmarkFormatError(
                f"{path}: {len(problems)} records cannot be asked or scored:\n  " + "\n  ".join(problems[:10]) + more
            )
        if unknown:
            named = ", ".join(f"{key} ({n} records)" for key, n in sorted(unknown.items()))
            log.warning(
                "%s: keys read by no rule, ignored: %s; the keys read are %s", path, named, sorted(QUESTION_FILE_KEYS)
            )
        return questions

    def _question(self, record, i: int, where: str) -> Question:
        if not isinstance(record, dict):
            raise BenchmarkFormatError(f"{where}: expected an object, found {record!r:.80}")
        start, end = _seconds(record, "start", where), _seconds(record, "end", where)
        if end == 0:
            raise BenchmarkFormatError(f"{where}: end 0 leaves nothing of the clip to read")
        if start is not None and end is not None and start >= end:
            raise BenchmarkFormatError(f"{where}: start {start} is not before end {end}")
        options = self._options(record, where)
        return Question(
            question_id=str(_scalar(record, "question_id", where)) if "question_id" in record else str(i),
            task=str(_scalar(record, "task", where)) if record.get("task") is not None else "all",
            video=str(Path(self.root) / self.video_dir / _text(record, "video", where)),
            question=_text(record, "question", where),
            options=tuple(str(option) for option in options),
            answer=self._answer(record, options, where),
            start=start,
            end=end,
            duration=_text(record, "duration", where) if record.get("duration") is not None else None,
        )

    def _options(self, record: dict, where: str) -> list:
        if self.kind is Kind.OPEN_ENDED:
            if "candidates" in record:
                raise BenchmarkFormatError(f"{where}: candidates in an open-ended benchmark (kind=multiple_choice?)")
            return []
        options = _options(record, "candidates", where)
        texts = [str(option).strip() for option in options]
        if len(set(texts)) < len(texts):
            raise BenchmarkFormatError(
                f"{where}: candidates {options!r:.120} repeat one: no letter would name it alone"
            )
        return options

    def _answer(self, record: dict, options: list, where: str) -> str | None:
        """The record's answer as a letter (multiple choice) or a text (open-ended); None where it is null. A
        multiple-choice answer must name one candidate as `answer_is` says: a text that is none of them (a
        different case, an index left under answer_is=text) is refused, not left unscored."""
        answer = _field(record, "answer", where)
        if answer is None:
            return None
        if self.kind is Kind.OPEN_ENDED:
            return str(_scalar(record, "answer", where))
        if self.answer_is is AnswerIs.TEXT:
            texts = [str(option).strip() for option in options]
            numbers = any(not isinstance(option, str) for option in options)
            if _is_scalar(answer) and (isinstance(answer, str) or numbers) and str(answer).strip() in texts:
                return LETTERS[texts.index(str(answer).strip())]
            raise BenchmarkFormatError(
                f"{where}: 'answer' is {answer!r:.80}, not one of the candidates {options!r:.120} (answer_is=text; an "
                "answer by letter or index: answer_is=letter or index)"
            )
        if self.answer_is is AnswerIs.LETTER:
            letters = LETTERS[: len(options)]
            return _typed(
                record, "answer", where, lambda v: isinstance(v, str) and v in letters, f"one of {list(letters)}"
            )
        index = _typed(
            record, "answer", where, lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(options),
            f"an index from 0 to {len(options) - 1}",
        )  # fmt: skip
        return LETTERS[index]

    def _ids_from(self) -> Path:
        return Path(self.root) / self.file


SRT_STAMP = re.compile(r"(\d+):(\d+):(\d+)[,.](\d+)\s*-->\s*(\d+):(\d+):(\d+)[,.](\d+)")
SRT_TAGS = re.compile(r"</?(?:i|b|u|s|font)\b[^>]*>|\{\\[^}]*\}", re.IGNORECASE)  # <i>, <font ...>, {\an8}


def read_srt(path: str | Path) -> list[tuple[float, float, str]]:
    """(start, end, text) of each cue of an .srt file, times in seconds. A cue is its timestamp line and the lines
    up to the next one, less the next cue's number: a cue that lacks the blank line before the next stays apart
    from it. Formatting tags are dropped; other text in angle brackets is the subtitle's own."""
    cues: list[tuple[float, float, list[str]]] = []
    text = Path(path).read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    for line in text.split("\n"):
        match = SRT_STAMP.search(line)
        if match is None:
            if cues and line.strip():
                cues[-1][2].append(line.strip())
            continue
        if cues and cues[-1][2] and cues[-1][2][-1].isdigit():  # the number of the cue this line starts
            cues[-1][2].pop()
        v = [int(x) for x in match.groups()]
        fractions = match.group(4), match.group(8)  # "1,5" is 1.5 s: a fraction, whatever its digits
        start = v[0] * 3600 + v[1] * 60 + v[2] + float("0." + fractions[0])
        end = v[4] * 3600 + v[5] * 60 + v[6] + float("0." + fractions[1])
        cues.append((start, end, []))
    out = []
    for start, end, lines in cues:
        joined = " ".join(SRT_TAGS.sub("", " ".join(lines)).split())
        if joined:
            out.append((start, end, joined))
    return out


def subtitles_at(cues: list[tuple[float, float, str]], times) -> list[str]:
    """The cues shown at any of `times` (seconds), in order, each once (SPEC 7: the lines active at the sampled
    frames)."""
    return [text for start, end, text in cues if any(start <= t <= end for t in times)]
