"""Multi-process training: `trainer=ddp` with 2 CPU processes (gloo) runs a fast_dev_run through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from helpers import tiny_overrides


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_ddp_two_cpu_processes_fast_dev_run(synthetic_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # trainer=ddp is the multi-GPU config; on CPU it needs the accelerator and float32 (bf16 would only be slower).
    cmd = [sys.executable, "-m", "brats_unet.cli.train", *tiny_overrides(synthetic_root, cache_dir, run_dir),
           "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
           "debug=fast_dev_run", f"hydra.run.dir={run_dir}"]
    # Lightning re-launches the same command line for rank 1, so both ranks run `python -m brats_unet.cli.train`.
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env={**os.environ}, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "distributed_backend=gloo" in output and "Starting with 2 processes" in output
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output
    assert "`Trainer.fit` stopped: `max_steps=1` reached" in output
    assert (run_dir / "split.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_ddp_validation_counts_every_case_once(synthetic_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    """3 validation cases on 2 ranks: the DDP mean must equal a single-process validation of the same weights
    (a padding sampler would score one case twice)."""
    import json

    import lightning.pytorch as L
    import torch
    from helpers import compose_train
    from hydra.utils import instantiate

    from brats_unet.training.build import build_module

    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides(synthetic_root, cache_dir, run_dir), "data.val_fraction=0.5", "logger=none"]
    cmd = [sys.executable, "-m", "brats_unet.cli.train", *overrides, "trainer=ddp", "trainer.accelerator=cpu",
           "trainer.devices=2", "trainer.precision=32-true", f"hydra.run.dir={run_dir}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env={**os.environ}, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    ddp_dice = json.loads((run_dir / "metrics.json").read_text())["final"]["val/dice_mean"]
    assert len(json.loads((run_dir / "split.json").read_text())["val"]) == 3

    cfg = compose_train(overrides)
    datamodule = instantiate(cfg.data, output_dir=str(run_dir), seed=cfg.seed, _recursive_=False)
    module = build_module(cfg, datamodule.num_channels)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    module.load_state_dict(state)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    (single,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    assert single["val/dice_mean"] == pytest.approx(ddp_dice, abs=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_ddp_refuses_to_skip_nan_batches(synthetic_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    """Skipping a step on one rank would hang the others: DDP with nonfinite_loss=skip is a clear error instead."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "brats_unet.cli.train", *tiny_overrides(synthetic_root, cache_dir, run_dir),
           "module.nonfinite_loss=skip", "logger=none", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.precision=32-true", f"hydra.run.dir={run_dir}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env={**os.environ}, timeout=240)
    assert result.returncode != 0
    assert "error: module.nonfinite_loss=skip works on one device only" in result.stderr
    assert "Traceback" not in result.stderr
