"""The time-to-quality benchmark's nnU-Net arm (benchmarks/nnunet_arm.py): the conversion to nnU-Net's raw format
needs no nnunetv2; the end-to-end run is skipped where nnunetv2 is not installed (`make nnunet`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate

# benchmarks/ sits beside the package, not inside it: make the checkout importable when pytest is run from elsewhere.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import benchmarks  # noqa: E402
from benchmarks import nnunet_arm, time_to_quality  # noqa: E402
from brats_unet.data.cases import load_nifti  # noqa: E402
from brats_unet.data.datamodule import BratsDataModule  # noqa: E402
from brats_unet.utils import BratsError  # noqa: E402


def _cases(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def test_conversion_writes_nnunets_layout_labels_and_dataset_json(synthetic_root: Path, tmp_path: Path) -> None:
    cases = _cases(synthetic_root)
    split = {"train": cases[:3], "val": cases[3:4], "test": cases[4:]}
    out = nnunet_arm.convert(synthetic_root, split, tmp_path / "raw")

    assert out == tmp_path / "raw" / "Dataset501_BratsSynth"
    listing = {d: sorted(p.name for p in (out / d).iterdir()) for d in ("imagesTr", "labelsTr", "imagesTs")}
    assert listing == {"imagesTr": sorted(f"{c}_{i:04d}.nii.gz" for c in cases[:4] for i in range(4)),
                       "labelsTr": [f"{c}.nii.gz" for c in cases[:4]],
                       "imagesTs": sorted(f"{c}_{i:04d}.nii.gz" for c in cases[4:] for i in range(4))}
    case = cases[1]  # holds every label (the first case has no necrosis)
    for i, modality in enumerate(("t1", "t1ce", "t2", "flair")):  # Dataset137_BraTS21's channel order
        assert (out / "imagesTr" / f"{case}_{i:04d}.nii.gz").read_bytes() == \
            (synthetic_root / case / f"{case}_{modality}.nii.gz").read_bytes()

    brats, affine, _ = load_nifti(synthetic_root / case / f"{case}_seg.nii.gz")
    labels, labels_affine, _ = load_nifti(out / "labelsTr" / f"{case}.nii.gz")
    assert sorted(np.unique(brats).tolist()) == [0, 1, 2, 4]  # every label occurs, so each rule below is exercised
    expected = np.zeros_like(brats)
    expected[brats == 1], expected[brats == 2], expected[brats == 4] = 2, 1, 3  # NCR -> 2, ED -> 1, ET -> 3
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_allclose(labels_affine, affine)
    np.testing.assert_array_equal(nnunet_arm.from_nnunet(labels), brats)  # and back
    assert nnunet_arm.from_nnunet(np.array([0, 1, 2, 3])).tolist() == [0, 2, 1, 4]

    assert json.loads((out / "dataset.json").read_text()) == {
        "channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"},
        "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]},
        "regions_class_order": [1, 2, 3],
        "numTraining": 4,
        "file_ending": ".nii.gz",
        "name": "Dataset501_BratsSynth",
        "description": "brats-synth cases of the time-to-quality benchmark (brats_unet); labels as Dataset137_BraTS21",
    }
    assert nnunet_arm.splits_final(split) == [{"train": cases[:3], "val": cases[3:4]}]


def test_from_nnunet_refuses_a_label_nnunet_does_not_write() -> None:
    with pytest.raises(BratsError, match=r"nnU-Net prediction holds labels \[4\], expected 0..3"):
        nnunet_arm.from_nnunet(np.array([0, 3, 4]))


def test_conversion_refuses_a_split_case_that_is_not_on_disk(synthetic_root: Path, tmp_path: Path) -> None:
    cases = _cases(synthetic_root)
    with pytest.raises(BratsError, match="split names cases that are not under .*: BraTS2021_99999"):
        nnunet_arm.convert(synthetic_root, {"train": cases[:2], "val": [], "test": ["BraTS2021_99999"]}, tmp_path)
    assert not (tmp_path / "Dataset501_BratsSynth").exists()


def test_benchmark_split_is_the_quickstart_datamodules(synthetic_root: Path, tmp_path: Path) -> None:
    cfg = time_to_quality.arm_config("auto", synthetic_root, tmp_path, quick=True)
    datamodule: BratsDataModule = instantiate(cfg.data, output_dir=str(tmp_path / "run"), seed=cfg.seed,
                                              _recursive_=False)
    datamodule.prepare_data()
    datamodule.setup("fit")
    split = time_to_quality.benchmark_split(synthetic_root, tmp_path)
    assert {k: split[k] for k in ("train", "val", "test")} == {k: datamodule.split[k] for k in ("train", "val", "test")}
    assert split["test"] and split["val"]


@pytest.mark.slow  # writes 4 small cases
def test_nnunet_arm_without_nnunetv2_is_skipped_with_how_to_install(tmp_path: Path, monkeypatch) -> None:
    # import nnunetv2 -> ImportError, installed or not, imported by an earlier test or not
    for name in ["nnunetv2", *(n for n in sys.modules if n.startswith("nnunetv2."))]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "benchmarks.nnunet_trainer", raising=False)
    monkeypatch.delattr(benchmarks, "nnunet_trainer", raising=False)
    result = time_to_quality.main(["--quick", "--arms", "nnunet", "--shape", "32,32,24", "--out", str(tmp_path)])
    [row] = result["rows"]
    assert row["arm"] == "nnunet"
    assert row["status"].startswith("skipped: ") and row["status"].endswith(f"({nnunet_arm.INSTALL})")
    assert "nnunetv2" in row["status"]  # the first package it imports (without nnunetv2: "No module named ...")


@pytest.mark.slow  # nnU-Net plans, preprocesses, trains one step and predicts (about a minute)
def test_nnunet_arm_runs_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed (make nnunet)")
    result = time_to_quality.main(["--quick", "--budget", "1", "--arms", "nnunet", "--threads", "1",
                                   "--out", str(tmp_path)])
    [row] = json.loads((tmp_path / "time_to_quality-cpu.json").read_text())["rows"]
    assert row == json.loads(json.dumps(result["rows"][0]))
    assert row["status"] == "ok" and row["impl"].startswith("nnU-Net v2 ")
    assert row["steps"] >= 1 and row["train_s"] >= 1 and row["val_dice_mean"] is None
    assert all(0 <= row[f"test_dice_{k}"] <= 1 for k in ("mean", "wt", "tc", "et")) and row["test_cases"] >= 1
    assert len(row["patch_size"]) == 3 and row["batch_size"] >= 2
