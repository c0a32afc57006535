"""Files that several processes share: whole-file writes and an exclusive lock."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def write_atomically(path: Path, text: str) -> None:
    """`text` into `path` through a file beside it renamed over it: a reader sees the old file or the new one, never
    part of one, and a write cut short leaves the old file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def as_created_here(path: Path) -> None:
    """Give `path` the permissions a file (or folder) created here gets (0666, or 0777, less the umask).
    safetensors 0.8 writes through a temporary file, which is made 0600: a hand-off or an export no one else could
    read (a teammate's `evaluate.py ckpt=<your run>`); `tempfile.mkdtemp` makes its folder 0700."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[bool]:
    """An exclusive lock on `path` for as long as the block runs, waiting for it (flock: released when the file
    closes, or if the process dies). Where the file system does not lock, the block runs unlocked (one process per
    benchmark is then the user's guarantee, as without shards). Gives whether the lock is held."""
    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as error:  # e.g. a mount without locking
            log.warning("cannot lock %s (%s): going on without the lock", path, error)
            yield False
        else:
            yield True


class Busy(RuntimeError):
    """Another live process holds the lock that `held_alone` asked for."""


class RunFolderTaken(ValueError):
    """A launch into a run folder that holds another run (its config.yaml differs, or it is a staged run and this
    launch one fit, or the reverse): refused before anything is written there, so that a sweep leaves that run's
    records as they are (`hicom.sweep.SweepSummary`)."""


@contextlib.contextmanager
def held_alone(path: Path, what: str) -> Iterator[None]:
    """An exclusive lock on `path` for as long as the block runs, or Busy at once where another process holds it:
    for work that two processes must not do together (`what` says which, in the error). Released when the file
    closes, or if the process dies, so a killed run never leaves it taken. Where the file system does not lock,
    the block runs unlocked."""
    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise Busy(f"{what}: another process is at it now (it holds {path})") from error
        except OSError as error:  # e.g. a mount without locking
            log.warning("cannot lock %s (%s): going on without the lock", path, error)
        yield


# the bytes read from each end of a weight file for its identity
_IDENTITY_BYTES = 2**20


def file_digest(path: Path) -> str:
    """A file's content, as 16 hex digits of its SHA-256: the same file wherever it is (about 1 s per GB)."""
    import hashlib

    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def weights_identity(folder: Path) -> str | None:
    """What tells the weights of a model folder from others, in seconds at any size: its config.json, and each
    weight file's name, size and first and last MiB (different weights differ there: a base and an instruct
    model of one architecture have files of the same names and sizes). A copy has the same identity, wherever
    it is and whenever it was made; None where the folder holds no weight files (or cannot be read)."""
    import hashlib

    folder = Path(folder)
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))
        if not files:
            return None
        digest = hashlib.sha256()
        config = folder / "config.json"
        digest.update(config.read_bytes() if config.is_file() else b"")
        for path in files:
            size = path.stat().st_size
            digest.update(f"{path.name} {size}\n".encode())
            with path.open("rb") as f:
                digest.update(f.read(_IDENTITY_BYTES))
                f.seek(max(size - _IDENTITY_BYTES, 0))
                digest.update(f.read(_IDENTITY_BYTES))
    except OSError:
        return None
    return digest.hexdigest()[:16]
