"""Shared fixtures: a few tiny synthetic BraTS cases on disk and a composed training config (helpers: helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TINY_SHAPE, compose_train, tiny_overrides
from omegaconf import DictConfig

from brats_unet.data.synthetic import write_dataset

torch.set_num_threads(1)  # tiny tensors: one thread is faster and steadier on 2 shared cores


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six tiny synthetic cases in the BraTS 2021 layout (generated once per test session)."""
    root = tmp_path_factory.mktemp("synthetic")
    write_dataset(root, cases=6, seed=0, shape=TINY_SHAPE)
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def train_cfg(synthetic_root: Path, cache_dir: Path, tmp_path: Path) -> DictConfig:
    return compose_train(tiny_overrides(synthetic_root, cache_dir, tmp_path / "run"))
