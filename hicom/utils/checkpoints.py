"""Checks on model folders given in config, so a missing path fails at once with what to set."""

from __future__ import annotations

from pathlib import Path


def require_pretrained(path: str | Path, what: str, key: str) -> Path:
    """The folder `path` if it holds a config.json, else a FileNotFoundError that names the config key to set."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{what} not found at '{folder}' (no config.json there). Put the HF-format folder there, or set "
            f"`{key}=<folder>` on the command line (or the environment variable that the config reads)."
        )
    return folder
