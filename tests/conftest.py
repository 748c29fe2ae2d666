"""Shared fixtures: a few tiny synthetic BraTS cases on disk and composed training configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from brats_unet.data.synthetic import write_dataset

# Tiny volumes keep the end-to-end tests to seconds; the fixed seed crop is scaled to fit them.
TINY_SHAPE = (64, 64, 48)
TINY_SEED_CROP = [[8, 56], [8, 56], [8, 40]]  # 48 x 48 x 32
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


def compose_cli(name: str, overrides: list[str]) -> DictConfig:
    """The config an entry point (`train`, `predict`, `evaluate`, ...) would get for these overrides."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="brats_unet.conf", version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def compose_train(overrides: list[str]) -> DictConfig:
    return compose_cli("train", overrides)


def tiny_overrides(root: Path, cache: Path, out: Path, preprocess: str = "modern") -> list[str]:
    """A CPU-sized run: 3-level U-Net with 4..16 filters on 32^3 patches, one epoch of 2 steps, no workers."""
    overrides = [
        "data=synthetic",
        f"data.root={root}",
        f"paths.cache_dir={cache}",
        f"paths.output_dir={out}",
        f"preprocess={preprocess}",
        "model=unet3d_small",
        "model.filters=[4,8,16]",
        "model.dropout=0.1",
        "data.patch_size=[32,32,32]",
        "data.batch_size=2",
        "data.steps_per_epoch=2",
        "data.num_workers=0",
        "data.persistent_workers=false",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=1",
        "~callbacks.progress_bar",
        "~callbacks.model_summary",
        "module.val_hd95=false",
        "scheduler.warmup_steps=0",
    ]
    if preprocess == "seed":
        overrides.append(f"preprocess.crop_box={TINY_SEED_CROP}".replace(" ", ""))
    return overrides


@pytest.fixture
def train_cfg(synthetic_root: Path, cache_dir: Path, tmp_path: Path) -> DictConfig:
    return compose_train(tiny_overrides(synthetic_root, cache_dir, tmp_path / "run"))
