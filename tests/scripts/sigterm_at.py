"""A callback for the signal tests' training processes: each process named in `at` sends itself SIGTERM as the
training batch given for it starts (`at`: process rank -> batch index), as a scheduler's preemption reaches each
process of a launch at its own moment, or one of them alone."""

import os
import signal

from lightning.pytorch.callbacks import Callback


class SigtermAt(Callback):
    def __init__(self, at: dict) -> None:
        self.at = {int(rank): int(batch) for rank, batch in at.items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.at.get(trainer.global_rank) == batch_idx:
            os.kill(os.getpid(), signal.SIGTERM)
