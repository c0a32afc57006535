"""The number a Hydra sweeper optimises: `optimized_metric`, one figure of a fit's metrics.json.

`python train.py hparams_search=<config>` runs Optuna (configs/hparams_search/) over one-fit runs; each run
returns the figure named by `optimized_metric`. What it names is checked before the first trial trains, so a sweep
with a misspelt or unreachable metric fails in seconds, not after its first fit. As each job of a multirun ends,
and at its end, `SweepSummary` tabulates every run's swept overrides and figures (summary.md, summary.json in the
sweep folder), a failed job with its error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from hicom.utils.files import RunFolderTaken, write_atomically

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Figure:
    held_out: bool  # scored on the held-out questions (needs evaluate=true)
    direction: str  # which way is better, as a sweeper's `direction` says it


# figures of metrics.json a run can return
OPTIMISABLE = {
    "accuracy": Figure(held_out=True, direction="maximize"),
    "n_unparsed": Figure(held_out=True, direction="minimize"),
    "train_loss": Figure(held_out=False, direction="minimize"),
    "fit_seconds": Figure(held_out=False, direction="minimize"),
    "wall_seconds": Figure(held_out=False, direction="minimize"),
    "samples_per_second": Figure(held_out=False, direction="maximize"),
}


def figure(name: str) -> Figure:
    if name not in OPTIMISABLE:
        raise ValueError(f"optimized_metric={name!r} is not a figure a run reports: one of {sorted(OPTIMISABLE)}")
    return OPTIMISABLE[name]


def direction_of(name: str) -> str:
    """The sweeper direction that makes `name` better (the `hicom_direction` resolver of the search configs)."""
    return figure(name).direction


def _has_key(root: DictConfig, key: str) -> bool:
    """Whether the dotted `key` is in the config, its value unresolved (an unset `???` or an interpolation of an
    unset variable is there all the same)."""
    parent, _, last = key.rpartition(".")
    node = OmegaConf.select(root, parent, default=None, throw_on_resolution_failure=False) if parent else root
    return isinstance(node, DictConfig) and last in node.keys()


class SearchSpaceError(CompactHydraException, InterpolationResolutionError):
    """A search space that names keys the config lacks. Raised while the sweeper's config resolves: as an
    interpolation error OmegaConf passes it on unwrapped, and as a compact one Hydra prints its message alone,
    not the resolver's stack."""


def check_search_space(root: DictConfig) -> None:
    """Refuse a search space (`hydra.sweeper.params`) that names a key the composed config lacks, naming it:
    `hparams_search=hicom_optuna model/compressor=avgpool` would otherwise stop at the first trial with Hydra's
    "Could not override ... To append to your config use +...", advice that would search a setting nothing reads.
    Run by the search configs' `hicom_direction` resolver, which the sweeper resolves before it launches a trial.
    A search that also swaps a config group (in its space, or by a sweep on the command line such as
    `'model/compressor=choice(avgpool,bilinear)'`) is left alone: its keys may be those of a group some trials
    pick, and this config is none of them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    def unresolved(key: str):  # an override such as `+x=${oc.env:X}` is text here, not its value
        node = OmegaConf.select(root, key, default=None)
        return OmegaConf.to_container(node, resolve=False) if node is not None else None

    params = unresolved("hydra.sweeper.params") or {}
    groups = set(unresolved("hydra.runtime.choices") or {})
    task = [str(o) for o in unresolved("hydra.overrides.task") or []]
    if any("/" in str(key) or str(key) in groups for key in params):
        return
    swept = [o.key_or_group for o in OverridesParser.create().parse_overrides(task) if o.is_sweep_override()]
    if any("/" in key or key in groups for key in swept):  # a range over a plain key swaps no part
        return
    missing = [key for key in map(str, params) if not key.startswith(("+", "~")) and not _has_key(root, key)]
    if missing:
        target = OmegaConf.select(root, "model.compressor._target_", default=None)
        raise SearchSpaceError(
            f"the search space (hydra.sweeper.params) names {', '.join(missing)}, which this config does not have "
            f"(its compressor: {target}). A search config names the keys of the parts it was written for "
            "(hicom_optuna: HICom's): for another part, copy configs/hparams_search/hicom_optuna.yaml and name "
            "that part's keys"
        )


def _sweeper_direction(cfg: DictConfig):
    """The sweeper's direction where the config holds one (composed with its hydra node, or inside a Hydra job);
    None where there is none, or it is the search config's own `hicom_direction` (right by construction, and not
    resolvable from a job's hydra node alone)."""
    from omegaconf.errors import OmegaConfBaseException

    node = cfg.get("hydra") if "hydra" in cfg else None
    if node is None:
        from hydra.core.hydra_config import HydraConfig

        node = HydraConfig.get() if HydraConfig.initialized() else None
    try:
        return OmegaConf.select(node, "sweeper.direction", default=None) if node is not None else None
    except OmegaConfBaseException:
        return None


