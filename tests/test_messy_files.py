"""Real releases are messy (issue 13, section 4): one case mixing float64, float32 and scaled integer modalities, a
float segmentation and different qform/sform codes per file validates, preprocesses, predicts and evaluates exactly like
the same voxels stored plainly; genuine geometry mismatches still fail with today's message."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import compose_cli, compose_train, make_case, tiny_overrides

from brats_unet.cli.evaluate import evaluate
from brats_unet.cli.predict import predict
from brats_unet.cli.preprocess import preprocess
from brats_unet.data.cache import load_cached
from brats_unet.data.cases import load_case, read_labels
from brats_unet.training.build import build_module
from brats_unet.training.fit import run_config
from brats_unet.utils import BratsError

CASE = "BraTS2021_00000"
SHAPE = (48, 44, 36)


def oblique_affine() -> np.ndarray:
    """Rotated, anisotropic and shifted: a qform (quaternion, float32) only approximates it."""
    a = np.deg2rad(20)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag(
        [1.2, 0.9, 1.5])
    affine[:3, 3] = [-80.0, 30.0, -12.5]
    return affine


AFFINE = oblique_affine()


def nifti(data: np.ndarray, dtype: type, *, sform: int = 2, qform: int = 1, slope: float = 1.0, inter: float = 0.0,
          affine: np.ndarray = AFFINE) -> nib.Nifti1Image:
    """`data` stored as `dtype` with scl_slope/scl_inter (the file holds (data - inter) / slope) and the given codes."""
    raw = (data.astype(np.float64) - inter) / slope
    img = nib.Nifti1Image(raw.astype(dtype), None)
    img.set_sform(affine, code=sform)
    img.set_qform(affine, code=qform)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(slope, inter)
    return img


def write(root: Path, messy: bool) -> Path:
    """The same voxels, stored plainly (int16 images, uint8 seg) or messily (see MESSY)."""
    images, seg, _ = make_case(np.random.default_rng(5), shape=SHAPE)
    arrays = {**images, "seg": seg}
    case_dir = root / CASE
    case_dir.mkdir(parents=True)
    for key, data in arrays.items():
        img = nifti(data, **MESSY[key]) if messy else nifti(data, np.uint8 if key == "seg" else np.int16)
        nib.save(img, case_dir / f"{CASE}_{key}.nii.gz")
    return case_dir


MESSY = {
    "t1": dict(dtype=np.float64, sform=1, qform=1),
    "t1ce": dict(dtype=np.float32, sform=0, qform=1),  # qform only: nibabel reads the quaternion
    "t2": dict(dtype=np.int16, sform=4, qform=0, slope=0.5),  # scaled integers
    "flair": dict(dtype=np.uint16, sform=2, qform=2, slope=0.25, inter=-100.0),  # background stored as 400
    "seg": dict(dtype=np.float32, sform=0, qform=1),  # a float label map
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("messy")
    return {"clean": write(base / "clean", messy=False).parent, "messy": write(base / "messy", messy=True).parent}


def test_the_files_really_are_messy(roots) -> None:
    case_dir = roots["messy"] / CASE
    headers = {k: nib.load(case_dir / f"{CASE}_{k}.nii.gz").header for k in MESSY}
    assert [str(h.get_data_dtype()) for h in headers.values()] == ["float64", "float32", "int16", "uint16", "float32"]
    assert [(int(h["sform_code"]), int(h["qform_code"])) for h in headers.values()] == [(1, 1), (0, 1), (4, 0), (2, 2),
                                                                                         (0, 1)]
    t2 = nib.load(case_dir / f"{CASE}_t2.nii.gz").dataobj
    assert (t2.slope, t2.inter) == (0.5, 0.0)


def test_messy_case_loads_as_the_plain_one(roots) -> None:
    clean, messy = load_case(roots["clean"] / CASE), load_case(roots["messy"] / CASE)
    for key in clean.images:
        assert messy.images[key].dtype == np.float32
        np.testing.assert_array_equal(messy.images[key], clean.images[key])
    np.testing.assert_array_equal(messy.seg, clean.seg)
    np.testing.assert_allclose(messy.affine, clean.affine, atol=1e-5)
    labels, _, _ = read_labels(roots["messy"] / CASE / f"{CASE}_seg.nii.gz", (0, 1, 2, 4))
    assert np.issubdtype(labels.dtype, np.integer)


def test_preprocess_writes_the_same_cache_for_both(roots, tmp_path) -> None:
    out = {}
    for name, root in roots.items():
        folder = preprocess(compose_cli("preprocess", [f"data.root={root}", f"paths.cache_dir={tmp_path / name}",
                                                       "preprocess=modern", "num_workers=0"]))
        out[name] = load_cached(folder, CASE, mmap=False)
    (x_clean, y_clean, meta_clean), (x_messy, y_messy, meta_messy) = out["clean"], out["messy"]
    np.testing.assert_array_equal(x_messy, x_clean)
    np.testing.assert_array_equal(y_messy, y_clean)
    np.testing.assert_allclose(meta_messy["affine"], meta_clean["affine"], atol=1e-5)


def test_predict_and_evaluate_the_messy_case(roots, tmp_path) -> None:
    torch.manual_seed(0)
    cfg = compose_train(tiny_overrides(Path("data"), Path("cache"), tmp_path, preprocess="modern"))
    module = build_module(cfg, in_channels=len(cfg.preprocess.modalities))
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "brats_config": run_config(cfg)}, ckpt)
    out = {}
    for name, root in roots.items():  # brats-predict on each root
        predict(compose_cli("predict", [f"ckpt_path={ckpt}", f"input={root}", f"output={tmp_path / name}"]))
        out[name] = nib.load(tmp_path / name / f"{CASE}.nii.gz")
    np.testing.assert_array_equal(np.asarray(out["messy"].dataobj), np.asarray(out["clean"].dataobj))
    np.testing.assert_allclose(out["messy"].affine, AFFINE, atol=1e-5)  # the messy input's geometry
    assert out["messy"].get_data_dtype() == np.uint8 and (out["messy"].dataobj.slope, out["messy"].dataobj.inter) == (
        1.0, 0.0)  # the t1 header's dtype and scaling are not carried over to the label map
    # ... and it scores against the float segmentation
    summary = evaluate(compose_cli("evaluate", [f"pred={tmp_path / 'messy'}", f"truth={roots['messy']}",
                                                f"output={tmp_path / 'eval'}"]))
    assert summary["n_cases"] == 1 and summary["metrics"]["dice_wt"]["n"] == 1


@pytest.mark.parametrize("change, message", [
    (dict(sform=0, qform=1, shift=2.0), r"BraTS2021_00000_t1ce\.nii\.gz: affine differs from t1 by up to 2"),
    (dict(sform=0, qform=0), r"BraTS2021_00000_t1ce\.nii\.gz: affine differs from t1 by up to"),
], ids=["qform_elsewhere", "no_orientation_at_all"])
def test_genuine_geometry_mismatch_still_fails(change: dict, message: str, roots, tmp_path) -> None:
    case_dir = tmp_path / CASE
    case_dir.mkdir()
    for key in MESSY:
        (case_dir / f"{CASE}_{key}.nii.gz").write_bytes((roots["messy"] / CASE / f"{CASE}_{key}.nii.gz").read_bytes())
    data = np.asarray(nib.load(case_dir / f"{CASE}_t1ce.nii.gz").dataobj)
    affine = AFFINE.copy()
    affine[0, 3] += change.pop("shift", 0.0)
    nib.save(nifti(data, np.float32, affine=affine, **change), case_dir / f"{CASE}_t1ce.nii.gz")
    with pytest.raises(BratsError, match=message):
        load_case(case_dir)
