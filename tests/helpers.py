"""What tests share: composed configs for tiny CPU runs and the installed console scripts."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from omegaconf import DictConfig

from brats_unet.cli.evaluate import evaluate
from brats_unet.cli.predict import predict
from brats_unet.config import compose
from brats_unet.synth.generator import FULL_SHAPE, generate_case, schema_seg
from brats_unet.training.build import build_module
from brats_unet.training.fit import run_config

# Tiny volumes keep the end-to-end tests to seconds; the fixed seed crop is scaled to fit them.
TINY_SHAPE = (64, 64, 48)
TINY_SEED_CROP = [[8, 56], [8, 56], [8, 40]]  # 48 x 48 x 32
# Console scripts live beside the interpreter running the tests (a venv, conda, tox or a system install).
SCRIPTS = Path(sys.executable).parent
FIXTURES = Path(__file__).parent / "fixtures"


def script(name: str) -> str:
    """Path of an installed console script (brats-train, brats-predict, ...)."""
    path = SCRIPTS / name
    if not path.is_file():
        raise FileNotFoundError(f"{name} is not installed beside {sys.executable}: pip install -e .")
    return str(path)


def run_script(name: str, args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([script(name), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def compose_cli(name: str, overrides: list[str]) -> DictConfig:
    """The config an entry point (`train`, `predict`, `evaluate`, ...) would get for these overrides."""
    return compose(overrides, config_name=name)


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
        # Fixed, not `auto`: a test's numbers must not depend on the CPU it runs on (test_hardware.py covers auto).
        "trainer.precision=32-true",
        "runtime.channels_last=false",
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


def run_evaluate(pred: Path, truth: Path, out: Path, *extra: str) -> dict:
    """brats-evaluate in-process (the CLI's own function on its composed config)."""
    return evaluate(compose_cli("evaluate", [f"pred={pred}", f"truth={truth}", f"output={out}", *extra]))


def run_predict(ckpt: Path, input_path: Path, output: Path, *extra: str) -> list[Path]:
    """brats-predict in-process (the CLI's own function on its composed config)."""
    return predict(compose_cli("predict", [f"ckpt_path={ckpt}", f"input={input_path}", f"output={output}", *extra]))


def nifti_array(path: Path) -> np.ndarray:
    """A NIfTI file's voxels as stored (no scaling to float)."""
    return np.asarray(nib.load(path).dataobj)


def save_checkpoint(path: Path, *extra: str, preprocess: str = "modern", et_everywhere: bool = False) -> Path:
    """An untrained tiny model saved the way brats-train saves one: weights plus the resolved run config.

    et_everywhere: logits = bias only, so the argmax is ET at every voxel the model sees."""
    torch.manual_seed(0)
    cfg = compose_train([*tiny_overrides(Path("data"), Path("cache"), path.parent, preprocess=preprocess), *extra])
    module = build_module(cfg, in_channels=len(cfg.preprocess.modalities))
    if et_everywhere:
        with torch.no_grad():
            module.net.head.weight.zero_()
            module.net.head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    torch.save({"state_dict": module.state_dict(), "brats_config": run_config(cfg), "epoch": 0, "global_step": 2},
               path)
    return path


def nudged_checkpoint(path: Path, seed: int = 1) -> Path:
    """A second, genuinely different model of the v0_1 fixture's architecture: its weights plus seeded noise."""
    checkpoint = torch.load(FIXTURES / "v0_1" / "tiny_region.ckpt", map_location="cpu", weights_only=True)
    generator = torch.Generator().manual_seed(seed)
    for key, value in checkpoint["state_dict"].items():
        if key.startswith("net.") and value.is_floating_point():
            checkpoint["state_dict"][key] = value + 0.05 * torch.randn(value.shape, generator=generator)
    torch.save(checkpoint, path)
    return path


def make_sweep(tmp_path: Path, ckpt: Path | Sequence[Path] | None, cases: list[str], root: Path) -> Path:
    """Two fold jobs as brats-train -m data.num_folds=2 data.fold=0,1 leaves them (only what is read here): `ckpt`'s
    model as both folds' checkpoints/best.ckpt, or one checkpoint per fold; None: a stub naming only the fold."""
    sweep = tmp_path / "cv"
    for fold in (0, 1):
        job = sweep / str(fold)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- data.num_folds=2\n- data.fold={fold}\n")
        (job / ".hydra" / "config.yaml").write_text(f"data:\n  root: {root}\n  layout: brats2021\n")
        val = cases[fold::2]
        split = {"train": [c for c in cases if c not in val], "val": val, "test": [], "seed": 0, "fold": fold,
                 "num_folds": 2}
        (job / "split.json").write_text(json.dumps(split))
        (job / "checkpoints").mkdir()
        if ckpt is None:  # only its config is read (the split check): the predictions are given
            torch.save({"brats_config": {"data": {"fold": fold, "num_folds": 2, "split_seed": 0}}},
                       job / "checkpoints" / "best.ckpt")
        else:  # a real fold job: its checkpoint's own config trained this fold (out-of-fold prediction checks it)
            checkpoint = torch.load(ckpt if isinstance(ckpt, str | Path) else ckpt[fold], map_location="cpu",
                                    weights_only=True)
            checkpoint["brats_config"]["data"] = {**checkpoint["brats_config"]["data"], "fold": fold,
                                                  "num_folds": 2, "split_seed": 0}
            torch.save(checkpoint, job / "checkpoints" / "best.ckpt")
    return sweep


def read_metrics_csv(path: Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    """(columns, {case: row}) of a metrics.csv, as text."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), {row["case"]: row for row in reader}


def make_case(rng: np.random.Generator, shape: tuple[int, ...] = FULL_SHAPE
              ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """One synthetic case as arrays: images (int16) per canonical modality, seg (uint8, BraTS 2021 labels {0, 1, 2,
    4}), affine (the physical voxel size of `shape`: 240 / shape[0] mm ...)."""
    case = generate_case(rng, shape)
    return case.images, schema_seg(case, "brats2021"), case.affine
