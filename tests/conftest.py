"""Fixtures: the real Hydra config, shrunk, with a shared cache for the tiny checkpoints and generated data."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import hicom.utils.config  # noqa: F401

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# A training run small enough for a unit test: few samples, no workers, a handful of steps.
SMALL = [
    "data.source.num_train=48",
    "data.source.num_val=16",
    "data.num_workers=0",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "logger=csv",
    "~callbacks.progress",
]


def pytest_configure(config) -> None:
    """Under pytest-xdist (`make test` runs 2 workers), each worker and the runs it starts take an equal share of the
    cores: torch's default of one thread per core in every worker would oversubscribe them."""
    import os

    import torch

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for train.py and the other processes a test starts


@pytest.fixture
def no_gc():
    """The garbage collector off for the test (after one collection): what only it would free stays, so that an
    object held in a reference cycle shows as alive."""
    import gc

    gc.collect()
    gc.disable()
    yield
    gc.enable()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def compose_train(cache: Path, out: Path, overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.cache_dir={cache}", *(overrides or [])])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


@pytest.fixture
def cfg_small(cache_dir, tmp_path) -> DictConfig:
    return compose_train(cache_dir, tmp_path / "run", SMALL)


@pytest.fixture(scope="session")
def tiny_paths(cache_dir) -> dict[str, Path]:
    """The tiny SigLIP and Qwen2 folders, written once per session through the default config's assets."""
    from hicom.utils.instantiators import write_assets

    cfg = compose_train(cache_dir, cache_dir / "unused")
    write_assets(cfg.assets)
    return {"siglip": Path(cfg.model.vision.path), "qwen2": Path(cfg.model.llm.path)}
