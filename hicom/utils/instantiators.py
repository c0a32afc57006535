"""The one place where configs become objects; each built thing is logged."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from hicom.utils.checkpoints import require_pretrained

log = logging.getLogger(__name__)


def write_assets(cfg: DictConfig | None) -> None:
    """Write the tiny checkpoints the config asks for (a no-op when they are there with the same spec)."""
    for name, asset in (cfg or {}).items():
        path = hydra.utils.instantiate(asset.spec)(asset.out_dir)
        log.info("asset %s: %s", name, path)


def check_pretrained(cfg: DictConfig, override: str | None = None) -> None:
    """Fail before building anything when a model folder named in the config is missing; the message says to set
    `override` (formatted with the config key) where given, else the key or the environment."""
    for key, what in (("model.vision.path", "the vision tower's checkpoint"), ("model.llm.path", "the LLM checkpoint")):
        path = OmegaConf.select(cfg, key)
        if path is not None:
            require_pretrained(path, what, key, None if override is None else override.format(key=key))


def check_data(cfg: DictConfig) -> None:
    """Fail before building anything when the data the config names is missing (generated data is not checked:
    it is written on first use)."""
    source = OmegaConf.select(cfg, "data.source")
    if source is None:
        return
    built = hydra.utils.instantiate(source)
    if hasattr(built, "check"):
        built.check()


def instantiate_all(cfg: DictConfig | None, kind: str) -> list:
    """Every `_target_` entry of a dict of configs (callbacks, loggers)."""
    built = []
    for name, conf in (cfg or {}).items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            log.info("%s %s: <%s>", kind, name, conf._target_)
            built.append(hydra.utils.instantiate(conf))
    return built


def ensure_dir(path: str) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out
