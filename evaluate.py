"""Evaluate a trained model on video benchmarks: `python evaluate.py ckpt=<folder> benchmark=<name or [names]>`.

See configs/evaluate.yaml for the benchmarks, frames, prompts and decoding; hicom/eval/runner.py for the outputs.
Under torchrun each process answers its share of the questions and the last one merges and scores them.
"""

import sys

import hydra
from omegaconf import DictConfig

from hicom.eval.runner import evaluate
from hicom.utils.config import refuse_group_slips  # registers the config resolvers too


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    refuse_group_slips(sys.argv[1:])
    main()
