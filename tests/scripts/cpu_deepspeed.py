"""Lightning's DeepSpeedStrategy on the CPU, for tests: Lightning refuses any accelerator but CUDA and takes the
engine's device from the root device's index, which a CPU device lacks. The engine itself runs on CPU tensors
(DS_ACCELERATOR=cpu, gloo); everything else, checkpoints included, is Lightning's and DeepSpeed's own code."""

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    def setup_environment(self) -> None:
        super(DeepSpeedStrategy, self).setup_environment()  # DDPStrategy's, without the CUDA check

    def setup_distributed(self) -> None:  # without the check that device indices are local ranks
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)
