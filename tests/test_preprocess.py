"""brats_unet.data.preprocess: hand-computed values on tiny arrays."""

from __future__ import annotations

import numpy as np
import pytest

from brats_unet.data.preprocess import minmax, minmax_slice, nonzero_bbox, preprocess_case, undo_crop, zscore
from brats_unet.utils import BratsError

SEED = dict(modalities=["t1ce", "t2", "flair"], normalize="minmax", crop="fixed", foreground_channel=False,
            schema="brats2021")
MODERN = dict(modalities=["t1", "t1ce", "t2", "flair"], normalize="zscore", crop="nonzero", crop_box=None,
              schema="brats2021")


def test_minmax_hand_computed():
    x = np.array([[2.0, 4.0], [6.0, 10.0]])
    np.testing.assert_allclose(minmax(x), [[0.0, 0.25], [0.5, 1.0]])
    assert minmax(x).dtype == np.float32
    np.testing.assert_array_equal(minmax(np.full((2, 3), 7.0)), np.zeros((2, 3)))


def test_minmax_slice_scales_each_axial_slice_on_its_own():
    x = np.zeros((2, 2, 3))
    x[..., 0] = [[2.0, 4.0], [6.0, 10.0]]  # slice 0: min 2, max 10
    x[..., 1] = [[-1.0, 0.0], [1.0, 3.0]]  # slice 1: min -1, max 3
    x[..., 2] = 5.0  # constant slice -> zeros (sklearn's zero-range rule)
    out = minmax_slice(x)
    assert out.dtype == np.float32 and out.shape == (2, 2, 3)
    np.testing.assert_allclose(out[..., 0], [[0.0, 0.25], [0.5, 1.0]])
    np.testing.assert_allclose(out[..., 1], [[0.0, 0.25], [0.5, 1.0]])
    np.testing.assert_array_equal(out[..., 2], np.zeros((2, 2)))
    # The per-volume scaling of the same array differs: slice 1 is squeezed into [0, 11/11] by the volume range.
    np.testing.assert_allclose(minmax(x)[..., 1], [[0.0, 1 / 11], [2 / 11, 4 / 11]], rtol=1e-6)


def test_seed_recipe_with_minmax_slice_normalises_before_the_crop():
    images = _images((6, 5, 4))
    images["t2"][0, 0, 1] = 1000.0  # outside the crop, but it is slice 1's maximum
    box = [[1, 5], [1, 4], [0, 4]]
    x, _, meta = preprocess_case(images, None, crop_box=box, **{**SEED, "normalize": "minmax_slice"})
    v = images["t2"].astype(np.float64)
    lo, hi = v.min(axis=(0, 1)), v.max(axis=(0, 1))
    np.testing.assert_allclose(x[1], ((v - lo) / (hi - lo))[1:5, 1:4, 0:4], rtol=1e-6)
    assert x[1, :, :, 1].max() < 0.11  # slice 1 scaled by its own 1000, slice 0 by its own max
    assert meta["normalize"] == "minmax_slice" and meta["norm_stats"]["t2"]["max"] == 1000.0


