"""OmegaConf resolvers the configs use; registered on import of hicom.utils.config."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def project_root() -> str:
    """The checkout holding configs/ (so relative paths do not depend on the launch directory), else the cwd."""
    here = Path(__file__).resolve().parents[2]
    return str(here if (here / "configs").is_dir() else Path.cwd())


if not OmegaConf.has_resolver("hicom_root"):
    OmegaConf.register_new_resolver("hicom_root", project_root)
