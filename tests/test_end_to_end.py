"""The default recipes on real geometry: full-size BraTS 2021 cases through the seed crop, BraTS 2023 naming."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import compose_cli, compose_train, tiny_overrides

from brats_unet.cli.predict import predict
from brats_unet.synth.generator import write_dataset
from brats_unet.training.fit import train


@pytest.mark.slow
def test_paper_recipe_on_full_size_cases_trains_and_predicts_in_the_original_geometry(tmp_path: Path) -> None:
    """240x240x155 cases, the paper's fixed [56:184, 56:184, 13:141] crop at 128^3, one training step, then predict."""
    root = tmp_path / "brats2021"
    write_dataset(root, cases=3, seed=1)
    run = tmp_path / "run"
    overrides = [o for o in tiny_overrides(root, tmp_path / "cache", run, preprocess="seed") if "crop_box" not in o]
    cfg = compose_train(["experiment=paper_final", "data=synthetic", *overrides, "data.patch_size=[128,128,128]",
                         "data.batch_size=1", "data.steps_per_epoch=1", "data.train_cases=null", "data.val_cases=null",
                         "data.val_fraction=0.34", "data.test_fraction=0.0", "scheduler.warmup_steps=0"])
    assert list(cfg.preprocess.crop_box) == [[56, 184], [56, 184], [13, 141]]
    metrics = train(cfg)
    assert np.isfinite(metrics["val/dice_mean"]) and np.isfinite(metrics["val/dice_paper"])  # 128^3 in fp32: no NaN

    out = tmp_path / "pred"
    predict(compose_cli("predict", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"input={root}",
                                    f"output={out}", f"split_file={run / 'split.json'}", "split_subset=val"]))
    (case,) = [p.name.removesuffix(".nii.gz") for p in out.glob("*.nii.gz")]
    reference = nib.load(root / case / f"{case}_flair.nii.gz")
    pred = nib.load(out / f"{case}.nii.gz")
    labels = np.asarray(pred.dataobj)
    assert pred.shape == (240, 240, 155) and np.allclose(pred.affine, reference.affine)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2, 4}
    outside = np.ones(labels.shape, bool)
    outside[56:184, 56:184, 13:141] = False
    assert not labels[outside].any()  # the seed model sees only its crop: everything else is background


@pytest.mark.slow
def test_brats2023_layout_trains_and_predicts_with_et_label_3(tmp_path: Path) -> None:
    root = tmp_path / "brats2023"
    write_dataset(root, cases=4, seed=2, layout="brats2023", shape=(64, 64, 48))
    run = tmp_path / "run"
    cfg = compose_train([*tiny_overrides(root, tmp_path / "cache", run), "data=brats2023", f"data.root={root}",
                         "data.val_fraction=0.25", "data.test_fraction=0.25"])
    metrics = train(cfg)
    assert {"val/dice_wt", "val/dice_tc", "val/dice_et"} <= set(metrics)  # 2023 names, the same regions
    out = tmp_path / "pred"
    predict(compose_cli("predict", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"input={root}",
                                    f"output={out}", f"split_file={run / 'split.json'}", "split_subset=test"]))
    (pred_file,) = out.glob("*.nii.gz")
    assert pred_file.name.startswith("BraTS-GLI-")
    assert set(np.unique(np.asarray(nib.load(pred_file).dataobj))) <= {0, 1, 2, 3}