def test_zscore_hand_computed():
    x = np.array([0.0, 1.0, 2.0, 3.0, 9.0])
    mask = np.array([False, True, True, True, False])
    # over the mask: mean 2, population std sqrt(2/3); outside the mask: 0 (even where x is 9)
    s = np.sqrt(2 / 3)
    np.testing.assert_allclose(zscore(x, mask), [0.0, -1 / s, 0.0, 1 / s, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(zscore(x, np.zeros(5, bool)), np.zeros(5))
    np.testing.assert_array_equal(zscore(np.full(5, 3.0), mask), np.zeros(5))


def test_nonzero_bbox_is_union_half_open():
    a, b = np.zeros((6, 7, 8)), np.zeros((6, 7, 8))
    a[1, 2, 3] = 5
    b[4, 5, 3] = -1
    b[2, 3, 6] = 1
    assert nonzero_bbox([a, b]) == [[1, 5], [2, 6], [3, 7]]
    assert nonzero_bbox([a]) == [[1, 2], [2, 3], [3, 4]]
    assert nonzero_bbox([np.zeros((2, 3, 4))]) == [[0, 2], [0, 3], [0, 4]]


def _images(shape, seed=0):
    rng = np.random.default_rng(seed)
    return {m: rng.uniform(1, 100, size=shape).astype(np.float32) for m in ("t1", "t1ce", "t2", "flair")}


def test_seed_minmax_whole_volume_then_crop_channel_order():
    images = _images((10, 9, 8))
    images["t2"][0, 0, 0] = -50.0  # the min and max sit outside the crop: normalisation must see the whole volume
    images["t2"][9, 8, 7] = 500.0
    seg = np.zeros((10, 9, 8), np.uint8)
    seg[3, 3, 3], seg[4, 4, 4], seg[5, 5, 5] = 1, 2, 4
    box = [[2, 8], [1, 7], [3, 6]]
    x, y, meta = preprocess_case(images, seg, crop_box=box, **SEED)
    assert x.shape == (3, 6, 6, 3) and x.dtype == np.float32
    expected_t2 = (images["t2"][2:8, 1:7, 3:6] + 50.0) / 550.0
    np.testing.assert_allclose(x[1], expected_t2, rtol=1e-6)
    for c, m in enumerate(["t1ce", "t2", "flair"]):
        v = images[m]
        np.testing.assert_allclose(x[c], ((v - v.min()) / (v.max() - v.min()))[2:8, 1:7, 3:6], rtol=1e-6)
    assert y.dtype == np.uint8
    assert (y[1, 2, 0], y[2, 3, 1], y[3, 4, 2]) == (1, 2, 3)  # BraTS 4 -> class 3, shifted by the box origin
    assert int(y.sum()) == 6
    assert meta["crop_box"] == box and meta["original_shape"] == [10, 9, 8]
    assert meta["modalities"] == ["t1ce", "t2", "flair"] and meta["normalize"] == "minmax"
    assert meta["norm_stats"]["t2"] == {"min": -50.0, "max": 500.0}


def test_seed_paper_crop_gives_128_cube():
    shape = (184, 184, 141)  # the smallest volume the paper's box [56:184, 56:184, 13:141] fits in
    vol = np.zeros(shape, np.int16)
    vol[56, 56, 13], vol[183, 183, 140], vol[0, 0, 0] = 30, 20, 60
    images = {m: vol for m in ("t1ce", "t2", "flair")}
    x, y, meta = preprocess_case(images, None, crop_box=[[56, 184], [56, 184], [13, 141]], **SEED)
    assert x.shape == (3, 128, 128, 128) and y is None
    assert x[0, 0, 0, 0] == pytest.approx(0.5) and x[2, 127, 127, 127] == pytest.approx(20 / 60)
    assert meta["cropped_shape"] == [128, 128, 128]


def test_crop_box_larger_than_volume():
    with pytest.raises(BratsError, match=r"crop box \[\[56, 184\], \[56, 184\], \[13, 141\]\] does not fit inside "
                                         r"the volume of shape \(160, 160, 100\)"):
        preprocess_case(_images((160, 160, 100)), None, crop_box=[[56, 184], [56, 184], [13, 141]], **SEED)


def test_modern_nonzero_crop_zscore_over_brain_and_foreground_channel():
    shape = (8, 8, 8)
    images = {m: np.zeros(shape, np.float32) for m in ("t1", "t1ce", "t2", "flair")}
    images["t1"][2:5, 3:6, 1:7] = 1.0
    images["t1"][2, 3, 1] = 4.0
    images["flair"][5, 5, 5] = 2.0  # brain = non-zero in ANY modality: extends the box to x=5
    x, y, meta = preprocess_case(images, None, foreground_channel=True, **MODERN)
    assert meta["crop_box"] == [[2, 6], [3, 6], [1, 7]]
    assert x.shape == (5, 4, 3, 6)
    # t1 over the 3*3*6 + 1 = 55 brain voxels: 53 ones, one 4, one 0 (the flair-only voxel)
    vals = np.array([1.0] * 53 + [4.0, 0.0])
    mean, std = vals.mean(), vals.std()
    assert x[0, 0, 0, 0] == pytest.approx((4 - mean) / std, rel=1e-5)
    assert x[0, 1, 1, 1] == pytest.approx((1 - mean) / std, rel=1e-5)
    assert x[0, 3, 2, 4] == pytest.approx((0 - mean) / std, rel=1e-5)  # brain voxel with t1 = 0
    assert x[0, 3, 0, 0] == 0.0  # outside the brain stays 0
    np.testing.assert_array_equal(x[1], 0.0)  # all-zero t1ce: constant -> zeros
    assert x[4].sum() == 55 and set(np.unique(x[4])) == {0.0, 1.0}
    assert meta["channels"] == ["t1", "t1ce", "t2", "flair", "foreground"]
    assert meta["norm_stats"]["t1"]["mean"] == pytest.approx(mean)


@pytest.mark.parametrize(("et_label", "schema"), [(4, "brats2021"), (3, "brats2023")])
def test_label_mapping(et_label, schema):
    seg = np.array([0, 1, 2, et_label, 0, 2], dtype=np.int16).reshape(1, 2, 3)
    images = {m: np.ones((1, 2, 3), np.float32) for m in ("t1", "t1ce", "t2", "flair")}
    _, y, _ = preprocess_case(images, seg, **{**MODERN, "schema": schema}, foreground_channel=False)
    np.testing.assert_array_equal(y.ravel(), [0, 1, 2, 3, 0, 2])


def test_bad_labels_and_bad_options():
    images = {m: np.ones((2, 2, 2), np.float32) for m in ("t1", "t1ce", "t2", "flair")}
    seg = np.zeros((2, 2, 2), np.int16)
    seg[0, 0, 0] = 3
    with pytest.raises(BratsError, match=r"label map: label values \[3\] are not brats2021 labels "
                                         r"\(allowed \[0, 1, 2, 4\]\)"):
        preprocess_case(images, seg, **MODERN, foreground_channel=False)
    with pytest.raises(BratsError, match=r"unknown preprocess.normalize 'robust'"):
        preprocess_case(images, None, **{**MODERN, "normalize": "robust"}, foreground_channel=False)
    with pytest.raises(BratsError, match=r"preprocess.modalities names \['dwi'\]"):
        preprocess_case(images, None, **{**MODERN, "modalities": ["t1", "dwi"]}, foreground_channel=False)


def test_undo_crop_round_trip():
    rng = np.random.default_rng(1)
    original = rng.integers(0, 4, size=(2, 10, 9, 8)).astype(np.uint8)
    box = [[2, 8], [1, 7], [3, 6]]
    cropped = original[:, 2:8, 1:7, 3:6]
    restored = undo_crop(cropped, box, (10, 9, 8), fill=0)
    assert restored.shape == (2, 10, 9, 8) and restored.dtype == np.uint8
    np.testing.assert_array_equal(restored[:, 2:8, 1:7, 3:6], cropped)
    inside = np.zeros((10, 9, 8), bool)
    inside[2:8, 1:7, 3:6] = True
    assert not restored[:, ~inside].any()
    # preprocess -> undo puts the labels back in the original geometry
    seg = np.zeros((10, 9, 8), np.uint8)
    seg[4, 4, 4] = 4
    images = {m: np.ones((10, 9, 8), np.float32) for m in ("t1ce", "t2", "flair")}
    _, y, meta = preprocess_case(images, seg, crop_box=box, **SEED)
    back = undo_crop(y, meta["crop_box"], meta["original_shape"])
    assert back.shape == (10, 9, 8) and back[4, 4, 4] == 3 and back.sum() == 3
    with pytest.raises(ValueError, match="does not match crop box"):
        undo_crop(cropped[:, :5], box, (10, 9, 8))


def test_recipe_is_checked_once_and_counts_its_channels() -> None:
    from brats_unet.data.preprocess import Recipe

    seed = Recipe.from_config({"name": "seed", "modalities": ["t1ce", "t2", "flair"], "normalize": "minmax",
                               "crop": "fixed", "crop_box": [[0, 2], [0, 2], [0, 2]]})
    assert seed.num_channels == 3 and seed.crop_box == ((0, 2), (0, 2), (0, 2))
    modern = Recipe.from_config({"name": "modern", "modalities": ["t1", "t1ce", "t2", "flair"], "normalize": "zscore",
                                 "crop": "nonzero", "foreground_channel": True})
    assert modern.num_channels == 5
    images = {m: np.arange(8, dtype=np.float32).reshape(2, 2, 2) + 1 for m in ("t1", "t1ce", "t2", "flair")}
    x, _, meta = modern.apply(images, None, "brats2021")
    assert x.shape == (5, 2, 2, 2) and meta["channels"][-1] == "foreground" and meta["schema"] == "brats2021"
    with pytest.raises(BratsError, match=r"unknown preprocess.crop 'box'"):
        Recipe.from_config({"name": "x", "modalities": ["t1"], "normalize": "zscore", "crop": "box"})
    with pytest.raises(BratsError, match=r"preprocess config needs 'name', 'modalities' \(non-empty\)"):
        Recipe.from_config({"name": "x", "modalities": [], "normalize": "zscore", "crop": "none"})
