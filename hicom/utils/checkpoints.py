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


def resolve_attention(requested: str) -> str:
    """`auto`: flash_attention_2 where the flash-attn package is installed and a GPU is present, else torch SDPA.
    Anything else is passed to transformers as is."""
    if requested != "auto":
        return requested
    import importlib.util

    import torch

    if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        return "flash_attention_2"
    return "sdpa"
