"""kill -9 in the middle of brats-preprocess, brats-train and brats-predict, then the same command again: the work
completes, finished parts are kept, and nothing on disk is corrupt (a stray `.tmp-*` file is at worst ignored)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import compose_cli, compose_train, script, tiny_overrides

from brats_unet.cli.preprocess import preprocess
from brats_unet.data import cache
from brats_unet.synth.generator import write_dataset
from brats_unet.training.build import build_module
from brats_unet.training.checkpoint import warn_config_changes
from brats_unet.training.fit import run_config, train

pytestmark = pytest.mark.slow
SHAPE = (64, 64, 48)


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "BRATS_DEBUG")}


def run(tool: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([script(tool), *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                            env=env())
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def kill_when(tool: str, args: list[str], cwd: Path, ready: Callable[[], bool], delay: float, timeout: float = 120
              ) -> bool:
    """Start the command, wait until `ready()`, sleep `delay`, SIGKILL it. True if it was killed (not finished)."""
    proc = subprocess.Popen([script(tool), *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env())
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, f"{tool} ended (rc {proc.returncode}) before the kill point"
            assert time.monotonic() < deadline, f"{tool} never reached the kill point"
            time.sleep(0.005)
        time.sleep(delay)
        killed = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        return killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def predictions(folder: Path) -> list[str]:
    """The visible label maps (not prediction.json, which names the model that wrote them)."""
    return [name for name in visible(folder) if name.endswith(".nii.gz")]


# ---- preprocessing ------------------------------------------------------------------------------------------------
def test_kill_during_preprocessing_then_rerun_equals_a_clean_run(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_dataset(root, cases=16, seed=3, shape=SHAPE, workers=2)
    args = lambda cache_dir: [f"data.root={root}", f"paths.cache_dir={cache_dir}", "preprocess=modern",  # noqa: E731
                              "num_workers=1"]
    killed_cache = tmp_path / "killed"
    started = lambda: killed_cache.exists() and any(killed_cache.rglob("*.npy"))  # noqa: E731
    delay = random.Random().uniform(0.0, 0.2)
    killed = kill_when("brats-preprocess", args(killed_cache), tmp_path, started, delay)
    (folder,) = killed_cache.iterdir()
    done_before = cache.cached_cases(folder)
    assert len(done_before) < 16 or not killed, "the kill came after the last case"
    for case in done_before:  # a case marked done is whole
        x, y, meta = cache.load_cached(folder, case, mmap=False)
        assert x.shape[1:] == y.shape and meta["case"] == case

    run("brats-preprocess", args(killed_cache), tmp_path)
    preprocess(compose_cli("preprocess", args(tmp_path / "clean")))  # the reference run, in-process
    (clean,) = (tmp_path / "clean").iterdir()
    assert clean.name == folder.name
    cases = cache.cached_cases(folder)
    assert cases == cache.cached_cases(clean) and len(cases) == 16
    for case in cases:
        a, b = cache.load_cached(folder, case, mmap=False), cache.load_cached(clean, case, mmap=False)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2], case
    # A killed write leaves at most a hidden temp file, which nothing counts as a case or reads.
    assert visible(folder) == visible(clean)
    assert all(p.name.startswith(".tmp-") for p in folder.iterdir() if p.name not in visible(clean))


# ---- training -----------------------------------------------------------------------------------------------------
def test_kill_during_training_then_resume_completes(synthetic_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [o for o in tiny_overrides(synthetic_root, cache_dir, run_dir) if not o.startswith("paths.output")]
    args = [*overrides, f"hydra.run.dir={run_dir}", "logger=csv", "trainer.max_epochs=4", "module.val_hd95=false"]
    last = run_dir / "checkpoints" / "last.ckpt"
    killed = kill_when("brats-train", args, tmp_path, last.exists, random.Random().uniform(0.0, 1.0))
    assert killed, "training finished before the kill: raise trainer.max_epochs"
    assert not (run_dir / "metrics.json").exists()
    torch.load(last, map_location="cpu", weights_only=False)  # atomic checkpoint saves: never a truncated file

    result = run("brats-train", [*args, "ckpt_path=last"], tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 4 and metrics["global_step"] == 8
    assert "val/dice_mean" in metrics["final"]
    assert "Restored all states" in result.stdout + result.stderr


# ---- prediction ---------------------------------------------------------------------------------------------------
def test_kill_during_prediction_then_resume_writes_every_case(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_dataset(root, cases=16, seed=5, shape=SHAPE, workers=2)
    torch.manual_seed(0)
    cfg = compose_train([*tiny_overrides(Path("data"), Path("cache"), tmp_path), "preprocess=modern"])
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": build_module(cfg, in_channels=4).state_dict(), "brats_config": run_config(cfg)}, ckpt)
    args = lambda out, *extra: [f"ckpt_path={ckpt}", f"input={root}", f"output={out}", "device=cpu",  # noqa: E731
                                *extra]
    pred = tmp_path / "pred"
    started = lambda: pred.is_dir() and any(pred.glob("*.nii.gz"))  # noqa: E731
    killed = kill_when("brats-predict", args(pred), tmp_path, started, random.Random().uniform(0.0, 0.5))
    written = predictions(pred)
    assert len(written) < 16 or not killed
    for name in written:  # every file the killed run left is a whole NIfTI
        assert nib.load(pred / name).get_fdata().shape == SHAPE

    run("brats-predict", args(pred, "resume=true"), tmp_path)
    run("brats-predict", args(tmp_path / "clean"), tmp_path)
    cases = sorted(p.name for p in root.iterdir())
    assert predictions(pred) == predictions(tmp_path / "clean") == [f"{c}.nii.gz" for c in cases]
    for name in predictions(pred):
        a = np.asarray(nib.load(pred / name).dataobj)
        b = np.asarray(nib.load(tmp_path / "clean" / name).dataobj)
        assert a.dtype == np.uint8 and np.array_equal(a, b), name


# ---- resume: periodic checkpoints, changed configs, an already finished run ---------------------------------------
def test_periodic_checkpoints_and_resuming_a_finished_run(synthetic_root: Path, cache_dir: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides(synthetic_root, cache_dir, run_dir), "logger=none", "trainer.max_epochs=2",
                 "callbacks.periodic_checkpoint.every_n_train_steps=1"]
    first = train(compose_train(overrides))
    # every step saved, the newest K=2 kept, named by step
    assert visible(run_dir / "checkpoints" / "periodic") == ["step-0000003.ckpt", "step-0000004.ckpt"]
    saved = torch.load(run_dir / "checkpoints" / "periodic" / "step-0000004.ckpt", weights_only=False)
    assert saved["global_step"] == 4
    metrics_file = (run_dir / "metrics.json").read_text()
    assert json.loads(metrics_file)["global_step"] == 4

    with caplog.at_level("INFO", logger="brats_unet.training"):
        again = train(compose_train([*overrides, "ckpt_path=last", "optimizer.lr=0.5", "seed=7"]))
    assert (run_dir / "metrics.json").read_text() == metrics_file  # not clobbered by the empty re-run
    assert again == json.loads(metrics_file)["final"] and again.keys() == first.keys()
    assert "the run was already complete" in caplog.text
    changed = [r.getMessage() for r in caplog.records if "with a changed config" in r.getMessage()]
    assert len(changed) == 2
    assert changed[0].endswith("optimizer.lr: 0.0001 -> 0.5") and changed[1].endswith("seed: 42 -> 7")


def test_warn_config_changes_names_each_changed_key_and_ignores_run_paths(caplog: pytest.LogCaptureFixture) -> None:
    saved = {"brats_config": {"seed": 1, "model": {"filters": [4, 8]}, "paths": {"output_dir": "a"},
                              "ckpt_path": None, "loss": {"alpha": 0.5}}}
    current = {"seed": 1, "model": {"filters": [4, 16]}, "paths": {"output_dir": "b"}, "ckpt_path": "last",
               "loss": {"alpha": 0.5, "smooth": 1.0}}
    with caplog.at_level("WARNING", logger="brats_unet.training"):
        assert warn_config_changes(saved, current, "last.ckpt") == ["loss.smooth", "model.filters"]
    assert "resuming last.ckpt with a changed config: model.filters: [4, 8] -> [4, 16]" in caplog.text
    assert warn_config_changes({}, current, "old.ckpt") == []  # a checkpoint without a stored config: nothing