def check_sweep(cfg: DictConfig) -> None:
    """Before anything runs: `optimized_metric`, when set, is a figure this run will report, and a sweeper's
    direction is the one that makes it better."""
    name = cfg.get("optimized_metric")
    if name is None:
        return
    wanted = figure(name)
    direction = _sweeper_direction(cfg)
    if isinstance(direction, Sequence) and not isinstance(direction, str):  # Optuna's list form: [maximize]
        if len(direction) != 1:
            raise ValueError(
                f"hydra.sweeper.direction={list(direction)}: a run returns one figure ({name}), so one direction: "
                f"{wanted.direction}, or leave it out (the search configs follow the metric)"
            )
        direction = direction[0]
    if isinstance(direction, str) and direction != wanted.direction:
        raise ValueError(
            f"optimized_metric={name} is better {'higher' if wanted.direction == 'maximize' else 'lower'}, and "
            f"hydra.sweeper.direction={direction} would keep the worst trial: set hydra.sweeper.direction="
            f"{wanted.direction}, or leave it out (the search configs follow the metric)"
        )
    if cfg.get("stages"):
        raise ValueError(
            f"optimized_metric={name}: a sweep's trials are single fits and a staged experiment returns no figure; "
            "set stages=null with the settings of the stage to tune"
        )
    if wanted.held_out and not cfg.get("evaluate"):
        raise ValueError(f"optimized_metric={name} is scored on the held-out questions: set evaluate=true")
    if cfg.get("dry_run"):
        raise ValueError(f"optimized_metric={name}: a dry run trains nothing and reports no figure; set dry_run=false")


def swept_value(cfg: DictConfig, metrics: dict) -> float | None:
    """The figure `optimized_metric` names (None when unset); a run that could not score it fails rather than
    report a made-up value (the Optuna sweeper then stops unless hydra.sweeper.max_failure_rate allows failed
    trials). metrics.json is written before this is read."""
    name = cfg.get("optimized_metric")
    if name is None:
        return None
    value = metrics.get(name)
    if value is None:
        raise RuntimeError(
            f"optimized_metric={name}: this run has no value for it (see its metrics.json); accuracy needs "
            "held-out questions, e.g. data.source.val_json"
        )
    return float(value)


# the figures of each run that a sweep's table shows (summary.json keeps every figure)
TABLE_FIGURES = ("compressor", "visual_tokens_per_video", "accuracy", "chance", "train_loss", "steps", "fit_seconds")


