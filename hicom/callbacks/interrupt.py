"""Ctrl-C during a fit stops it the way a scheduler's SIGTERM does, and data-loader workers outlast the stop."""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import signal
import threading
import time

from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class GracefulInterrupt(Callback):
    """The first Ctrl-C (SIGINT) of a fit is turned into SIGTERM, which Lightning handles as a stop after the
    batch at hand on every process at once; `LastCheckpoint` then writes last.ckpt at that step, so that
    `ckpt_path=<run>` goes on with the next batch. Python's own Ctrl-C would stop mid-step, wherever it was, with
    nothing saved. Ctrl-C again, `again_after` seconds or more later, stops at once, saving nothing; one sooner is
    taken for the same Ctrl-C passed on by a wrapper (`timeout`, a launcher) and ignored. Signal handlers can only
    be set in the main thread: elsewhere Ctrl-C keeps its default."""

    again_after = 1.0

    def __init__(self) -> None:
        self._before = None  # the SIGINT handler to put back, while ours is set
        self._first: float | None = None  # when the first Ctrl-C came

    def on_train_start(self, trainer, pl_module) -> None:
        from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

        if isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher) and trainer.global_rank != 0:
            # Lightning's own launcher: the first process passes its SIGTERM on to the others (launcher.kill); a
            # process that also turned the terminal's Ctrl-C into one would stop twice, out of step (a hang)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            return
        if threading.current_thread() is threading.main_thread():
            before = signal.getsignal(signal.SIGINT)
            self._before = signal.default_int_handler if before is None else before  # None: set outside Python
            self._first = None
            signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        now = time.monotonic()
        if self._first is None:
            self._first = now
            log.warning("Ctrl-C: the fit stops after this batch and writes last.ckpt (Ctrl-C again: stop now, unsaved)")
            signal.raise_signal(signal.SIGTERM)
        elif now - self._first >= self.again_after:
            self._restore()
            raise KeyboardInterrupt

    def _restore(self) -> None:
        if self._before is not None:
            signal.signal(signal.SIGINT, self._before)
            self._before = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()


# Set in the training process as it exits (atexit runs this before multiprocessing ends its children): a loader
# worker then leaves at its first SIGTERM. Shared with the workers forked from it.
_EXITING = multiprocessing.Value("b", 0, lock=False)
atexit.register(lambda: setattr(_EXITING, "value", 1))


def _exit_quietly(signum, frame) -> None:
    os._exit(0)


# the longest a loader worker serves on after a SIGTERM (where it cannot see the exit flag: a worker not forked from
# the training process, as under the spawn or forkserver start methods)
WORKER_GRACE_SECONDS = 60


def _outlast_the_stop(signum, frame) -> None:
    if _EXITING.value:  # the training process is done: nothing to serve
        os._exit(0)
    signal.signal(signal.SIGTERM, _exit_quietly)  # the next one (the loader, or the exit, ending the worker): now
    signal.signal(signal.SIGALRM, _exit_quietly)
    signal.alarm(WORKER_GRACE_SECONDS)


def loader_worker_signals(worker_id: int) -> None:
    """A DataLoader's `worker_init_fn`. A scheduler's SIGTERM (and a terminal's Ctrl-C) reaches the loader's
    workers with the training process; a worker it ended would make PyTorch raise "DataLoader worker killed by
    signal" in the training process, which then stops mid-batch with nothing saved. So a worker ignores Ctrl-C,
    and SIGTERM while the training process runs, serving on while that stops after its batch (GracefulInterrupt,
    LastCheckpoint); it leaves, with status 0, which PyTorch does not count as a failure, when the loader shuts it
    down, at a second SIGTERM, or at the first once the training process is exiting."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _outlast_the_stop)
