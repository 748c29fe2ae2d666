"""brats_unet.data.discovery and brats_unet.data.cases on small real NIfTI cases written with nibabel."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_unet.data.cases import load_nifti, load_validated_case, read_case_files, save_nifti, validate_case
from brats_unet.data.discovery import CaseFiles, case_files, find_cases
from brats_unet.data.labels import LAYOUTS, MODALITIES
from brats_unet.utils import BratsError

SHAPE = (32, 32, 24)
AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])


def make_arrays(seed: int = 0, shape=SHAPE, et_label: int = 4) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Images non-zero in a central 'brain' block, seg with all four labels inside it."""
    rng = np.random.default_rng(seed)
    images = {}
    for i, mod in enumerate(MODALITIES):
        img = np.zeros(shape, dtype=np.int16)
        img[4:-4, 4:-4, 3:-3] = rng.integers(50, 1000, size=(shape[0] - 8, shape[1] - 8, shape[2] - 6)) + i
        images[mod] = img
    seg = np.zeros(shape, dtype=np.uint8)
    seg[10:14, 10:14, 8:12] = 2
    seg[11:13, 11:13, 9:11] = 1
    seg[12, 12, 10] = et_label
    return images, seg


def write_case(root: Path, case: str, layout: str = "brats2021", ext: str = ".nii.gz", seed: int = 0,
               overrides: dict | None = None, seg: bool = True, affine: np.ndarray = AFFINE) -> Path:
    """Write one case; `overrides` maps modality/"seg" -> array (or None to leave the file out)."""
    lay = LAYOUTS[layout]
    images, labels = make_arrays(seed, et_label=dict((n, v) for v, n in lay.label_schema.labels)["et"])
    arrays = {**images, **({"seg": labels} if seg else {}), **(overrides or {})}
    folder = root / case
    folder.mkdir(parents=True, exist_ok=True)
    for key, arr in arrays.items():
        if arr is not None:
            nib.save(nib.Nifti1Image(arr, affine), folder / lay.filename(case, key, ext))
    return folder


def bad_case(tmp_path: Path, key: str, array: np.ndarray, case: str = "BraTS2021_00003") -> CaseFiles:
    write_case(tmp_path, case, overrides={key: array})
    return case_files(tmp_path / case, "brats2021")


# ---- discovery ----

def test_find_cases_sorted_both_extensions_and_extras_ignored(tmp_path):
    write_case(tmp_path, "BraTS2021_00002")
    write_case(tmp_path, "BraTS2021_00000", ext=".nii")
    (tmp_path / "BraTS2021_00000" / "notes.txt").write_text("ignored")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    cases = find_cases(tmp_path, "brats2021")
    assert [c.case for c in cases] == ["BraTS2021_00000", "BraTS2021_00002"]
    assert cases[0].images["flair"] == tmp_path / "BraTS2021_00000" / "BraTS2021_00000_flair.nii"
    assert cases[1].seg == tmp_path / "BraTS2021_00002" / "BraTS2021_00002_seg.nii.gz"
    assert list(cases[0].images) == list(MODALITIES)


def test_find_cases_brats2023_layout(tmp_path):
    write_case(tmp_path, "BraTS-GLI-00001-000", layout="brats2023")
    (case,) = find_cases(tmp_path, LAYOUTS["brats2023"])
    assert case.images["t1ce"].name == "BraTS-GLI-00001-000-t1c.nii.gz"
    assert case.images["flair"].name == "BraTS-GLI-00001-000-t2f.nii.gz"


def test_unlabelled_cases(tmp_path):
    write_case(tmp_path, "BraTS2021_00000", seg=False)
    assert find_cases(tmp_path, "brats2021", require_seg=False)[0].seg is None
    with pytest.raises(BratsError, match=r"BraTS2021_00000: BraTS2021_00000_seg\.nii\.gz: missing seg"):
        find_cases(tmp_path, "brats2021")


@pytest.mark.parametrize("setup, problem", [
    (lambda p: p / "nope", "does not exist"),
    (lambda p: (p / "file.txt", (p / "file.txt").write_text("x"))[0], "is not a folder"),
    (lambda p: p, "holds no case folders"),
])
def test_bad_root(tmp_path, setup, problem):
    root = setup(tmp_path)
    pattern = re.escape("<root>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz")
    with pytest.raises(BratsError, match=rf"data root {re.escape(str(root))} {problem}; expected {pattern}"):
        find_cases(root, "brats2021")


def test_unknown_layout(tmp_path):
    with pytest.raises(BratsError, match=r"unknown data layout 'brats2019'.*brats2021.*brats2023"):
        find_cases(tmp_path, "brats2019")


def test_missing_modality_names_case_and_file(tmp_path):
    write_case(tmp_path, "BraTS2021_00000")
    write_case(tmp_path, "BraTS2021_00001", overrides={"t2": None})
    with pytest.raises(BratsError, match=r"^BraTS2021_00001: BraTS2021_00001_t2\.nii\.gz: missing t2 file"):
        find_cases(tmp_path, "brats2021")