def job_folders(sweep: Path) -> list[Path]:
    """The run folders of a multirun folder, each with Hydra's `.hydra/` record, a metrics.json or stages: numbered
    (hydra.sweep.subdir's default) in job order, others (e.g. named by their overrides) by name."""
    jobs = [
        p for p in sweep.iterdir() if p.is_dir() and any((p / n).exists() for n in (".hydra", "metrics.json", "stages"))
    ]
    return sorted(jobs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def _stamp(job: Path) -> float:
    """When Hydra last wrote the job's record (its folder's, where it keeps none)."""
    record = job / ".hydra" / "overrides.yaml"
    return (record if record.is_file() else job).stat().st_mtime


# what SweepSummary writes into a failed job's folder: the exception that ended it
ERROR_FILE = "error.txt"


def _overrides(job: Path) -> list[str]:
    """The job's overrides (`.hydra/overrides.yaml`); none where the record cannot be read, which costs its row the
    swept columns, not the sweep its table."""
    import yaml

    try:
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        return []
    return overrides


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _error(job: Path) -> str | None:
    try:
        return (job / ERROR_FILE).read_text().strip() or None
    except OSError:
        return None


def _mtime(path: Path) -> float:
    return path.stat().st_mtime


def _stale(job: Path, name: str) -> bool:
    """Whether the job's file `name` is older than the job's record: an earlier launch's, in a sweep folder given
    again (the record is written as the job starts; the folder's own time is not)."""
    record = job / ".hydra" / "overrides.yaml"
    return record.is_file() and _mtime(job / name) < _mtime(record)


def _setting(override: str) -> tuple[str, str]:
    """An override's key and its value as a table shows it: a text value as it reads (Hydra records a swept
    `question="what is it?"` as `what\\ is\\ it?`), anything else as written (`1e-4`, `[4,3,3]`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    key, _, written = override.partition("=")
    try:
        value = OverridesParser.create().parse_override(override).value()
    except HydraException:  # a record no parser reads: shown as it is
        return key, written
    return key, value if isinstance(value, str) else written


def _first_line(text: str, limit: int = 200) -> str:
    """An error's first lines, joined, up to `limit` characters: a wrapped error (Hydra's "Error in call to
    target ...:") says its cause on the next line."""
    line = " ".join(part.strip() for part in text.splitlines()[:3] if part.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _cell(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class SweepSummary(Callback):
    """A training multirun's table (`train.py -m ...`, an Optuna search): every run's swept overrides and figures,
    written to the sweep folder as summary.md, with every figure in summary.json, as each job ends and again
    (printed) at the end. A job that fails leaves its error in its folder (error.txt) and its row: Hydra's sweepers
    stop the launch on a failed job and then call no end-of-multirun hook, so the table of the jobs that ran is
    written as they end."""

    part = "stage"  # what a job's rows are of: a staged experiment has one per finished stage
    header = (*TABLE_FIGURES, "skipped")
    missing = "no metrics.json (running, or stopped)"

    def __init__(self) -> None:
        self.before: dict[str, float] = {}

    def figures(self, job: Path) -> list[tuple[str | None, dict | None]]:
        """The job's figures: its metrics.json, or each finished stage's, in the order they were written. A
        metrics.json older than the job's record is an earlier launch's (a sweep folder given again), not this
        job's; a staged run's finished stages stay its own, skipped when it runs again."""
        if (job / "metrics.json").is_file():
            if _stale(job, "metrics.json"):
                return []
            return [(None, _read_json(job / "metrics.json"))]
        stages = sorted(job.glob("stages/*/metrics.json"), key=_mtime)
        return [(path.parent.name, _read_json(path)) for path in stages]

    def cells(self, metrics: dict) -> list[str]:
        return [_cell(metrics.get(name)) for name in TABLE_FIGURES] + [str(len(metrics.get("skipped_samples") or []))]

    def rows(self, jobs: list[Path]) -> list[dict]:
        """A row per job and part: its name, its overrides, the part, its figures (None where it wrote none: a job
        that failed, or one still running) and the error that ended it where it failed (error.txt): on the row of
        a job that wrote no figures, else a row of its own (it failed after a stage, or at the swept value)."""
        rows = []
        for job in jobs:
            overrides = _overrides(job)
            for part, metrics in self.figures(job) or [(None, None)]:
                rows.append(
                    {"job": job.name, "overrides": overrides, self.part: part, "metrics": metrics, "error": None}
                )
            error = _error(job)
            if error is not None and rows[-1]["metrics"] is None:
                rows[-1]["error"] = error
            elif error is not None:
                rows.append({"job": job.name, "overrides": overrides, self.part: None, "metrics": None, "error": error})
        return rows

    def table(self, rows: list[dict]) -> str:
        """The rows as a Markdown table: the overrides that differ between runs, the part where a job has several,
        then the figures."""
        settings = [dict(_setting(o) for o in row["overrides"]) for row in rows]
        keys = list(dict.fromkeys(key for setting in settings for key in setting))
        swept = [key for key in keys if len({setting.get(key) for setting in settings}) > 1]
        parts = any(row.get(self.part) for row in rows)
        header = ["job", *swept, *([self.part] if parts else []), *self.header]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row, setting in zip(rows, settings, strict=True):
            cells = [row["job"], *(setting.get(key, "") for key in swept)]
            cells += [row.get(self.part) or ""] if parts else []
            if row.get("error"):
                cells += [f"failed: {_first_line(row['error'])}"] + [""] * (len(self.header) - 1)
            elif row["metrics"] is None:
                cells += [self.missing] + [""] * (len(self.header) - 1)
            else:
                cells += self.cells(row["metrics"])
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        return "\n".join(lines) + "\n"

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # a sweep folder given again (hydra.sweep.dir, HICOM_RUN_STAMP) holds an earlier launch's jobs: noted here,
        # they are left out of this launch's table unless a job of this launch wrote them again
        sweep = Path(config.hydra.sweep.dir)
        self.before = {job.name: _stamp(job) for job in job_folders(sweep)} if sweep.is_dir() else {}

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        if OmegaConf.select(config, "hydra.mode") != RunMode.MULTIRUN:
            return
        folder = Path(config.hydra.runtime.output_dir)
        error = None
        if job_return.status == JobStatus.FAILED:
            try:
                job_return.return_value  # noqa: B018  (raises the exception the job ended with)
            except BaseException as raised:  # noqa: BLE001  (recorded, not handled: the sweeper raises it again)
                error = raised
        if isinstance(error, RunFolderTaken):  # the folder holds an earlier launch's run: its records left as they are
            self.before[folder.name] = _stamp(folder)  # (Hydra has written its .hydra again): not this launch's job
            log.error(
                "job %s of the sweep was refused, its folder %s holding another run (below): the sweep's table and "
                "that run's files are left as they were", folder.name, folder,
            )  # fmt: skip
            return
        (folder / ERROR_FILE).unlink(missing_ok=True)  # an earlier launch's, where the sweep folder is given again
        if error is not None:
            write_atomically(folder / ERROR_FILE, f"{type(error).__name__}: {error}\n")
        summary = self.summarise(config)
        if summary is not None and job_return.status == JobStatus.FAILED:
            log.error("a job of the sweep failed; the table of its %d runs so far (%s):\n%s", *summary)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        summary = self.summarise(config)
        if summary is not None:
            log.info("the sweep's %d runs (%s):\n%s", *summary)

    def summarise(self, config: DictConfig) -> tuple[int, Path, str] | None:
        """Writes the table of this launch's jobs so far; returns their number, where it went and the table (None
        where there is nothing to tabulate)."""
        sweep = Path(config.hydra.sweep.dir)
        if not sweep.is_dir() or config.get("dry_run"):  # a dry run reports its costs, not figures
            return None
        jobs = [job for job in job_folders(sweep) if self.before.get(job.name, -1.0) != _stamp(job)]
        rows = self.rows(jobs)
        if not rows:
            return None
        table = self.table(rows)
        write_atomically(sweep / "summary.json", json.dumps(rows, indent=2))
        write_atomically(sweep / "summary.md", table)
        return len(jobs), sweep / "summary.md", table


class EvalSweepSummary(SweepSummary):
    """An evaluation multirun's table (`evaluate.py -m ckpt=a,b sampling.num_frames=16,32`): a row per job and
    benchmark with its swept overrides, score, metric, questions, unparsed and failed replies, frames and visual
    tokens (each job's results.json; summary.json keeps them whole)."""

    part = "benchmark"
    header = ("score", "metric", "n", "unparsed", "failed", "frames", "visual_tokens_per_video")
    missing = "no results.json (running, or stopped)"

    def figures(self, job: Path) -> list[tuple[str | None, dict | None]]:
        report = _read_json(job / "results.json")
        if not isinstance(report, dict):
            return []
        return [(name, results) for name, results in report.items() if isinstance(results, dict)]

    def cells(self, metrics: dict) -> list[str]:
        from hicom.eval.runner import METRIC_NAMES

        metric, settings = metrics.get("metric"), metrics.get("settings") or {}
        score = metrics.get(metric) if metric else None
        return [
            f"{100 * score:.1f}" if isinstance(score, int | float) else "n/a",
            METRIC_NAMES.get(metric, str(metric)),
            *(_cell(metrics.get(key)) for key in ("n", "n_unparsed", "n_failed")),
            *(_cell(settings.get(key)) for key in ("frames", "visual_tokens_per_video")),
        ]


class AskSweepSummary(SweepSummary):
    """An ask multirun's table (`ask.py -m ckpt=a,b video=... question=...`): a row per job and question asked with
    its swept overrides, the reply (its first lines, up to 200 characters) and, for a multiple-choice question, the
    letter read from it or `none` (each job's answers.json)."""

    part = "asked"  # not `question`: a swept question is an override column of that name
    header = ("reply", "choice")
    missing = "no answers.json (running, or stopped)"

    def figures(self, job: Path) -> list[tuple[str | None, dict | None]]:
        answers = _read_json(job / "answers.json")
        if not isinstance(answers, dict) or _stale(job, "answers.json"):
            return []
        return [(answer.get("question"), answer) for answer in answers.get("answers") or [] if isinstance(answer, dict)]

    def cells(self, metrics: dict) -> list[str]:
        choice = "" if "options" not in metrics else metrics.get("choice") or "none"
        return [_first_line(str(metrics.get("reply", "")).strip()), choice]
