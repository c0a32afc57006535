"""The number a Hydra sweeper optimises: `optimized_metric`, one figure of a fit's metrics.json.

`python train.py hparams_search=<config>` runs Optuna (configs/hparams_search/) over one-fit runs; each run
returns the figure named by `optimized_metric`. What it names is checked before the first trial trains, so a sweep
with a misspelt or unreachable metric fails in seconds, not after its first fit.
"""

from __future__ import annotations

from omegaconf import DictConfig

# figures of metrics.json a run can return, and whether they are scored on the held-out questions (evaluate=true)
OPTIMISABLE = {
    "accuracy": True,
    "n_unparsed": True,
    "train_loss": False,
    "fit_seconds": False,
    "wall_seconds": False,
}


def check_sweep(cfg: DictConfig) -> None:
    """Before anything runs: `optimized_metric`, when set, is a figure this run will report."""
    name = cfg.get("optimized_metric")
    if name is None:
        return
    if name not in OPTIMISABLE:
        raise ValueError(f"optimized_metric={name!r} is not a figure a run reports: one of {sorted(OPTIMISABLE)}")
    if OPTIMISABLE[name] and not cfg.get("evaluate"):
        raise ValueError(f"optimized_metric={name} is scored on the held-out questions: set evaluate=true")
    if cfg.get("dry_run"):
        raise ValueError(f"optimized_metric={name}: a dry run trains nothing and reports no figure; set dry_run=false")
    if cfg.get("stages"):
        raise ValueError(
            f"optimized_metric={name}: a sweep's trials are single fits and a staged experiment returns no figure; "
            "set stages=null with the settings of the stage to tune"
        )


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