def test_folder_name_not_matching_file_names(tmp_path):
    write_case(tmp_path, "BraTS2021_00004")
    (tmp_path / "BraTS2021_00004").rename(tmp_path / "BraTS2021_00005")
    with pytest.raises(BratsError, match=r"BraTS2021_00005: BraTS2021_00004_t1\.nii\.gz: file name does not match "
                                         r"the case folder name \(expected BraTS2021_00005_t1\.nii\.gz\)"):
        find_cases(tmp_path, "brats2021")
    files = CaseFiles("BraTS2021_00005", {m: tmp_path / "BraTS2021_00005" / f"BraTS2021_00004_{m}.nii.gz"
                                          for m in MODALITIES}, None)
    with pytest.raises(BratsError, match=r"BraTS2021_00005: BraTS2021_00004_t1\.nii\.gz: file name does not match"):
        validate_case(files, "brats2021")


# ---- NIfTI read/write ----

def test_save_load_round_trip_atomic(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    affine = np.diag([1.0, 1.2, 2.5, 1.0])
    affine[:3, 3] = [-10, 5, 3]
    path = tmp_path / "sub" / "img.nii.gz"
    save_nifti(path, data, affine)
    got, got_affine, header = load_nifti(path)
    np.testing.assert_array_equal(got, data)
    assert got.dtype == np.int16
    np.testing.assert_allclose(got_affine, affine)
    assert header.get_zooms() == pytest.approx((1.0, 1.2, 2.5))
    assert [p.name for p in path.parent.iterdir()] == ["img.nii.gz"]  # no temp file left
    with gzip.open(path) as f:  # really gzip-compressed: the temp file kept the .nii.gz suffix
        assert len(f.read()) > 24 * 2


def test_truncated_gzip(tmp_path):
    path = write_case(tmp_path, "BraTS2021_00000") / "BraTS2021_00000_flair.nii.gz"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(BratsError, match=rf"{re.escape(str(path))}: .*truncated or corrupt"):
        load_nifti(path)
    with pytest.raises(BratsError, match=r"^BraTS2021_00000: BraTS2021_00000_flair\.nii\.gz: .*truncated or corrupt"):
        validate_case(case_files(path.parent, "brats2021"), "brats2021")
    path.write_bytes(b"plain bytes, no gzip header" * 10)
    with pytest.raises(BratsError, match=r"BraTS2021_00000_flair\.nii\.gz: not a gzip file"):
        validate_case(case_files(path.parent, "brats2021"), "brats2021")


def test_truncated_uncompressed(tmp_path):
    path = write_case(tmp_path, "BraTS2021_00000", ext=".nii") / "BraTS2021_00000_t2.nii"
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(BratsError, match=r"BraTS2021_00000_t2\.nii: cannot read the voxels: truncated or corrupt file"):
        validate_case(case_files(path.parent, "brats2021"), "brats2021")


def test_not_a_nifti(tmp_path):
    path = write_case(tmp_path, "BraTS2021_00000", ext=".nii") / "BraTS2021_00000_t1.nii"
    path.write_text("this is a text file, not an image\n" * 20)
    with pytest.raises(BratsError, match=r"BraTS2021_00000: BraTS2021_00000_t1\.nii: not a NIfTI file"):
        validate_case(case_files(path.parent, "brats2021"), "brats2021")


def test_4d_image_rejected_but_trailing_singleton_accepted(tmp_path):
    vol = make_arrays()[0]["t1"]
    files = bad_case(tmp_path, "t1", np.stack([vol, vol], axis=-1))
    with pytest.raises(BratsError, match=r"BraTS2021_00003_t1\.nii\.gz: 4D image of shape \(32, 32, 24, 2\) where"):
        validate_case(files, "brats2021")
    files = bad_case(tmp_path, "t1", vol[..., None], case="BraTS2021_00004")
    validate_case(files, "brats2021")
    assert load_nifti(files.images["t1"])[0].shape == SHAPE


# ---- deep validation ----

def test_valid_cases_pass(tmp_path):
    write_case(tmp_path, "BraTS2021_00000")
    write_case(tmp_path, "BraTS-GLI-00000-000", layout="brats2023")
    validate_case(case_files(tmp_path / "BraTS2021_00000", "brats2021"), "brats2021")
    files = case_files(tmp_path / "BraTS-GLI-00000-000", "brats2023")
    validate_case(files, "brats2023")
    # The cache builder's single read returns exactly what was written, and the same meta as read_case_files.
    images, seg, meta = load_validated_case(files, "brats2023", ["t2", "t1"])
    expected, expected_seg = make_arrays(et_label=3)
    assert list(images) == ["t1", "t2"] and images["t2"].dtype == np.float32
    np.testing.assert_array_equal(images["t2"], expected["t2"])
    np.testing.assert_array_equal(seg, expected_seg)
    assert meta == read_case_files(files, list(MODALITIES))[2]
    assert meta["files"]["seg"] == str(tmp_path / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-seg.nii.gz")


def test_shape_differs(tmp_path):
    files = bad_case(tmp_path, "t2", np.ones((32, 32, 20), dtype=np.int16))
    with pytest.raises(BratsError, match=r"^BraTS2021_00003: BraTS2021_00003_t2\.nii\.gz: "
                                         r"shape \(32, 32, 20\) differs from t1 \(32, 32, 24\)$"):
        validate_case(files, "brats2021")


def test_affine_differs(tmp_path):
    write_case(tmp_path, "BraTS2021_00003")
    shifted = AFFINE.copy()
    shifted[0, 3] = 0.5
    nib.save(nib.Nifti1Image(make_arrays()[0]["flair"], shifted), tmp_path / "BraTS2021_00003" /
             "BraTS2021_00003_flair.nii.gz")
    files = case_files(tmp_path / "BraTS2021_00003", "brats2021")
    with pytest.raises(BratsError, match=r"BraTS2021_00003_flair\.nii\.gz: affine differs from t1 by up to 0\.5"):
        validate_case(files, "brats2021")
    validate_case(files, "brats2021", atol=0.6)


def test_nan_voxels(tmp_path):
    vol = make_arrays()[0]["t1ce"].astype(np.float32)
    vol[1, 2, 3] = np.nan
    vol[2, 2, 3] = np.inf
    with pytest.raises(BratsError, match=r"BraTS2021_00003_t1ce\.nii\.gz: 2 NaN or Inf voxels"):
        validate_case(bad_case(tmp_path, "t1ce", vol), "brats2021")


def test_all_zero_modality(tmp_path):
    with pytest.raises(BratsError, match=r"BraTS2021_00003: BraTS2021_00003_t2\.nii\.gz: t2 image is all zero"):
        validate_case(bad_case(tmp_path, "t2", np.zeros(SHAPE, np.int16)), "brats2021")


def test_labels_outside_allowed_set(tmp_path):
    seg = make_arrays()[1]
    seg[0, 0, 0] = 3  # ET is 4 in BraTS 2021
    with pytest.raises(BratsError, match=r"BraTS2021_00003_seg\.nii\.gz: label values \[3\] are not brats2021 labels "
                                         r"\(allowed \[0, 1, 2, 4\]; brats2021 cases label ET as 4\)"):
        validate_case(bad_case(tmp_path, "seg", seg), "brats2021")


def test_float_labels(tmp_path):
    seg = make_arrays()[1].astype(np.float32)
    files = bad_case(tmp_path, "seg", seg, case="BraTS2021_00007")
    validate_case(files, "brats2021")  # integer-valued floats: fine
    _, labels, _ = load_validated_case(files, "brats2021", [])
    assert np.issubdtype(labels.dtype, np.integer)
    np.testing.assert_array_equal(labels, make_arrays()[1])
    seg[5, 5, 5] = 0.5
    with pytest.raises(BratsError, match=r"BraTS2021_00003_seg\.nii\.gz: label map holds non-integer values "
                                         r"\(e\.g\. 0\.5\)"):
        validate_case(bad_case(tmp_path, "seg", seg), "brats2021")


def test_float_labels_too_large_for_int16_are_not_wrapped_into_valid_ones(tmp_path):
    seg = make_arrays()[1].astype(np.float32)
    seg[0, 0, 0] = 65540.0  # int16 would wrap this to 4: ET in BraTS 2021
    files = bad_case(tmp_path, "seg", seg)
    with pytest.raises(BratsError, match=r"^BraTS2021_00003: BraTS2021_00003_seg\.nii\.gz: label map holds values "
                                         r"far outside the BraTS labels \(e\.g\. 65540\.0\)$"):
        validate_case(files, "brats2021")
    with pytest.raises(BratsError, match=r"BraTS2021_00003_seg\.nii\.gz: label map holds values far outside"):
        read_case_files(files, [])


def test_read_case_files(tmp_path):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    write_case(tmp_path, "BraTS2021_00000", affine=affine)
    files = case_files(tmp_path / "BraTS2021_00000", "brats2021")
    images, seg, meta = read_case_files(files, ["t1ce", "flair"])
    expected, expected_seg = make_arrays()
    assert list(images) == ["t1ce", "flair"]
    assert images["flair"].dtype == np.float32
    np.testing.assert_array_equal(images["flair"], expected["flair"])
    np.testing.assert_array_equal(seg, expected_seg)
    assert np.issubdtype(seg.dtype, np.integer)
    assert meta["shape"] == [32, 32, 24]
    assert meta["spacing"] == [1.0, 1.0, 2.0]
    assert meta["affine"] == affine.tolist()
    assert meta["files"]["t1ce"] == str(files.images["t1ce"])
