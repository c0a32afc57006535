"""Ask a trained model about a video: `python ask.py ckpt=<folder> video=<clip> question="What happens?"`.

See configs/ask.yaml for the questions, options and decoding (the rest is evaluate's: frames, precision, model
folders); hicom/eval/ask.py for what it prints and writes.
"""

import sys

import hydra
from omegaconf import DictConfig

from hicom.eval.ask import ask
from hicom.utils.config import refuse_group_slips  # registers the config resolvers too


@hydra.main(version_base="1.3", config_path="configs", config_name="ask")
def main(cfg: DictConfig) -> None:
    ask(cfg)


if __name__ == "__main__":
    refuse_group_slips(sys.argv[1:])
    main()
