"""Train a video LLM from the Hydra config: `python train.py [experiment=...] [overrides]`, `-m` for sweeps."""

import sys

import hydra
from omegaconf import DictConfig

from hicom.sweep import check_sweep, swept_value
from hicom.training import release_process_group, train
from hicom.utils.config import refuse_group_slips  # registers the config resolvers too


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    check_sweep(cfg)
    if cfg.get("stages"):
        from hydra.core.hydra_config import HydraConfig

        from hicom.stages import check_stage_overrides

        check_stage_overrides(cfg.stages, HydraConfig.get().overrides.task)
    elif cfg.get("stage") is not None or cfg.get("stage_parent") is not None:
        raise ValueError(
            "stage= and stage_parent= pick a stage of a staged experiment (one with `stages`, e.g. "
            "experiment=directg_local43_global32 or experiment=tiny_stages), and this config has none"
        )
    if cfg.get("dry_run"):
        from hicom.dry_run import report

        report(cfg)
        return None
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    more_jobs = HydraConfig.get().mode == RunMode.MULTIRUN  # the process group stays open for them
    if cfg.get("stages"):
        from hicom.stages import run_stages

        run_stages(cfg)
        release_process_group(more_jobs=more_jobs)
        return None
    metrics = release_process_group(train(cfg), more_jobs)  # process 0's, on every process
    return swept_value(cfg, metrics)  # what a Hydra sweeper optimises


if __name__ == "__main__":
    refuse_group_slips(sys.argv[1:])
    main()
