"""Ctrl-C during a fit stops it the way a scheduler's SIGTERM does, and data-loader workers outlast the stop."""

from __future__ import annotations

import logging
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


# how long a data-loader worker keeps serving after SIGTERM: time for the training process to finish the batch at
# hand and write its checkpoint (a scheduler's SIGKILL ends everything anyway: SLURM's KillWait is 30 s by default)
WORKER_GRACE_SECONDS = 60


def _exit_quietly(signum, frame) -> None:
    os._exit(0)


def _outlast_the_stop(signum, frame) -> None:
    signal.signal(signal.SIGTERM, _exit_quietly)  # a second SIGTERM (the loader shutting a stuck worker): now
    signal.signal(signal.SIGALRM, _exit_quietly)
    signal.alarm(WORKER_GRACE_SECONDS)


def loader_worker_signals(worker_id: int) -> None:
    """A DataLoader's `worker_init_fn`. A scheduler's SIGTERM (and a terminal's Ctrl-C) reaches the loader's
    workers with the training process; a worker it ended would make PyTorch raise "DataLoader worker killed by
    signal" in the training process, which then stops mid-batch with nothing saved. So a worker ignores Ctrl-C
    and, after SIGTERM, goes on serving for WORKER_GRACE_SECONDS while the training process stops after its batch
    (GracefulInterrupt, LastCheckpoint) and shuts its loaders down; it then leaves with status 0, which PyTorch
    does not count as a failure. A second SIGTERM ends it at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _outlast_the_stop)
