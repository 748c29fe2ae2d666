"""Shared fixtures: a few tiny synthetic BraTS cases on disk and a composed training config (helpers: helpers.py)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import TINY_SHAPE, compose_train, tiny_overrides
from omegaconf import DictConfig

from brats_unet.runtime import PRECISIONS, USES, cache_file, detect, probe_key
from brats_unet.synth.generator import write_dataset

torch.set_num_threads(1)  # tiny tensors: one thread is faster and steadier on 2 shared cores


@pytest.fixture(scope="session", autouse=True)
def hermetic_probe_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """runtime.channels_last=auto reads a probe cache (brats_unet.runtime): point it at a session folder that says
    "no gain" for this machine, so tests never time anything, never write to ~/.cache, and keep the standard format
    whatever the machine measures (test_hardware.py fills its own caches)."""
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg"))
    hw = detect("cpu")
    no_gain = {"contiguous": 1.0, "channels_last": 1.0}
    cache_file().parent.mkdir(parents=True)
    cache_file().write_text(json.dumps({probe_key(hw, p, use): no_gain for p in PRECISIONS for use in USES}))
    yield
    if saved is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = saved


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
