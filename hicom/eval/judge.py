"""The judge step of open-ended QA: an LLM decides whether a reply matches the answer and scores it 0-5.

`Judge` is the interface; `OpenAICompatibleJudge` calls any OpenAI-compatible chat endpoint (the `openai`
package, pip install openai). Judging is a separate, resumable step over a predictions file:

    python -m hicom.eval.judge predictions=<run>/activitynet_qa/predictions.jsonl model=<name> [base_url=<url>]

adds a `judge` field ({correct, score, raw}) to each line; `python -m hicom.eval.score` then reports judge_acc
and judge_score beside the exact match (a clip that could not be read, never judged, counting wrong with score 0).
The judge's prompts are configs/evaluate.yaml's `judge.system` and `judge.user` (a protocol's own, Video-ChatGPT's
say, goes there), or judge.system=... judge.user=... on the command line.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from omegaconf import DictConfig

from hicom.utils.files import locked, write_atomically

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    correct: bool
    score: float
    raw: str


class Judge(Protocol):
    def __call__(self, question: str, answer: str, reply: str) -> Verdict: ...


JUDGE_SYSTEM = (
    "You evaluate answers to questions about videos. Compare the predicted answer with the correct answer and "
    "decide whether the prediction is correct: synonyms and paraphrases count as matches, meaning matters more "
    "than wording. Reply with only a Python dict with two keys: 'pred', 'yes' or 'no', and 'score', an integer "
    "from 0 to 5 for how well the prediction matches, for example {'pred': 'yes', 'score': 4}."
)


# the user message: one question's texts, by these fields
JUDGE_USER = "Question: {question}\nCorrect answer: {answer}\nPredicted answer: {reply}\n"
JUDGE_FIELDS = ("question", "answer", "reply")


def check_user_prompt(template: str) -> None:
    """A user prompt with a field other than {question}, {answer} and {reply}, or without the answer or the reply
    (the judge would have nothing to compare), is an error that says which."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:  # an unmatched brace
        raise ValueError(f"judge.user={template!r}: {err} (a literal brace is written twice)") from err
    unknown = sorted(fields - set(JUDGE_FIELDS))
    if unknown:  # a protocol's example verdict, {'pred': 'yes'}, reads as a field
        raise ValueError(
            f"judge.user={template!r} names {unknown}: it may use {{question}}, {{answer}} and {{reply}} (a literal "
            "brace is written twice: {{'pred': 'yes'}})"
        )
    if not {"answer", "reply"} <= fields:
        raise ValueError(f"judge.user={template!r}: it must show the judge {{answer}} and {{reply}}")
    try:  # a format spec the text cannot take ({reply:d})
        template.format(**dict.fromkeys(JUDGE_FIELDS, "text"))
    except (ValueError, IndexError) as err:
        raise ValueError(f"judge.user={template!r}: {err}") from err


def judge_prompt(question: str, answer: str, reply: str, template: str = JUDGE_USER) -> str:
    """The user message that asks the judge about one reply."""
    return template.format(question=question, answer=answer, reply=reply)


class UnreadableVerdict(ValueError):
    """A judge's reply that holds no {'pred': yes/no, 'score': 0-5} dict; `raw` is the reply."""

    def __init__(self, message: str, raw: str) -> None:
        super().__init__(message)
        self.raw = raw


def parse_verdict(text: str) -> Verdict:
    """The judge's dict, read leniently (JSON or a Python literal, anywhere in the text); UnreadableVerdict (a
    ValueError) otherwise."""
    match = re.search(r"\{[^{}]*\}", text)
    if match:
        for load in (json.loads, ast.literal_eval):
            try:
                data = load(match.group(0))
            except (ValueError, SyntaxError):
                continue
            if isinstance(data, dict) and "pred" in data and "score" in data:
                pred = str(data["pred"]).strip().lower()
                try:
                    score = float(data["score"])
                except (TypeError, ValueError):
                    continue
                if pred in ("yes", "no") and 0 <= score <= 5:
                    return Verdict(correct=pred == "yes", score=score, raw=text)
    raise UnreadableVerdict(f"the judge's reply is not a {{'pred': yes/no, 'score': 0-5}} dict: {text[:200]!r}", text)


