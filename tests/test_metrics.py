"""Metrics on tiny hand-built masks whose numbers can be worked out on paper."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist

from brats_unet.evaluation.metrics import BratsMetrics, paper_dice
from brats_unet.evaluation.region import HD95_EMPTY, class_metrics, dice, hd95, nsd
from brats_unet.evaluation.surface import crop_pair, directed_distances, surface_distances
from brats_unet.training.module import batch_spacing
from brats_unet.utils import BratsError


def _mask(shape, *voxels):
    m = np.zeros(shape, dtype=bool)
    for v in voxels:
        m[v] = True
    return m


# ---------------------------------------------------------------- dice
def test_dice_hand_example():
    a = _mask((5, 5, 5), (0, 0, 0), (0, 0, 1), (0, 0, 2))  # |A| = 3
    b = _mask((5, 5, 5), (0, 0, 2), (4, 4, 4))  # |B| = 2, |A & B| = 1
    assert dice(a, b) == pytest.approx(2 * 1 / (3 + 2))  # 0.4
    assert dice(a, a) == 1.0


@pytest.mark.parametrize(
    ("pred_on", "truth_on", "expected_dice", "expected_hd"),
    [(False, False, 1.0, 0.0), (True, False, 0.0, HD95_EMPTY), (False, True, 0.0, HD95_EMPTY)],
)
def test_empty_conventions(pred_on, truth_on, expected_dice, expected_hd):
    pred = _mask((4, 4, 4), *([(1, 1, 1)] if pred_on else []))
    truth = _mask((4, 4, 4), *([(2, 2, 2)] if truth_on else []))
    assert dice(pred, truth) == expected_dice
    assert hd95(pred, truth) == expected_hd


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="mask shapes differ"):
        dice(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool))
    with pytest.raises(ValueError, match="spacing must be 3 positive"):
        hd95(_mask((3, 3, 3), (0, 0, 0)), _mask((3, 3, 3), (1, 1, 1)), spacing=(1.0, 0.0, 1.0))


# ---------------------------------------------------------------- hd95
def test_hd95_two_single_voxels():
    a = _mask((10, 10, 10), (2, 5, 5))
    b = _mask((10, 10, 10), (5, 5, 5))
    assert hd95(a, b) == pytest.approx(3.0)
    assert hd95(a, b, spacing=(2.0, 1.0, 1.0)) == pytest.approx(6.0)  # the gap is along x
    assert hd95(a, b, spacing=(1.0, 7.0, 7.0)) == pytest.approx(3.0)  # other axes do not matter
    assert hd95(a, a) == 0.0


def test_hd95_percentile_of_pooled_distances():
    # A: one voxel at the origin of a 10-voxel line B. A->B: [0]; B->A: [0, 1, ..., 9]. Pooled (11 values) sorted:
    # [0, 0, 1, ..., 9]; the 95th percentile sits at rank 0.95 * 10 = 9.5, halfway between 8 and 9.
    line = _mask((12, 3, 3), *[(i, 1, 1) for i in range(10)])
    dot = _mask((12, 3, 3), (0, 1, 1))
    assert hd95(dot, line) == pytest.approx(8.5)
    assert hd95(line, dot) == pytest.approx(8.5)  # symmetric


def test_hd95_cubes_offset_along_one_axis():
    # 4-cubes, B shifted by 2 along x. A's surface: face x=0 (16 voxels, 2 from B's face x=2), ring x=1 (12, 1 away),
    # ring x=2 (12, on B's side faces: 0), face x=3 (ring 12 at 0, centre 4 at 1 from B's face). Same for B->A.
    # Pooled 112 values: 48 zeros, 32 ones, 32 twos -> 95th percentile (rank 105.45) = 2 = the offset.
    a = np.zeros((10, 8, 8), bool)
    a[1:5, 2:6, 2:6] = True
    b = np.roll(a, 2, axis=0)
    assert hd95(a, b) == pytest.approx(2.0)
    # x voxels 3 mm long: the face x=0 is 6 mm away; the face-centre voxels now reach B's side faces 1 mm away.
    assert hd95(a, b, spacing=(3.0, 1.0, 1.0)) == pytest.approx(6.0)


def test_hd95_matches_brute_force_on_random_blobs():
    # Blobs touch the array border, so this also checks that cropping keeps the full-volume surface there.
    rng = np.random.default_rng(0)
    cross = ndimage.generate_binary_structure(3, 1)
    for spacing in [(1.0, 1.0, 1.0), (0.8, 1.2, 2.5)]:
        a = ndimage.binary_opening(rng.random((14, 12, 10)) > 0.55)
        b = ndimage.binary_opening(rng.random((14, 12, 10)) > 0.6)
        sa, sb = (m & ~ndimage.binary_erosion(m, cross) for m in (a, b))
        pa, pb = np.argwhere(sa) * spacing, np.argwhere(sb) * spacing
        pairwise = cdist(pa, pb)
        expected = np.percentile(np.concatenate([pairwise.min(1), pairwise.min(0)]), 95)
        assert hd95(a, b, spacing) == pytest.approx(expected)
        # Both internal methods (k-d tree, distance transform) give the same distances.
        tree = np.concatenate(directed_distances(sa, sb, spacing))
        edt = np.concatenate(directed_distances(sa, sb, spacing, max_tree_points=0))
        np.testing.assert_allclose(np.sort(tree), np.sort(edt), rtol=1e-12)


# ---------------------------------------------------------------- class_metrics
def _class_maps():
    # 1 x 1 x 8 strip, classes per voxel. Truth: NCR NCR ED ED ET ET 0 0 ; pred: NCR ED ED ED ET 0 ET 0.
    truth = np.array([1, 1, 2, 2, 3, 3, 0, 0], dtype=np.uint8).reshape(1, 1, 8)
    pred = np.array([1, 2, 2, 2, 3, 0, 3, 0], dtype=np.uint8).reshape(1, 1, 8)
    return pred, truth


def test_class_metrics_keys_and_values():
    pred, truth = _class_maps()
    m = class_metrics(pred, truth, spacing=(2.0, 2.0, 0.5))  # voxel = 2 mm^3 = 0.002 mL
    assert list(m) == [
        "dice_wt", "dice_tc", "dice_et", "hd95_wt", "hd95_tc", "hd95_et", "dice_ncr", "dice_ed",
        "vol_pred_wt", "vol_pred_tc", "vol_pred_et", "vol_true_wt", "vol_true_tc", "vol_true_et",
    ]  # fmt: skip
    # WT: truth 0..5 (6), pred 0..4 + 6 (6), overlap 5 -> 10/12.  TC (NCR+ET): truth {0,1,4,5}, pred {0,4,6} -> 4/7.
    # ET: truth {4,5}, pred {4,6} -> 2/4.  NCR: {0,1} vs {0} -> 2/3.  ED: {2,3} vs {1,2,3} -> 4/5.
    assert m["dice_wt"] == pytest.approx(10 / 12)
    assert m["dice_tc"] == pytest.approx(4 / 7)
    assert m["dice_et"] == pytest.approx(0.5)
    assert m["dice_ncr"] == pytest.approx(2 / 3)
    assert m["dice_ed"] == pytest.approx(0.8)
    assert m["vol_true_wt"] == pytest.approx(6 * 0.002)
    assert m["vol_pred_tc"] == pytest.approx(3 * 0.002)
    assert m["vol_true_et"] == pytest.approx(2 * 0.002)
    # ET along z (0.5 mm voxels): each line is all surface. truth->pred: 4->4 0, 5->{4,6} 1 voxel; pred->truth:
    # 4 0, 6->5 1 voxel. Pooled [0, .5, 0, .5] -> 95th percentile 0.5 mm.
    assert m["hd95_et"] == pytest.approx(0.5)
    assert class_metrics(truth, truth)["hd95_wt"] == 0.0
    assert "hd95_wt" not in class_metrics(pred, truth, with_hd95=False)


def test_class_metrics_missing_region():
    pred, truth = _class_maps()
    truth_no_et = np.where(truth == 3, 1, truth)
    m = class_metrics(pred, truth_no_et)
    assert m["dice_et"] == 0.0 and m["hd95_et"] == HD95_EMPTY
    assert m["vol_true_et"] == 0.0


# ---------------------------------------------------------------- BratsMetrics
def test_brats_metrics_is_mean_of_cases():
    pred, truth = _class_maps()
    other_pred = np.zeros_like(pred)
    other_pred[0, 0, :3] = 2  # ED only: WT 3 of truth's 6 -> 6/9; TC and ET missed -> 0
    metric = BratsMetrics()
    metric.update(torch.from_numpy(pred[None]), torch.from_numpy(truth[None]))
    metric.update(torch.from_numpy(np.stack([other_pred, truth])), torch.from_numpy(np.stack([truth, truth])))
    cases = [class_metrics(p, truth) for p in (pred, other_pred, truth)]
    result = metric.compute()
    assert list(result) == ["dice_wt", "dice_tc", "dice_et", "dice_mean", "hd95_wt", "hd95_tc", "hd95_et"]
    for key in ["dice_wt", "dice_tc", "dice_et", "hd95_wt", "hd95_tc", "hd95_et"]:
        assert result[key].item() == pytest.approx(np.mean([c[key] for c in cases]), rel=1e-6)
    expected_mean = np.mean([np.mean([c["dice_wt"], c["dice_tc"], c["dice_et"]]) for c in cases])
    assert result["dice_mean"].item() == pytest.approx(expected_mean, rel=1e-6)
    assert metric.per_case()["dice_wt"].tolist() == pytest.approx([10 / 12, 6 / 9, 1.0])
    metric.reset()
    assert metric.per_case()["dice_wt"].numel() == 0


def test_brats_metrics_without_hd95_and_with_spacing():
    pred, truth = _class_maps()
    metric = BratsMetrics(hd95=False)
    metric.update(torch.from_numpy(pred[None]), torch.from_numpy(truth[None]), spacing=(1.0, 1.0, 2.0))
    assert set(metric.compute()) == {"dice_wt", "dice_tc", "dice_et", "dice_mean"}
    with_hd = BratsMetrics()
    with_hd.update(torch.from_numpy(pred[None]), torch.from_numpy(truth[None]), spacing=(1.0, 1.0, 2.0))
    assert with_hd.compute()["hd95_et"].item() == pytest.approx(2.0)  # one voxel along z, 2 mm
    with pytest.raises(ValueError, match="spacing must have 3 values"):
        with_hd.update(torch.from_numpy(pred[None]), torch.from_numpy(truth[None]), spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="equal shape"):
        with_hd.update(torch.from_numpy(pred[None]), torch.from_numpy(truth))


def test_each_case_gets_its_own_spacing():
    # The same ET miss-by-one-voxel along z (see test_case_metrics_keys_and_values) in 2 mm and in 0.5 mm slices.
    pred, truth = _class_maps()
    spacing = torch.tensor([[1.0, 1.0, 2.0], [1.0, 1.0, 0.5]], dtype=torch.float64)
    metric = BratsMetrics()
    metric.update(torch.from_numpy(np.stack([pred, pred])), torch.from_numpy(np.stack([truth, truth])),
                  spacing=batch_spacing({"spacing": spacing}))
    assert metric.per_case()["hd95_et"].tolist() == pytest.approx([2.0, 0.5])
    # The module reads (B, 3) tensors as collated, 3 x (B,) lists transposed back, and no spacing as 1 mm.
    assert torch.equal(batch_spacing({"spacing": list(spacing.T)}), spacing)
    assert batch_spacing({}) == (1.0, 1.0, 1.0)


# ---------------------------------------------------------------- paper_dice
def test_paper_dice_hand_example():
    # B=1, 2 voxels, 4 classes. target [0, 3]; probs voxel0 = (1, 0, 0, 0), voxel1 = (0, 0, .5, .5).
    probs = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.5], [0.0, 0.5]]).reshape(1, 4, 2, 1, 1)
    target = torch.tensor([0, 3]).reshape(1, 2, 1, 1)
    # class0: (2*1+1)/(1+1+1) = 1; class1: (0+1)/(0+0+1) = 1; class2: 1/(0+.5+1) = 2/3; class3: (1+1)/(1+.5+1) = .8
    expected = (1 + 1 + 2 / 3 + 0.8) / 4
    assert paper_dice(probs, target).item() == pytest.approx(expected)


def test_paper_dice_sums_over_the_batch():
    # Keras style: one Dice per class over the whole batch, not a mean of per-sample Dice.
    probs = torch.zeros(2, 2, 1, 1, 1)
    probs[0, 1] = 1.0  # sample 0 predicts class 1 (truth 1); sample 1 predicts class 1 (truth 0)
    probs[1, 1] = 1.0
    target = torch.tensor([1, 0]).reshape(2, 1, 1, 1)
    # class0: (0+1)/(1+0+1) = 0.5; class1: (2*1+1)/(1+2+1) = 0.75
    assert paper_dice(probs, target).item() == pytest.approx(0.625)
    with pytest.raises(ValueError, match="expected probs"):
        paper_dice(probs, target[0])


def test_brats_metrics_states_concatenate_across_processes():
    # merge_state applies the same dist_reduce_fx ("cat") that a DDP sync uses: cases are pooled, not averaged twice.
    empty = torch.zeros(1, 4, 4, 4, dtype=torch.uint8)
    one_et = empty.clone()
    one_et[0, 1, 1, 1] = 3
    rank0, rank1 = BratsMetrics(), BratsMetrics()
    rank0.update(empty, empty)  # perfect: Dice 1, HD95 0
    rank1.update(torch.cat([empty, empty]), torch.cat([one_et, one_et]))  # two misses: Dice 0, HD95 373.13
    rank0.merge_state(rank1)
    result = rank0.compute()
    assert result["dice_et"].item() == pytest.approx(1 / 3)
    assert result["hd95_et"].item() == pytest.approx(2 * HD95_EMPTY / 3)
    assert sorted(rank0.per_case()["dice_wt"].tolist()) == [0.0, 0.0, 1.0]


# ---------------------------------------------------------------- hd95 modes, nsd
def _point_and_line():
    # A: one voxel at the start of B, a 10-voxel line (no interior: every voxel is surface).
    # A->B: [0]; B->A: [0, 1, ..., 9].
    a = _mask((12, 3, 3), (0, 1, 1))
    b = np.zeros((12, 3, 3), bool)
    b[0:10, 1, 1] = True
    return a, b


def test_hd95_max_mode_takes_the_larger_directed_percentile():
    a, b = _point_and_line()
    assert hd95(a, b) == pytest.approx(8.5)  # pooled, as before
    # directed: p95([0]) = 0; p95([0..9]) at rank 0.95 * 9 = 8.55
    assert hd95(a, b, mode="max") == pytest.approx(8.55)
    assert hd95(a, b, spacing=(2.0, 1.0, 1.0), mode="max") == pytest.approx(17.1)
    with pytest.raises(BratsError, match=r"hd95 mode must be one of \['pooled', 'max'\], got 'mean'"):
        hd95(a, b, mode="mean")


def test_nsd_pooled_and_mean_of_fractions():
    a, b = _point_and_line()
    # within 1 mm: A 1 of 1, B 2 of 10 (distances 0 and 1; equal to the tolerance counts)
    assert nsd(a, b, tolerance_mm=1.0) == pytest.approx(3 / 11)
    assert nsd(a, b, tolerance_mm=1.0, mode="mean") == pytest.approx((1 / 1 + 2 / 10) / 2)
    assert nsd(a, b, tolerance_mm=2.0) == pytest.approx(4 / 11)
    assert nsd(a, b, spacing=(0.5, 1.0, 1.0), tolerance_mm=1.0) == pytest.approx(4 / 11)  # B: 0, .5, 1 mm
    assert nsd(a, a) == 1.0
    with pytest.raises(BratsError, match="nsd tolerance must be a finite distance >= 0 mm, got -1"):
        nsd(a, b, tolerance_mm=-1)


@pytest.mark.parametrize(("pred_on", "truth_on", "expected"), [(False, False, 1.0), (True, False, 0.0),
                                                                (False, True, 0.0)])
def test_nsd_empty_conventions(pred_on, truth_on, expected):
    pred = _mask((4, 4, 4), *([(1, 1, 1)] if pred_on else []))
    truth = _mask((4, 4, 4), *([(2, 2, 2)] if truth_on else []))
    assert nsd(pred, truth) == expected
    assert surface_distances(pred, truth) is None


def test_crop_pair_keeps_every_metric():
    rng = np.random.default_rng(3)
    pred = np.zeros((30, 30, 30), np.uint8)
    truth = np.zeros_like(pred)
    pred[5:12, 6:14, 8:15] = rng.integers(0, 3, (7, 8, 7))
    truth[7:13, 5:12, 9:16] = rng.integers(0, 3, (6, 7, 7))
    small_pred, small_truth = crop_pair(pred, truth)
    assert small_pred.shape == (10, 11, 10)  # union box x 5..12, y 5..13, z 8..15, plus 1 voxel each side
    for region in (1, 2):
        full = (pred == region, truth == region)
        cut = (small_pred == region, small_truth == region)
        assert hd95(*cut) == hd95(*full) and nsd(*cut) == nsd(*full) and dice(*cut) == dice(*full)
