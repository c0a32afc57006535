"""Scores from a predictions file, by each benchmark's official rule (SPEC 7).

    python -m hicom.eval.score benchmark=mvbench predictions=<run>/mvbench/predictions.jsonl

prints the results as JSON and writes results.json beside the predictions; `metric` names the benchmark's official
figure among them (its reader's `metric`). A predictions line holds at least
question_id, task, answer, pred and reply; `error` marks a question whose clip could not be read (counted wrong,
and retried by a resumed run); `duration` and `judge` are used where present.
"""

from __future__ import annotations

import json
import logging
import re
import string
import sys
from collections import defaultdict
from pathlib import Path

from hicom.eval.benchmarks import Kind

log = logging.getLogger(__name__)


def drop_torn_tail(path: Path) -> None:
    """Cut a last line that a killed run left half written (no newline after it) off a predictions file that is
    appended to, so that a resumed run answers that question again; any other line stays as it is."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    log.warning("%s: its last line was cut short (%d bytes); removed, its question is answered again", path,
                len(data) - keep)  # fmt: skip
    with path.open("r+b") as f:
        f.truncate(keep)


def read_predictions(path: str | Path) -> list[dict]:
    """The lines of a predictions file; a later line for a question replaces an earlier one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no predictions file")
    rows: dict[str, dict] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {n}: not JSON ({err})") from err
        for key in ("question_id", "task", "answer", "pred"):
            if key not in row:
                raise ValueError(f"{path} line {n}: no {key!r}")
        rows[str(row["question_id"])] = row
    return list(rows.values())


def _accuracy(rows: list[dict]) -> dict:
    n = len(rows)
    failed = sum("error" in r for r in rows)
    unparsed = sum(r["pred"] is None and "error" not in r for r in rows)
    correct = sum(r["pred"] is not None and r["pred"] == r["answer"] for r in rows)
    answered = n - unparsed - failed
    return {
        "acc": correct / n if n else 0.0,
        "acc_answered": correct / answered if answered else 0.0,
        "n": n,
        "n_unparsed": unparsed,
        "n_failed": failed,
    }


def score_multiple_choice(rows: list[dict], mean_of_tasks: bool = False) -> dict:
    """`acc` over every scored question (unparsed and failed ones wrong), `acc_answered` over parsed replies,
    per task and per duration; with `mean_of_tasks` (MLVU) also `m_avg`, the mean of the task accuracies.
    Questions without a gold answer (EgoSchema outside its public subset) are left out and counted, and so are
    the clips among them that could not be read (`n_failed_unscored`: their submission entry is no answer)."""
    scored = [r for r in rows if r["answer"] is not None]
    out = _accuracy(scored)
    out["n_unscored"] = len(rows) - len(scored)
    out["n_failed_unscored"] = sum("error" in r for r in rows if r["answer"] is None)
    tasks: dict[str, list[dict]] = defaultdict(list)
    durations: dict[str, list[dict]] = defaultdict(list)
    for r in scored:
        tasks[str(r["task"])].append(r)
        if r.get("duration") is not None:
            durations[str(r["duration"])].append(r)
    out["per_task"] = {t: _accuracy(rs) for t, rs in sorted(tasks.items())}
    if durations:
        out["per_duration"] = {d: _accuracy(rs) for d, rs in sorted(durations.items())}
    if mean_of_tasks:
        accs = [v["acc"] for v in out["per_task"].values()]
        out["m_avg"] = sum(accs) / len(accs) if accs else 0.0
    return out


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str | None) -> str:
    """Lower case, no punctuation, no articles, single spaces: the usual open-ended QA normalisation."""
    if not text:
        return ""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def _exact_match(rows: list[dict]) -> float:
    """Share of rows whose normalised reply equals the normalised answer (a failed clip has no reply: wrong)."""
    hits = sum(normalize_answer(r.get("reply")) == normalize_answer(r["answer"]) for r in rows if "error" not in r)
    return hits / len(rows) if rows else 0.0


def score_open_ended(rows: list[dict]) -> dict:
    """`exact_match`: the normalised reply equals the normalised answer; and, once a judge has seen replies,
    `judge_acc` (share judged correct) and `judge_score` (mean 0-5 score) over the judged lines and the failed
    clips, which have no reply to judge: wrong, score 0, as in the exact match; so are the lines whose judge's reply
    held no verdict (`n_judge_refused`). `n_judged` counts the verdicts, refused ones included, so that a judge run
    still under way shows (n_judged + n_failed < n). Questions without a gold answer (a question file's null) are
    left out and counted (`n_unscored`), as for multiple choice."""
    scored = [r for r in rows if r["answer"] is not None]
    out = {"exact_match": _exact_match(scored), "n": len(scored), "n_failed": sum("error" in r for r in scored)}
    out["n_unscored"] = len(rows) - len(scored)
    rows = scored
    tasks: dict[str, list[dict]] = defaultdict(list)
    durations: dict[str, list[dict]] = defaultdict(list)  # a question file's duration classes
    for r in rows:
        tasks[str(r["task"])].append(r)
        if r.get("duration") is not None:
            durations[str(r["duration"])].append(r)
    out["per_task"] = {t: {"exact_match": _exact_match(rs), "n": len(rs)} for t, rs in sorted(tasks.items())}
    if durations:
        out["per_duration"] = {
            d: {"exact_match": _exact_match(rs), "n": len(rs)} for d, rs in sorted(durations.items())
        }
    judged = [r["judge"] for r in rows if isinstance(r.get("judge"), dict) and "error" not in r]
    if judged:
        counted = len(judged) + out["n_failed"]
        read = [j for j in judged if "refused" not in j]
        out["judge_acc"] = sum(bool(j["correct"]) for j in read) / counted
        out["judge_score"] = sum(float(j["score"]) for j in read) / counted
        out["n_judged"] = len(judged)
        out["n_judge_refused"] = len(judged) - len(read)
    return out


