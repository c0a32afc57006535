"""Lightning's ModelCheckpoint, its last.ckpt brought up to date when training ends and, where the strategy writes
a checkpoint as a folder, replaced whole or not at all."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

log = logging.getLogger(__name__)


class DirectCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, but a checkpoint on a local file system goes straight into its file.

    Lightning's first serialises the whole checkpoint into memory (a second copy of the weights and optimizer
    states in host RAM: tens of GB at 7B), then writes it to a temporary file in TMPDIR and moves that into place.
    Where TMPDIR is small (a node's /tmp), every save fails and the error names the checkpoint's file system;
    where it is another file system, the move is a copy, and a job killed during it leaves a checkpoint-sized
    file in TMPDIR for good. `LastCheckpoint` writes into a `.partial` file beside the checkpoint and renames it,
    so the file in place is always whole. Object storage keeps Lightning's path (it writes a file whole or not
    at all)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        from fsspec.utils import get_protocol

        if storage_options is not None or get_protocol(str(path)) != "file":
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        import torch

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb"):  # a folder that cannot be written fails here with its errno; torch's own writer
            pass  # raises a RuntimeError that carries only the message, which write_failure cannot tell apart
        torch.save(checkpoint, path)


def writes_folders(strategy) -> bool:
    """Whether the strategy saves a checkpoint as a folder of files (DeepSpeed: one file per process and
    optimizer shard), which it writes in place; a single-file checkpoint is written whole by Lightning
    (a temporary file moved into place)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if isinstance(strategy, DeepSpeedStrategy):
        return True
    return isinstance(strategy, FSDPStrategy) and getattr(strategy, "_state_dict_type", "full") == "sharded"


def replace_folder(path: Path, step: int, write: Callable[[Path], None], is_writer: bool, barrier) -> None:
    """Write a folder checkpoint so that `path` names a whole one at every moment: `write` (every process) fills
    `<stem>.step<N><suffix>` beside it (a name not yet taken), then one process points `path`, a relative symlink,
    at it in one `os.replace` and deletes the folders it replaced. A write that stops part-way (the job killed
    during an hourly save) leaves `path` on the checkpoint before, and its leftover folder goes with the next save.
    Disk use peaks at two checkpoints. Where `path` is a folder (the file system has no symlinks, or an earlier
    version wrote it in place) it is replaced by two renames, and between them `resume_checkpoint` finds it under
    `<stem>.replaced<suffix>`."""
    target, again = path.with_name(f"{path.stem}.step{step}{path.suffix}"), 0
    while target.exists():  # this step saved before, or a write of it that stopped part-way: a new folder still
        again += 1
        target = path.with_name(f"{path.stem}.step{step}.{again}{path.suffix}")
    if is_writer:
        path.parent.mkdir(parents=True, exist_ok=True)
    barrier()
    write(target)
    barrier()  # every process has written its files
    if is_writer:
        swap = path.with_name(f".{path.name}.swap")
        swap.unlink(missing_ok=True)
        try:
            swap.symlink_to(target.name)
        except OSError as error:
            log.warning("cannot link %s to %s (%s): the folder is renamed into its place", path, target, error)
        linked = swap.is_symlink()
        if path.is_symlink() and not linked or path.is_dir() and not path.is_symlink():  # no one-step replace
            replaced = path.with_name(f"{path.stem}.replaced{path.suffix}")
            if replaced.is_dir():  # a job killed while deleting it, after `path` was whole again: it is older
                shutil.rmtree(replaced)
            path.rename(replaced)
        if linked:
            os.replace(swap, path)
        else:
            target = target.rename(path)
        for old in path.parent.glob(f"{path.stem}.*{path.suffix}"):
            if old.is_symlink():
                old.unlink()
            elif old != target and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    barrier()


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, most often)."""


class NonFiniteWeightsError(RuntimeError):
    """Trained weights hold a NaN or an infinity: a checkpoint or hand-off of them would replace a good one."""


def non_finite(tensors: dict) -> list[str]:
    """The names of the floating-point tensors that hold a NaN or an infinity; a ZeRO-3 parameter is read in this
    process's shard. Read a part at a time: a whole 7B embedding's mask would take half its size again."""
    import torch

    found = []
    for name, tensor in tensors.items():
        local = getattr(tensor, "ds_tensor", tensor).detach()
        if local.is_floating_point() and not all(torch.isfinite(part).all() for part in local.reshape(-1).split(2**26)):
            found.append(name)
    return found


def refuse_non_finite(tensors: dict, written: Path, strategy=None, step: int | None = None) -> None:
    """Stops before `written` is written from `tensors` where any holds a NaN or an infinity (a finiteness pass,
    at save time only). With the run's `strategy` on several processes, all of them decide alike (one all-reduce of
    a flag, each process having read its own tensors), so that none is left waiting in the save's collectives."""
    found = non_finite(tensors)
    refused = bool(found)
    if getattr(strategy, "world_size", 1) > 1:
        refused = strategy.reduce_boolean_decision(refused, all=False)
    if not refused:
        return
    # a checkpoint's folder, or a run's (or stage's) with its checkpoints/
    folders = [folder for folder in (written.parent, written.parent / "checkpoints") if folder.is_dir()]
    earlier = next((last for last in map(resume_checkpoint, folders) if last is not None), None)
    where = "" if step is None else f" at step {step}"
    which = f"{len(found)} of {len(tensors)} tensors, e.g. {found[:3]}" if found else "on another process"
    kept = f"; the checkpoint written before, {earlier}, stays, and ckpt_path= resumes from it" if earlier else ""
    raise NonFiniteWeightsError(
        f"the trained weights{where} hold NaN or infinite values ({which}): {written} is not written{kept}"
    )