@dataclass
class OpenAICompatibleJudge:
    """A chat-completions endpoint as judge; the key is read from the environment variable `api_key_env`. `system`
    and `user` are its prompts, `user` a template of {question}, {answer} and {reply}."""

    model: str
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 60.0
    max_retries: int = 3
    system: str = JUDGE_SYSTEM
    user: str = JUDGE_USER

    def __post_init__(self) -> None:
        check_user_prompt(self.user)  # before the client: a bad template would fail at the first reply
        try:
            from openai import OpenAI
        except ImportError as err:
            raise ImportError("the judge needs the openai package: pip install openai") from err
        key = os.environ.get(self.api_key_env)
        if key is None and self.base_url is None:
            raise ValueError(f"set {self.api_key_env} (or base_url for a local server) for the judge")
        self._client = OpenAI(
            api_key=key or "none", base_url=self.base_url, timeout=self.timeout, max_retries=self.max_retries
        )

    def __call__(self, question: str, answer: str, reply: str) -> Verdict:
        response = self._client.chat.completions.create(
            model=self.model,
            temperature=0.0,
            messages=[
                {"role": "system", "content": self.system},
                {"role": "user", "content": judge_prompt(question, answer, reply, self.user)},
            ],
        )
        return parse_verdict(response.choices[0].message.content or "")


def judge_predictions(path: str | Path, judge: Judge, save_every: int = 50) -> int:
    """Adds a verdict to every line of a predictions file that has none (lines with a decoding error, and those
    without a gold answer, are left alone). A reply of the judge's that holds no verdict is kept as refused on its
    line (`{"refused": reply}`, scored wrong) and judging goes on: at temperature 0 the judge would give it again at every resume, and the
    lines after it would never be judged. The verdicts are written into the file every `save_every` verdicts, at
    the end and on an error, so that an interrupted run resumes; each write reads the file again under the
    benchmark folder's merge lock and adds the verdicts to it, so answers an evaluation merged in meanwhile stay.
    Returns the count judged, refused ones included."""
    path = Path(path)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    verdicts: dict[str, dict] = {}

    def save() -> None:
        with locked(path.parent / "merge.lock"):
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            for line in lines:
                verdict = verdicts.get(str(line.get("question_id")))
                if verdict is not None and "judge" not in line and "error" not in line:
                    line["judge"] = verdict
            write_atomically(path, "".join(json.dumps(line) + "\n" for line in lines))

    try:
        for row in rows:
            if "judge" in row or "error" in row or row.get("answer") is None:  # nothing to compare a reply with
                continue
            answer = str(row["answer"])  # kept with the verdict: a corrected gold answer is judged again
            try:
                verdict = judge(row.get("question", ""), answer, row.get("reply") or "")
            except UnreadableVerdict as error:
                log.warning("question %s: %s; kept as refused, scored wrong", row["question_id"], error)
                verdicts[str(row["question_id"])] = {"refused": error.raw, "answer": answer}
            else:
                verdict_row = {"correct": verdict.correct, "score": verdict.score, "raw": verdict.raw, "answer": answer}
                verdicts[str(row["question_id"])] = verdict_row
            if len(verdicts) % save_every == 0:
                save()
    finally:  # stopped by an endpoint's error or a verdict it cannot read: the verdicts paid for so far are kept
        if verdicts:
            save()
    return len(verdicts)


def judge_config(overrides: list[str]) -> DictConfig:
    """configs/evaluate.yaml's `judge` (its prompts), with `overrides` (judge.<key>=<value>) over it."""
    from hydra import compose, initialize_config_dir

    import hicom.utils.config  # noqa: F401  (registers the resolvers the configs use)

    configs = Path(__file__).resolve().parents[2] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        return compose("evaluate", overrides=overrides).judge


def main(argv: list[str]) -> None:
    usage = (
        "usage: python -m hicom.eval.judge predictions=<file> model=<name> [base_url=<url>] "
        "[\"judge.system='<text>'\"] [\"judge.user='<text with {question}, {answer}, {reply}>'\"]"
    )
    overrides = [arg for arg in argv if arg.split("=", 1)[0].startswith("judge.")]
    args = dict(arg.split("=", 1) for arg in argv if "=" in arg and arg not in overrides)
    if "predictions" not in args or "model" not in args or set(args) - {"predictions", "model", "base_url"}:
        raise SystemExit(usage)
    prompts = judge_config(overrides)
    judge = OpenAICompatibleJudge(
        model=args["model"], base_url=args.get("base_url"), system=prompts.system, user=prompts.user
    )
    print(f"judged {judge_predictions(args['predictions'], judge)} replies")


if __name__ == "__main__":
    main(sys.argv[1:])