def scoring_of(reader) -> dict:
    """How a benchmark's replies are scored (its reader's or reader class's kind, mean_of_tasks, metric), as
    results.json records it, so that a re-score scores them alike whatever the config says then."""
    return {"kind": Kind(reader.kind).value, "mean_of_tasks": bool(reader.mean_of_tasks), "metric": reader.metric}


def score(reader, rows: list[dict]) -> dict:
    """The scores of a benchmark (its reader, reader class, or recorded `scoring_of`, as a dict) with `metric`
    naming the official one among them, and `scoring`, how they were computed."""
    scoring = reader if isinstance(reader, dict) else scoring_of(reader)
    if Kind(scoring["kind"]) is Kind.OPEN_ENDED:
        scores = score_open_ended(rows)
    else:
        scores = score_multiple_choice(rows, scoring["mean_of_tasks"])
    return {**scores, "metric": scoring["metric"], "scoring": scoring}


def benchmark_reader(name: str, overrides: list[str] = ()) -> object:
    """The reader of a benchmark named in configs/evaluate.yaml (with `overrides` of that config), which says how
    its replies are scored; its files are not read."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import hicom.utils.config  # noqa: F401  (registers the resolvers the configs use)

    configs = Path(__file__).resolve().parents[2] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose("evaluate", overrides=list(overrides))
    if name not in cfg.benchmarks:
        raise ValueError(f"benchmark={name!r} is not one of {sorted(cfg.benchmarks)}")
    return instantiate(cfg.benchmarks[name])


# what a re-score keeps of evaluate.py's results.json: how the predictions were made, not what they scored
KEPT_ON_RESCORE = (
    "settings",
    "answered_this_run",
    "seconds_per_question",
    "n_questions",
    "n_with_subtitles",
    "submission",
)


def _recorded_scoring(results: dict) -> dict | None:
    """The `scoring` an evaluation's results.json records (None where it records none: an older one)."""
    recorded = results.get("scoring")
    keys = {"kind", "mean_of_tasks", "metric"}
    return recorded if isinstance(recorded, dict) and set(recorded) == keys else None


def main(argv: list[str]) -> dict:
    args = dict(
        arg.split("=", 1) for arg in argv if "=" in arg and arg.split("=", 1)[0] in ("benchmark", "predictions")
    )
    overrides = [arg for arg in argv if arg.split("=", 1)[0] not in ("benchmark", "predictions")]
    if {"benchmark", "predictions"} - set(args) or any("=" not in arg for arg in overrides):
        raise SystemExit(
            "usage: python -m hicom.eval.score benchmark=<name> predictions=<predictions.jsonl> [<override of "
            "configs/evaluate.yaml>=<value> ...]: the replies are scored as the results.json beside them records (a "
            "copied benchmark entry's included); overrides score them as the configured benchmark with them says"
        )
    path = Path(args["predictions"])
    out = path.parent / "results.json"
    before = json.loads(out.read_text()) if out.is_file() else {}  # evaluate.py's results, where it wrote them
    recorded = _recorded_scoring(before)
    if recorded is not None and before.get("benchmark") != args["benchmark"]:  # its rules are another benchmark's
        raise SystemExit(f"{out} scored these replies as benchmark={before.get('benchmark')}, not {args['benchmark']}")
    if recorded is not None and not overrides:  # scored as the evaluation scored them, a copied entry's included
        reader = recorded
    else:
        reader = scoring_of(benchmark_reader(args["benchmark"], overrides))
        if recorded is not None and recorded != reader:
            log.warning("%s was scored with %s; re-scoring with %s, as the overrides give", out, recorded, reader)
    results = {"benchmark": args["benchmark"], **score(reader, read_predictions(path))}
    if before:  # the scores are replaced, the settings and timings that made them kept
        results.update({key: before[key] for key in KEPT_ON_RESCORE if key in before})
        rows = results["n"] + results.get("n_unscored", 0)  # every line scored or, without an answer, counted
        if before.get("n_questions") not in (None, rows):  # e.g. a `limit` run over a fuller file
            log.warning(
                "%s: the run scored %s of its questions; this re-score scores every line of the file (%d)",
                path, before["n_questions"], rows,
            )  # fmt: skip
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
