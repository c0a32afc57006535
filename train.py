"""Train a video LLM from the Hydra config: `python train.py [experiment=...] [overrides]`, `-m` for sweeps."""

import hydra
from omegaconf import DictConfig

import hicom.utils.config  # noqa: F401  (registers the config resolvers)
from hicom.sweep import check_sweep, swept_value
from hicom.training import release_process_group, train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    check_sweep(cfg)
    if cfg.get("dry_run"):
        from hicom.dry_run import report

        report(cfg)
        return None
    if cfg.get("stages"):
        from hicom.stages import run_stages

        run_stages(cfg)
        release_process_group()
        return None
    metrics = train(cfg)
    release_process_group()
    return swept_value(cfg, metrics)  # what a Hydra sweeper optimises


if __name__ == "__main__":
    main()