def write_failure(path: Path, err: BaseException) -> str:
    """What a failed checkpoint write says: the error, what to do, and whether an earlier checkpoint is there to
    resume from. A folder that cannot be written (read-only, no permission) is said to be so; otherwise the space
    left where it was written is given: torch reports a full disk as an 'unexpected pos' or an 'iostream error',
    which names neither."""
    import errno

    folder = next((p for p in (path.parent, *path.parents) if p.exists()), None)
    cause, causes = err, []
    while cause is not None:  # the OSError behind torch's or Lightning's wrapping
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    denied = any(isinstance(c, OSError) and c.errno in (errno.EROFS, errno.EACCES, errno.EPERM) for c in causes)
    # a failed write never replaces last.ckpt (it fills a .partial file, or a new step folder), so one there is earlier
    earlier = resume_checkpoint(path.parent) if path.parent.is_dir() else None
    kept = (
        f"the checkpoint written before this one ({earlier}) is kept, and `ckpt_path=` resumes from it"
        if earlier is not None
        else "no earlier checkpoint is there to resume from"
    )
    if denied:
        return (
            f"writing the checkpoint {path} failed ({type(err).__name__}: {str(err).strip()}): its folder cannot be "
            "written (a read-only file system, or no permission): point callbacks.model_checkpoint.dirpath (or "
            f"hydra.run.dir) at a folder this job can write; {kept}"
        )
    free = f"{shutil.disk_usage(folder).free / 2**30:.1f} GiB free on its file system" if folder else "no such folder"
    return (
        f"writing the checkpoint {path} failed ({type(err).__name__}: {str(err).strip()}); {free}. A full disk "
        "fails this way: free space (unfinished folders beside it, last.step<N>[.<k>].ckpt, can go), or point "
        f"callbacks.model_checkpoint.dirpath at a larger file system; {kept}"
    )


def resume_checkpoint(checkpoints: Path) -> Path | None:
    """The checkpoint a run's checkpoints/ folder resumes from: last.ckpt, or, if the job stopped between the two
    renames that replace a last.ckpt folder (`replace_folder`), the folder being replaced; None if neither."""
    last = checkpoints / "last.ckpt"
    if last.exists():
        return last
    replaced = checkpoints / "last.replaced.ckpt"
    return replaced if replaced.is_dir() else None


def _fit_ends_mid_epoch(trainer) -> bool:
    """Whether the fit stops after the batch at hand (Lightning's conditions: max_steps reached, or should_stop
    where min_epochs and min_steps allow) and that batch is not its epoch's last."""
    loop = trainer.fit_loop.epoch_loop
    if loop._num_ready_batches_reached():
        return False
    max_steps = loop.max_steps
    if max_steps is not None and max_steps != -1 and trainer.global_step >= max_steps:
        return True
    return trainer.should_stop and trainer.fit_loop._can_stop_early


def _validates_after(trainer) -> bool:
    """Whether Lightning validates after the training batch at hand (its own test, which a stop makes true)."""
    loop = trainer.fit_loop.epoch_loop
    if loop._skip_next_val or loop.val_loop.skip:
        return False
    return loop._should_check_val_fx(trainer.fit_loop._data_fetcher)


def _within_step(trainer) -> bool:
    """Whether a fit is part-way through a gradient accumulation (at a micro-batch that does not step, or in a
    validation after one)."""
    fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
    return fitting and trainer.fit_loop.epoch_loop._should_accumulate()


