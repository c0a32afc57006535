"""The number a Hydra sweeper optimises: `optimized_metric`, one figure of a fit's metrics.json.

`python train.py hparams_search=<config>` runs Optuna (configs/hparams_search/) over one-fit runs; each run
returns the figure named by `optimized_metric`. What it names is checked before the first trial trains, so a sweep
with a misspelt or unreachable metric fails in seconds, not after its first fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf


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
}


def figure(name: str) -> Figure:
    if name not in OPTIMISABLE:
        raise ValueError(f"optimized_metric={name!r} is not a figure a run reports: one of {sorted(OPTIMISABLE)}")
    return OPTIMISABLE[name]


def direction_of(name: str) -> str:
    """The sweeper direction that makes `name` better (the `hicom_direction` resolver of the search configs)."""
    return figure(name).direction


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
