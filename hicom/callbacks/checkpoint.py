"""Lightning's ModelCheckpoint, its last.ckpt brought up to date when training ends."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """With a time or step trigger (the hourly last.ckpt), Lightning's ModelCheckpoint writes last.ckpt at the end
    of training only if it never wrote one, so a run longer than the interval ends with a last.ckpt up to an
    interval behind its weights. This one writes it at the end whenever the last write was at an earlier step
    (Lightning's own conditions: not in fast_dev_run, sanity checking or outside fit)."""

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