class LastCheckpoint(ModelCheckpoint):
    """With a time or step trigger (the hourly last.ckpt), Lightning's ModelCheckpoint writes last.ckpt at the end
    of training only if it never wrote one, so a run longer than the interval ends with a last.ckpt up to an
    interval behind its weights. This one writes it at the end whenever the last write was at an earlier step
    (Lightning's own conditions: not in fast_dev_run, sanity checking or outside fit).

    A fit that stops part-way through an epoch (max_steps, or trainer.should_stop: max_time) writes last.ckpt
    after its last batch (after the validation Lightning runs there, if any), before Lightning ends the epoch:
    there Lightning would count the epoch done, and a run resumed from it with a larger max_steps would go on with
    the next epoch, the rest of this one never trained. Written where the epoch is under way, it resumes as the
    run would have gone on. A should_stop set within a gradient accumulation waits for its step, as SIGTERM does,
    and so does last.ckpt where a validation there asks for it (`_save_last_checkpoint`).

    Under a strategy that saves a folder (DeepSpeed), last.ckpt is a link to a whole folder (`replace_folder`):
    DeepSpeed writes its files in place, and a job killed during the save would otherwise leave last.ckpt
    neither the old checkpoint nor the new one."""

    def __init__(self, *args, **kwargs) -> None:
        # last.ckpt is the one file a relaunch into the run folder goes on from: always it, never last-v1.ckpt.
        # Lightning restores where it last wrote only for a checkpoint of the same interval settings (its state key),
        # so a relaunch with another interval found last.ckpt "taken", wrote last-v1.ckpt beside it, and the next
        # relaunch resumed from the stale last.ckpt, training its steps again
        kwargs.setdefault("enable_version_counter", False)
        save_last = kwargs.get("save_last")
        if not (save_last is None or isinstance(save_last, bool) or save_last == "link"):  # "no" saved, as true
            raise ValueError(f"callbacks.model_checkpoint.save_last must be true, false or link, got {save_last!r}")
        interval = kwargs.get("train_time_interval")
        if interval is not None and interval.total_seconds() <= 0:  # Lightning would save at every step
            raise ValueError(
                f"callbacks.model_checkpoint.train_time_interval must be a positive time, got {interval}: set it "
                "longer, or to null with every_n_train_steps"
            )
        super().__init__(*args, **kwargs)
        self._signalled = False  # this process has received SIGTERM; the fit stops where every process agrees
        self._connector = None  # Lightning's signal connector, whose SIGTERM handler this callback replaces
        self._stop_at_step = False  # should_stop was set within a gradient accumulation: set again at its step
        self._save_after_validation = False  # the fit ends mid-epoch after the validation under way
        self._last_at_step = False  # last.ckpt was asked for within a gradient accumulation: written at its step
        self._stopped_by_validation = False  # the stop waiting for the step was set at a validation

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Replaces Lightning's SIGTERM handler before the trainer registers it (when its run starts, after this
        hook). Lightning's makes a `dist.broadcast` from inside the handler and stops each process on its own flag:
        under DDP a SIGTERM that reaches one process (or each at a different moment) pairs that broadcast with
        whatever collective the others are in, and the launch crashes or hangs with nothing saved. This one only
        notes the signal; the processes agree to stop at an optimizer-step boundary (`_agree_to_stop`)."""
        super().setup(trainer, pl_module, stage)
        strategy = trainer.strategy
        if type(getattr(strategy, "_checkpoint_io", None)) in (TorchCheckpointIO, type(None)):  # not a user's own
            strategy.checkpoint_io = DirectCheckpointIO()
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None:
            connector._sigterm_notifier_fn = self._note_sigterm  # an instance attribute: what it registers
            self._connector = connector

    def _note_sigterm(self, signum, frame) -> None:
        log.info("received SIGTERM (%d): the fit stops at the next optimizer step every process has taken", signum)
        if not self._signalled and self._connector is not None:
            launcher = self._connector.trainer.strategy.launcher
            if launcher is not None:  # Lightning's own launcher: its first process passes the signal on, as before
                launcher.kill(signum)
        self._signalled = True

    def _agree_to_stop(self, trainer) -> None:
        """Where any process has been signalled, every process stops after the batch at hand: one all-reduce of a
        flag, at a point all of them reach in step. Lightning then ends the loop and `on_exception` saves."""
        signalled = self._signalled
        if trainer.world_size > 1:
            signalled = trainer.strategy.reduce_boolean_decision(signalled, all=False)
        if signalled and self._connector is not None:
            self._connector.received_sigterm = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Saves only where an optimizer step has just been taken. Within a gradient accumulation the gradients
        gathered so far are in no checkpoint, while the data loader's place counts their micro-batches: a resume
        would pass over them and take its next step on part of a batch. So a time or step trigger that falls there
        waits for the step, and so does a SIGTERM: the fit stops after the step's last micro-batch, at most
        `accumulate_grad_batches` - 1 more."""
        if trainer.fit_loop.epoch_loop._should_accumulate():
            if trainer.should_stop:  # max_time's Timer checks every micro-batch: the stop waits for the step too
                trainer.should_stop, self._stop_at_step = False, True
            return
        if self._stop_at_step:
            trainer.should_stop, self._stop_at_step = True, False
            if self._stopped_by_validation:  # Lightning validates where a fit stops: this one has, in the step
                trainer.fit_loop.epoch_loop._skip_next_val, self._stopped_by_validation = True, False
        self._agree_to_stop(trainer)
        if self._last_at_step:
            self._last_at_step = False
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.save_last and _fit_ends_mid_epoch(trainer):
            if _validates_after(trainer):  # its checkpoints (a monitored top-k) first, then last.ckpt
                self._save_after_validation = True
            elif not self._should_skip_saving_checkpoint(trainer):
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._agree_to_stop(trainer)  # Lightning's evaluation loop stops on each process's own flag

    def on_validation_end(self, trainer, pl_module) -> None:
        """Writes the validation's checkpoints (a monitored top-k: the weights it measured), then last.ckpt where the
        fit ends mid-epoch after it. A validation within a gradient accumulation (where `val_check_interval` falls
        inside an optimizer step) leaves last.ckpt to the step (`_save_last_checkpoint`), and a stop it sets
        (EarlyStopping, which runs before this callback) too: Lightning would end the epoch there, the step's
        micro-batches untrained and the rest of the epoch too on a resume."""
        super().on_validation_end(trainer, pl_module)
        if _within_step(trainer) and trainer.should_stop:
            trainer.should_stop, self._stop_at_step, self._stopped_by_validation = False, True, True
        if self._save_after_validation:
            self._save_after_validation = False
            if not self._should_skip_saving_checkpoint(trainer):
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._agree_to_stop(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A fit stopped by SIGTERM (a scheduler's preemption, `scancel`, or Ctrl-C through `GracefulInterrupt`)
        writes last.ckpt at the step it reached, so that `ckpt_path=<run>` goes on from there rather than from the
        last hourly save. Lightning stops such a fit after the batch at hand, on every process at once, so the
        save (a collective under DeepSpeed) is made by all of them at one step. Other exceptions save nothing
        (a crash may leave its step half done)."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException) or not self.save_last:
            return
        asked, self._last_at_step = self._last_at_step, False
        if self._should_skip_saving_checkpoint(trainer) and not asked:  # saved at this step; not fitting; sanity
            return
        # within a gradient accumulation too (a SIGTERM in a validation there stops the fit at once): it ends here
        super()._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        log.warning("stopped at step %d: %s written", trainer.global_step, self.last_model_path)

    def _save_last_checkpoint(self, trainer, monitor_candidates: dict) -> None:
        """last.ckpt, which a resume goes on from, is written only where an optimizer step has just been taken:
        asked for within a gradient accumulation (by a validation there, after its top-k), it is written at the
        step's last micro-batch (`on_train_batch_end`), since there it would count the step's micro-batches as
        read with their gradients in no file. A top-k checkpoint is written where its validation measured it."""
        if _within_step(trainer):
            self._last_at_step = True
            return
        super()._save_last_checkpoint(trainer, monitor_candidates)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        trained = {name: p for name, p in trainer.lightning_module.named_parameters() if p.requires_grad}
        refuse_non_finite(trained, Path(filepath), trainer.strategy, trainer.global_step)
        try:
            self._write(trainer, filepath)
        except (OSError, RuntimeError) as err:
            raise CheckpointWriteError(write_failure(Path(filepath), err)) from err

    def _write(self, trainer, filepath: str) -> None:
        if not writes_folders(trainer.strategy):
            self._write_file(trainer, filepath)
            return
        if filepath != self.last_model_path:
            super()._save_checkpoint(trainer, filepath)
            return
        replace_folder(
            Path(filepath),
            trainer.global_step,
            lambda target: super(LastCheckpoint, self)._save_checkpoint(trainer, str(target)),
            trainer.is_global_zero,
            trainer.strategy.barrier,
        )
        self._last_checkpoint_saved = filepath

    def _write_file(self, trainer, filepath: str) -> None:
        """A single-file checkpoint, written beside its place (`DirectCheckpointIO`: not through TMPDIR) and renamed
        into it: one step on the same file system, so a job killed during the save leaves the checkpoint before."""
        from fsspec.utils import get_protocol

        if get_protocol(filepath) != "file":  # object storage writes a file whole or not at all
            super()._save_checkpoint(trainer, filepath)
            return
        path = Path(filepath)
        partial = path.with_name(f".{path.name}.partial")
        try:
            super()._save_checkpoint(trainer, str(partial))
        except BaseException:
            if trainer.is_global_zero:  # a full disk's share of a checkpoint: of no use, and it holds the space
                partial.unlink(missing_ok=True)
            raise
        if trainer.is_global_zero:
            os.replace(partial, path)
        trainer.strategy.barrier()
        self._last_checkpoint_saved = filepath  # Lightning's record of the save, which named the partial file
