"""Config values from a fixed set."""

from __future__ import annotations

import enum
import math


class Choice(str, enum.Enum):
    """A config value from a fixed set (subclasses add the members): a wrong one is refused with the set, under the
    name of the config key, the class name in lower case (Guide: `guide`)."""

    @classmethod
    def _missing_(cls, value):
        raise ValueError(f"{cls.__name__.lower()} must be one of {[c.value for c in cls]}, got {value!r}")

    @classmethod
    def of(cls, value, key: str):
        """`cls(value)`, refused under the name `key` where the config key is not the class's (a fallback decoder)."""
        if isinstance(value, cls) or value in {c.value for c in cls}:
            return cls(value)
        raise ValueError(f"{key} must be one of {[c.value for c in cls]}, got {value!r}")


def whole_number(key: str, value, least: int = 1) -> int:
    """`value` if it is an int (not a bool) of at least `least`, else ValueError naming `key`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{key} must be a whole number >= {least}, got {value!r}")
    return value


def flag(key: str, value) -> bool:
    """`value` if it is a bool, else ValueError naming `key`: a string such as `no` would read as true."""
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def positive(key: str, value) -> float:
    """`value` if it is a finite number (not a bool) above 0, else ValueError naming `key`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"{key} must be a finite number > 0, got {value!r}")
    return value


def kernel_sizes(key: str, kernel) -> tuple[int, ...]:
    """`kernel` as a tuple of three whole numbers >= 1, else ValueError naming `key`."""
    if (
        isinstance(kernel, str | bytes)
        or not hasattr(kernel, "__len__")
        or len(kernel) != 3
        or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in kernel)
    ):
        raise ValueError(f"{key} must be three whole numbers >= 1 (k_t, k_s, k_s), got {kernel!r}")
    return tuple(kernel)


class MultiprocessingContext(Choice):
    """How a DataLoader starts its worker processes (torch's `multiprocessing_context`). `fork` (Linux's default)
    copies the main process, locks other threads hold included: a worker that needs one waits forever (a decoder's
    or an allocator's thread in the parent). `forkserver` and `spawn` start clean processes, which import the
    dataset's modules once each (seconds, once per run with persistent workers)."""

    FORK = "fork"
    FORKSERVER = "forkserver"
    SPAWN = "spawn"


def loader_start(key: str, value, num_workers: int) -> dict:
    """The DataLoader keyword for `value` (None: torch's default), checked against this platform's start methods
    under the name `key`; none without workers, where torch refuses one."""
    if value is None:
        return {}
    import multiprocessing

    method = MultiprocessingContext.of(value, key).value
    if method not in multiprocessing.get_all_start_methods():
        raise ValueError(f"{key}={method} is not available here: {multiprocessing.get_all_start_methods()}")
    return {"multiprocessing_context": method} if num_workers > 0 else {}
