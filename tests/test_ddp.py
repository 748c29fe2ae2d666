"""Multi-process training: `trainer=ddp` with 2 CPU processes (gloo) runs a fast_dev_run through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import tiny_overrides


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_ddp_two_cpu_processes_fast_dev_run(synthetic_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # trainer=ddp is the multi-GPU config; on CPU it needs the accelerator and float32 (bf16 would only be slower).
    cmd = [sys.executable, "-m", "brats_unet.train", *tiny_overrides(synthetic_root, cache_dir, run_dir),
           "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
           "debug=fast_dev_run", f"hydra.run.dir={run_dir}"]
    # Lightning re-launches the same command line for rank 1, so both ranks run `python -m brats_unet.train`.
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env={**os.environ}, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "distributed_backend=gloo" in output and "Starting with 2 processes" in output
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output
    assert "`Trainer.fit` stopped: `max_steps=1` reached" in output
    assert (run_dir / "split.json").is_file()
