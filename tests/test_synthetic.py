"""Synthetic BraTS-like cases: determinism, files on disk, labels, anatomy of the tumour, contrasts, resuming."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import platform

import nibabel as nib
import numpy as np
import pytest
import scipy
from helpers import FIXTURES, make_case
from scipy import ndimage as ndi

from brats_unet.cli.synth import main
from brats_unet.data.labels import MODALITIES
from brats_unet.runtime import detect
from brats_unet.synth import anatomy as A
from brats_unet.synth import generator as S
from brats_unet.synth import releases as R
from brats_unet.synth import tumour as T
from brats_unet.utils import BratsError

SMALL = (64, 64, 48)
FILES_2021 = ["BraTS2021_00001_flair.nii.gz", "BraTS2021_00001_seg.nii.gz", "BraTS2021_00001_t1.nii.gz",
              "BraTS2021_00001_t1ce.nii.gz", "BraTS2021_00001_t2.nii.gz"]
FILES_2023 = ["BraTS-GLI-00001-000-seg.nii.gz", "BraTS-GLI-00001-000-t1c.nii.gz", "BraTS-GLI-00001-000-t1n.nii.gz",
              "BraTS-GLI-00001-000-t2f.nii.gz", "BraTS-GLI-00001-000-t2w.nii.gz"]


@pytest.fixture(scope="module")
def small_cases() -> list[S.SynthCase]:
    """Cases 0..5 of seed 0 at SMALL (the conftest cases)."""
    return [S.generate_case(S.case_rng(0, i), SMALL) for i in range(6)]


def best_threshold_accuracy(a: np.ndarray, b: np.ndarray) -> float:
    """Best balanced accuracy of any single intensity threshold separating samples a from samples b (1.0: perfect)."""
    values = np.concatenate([a, b])
    is_b = np.concatenate([np.zeros(len(a), bool), np.ones(len(b), bool)])[np.argsort(values, kind="stable")]
    below_a = np.concatenate([[0], np.cumsum(~is_b)]) / len(a)  # share of a below each cut
    below_b = np.concatenate([[0], np.cumsum(is_b)]) / len(b)
    acc = 0.5 * (below_a + 1 - below_b)  # "a below the cut"
    return float(max(acc.max(), (1 - acc).max()))


def test_best_threshold_accuracy_by_hand():
    assert best_threshold_accuracy(np.array([1, 2]), np.array([3, 4])) == 1.0
    assert best_threshold_accuracy(np.array([5, 6]), np.array([3, 4])) == 1.0
    # a = {1, 3}, b = {2, 4}: the best cut (below 2) gets 1 of 2 a's and 2 of 2 b's right -> 0.75
    assert best_threshold_accuracy(np.array([1, 3]), np.array([2, 4])) == 0.75


def test_generate_case_deterministic_types_and_composition(small_cases):
    images, seg, affine = make_case(S.case_rng(0, 0), SMALL)
    again, seg_again, _ = make_case(S.case_rng(0, 0), SMALL)
    other, seg_other, _ = make_case(S.case_rng(1, 0), SMALL)
    case = small_cases[0]
    assert list(images) == list(MODALITIES)
    for m in MODALITIES:
        assert images[m].dtype == np.int16 and images[m].shape == SMALL
        np.testing.assert_array_equal(images[m], again[m])
        np.testing.assert_array_equal(images[m], case.images[m])  # make_case = generate_case in 2021 labels
        assert not np.array_equal(images[m], other[m])
        # skull-stripped: zero outside the brain, positive inside (bar a few noisy edge voxels)
        assert (images[m][case.tissue == 0] == 0).all()
        assert (images[m][case.tissue > 0] > 0).mean() > 0.99
    assert seg.dtype == np.uint8
    np.testing.assert_array_equal(seg, seg_again)
    np.testing.assert_array_equal(seg, np.where(case.classes == 3, 4, case.classes))
    assert not np.array_equal(seg, seg_other)
    assert {0, 2, 4} <= set(np.unique(seg).tolist()) <= {0, 1, 2, 4}
    np.testing.assert_array_equal(case.classes, T.TISSUE_CLASS[case.tissue])
    assert (case.tissue[seg > 0] > 0).all()  # the tumour lies in the brain
    np.testing.assert_array_equal(affine, S.brats_affine(SMALL, S.physical_spacing(SMALL)))
    np.testing.assert_array_equal(S.generate_case(S.case_rng(0, 0), SMALL, spacing=(1, 1, 1)).affine,
                                  S.brats_affine(SMALL))


def test_brats_affine_by_hand():
    expected = [[-1, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]]  # the BraTS 2021 affine
    np.testing.assert_array_equal(S.brats_affine(), expected)
    expected = [[-2, 0, 0, 0], [0, -2, 0, 38], [0, 0, 3, 0], [0, 0, 0, 1]]
    np.testing.assert_array_equal(S.brats_affine((10, 20, 30), (2, 2, 3)), expected)


def test_atlas_is_the_mni152_template_in_brats_order():
    atlas = A.load_atlas()
    wm, gm, csf = atlas.tissue
    brain = atlas.tissue.sum(0) > 0.5
    # The 2009 template's skull-stripped brain (with brainstem and cerebellum): ~1.9 l at 1 mm, GM > WM > CSF.
    assert 1700 < brain.sum() / 1000 < 2000
    assert gm.sum() > wm.sum() > csf.sum() > 0.05 * brain.sum()
    np.testing.assert_allclose(atlas.tissue.sum(0)[brain], 1.0, atol=1e-5)
    # BraTS voxel order (LPS): j grows towards the back of the head. The lowest 30 slices of the brain hold the
    # brainstem and cerebellum, which lie behind the brain's centre; real T1: WM brighter than GM brighter than CSF.
    z0 = np.argwhere(brain)[:, 2].min()
    assert np.argwhere(brain[:, :, z0:z0 + 30])[:, 1].mean() > atlas.centre[1] + 10
    t1 = {name: atlas.t1[p > 0.9].mean() for name, p in zip(A.HEALTHY, atlas.tissue, strict=True)}
    assert t1["wm"] > t1["gm"] > 1.5 * t1["csf"]


def test_heads_have_real_anatomy(small_cases):
    voxel_ml = np.prod(S.physical_spacing(SMALL)) / 1000
    brains = []
    for case in small_cases:
        h = case.healthy
        brain = h > 0
        brains.append(brain)
        ml = brain.sum() * voxel_ml
        assert 1100 < ml < 1900, ml  # adult brain volumes (the template, shrunk to BraTS-like sizes)
        shares = {t: (h == T.TISSUES.index(t)).sum() / brain.sum() for t in ("wm", "gm", "csf")}
        assert 0.2 < shares["wm"] < 0.5 and 0.4 < shares["gm"] < 0.7 and 0.02 < shares["csf"] < 0.25, shares
        # Ventricles: CSF deep inside the brain (> 25 mm from its surface), several ml of it.
        depth = ndi.distance_transform_edt(brain, sampling=S.physical_spacing(SMALL))
        assert ((h == T.CSF) & (depth > 25)).sum() * voxel_ml > 3
        # Cortex: the healthy outer 7 mm shell is grey matter and sulcal CSF, the deep brain largely white matter.
        shell = brain & (depth <= 7) & (case.classes == 0)
        deep = brain & (depth > 20) & (case.classes == 0)
        assert (h[shell] == T.WM).mean() < 0.05 and (h[shell] == T.GM).mean() > 0.4
        assert (h[deep] == T.WM).mean() > 0.35
    # No two heads are the same: shapes differ by warp, size and pose.
    for a, b in [(0, 1), (1, 2), (0, 2)]:
        dice = 2 * (brains[a] & brains[b]).sum() / (brains[a].sum() + brains[b].sum())
        assert 0.8 < dice < 0.99


def test_mass_effect_moves_tissue_out_by_hand():
    pose = A.Pose(np.eye(3), np.zeros(3), [], 0.0, 0.0)  # identity: atlas = centre + (p - HEAD_CENTRE)
    pose.warp = [lambda axes: 0.0] * 3
    centre = A.HEAD_CENTRE_MM + [10.0, 0.0, 0.0]
    axes = [np.array([centre[0] + 20.0], np.float32), np.array([centre[1]], np.float32),
            np.array([centre[2]], np.float32)]
    plain = A.atlas_coordinates(pose, axes)[:, 0, 0, 0]
    pushed = A.atlas_coordinates(pose, axes, [A.Push(centre, 10.0)])[:, 0, 0, 0]
    np.testing.assert_allclose(plain, A.load_atlas().centre + [30.0, 0, 0], atol=1e-4)
    # A point 20 mm from the lesion shows the tissue that was at (20^3 - 10^3)^(1/3) = 19.13 mm: pushed out 0.87 mm.
    np.testing.assert_allclose(pushed - plain, [7000 ** (1 / 3) - 20, 0, 0], atol=1e-3)


def test_tumours_grow_inside_the_anatomy(small_cases):
    for case in small_cases:
        seg, h = case.classes, case.healthy
        ncr, et, tc, wt, ed = seg == 1, seg == 3, np.isin(seg, (1, 3)), seg > 0, seg == 2
        assert wt.any() and ed.any() and tc.any()
        # necrosis is enclosed by the core: no face neighbour of an NCR voxel is oedema or healthy
        if et.any():
            assert not (ndi.binary_dilation(ncr) & ~tc).any()
        # oedema spreads through white matter: never over what was CSF, mostly over what was WM
        assert not (ed & (h == T.CSF)).any()
        assert (h[ed] == T.WM).mean() > 0.6
        # the core displaces CSF rather than filling it; everything stays inside the brain
        assert (h[tc] == T.CSF).mean() < 0.15
        assert (h[wt] > 0).all()
        assert 0.05 < tc.sum() / wt.sum() < 0.8


def test_class_shares_are_brats_like(small_cases):
    """Over the six conftest cases: BraTS-like class shares (paper: NCR 0.16 %, ED 0.79 %, ET 0.25 %) and variety."""
    shares = np.array([np.bincount(c.classes.ravel(), minlength=4) / c.classes.size * 100 for c in small_cases])
    mean = shares.mean(0)
    assert 0.05 < mean[1] < 0.5 and 0.3 < mean[2] < 1.6 and 0.05 < mean[3] < 0.6, mean
    assert shares[:, 1:].sum(1).min() > 0.2 and shares[:, 1:].sum(1).max() < 4  # whole tumour ~ 18-350 ml
    # most cases show all three classes (the tests' tiny datasets rely on it); lower-grade ones may not enhance
    assert sum(set(np.unique(c.classes).tolist()) == {0, 1, 2, 3} for c in small_cases) >= 4


def test_tumour_kinds_and_cavity():
    rng = np.random.default_rng(0)
    axes, spacing = A.grid_axes(SMALL), tuple(S.physical_spacing(SMALL))
    probs, _ = A.sample_tissue(A.Pose.draw(rng), axes, spacing)
    base = T.draw_lesions(rng, axes, probs, np.ones(probs.shape[1:], bool))[0]
    labels = {}
    for kind in T.KINDS:
        les = dataclasses.replace(base, kind=kind, core_mm=20.0, rim_mm=6.0)
        labels[kind] = T.paint_lesions(np.random.default_rng(1), [les], axes, probs, spacing)
    assert set(np.unique(labels["necrotic"]).tolist()) == {0, T.ED, T.ET, T.NCR}
    assert set(np.unique(labels["solid"]).tolist()) == {0, T.ED, T.ET}
    assert set(np.unique(labels["nonenhancing"]).tolist()) == {0, T.ED, T.NET}
    # the same core in all three: only its labels differ
    cores = [np.isin(v, (T.ET, T.NCR, T.NET)) for v in labels.values()]
    assert all(np.array_equal(cores[0], c) for c in cores[1:])
    case = S.generate_case(S.case_rng(0, 0), SMALL, cavity=True)
    hole = case.tissue == T.CAVITY
    assert hole.sum() > 10 and (case.classes[hole] == 0).all()
    assert case.images["t2"][hole].mean() > 1.5 * case.images["t2"][case.tissue == T.WM].mean()  # fluid


def test_contrasts_follow_the_table(small_cases):
    for case in small_cases:
        def mean(modality, t, case=case):
            return case.images[modality][case.tissue == T.TISSUES.index(t)].mean()

        assert mean("flair", "ed") > 1.3 * mean("flair", "wm")
        if (case.tissue == T.ET).sum() > 20:
            assert mean("t1ce", "et") > 1.25 * mean("t1ce", "ed")
        assert mean("t2", "csf") > 1.3 * mean("t2", "wm") and mean("t2", "csf") > 1.1 * mean("t2", "gm")
        if (case.tissue == T.NCR).sum() > 20:
            assert mean("t1", "ncr") < 0.8 * mean("t1", "wm")
        assert mean("t1", "gm") < mean("t1", "wm") and mean("t1", "csf") < mean("t1", "gm")


def test_no_single_modality_separates_all_classes(small_cases):
    for case in small_cases:
        seg, tissue, images = case.classes, case.tissue, case.images
        classes = {"healthy": (tissue > 0) & (seg == 0), "ncr": seg == 1, "ed": seg == 2, "et": seg == 3}
        classes = {k: v for k, v in classes.items() if v.sum() > 20}
        for m in MODALITIES:
            x = images[m]
            worst = min(best_threshold_accuracy(x[classes[a]], x[classes[b]])
                        for i, a in enumerate(classes) for b in list(classes)[i + 1:])
            assert worst < 0.9, f"{m} separates every pair of classes (worst pair {worst:.3f})"


@pytest.mark.parametrize(("layout", "cases", "names", "labels"), [
    ("brats2021", ["BraTS2021_00000", "BraTS2021_00001"], FILES_2021, {0, 1, 2, 4}),
    ("brats2023", ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000"], FILES_2023, {0, 1, 2, 3}),
])
def test_write_dataset_files(tmp_path, small_cases, layout, cases, names, labels):
    folders = S.write_dataset(tmp_path, cases=2, seed=0, layout=layout, shape=SMALL)
    assert folders == [tmp_path / c for c in cases]
    assert sorted(p.name for p in tmp_path.iterdir()) == cases
    assert sorted(os.listdir(folders[1])) == names
    images, seg = small_cases[1].images, S.schema_seg(small_cases[1], "brats2021")  # written case 1 == generated case 1
    by_modality = dict(zip(["flair", "seg", "t1", "t1ce", "t2"] if layout == "brats2021"
                           else ["seg", "t1ce", "t1", "flair", "t2"], names, strict=True))
    for key, name in by_modality.items():
        img = nib.load(folders[1] / name)
        data = np.asarray(img.dataobj)
        np.testing.assert_allclose(img.affine, S.brats_affine(SMALL, S.physical_spacing(SMALL)), rtol=1e-6)
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        np.testing.assert_allclose(img.header.get_qform(), S.brats_affine(SMALL, S.physical_spacing(SMALL)))
        if key == "seg":
            assert img.get_data_dtype() == np.uint8
            assert set(np.unique(data).tolist()) == labels
            np.testing.assert_array_equal(data == max(labels), seg == 4)
            np.testing.assert_array_equal(data[seg != 4], seg[seg != 4])
        else:
            assert img.get_data_dtype() == np.int16
            np.testing.assert_array_equal(data, images[key])


def test_case_does_not_depend_on_case_count(tmp_path):
    one = S.write_dataset(tmp_path / "a", cases=1, seed=3, shape=SMALL)[0]
    three = S.write_dataset(tmp_path / "b", cases=3, seed=3, shape=SMALL, workers=2)[0]
    for name in os.listdir(one):
        np.testing.assert_array_equal(np.asarray(nib.load(one / name).dataobj),
                                      np.asarray(nib.load(three / name).dataobj))


def test_rerun_skips_complete_cases_and_resumes(tmp_path, capsys):
    folders = S.write_dataset(tmp_path, cases=2, seed=0, shape=SMALL)
    seg0 = folders[0] / "BraTS2021_00000_seg.nii.gz"
    seg1 = folders[1] / "BraTS2021_00001_seg.nii.gz"
    before = seg0.stat().st_mtime_ns
    # simulate a kill while writing case 1: seg missing, a stale temp file left behind
    seg1.unlink()
    (folders[1] / ".tmp-BraTS2021_00001_seg.nii-abc.nii.gz").write_bytes(b"partial")
    S.write_dataset(tmp_path, cases=2, seed=0, shape=SMALL, progress=True)
    out = capsys.readouterr().out
    assert "[1/2] BraTS2021_00000: complete, skipped" in out
    assert "[2/2] BraTS2021_00001: written" in out
    assert seg0.stat().st_mtime_ns == before and seg1.exists()
    assert sorted(os.listdir(folders[1])) == FILES_2021  # stale temp file removed


def test_refuses_foreign_or_other_seed_folders(tmp_path):
    S.write_dataset(tmp_path, cases=1, seed=0, shape=SMALL)
    with pytest.raises(BratsError, match=r"BraTS2021_00000 already holds BraTS2021_00000_flair.nii.gz, which is "
                                         r"not this synthetic case \(brats-synth v3 seed=1 case=0"):
        S.write_dataset(tmp_path, cases=1, seed=1, shape=SMALL)
    with pytest.raises(BratsError, match=r"shape \[32, 32, 24\]"):  # same seed, other shape: not complete
        S.write_dataset(tmp_path, cases=1, seed=0, shape=(32, 32, 24))
    (tmp_path / "BraTS2021_00000" / "notes.txt").write_text("real data")
    with pytest.raises(BratsError, match=r"BraTS2021_00000 already holds notes.txt.*pass overwrite"):
        S.write_dataset(tmp_path, cases=1, seed=0, shape=SMALL)
    S.write_dataset(tmp_path, cases=1, seed=1, shape=SMALL, overwrite=True)
    header = nib.load(tmp_path / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz").header
    assert bytes(header["descrip"]).rstrip(b"\0") == b"brats-synth v3 seed=1 case=0"


def test_input_errors(tmp_path):
    with pytest.raises(BratsError, match="cases must be at least 1, got 0"):
        S.write_dataset(tmp_path, cases=0, seed=0)
    with pytest.raises(BratsError, match=r"shape must be three sizes of at least 16 voxels, got \[64, -1, 48\]"):
        S.write_dataset(tmp_path, cases=1, seed=0, shape=(64, -1, 48))
    (tmp_path / "file").write_text("x")
    with pytest.raises(BratsError, match=r"cannot create output folder .*file/sub"):
        S.write_dataset(tmp_path / "file" / "sub", cases=1, seed=0, shape=SMALL)
    with pytest.raises(BratsError, match="unknown data layout 'brats2019'"):
        S.write_dataset(tmp_path, cases=1, seed=0, layout="brats2019", shape=SMALL)


def test_cli_writes_2023_layout_and_reports_folder(tmp_path, capsys):
    main(["--out", str(tmp_path / "syn"), "--cases", "1", "--seed", "0", "--layout", "2023", "--shape", "32", "32",
          "24", "--workers", "1"])
    out = capsys.readouterr().out
    assert "[1/1] BraTS-GLI-00000-000: written" in out
    assert f"1 synthetic cases in {(tmp_path / 'syn').resolve()}" in out
    seg = nib.load(tmp_path / "syn" / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-seg.nii.gz")
    expected = make_case(S.case_rng(0, 0), (32, 32, 24))[1]  # BraTS 2021 labels: ET 4 becomes 3 in 2023
    np.testing.assert_array_equal(np.asarray(seg.dataobj), np.where(expected == 4, 3, expected))
    np.testing.assert_allclose(seg.header.get_zooms(), (7.5, 7.5, 155 / 24))


@pytest.mark.parametrize(("args", "message"), [
    (["--cases", "0"], "error: cases must be at least 1, got 0"),
    (["--shape", "64", "-2", "48"], "error: shape must be three sizes of at least 16 voxels"),
    (["--out", "{tmp}/file/sub"], "error: cannot create output folder"),
])
def test_cli_errors_exit_2_without_traceback(tmp_path, capsys, args, message):
    (tmp_path / "file").write_text("x")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.slow
def test_full_size_case_is_plausible():
    images, seg, affine = make_case(S.case_rng(0, 0))
    assert seg.shape == (240, 240, 155) and all(im.shape == seg.shape for im in images.values())
    brain_ml = (images["t1"] > 0).sum() / 1000  # 1 mm voxels
    wt_ml, tc_ml = (seg > 0).sum() / 1000, np.isin(seg, (1, 4)).sum() / 1000
    assert 1000 < brain_ml < 1800
    assert 20 < wt_ml < 200 and 0.1 < tc_ml / wt_ml < 0.7
    for m in MODALITIES:  # WM at 300-1200 units (times bias and per-case contrast), far below int16 limits
        assert 150 < np.median(images[m][images[m] > 0]) < 4000 and images[m].max() < 15_000


def _digests(root) -> dict[str, str]:
    """sha256 (16 hex) of each file under root; NIfTI digested decompressed, so the zlib version does not matter."""
    out = {}
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        data = p.read_bytes()
        out[str(p.relative_to(root))] = hashlib.sha256(gzip.decompress(data) if p.name.endswith(".gz")
                                                       else data).hexdigest()[:16]
    return out


def test_written_files_are_the_recorded_ones(tmp_path):
    """The files brats-synth writes, byte for byte, as recorded in tests/fixtures/synth_digests.json (written by the
    generator before write_dataset was split into small functions). Float rounding differs between CPUs and library
    versions, so the comparison runs only in the environment the digests were recorded in."""
    recorded = json.loads((FIXTURES / "synth_digests.json").read_text())
    env = {"cpu": detect("cpu").name, "machine": platform.machine(), "numpy": np.__version__,
           "scipy": scipy.__version__, "nibabel": nib.__version__}
    if env != recorded["environment"]:
        pytest.skip(f"digests recorded in {recorded['environment']}, this is {env}")
    for layout, want in recorded["layouts"].items():
        S.write_dataset(tmp_path / layout, want["cases"], recorded["seed"], layout=layout, shape=recorded["shape"])
        assert _digests(tmp_path / layout) == want["files"], layout


# ---- distractors, healthy heads, metastases and paediatric cysts (issue 20 section 3, issue 19 item 7) ----

def test_distractors_are_background_bright_where_they_should_be_and_change_nothing_else(small_cases):
    from brats_unet.synth.distractors import CAP, PLEXUS, VESSEL, WMH

    release = R.resolve_release("2021")
    kinds = set()
    for i in (0, 3):  # between them, all four kinds
        plain = small_cases[i]
        case = S.generate_case(S.case_rng(0, i), SMALL, **S.case_options(release, 0, i, S.Options(distractors=True)))
        d = case.distractors
        np.testing.assert_array_equal(case.classes, plain.classes)  # same tumour, same labels: distractors are 0
        assert plain.distractors is None and not (d > 0)[case.classes > 0].any() and (case.tissue[d > 0] > 0).all()
        far = ~ndi.binary_dilation(d > 0, iterations=3)  # beyond the blur's reach the images are the same
        for m in MODALITIES:
            np.testing.assert_array_equal(case.images[m][far], plain.images[m][far])
        wm = {m: np.median(case.images[m][(case.healthy == 1) & far]) for m in MODALITIES}
        for code, modality in ((PLEXUS, "t1ce"), (VESSEL, "t1ce"), (CAP, "flair"), (WMH, "flair")):
            if (d == code).sum() >= 3:
                kinds.add(code)
                assert np.median(case.images[modality][d == code]) > 1.1 * wm[modality], (i, code)
    assert kinds == {PLEXUS, VESSEL, CAP, WMH}


def test_healthy_fraction_gives_heads_without_tumour_and_is_part_of_the_case_identity(tmp_path):
    # Case i is healthy when frac((i + 1) * 0.618...) < 0.4: 0.618, 0.236, 0.854, 0.472, 0.090 -> cases 1 and 4.
    folders = S.write_dataset(tmp_path, cases=5, seed=0, shape=(32, 32, 24), healthy_fraction=0.4)
    tumour = [bool(np.asarray(nib.load(f / f"{f.name}_seg.nii.gz").dataobj).any()) for f in folders]
    assert tumour == [True, False, True, True, False]
    header = nib.load(folders[1] / "BraTS2021_00001_t1.nii.gz").header
    assert bytes(header["descrip"]).rstrip(b"\0") == b"brats-synth v3 seed=0 case=1 healthy=0.4"
    assert (np.asarray(nib.load(folders[1] / "BraTS2021_00001_t1.nii.gz").dataobj) > 0).sum() > 1000  # a head
    with pytest.raises(BratsError, match=r"not this synthetic case \(brats-synth v3 seed=0 case=0 \+distractors"):
        S.write_dataset(tmp_path, cases=1, seed=0, shape=(32, 32, 24), distractors=True)
    with pytest.raises(BratsError, match=r"healthy fraction must be in \[0, 1\], got 1.5"):
        S.write_dataset(tmp_path / "x", cases=1, seed=0, shape=(32, 32, 24), healthy_fraction=1.5)


def test_paediatric_cases_hold_cysts_and_metastases_include_small_lesions():
    # Before: a PED label map never held CC (3), and MET cases were one glioma of 2-110 cm3.
    ped, met = R.resolve_release("ped"), R.resolve_release("met")
    cc = [3 in S.schema_seg(S.generate_case(S.case_rng(0, i), SMALL, **S.case_options(ped, 0, i, S.Options())),
                            ped.label_schema) for i in range(2)]
    assert cc == [True, False]  # CYSTS: half of the tumours
    voxel_ml = np.prod(S.physical_spacing(SMALL)) / 1000
    lesions = []
    for i in range(2):
        case = S.generate_case(S.case_rng(0, i), SMALL, **S.case_options(met, 0, i, S.Options()))
        labels, n = ndi.label(np.isin(case.classes, (1, 3)), ndi.generate_binary_structure(3, 3))
        lesions += (np.bincount(labels.ravel())[1:] * voxel_ml).tolist()
    assert len(lesions) >= 4 and min(lesions) < 0.5  # several lesions per case, some under half a millilitre


def test_cli_distractor_options(tmp_path, capsys):
    main(["--out", str(tmp_path / "syn"), "--cases", "2", "--shape", "32", "32", "24", "--workers", "1",
          "--distractors", "--healthy-fraction", "1"])
    seg = nib.load(tmp_path / "syn" / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz")
    assert not np.asarray(seg.dataobj).any()
    assert bytes(seg.header["descrip"]).rstrip(b"\0") == b"brats-synth v3 seed=0 case=0 +distractors healthy=1"
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "x"), "--healthy-fraction", "-0.1"])
    assert exc.value.code == 2 and "error: healthy fraction must be in [0, 1], got -0.1" in capsys.readouterr().err


def test_nonenhancing_share_sets_the_kind_shares_and_is_part_of_the_case_identity(tmp_path, capsys):
    assert T.kinds_with(None) == T.KINDS
    # 0.25 non-enhancing; necrotic and solid keep their 77 : 15 ratio in the remaining 0.75
    assert T.kinds_with(0.25) == pytest.approx({"necrotic": 0.77 / 0.92 * 0.75, "solid": 0.15 / 0.92 * 0.75,
                                                "nonenhancing": 0.25})
    assert sum(T.kinds_with(0.6).values()) == pytest.approx(1.0)
    # share 1: every glioma is non-enhancing (core labelled NCR = 1, no ET = 4)
    main(["--out", str(tmp_path / "ne"), "--cases", "2", "--shape", "32", "32", "24", "--workers", "1",
          "--nonenhancing-share", "1", "--quiet"])
    S.write_dataset(tmp_path / "plain", cases=2, seed=0, shape=(32, 32, 24))
    for i in range(2):
        name = f"BraTS2021_0000{i}"
        seg = nib.load(tmp_path / "ne" / name / f"{name}_seg.nii.gz")
        labels = np.asarray(seg.dataobj)
        assert set(np.unique(labels).tolist()) == {0, 1, 2}
        assert bytes(seg.header["descrip"]).rstrip(b"\0") == f"brats-synth v3 seed=0 case={i} nonenhancing=1".encode()
        plain = np.asarray(nib.load(tmp_path / "plain" / name / f"{name}_seg.nii.gz").dataobj)
        assert 4 in plain  # both seed-0 cases enhance by default
    with pytest.raises(BratsError, match=r"not this synthetic case \(brats-synth v3 seed=0 case=0 nonenhancing=0.5"):
        S.write_dataset(tmp_path / "ne", cases=1, seed=0, shape=(32, 32, 24), nonenhancing=0.5)
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "x"), "--nonenhancing-share", "1.2"])
    assert exc.value.code == 2 and "error: non-enhancing share must be in [0, 1], got 1.2" in capsys.readouterr().err
