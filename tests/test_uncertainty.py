"""Uncertainty at prediction (save_uncertainty=true): hand-computed entropy, agreement and AUROC; the maps never
change the prediction; qc.csv and its review rule; and, on a tiny trained model, higher uncertainty on wrong voxels."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import FIXTURES, compose_cli, compose_train, nudged_checkpoint, tiny_overrides

from brats_unet.cli.predict import predict as predict_command
from brats_unet.data.cases import Case, load_nifti
from brats_unet.data.labels import LAYOUTS, SCHEMAS
from brats_unet.data.split import load_split
from brats_unet.evaluation.folder import find_predictions
from brats_unet.inference.segmenter import Segmenter
from brats_unet.inference.uncertainty import (
    Uncertainty,
    auroc,
    expected_calibration_error,
    fit_temperature,
    normalised_entropy,
    pooled_agreement,
    qc_row,
    scale_temperature,
    segment_with_uncertainty,
)
from brats_unet.training.fit import train

OLD = FIXTURES / "v0_1"
CKPT = OLD / "tiny_region.ckpt"
CASE = OLD / "BraTS2021_00000"


def test_entropy_is_normalised_per_head() -> None:
    uniform = torch.full((1, 4, 1), 0.25)
    certain = torch.tensor([0.0, 1.0, 0.0, 0.0]).reshape(1, 4, 1)
    assert normalised_entropy(uniform, "softmax").item() == pytest.approx(1.0)
    assert normalised_entropy(certain, "softmax").item() == 0.0
    # sigmoid regions: the mean binary entropy / log 2 -> (0 + 0 + 1) / 3
    regions = torch.tensor([1.0, 0.0, 0.5]).reshape(1, 3, 1)
    assert normalised_entropy(regions, "sigmoid").item() == pytest.approx(1 / 3)


def test_pooled_agreement_is_the_pairwise_dice_of_the_samples() -> None:
    rng = np.random.default_rng(0)
    masks = rng.random((5, 200)) < np.linspace(0.1, 0.9, 200)  # 5 samples that partly agree
    pairs = list(itertools.combinations(masks, 2))
    expected = sum(2 * (a & b).sum() for a, b in pairs) / sum(a.sum() + b.sum() for a, b in pairs)
    assert pooled_agreement(masks.mean(0), 5) == pytest.approx(expected)
    # by hand: counts (4, 4, 2, 0) of 4 samples -> sum c(c-1) / (3 sum c) = 26 / 30
    assert pooled_agreement(np.array([1.0, 1.0, 0.5, 0.0]), 4) == pytest.approx(26 / 30)
    assert pooled_agreement(np.zeros(3), 4) == 1.0 and pooled_agreement(np.ones(3), 1) is None


def test_auroc_by_hand() -> None:
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auroc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)  # ties share their rank
    assert auroc(np.array([0.1, 0.2]), np.array([0, 0])) is None


def test_calibration_error_by_hand_and_temperature_undoes_overconfidence() -> None:
    # bins of width 0.1: {0.1, 0.1} holds 1 positive (|0.2 - 1| = 0.8), {0.9, 0.9} 2 (|1.8 - 2| = 0.2) -> 1.0 / 4
    assert expected_calibration_error(np.array([0.1, 0.1, 0.9, 0.9]), np.array([0, 1, 1, 1]), bins=10) == \
        pytest.approx(0.25)
    rng = np.random.default_rng(0)
    q = rng.uniform(0.02, 0.98, 40000)  # true probabilities
    y = rng.random(q.size) < q
    overconfident = scale_temperature(q, 0.5)  # logits doubled
    t = fit_temperature(overconfident, y)
    assert t == pytest.approx(2.0, rel=0.1)
    assert expected_calibration_error(scale_temperature(overconfident, t), y) < \
        expected_calibration_error(overconfident, y) / 3


def test_uncertainty_leaves_the_prediction_bit_identical(tmp_path: Path) -> None:
    members = [CKPT, nudged_checkpoint(tmp_path / "b.ckpt")]
    segmenter = Segmenter.from_checkpoint(members, device="cpu", precision="fp32", tta=True)
    _, labels, probs = segmenter.segment(CASE, probabilities=True)
    _, labels_u, probs_u, unc = segment_with_uncertainty(segmenter, CASE, probabilities=True)
    assert np.array_equal(labels, labels_u) and torch.equal(torch.from_numpy(probs), torch.from_numpy(probs_u))
    assert unc.samples == 16 and unc.entropy.shape == labels.shape
    assert unc.mutual_information is not None and unc.mutual_information.min() >= 0
    assert unc.mutual_information.max() > 0 and unc.entropy.min() >= 0 and unc.entropy.max() <= 1
    assert all(0 <= unc.agreement[r] <= 1 for r in ("wt", "tc", "et"))


def test_qc_row_volumes_and_review_rule() -> None:
    schema = SCHEMAS["brats2021"]
    case = Case("c1", {}, np.diag([2.0, 2.0, 2.0, 1.0]), None, LAYOUTS["brats2021"])  # 8 mm^3 = 0.008 mL per voxel
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[:5, :5, :4] = 2  # 100 voxels of oedema
    labels[:5, :5, 4] = 4  # 25 voxels of ET
    entropy = np.where(labels == 4, 0.5, 0.1)
    unc = Uncertainty(entropy, None, {"wt": 0.95, "tc": 0.7, "et": 0.7}, samples=8)
    row = qc_row(case, labels, SimpleNamespace(schema=schema), unc, min_volume_ml=0.1)
    assert row["volume_wt_ml"] == pytest.approx(1.0) and row["volume_tc_ml"] == pytest.approx(0.2)
    assert row["entropy_wt"] == pytest.approx((100 * 0.1 + 25 * 0.5) / 125) and row["entropy_et"] == 0.5
    assert row["review"] == 1
    assert row["reasons"] == "tc agreement 0.70 < 0.9; tc entropy 0.50 > 0.3; et agreement 0.70 < 0.9; et entropy " \
                             "0.50 > 0.3"
    calm = Uncertainty(np.zeros_like(entropy), None, {"wt": 1.0, "tc": 1.0, "et": 1.0}, samples=8)
    assert qc_row(case, labels, SimpleNamespace(schema=schema), calm)["review"] == 0
    empty = qc_row(case, np.zeros_like(labels), SimpleNamespace(schema=schema), calm)
    assert (empty["review"], empty["reasons"], empty["entropy_wt"]) == (1, "no wt predicted", None)


def test_brats_predict_save_uncertainty_writes_maps_and_qc_and_evaluate_skips_them(tmp_path: Path) -> None:
    out = tmp_path / "pred"
    predict_command(compose_cli("predict", [f"ckpt_path={CKPT}", f"input={CASE}", f"output={out}", "device=cpu",
                                            "precision=fp32", "tta=true", "save_uncertainty=true"]))
    img = nib.load(out / f"{CASE.name}_uncertainty.nii.gz")
    assert img.shape == (48, 48, 32, 2) and img.get_data_dtype() == np.float32
    assert np.allclose(img.affine, nib.load(out / f"{CASE.name}.nii.gz").affine)
    with open(out / "qc.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == [CASE.name] and rows[0]["samples"] == "8"
    assert {"volume_wt_ml", "entropy_et", "agreement_tc", "review", "reasons"} <= set(rows[0])
    assert list(find_predictions(out)) == [CASE.name]  # not <case>_uncertainty


@pytest.mark.slow
def test_uncertainty_is_higher_on_wrong_voxels_of_a_tiny_trained_model(synthetic_root: Path, cache_dir: Path,
                                                                       tmp_path: Path) -> None:
    # The demo's recipe (region head, instance norm, AdamW 3e-3) on a 3-level U-Net: 80 steps, about 15% of the
    # held-out brain voxels wrong (measured here: entropy 0.87 on wrong vs 0.77 on right voxels, AUROC 0.79).
    cfg = compose_train([*tiny_overrides(synthetic_root, cache_dir, tmp_path / "run"), "loss=region",
                         "optimizer=adamw", "optimizer.lr=3e-3", "model.norm=instance", "model.dropout=0.0",
                         "model.filters=[8,16,32]", "data.steps_per_epoch=20", "trainer.max_epochs=4",
                         "trainer.check_val_every_n_epoch=2", "logger=none"])
    train(cfg)
    run = Path(cfg.paths.output_dir)
    split = load_split(run / "split.json", need_train=False)
    segmenter = Segmenter.from_checkpoint(run / "checkpoints" / "best.ckpt", device="cpu", precision="fp32", tta=True)
    schema = segmenter.schema
    entropy, wrong = [], []
    for name in split["val"] + split["test"]:  # cases the model never trained on
        case = synthetic_root / name
        loaded, labels, _, unc = segment_with_uncertainty(segmenter, case)
        truth = schema.to_classes(load_nifti(next(case.glob("*_seg.nii.gz")))[0].astype(np.int64))
        brain = np.any([image != 0 for image in loaded.images.values()], axis=0)  # not the trivially right air
        entropy.append(unc.entropy[brain])
        wrong.append((schema.to_classes(labels) != truth)[brain])
    entropy_all, wrong_all = np.concatenate(entropy), np.concatenate(wrong)
    assert 0 < wrong_all.mean() < 0.5
    assert entropy_all[wrong_all].mean() > entropy_all[~wrong_all].mean() + 0.05
    assert auroc(entropy_all, wrong_all) > 0.7


def test_resume_keeps_the_qc_rows_of_cases_already_predicted(synthetic_root: Path, tmp_path: Path) -> None:
    cases = sorted(p.name for p in synthetic_root.iterdir())
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": cases[1:], "val": [], "test": cases[:1]}))
    out = tmp_path / "pred"
    common = [f"ckpt_path={CKPT}", f"input={synthetic_root}", f"output={out}", "device=cpu", "precision=fp32",
              "save_uncertainty=true"]
    predict_command(compose_cli("predict", [*common, f"split_file={split}"]))
    first = (out / "qc.csv").read_text().splitlines()
    predict_command(compose_cli("predict", [*common, "resume=true"]))
    rows = (out / "qc.csv").read_text().splitlines()
    assert len(first) == 2 and len(rows) == 1 + len(cases) and first[1] in rows
    assert sorted(p.name for p in out.glob("*_uncertainty.nii.gz")) == [f"{c}_uncertainty.nii.gz" for c in cases]
