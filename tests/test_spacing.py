"""Input at another voxel size (issue 19.5): a checkpoint records its training spacing; prediction resamples a case at
another spacing to it, predicts, and resamples the probabilities back, so the output keeps the input's geometry."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import FIXTURES

import brats_unet
from brats_unet.inference import segmenter as segmenter_module
from brats_unet.inference.loading import load_model
from brats_unet.inference.resampling import resample, resampled_shape
from brats_unet.inference.segmenter import Segmenter

OLD = FIXTURES / "v0_1"
MODALITIES = ("t1", "t1ce", "t2", "flair")


def write_case(root: Path, name: str, images: dict[str, np.ndarray], affine: np.ndarray) -> Path:
    case_dir = root / name
    case_dir.mkdir(parents=True)
    for m, data in images.items():
        img = nib.Nifti1Image(data, affine)
        img.header["descrip"] = name.encode()
        nib.save(img, case_dir / f"{name}_{m}.nii.gz")
    return case_dir


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The fixture case written at 2 mm, and the same head at 1 mm (each 2 mm voxel as 2x2x2 voxels of 1 mm: the same
    field of view, so a 1 mm voxel centre sits 0.5 mm from its 2 mm one)."""
    root = tmp_path_factory.mktemp("spacing")
    case = brats_unet.load_case(OLD / "BraTS2021_00000")
    two = np.diag([2.0, 2.0, 2.0, 1.0])
    two[:3, 3] = [-40.0, 10.0, 3.0]
    one = np.diag([1.0, 1.0, 1.0, 1.0])
    one[:3, 3] = two[:3, 3] - 0.5
    fine = {m: np.repeat(np.repeat(np.repeat(v, 2, 0), 2, 1), 2, 2) for m, v in case.images.items()}
    return (write_case(root, "Case2mm", case.images, two), write_case(root, "Case1mm", fine, one))


@pytest.fixture(scope="module")
def model() -> tuple:
    return load_model(OLD / "tiny_region.ckpt")


def test_a_case_at_another_spacing_is_predicted_at_the_training_spacing_in_its_own_geometry(cases, model) -> None:
    coarse, fine = cases
    segmenter = Segmenter(*model, device="cpu", precision="fp32", spacing=(2.0, 2.0, 2.0))
    p_coarse, p_fine = segmenter.predict_proba(coarse), segmenter.predict_proba(fine)
    # The 1 mm case resampled to 2 mm is the 2 mm case voxel for voxel, so the model saw the same input, and its
    # probabilities came back to 1 mm by the same interpolation (before: the model read the head at twice its size).
    np.testing.assert_array_equal(p_fine, resample(p_coarse, p_fine.shape[1:]))
    for path in (coarse, fine):
        out, src = segmenter.predict(path), nib.load(path / f"{path.name}_t1.nii.gz")
        assert out.shape == src.shape and np.array_equal(out.affine, src.affine)
        assert out.header["descrip"] == src.header["descrip"] and out.get_data_dtype() == np.uint8
    labels_coarse = np.asarray(segmenter.predict(coarse).dataobj)
    labels_fine = np.asarray(segmenter.predict(fine).dataobj)
    # downsampled (one voxel of each 2x2x2 block), the 1 mm labels agree with the 2 mm ones but at the edges
    agree = (labels_fine[::2, ::2, ::2] == labels_coarse).mean()
    assert agree > 0.9, agree


def test_spacings_within_one_percent_are_not_resampled(cases, model) -> None:
    coarse, _ = cases
    plain = Segmenter(*model, device="cpu", precision="fp32").predict_proba(coarse)
    near = Segmenter(*model, device="cpu", precision="fp32", spacing=(2.015, 1.99, 2.0)).predict_proba(coarse)
    np.testing.assert_array_equal(near, plain)
    assert resampled_shape((48, 48, 32), (2.0, 2.0, 2.0), (2.015, 1.99, 2.0)) is None
    assert resampled_shape((48, 48, 32), (1.0, 1.0, 2.0), (2.0, 2.0, 2.0)) == (24, 24, 32)
    assert resampled_shape((48, 48, 32), (1.0, 1.0, 1.0), None) is None


def test_a_checkpoint_without_a_spacing_predicts_as_before_and_says_so_once(caplog, monkeypatch) -> None:
    monkeypatch.setattr(segmenter_module, "_warned_no_spacing", [])  # whatever loaded an old checkpoint before
    with caplog.at_level(logging.WARNING, logger="brats_unet.predict"):
        segmenter = brats_unet.Segmenter.from_checkpoint(OLD / "tiny_region.ckpt", device="cpu", precision="fp32")
        brats_unet.Segmenter.from_checkpoint(OLD / "tiny_region.ckpt", device="cpu", precision="fp32")
    assert segmenter.spacing is None
    assert caplog.text.count("records no training voxel size") == 1 and "without resampling" in caplog.text
    expected = np.asarray(nib.load(OLD / "expected" / "plain.nii.gz").dataobj)
    assert np.array_equal(np.asarray(segmenter.predict(OLD / "BraTS2021_00000").dataobj), expected)
