"""Lesion-wise metrics on hand-built lesions whose numbers are worked out in the comments, plus a cross-check against
the official `brats-evaluation` package (skipped when the `eval` extra is not installed)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from brats_unet.evaluation.challenges import CHALLENGES, OFFICIAL_HD95_PENALTY
from brats_unet.evaluation.lesionwise import label_lesions, lesionwise_metrics, match_lesions, region_lesion_metrics
from brats_unet.utils import BratsError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.evaluation import compare, official_evaluator, official_metrics, synthetic_case  # noqa: E402

METS = {"parser": "mets", "lesion_volume_threshold": 20.0, "detection_dice_threshold": 0.1}


def _bar_split_in_two():
    """Truth: a 3x3x9 bar (81 voxels). Prediction: the same bar without its middle slice z=4: two 3x3x4 lesions."""
    truth = np.zeros((5, 5, 11), bool)
    truth[1:4, 1:4, 1:10] = True
    pred = truth.copy()
    pred[:, :, 5] = False
    return pred, truth


def test_components_are_26_connected():
    mask = np.zeros((4, 4, 4), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True  # corner neighbours: one lesion
    mask[3, 3, 3] = True
    labels, n = label_lesions(mask)
    assert n == 2 and labels[0, 0, 0] == labels[1, 1, 1] != labels[3, 3, 3]


def test_lesion_split_in_two_seg_parser():
    pred, truth = _bar_split_in_two()
    out = region_lesion_metrics(pred, truth)
    # one-to-one: the truth lesion takes one half (Dice 2*36/(81+36)), the other half is a false positive
    assert (out["all_instance_tp"], out["all_instance_fp"], out["all_instance_fn"]) == (1, 1, 0)
    assert out["all_instance_prec"] == 0.5 and out["all_instance_rec"] == 1.0 and out["all_instance_f1"] == 2 / 3
    assert out["lesionwise_dsc_mean"] == pytest.approx(72 / 117)
    # Half A (z 1..4) vs the bar. A->bar: 33 surface voxels at 0, its top centre (bar interior) at 1. bar->A: 33 at 0,
    # the 8 side voxels of each slice above A at 1, 2, 3, 4, the 9 of the top face at 5. Pooled 108 values: rank
    # 0.95 * 107 = 101.65 falls among the 9 fives -> 5. NSD at 1 mm (mean of fractions): (34/34 + 41/74) / 2.
    assert out["lesionwise_hd95_mean"] == pytest.approx(5.0)
    assert out["lesionwise_nsd_mean"] == pytest.approx((1 + 41 / 74) / 2)
    assert out["lesionwise_dsc_std"] == 0.0
    # Globally only the missing slice's 8 side voxels (bar->pred) and the two cut faces' centres (pred->bar) are at
    # 1 mm, the other 132 surface distances are 0: HD95 at rank 133.95 of 142 -> 1.
    assert out["global_dsc"] == pytest.approx(2 * 72 / (72 + 81))
    assert out["global_hd95"] == pytest.approx(1.0)
    assert out["global_nsd"] == 1.0
    assert region_lesion_metrics(pred, truth, hd95_mode="max", nsd_mode="pooled")["lesionwise_nsd_mean"] == \
        pytest.approx((34 + 41) / (34 + 74))


def test_lesion_split_in_two_mets_parser_penalises_the_false_positive():
    pred, truth = _bar_split_in_two()
    out = region_lesion_metrics(pred, truth, **METS)
    # the 81-voxel lesion is large (>= 20): its scores plus one FP at Dice 0 / NSD 0 / HD95 373
    assert out["lesionwise_dsc_mean"] == pytest.approx(36 / 117)
    assert out["lesionwise_dsc_std"] == pytest.approx(36 / 117)
    assert out["lesionwise_hd95_mean"] == pytest.approx((5.0 + OFFICIAL_HD95_PENALTY) / 2)
    assert out["lesionwise_nsd_mean"] == pytest.approx((1 + 41 / 74) / 4)
    assert (out["large_instance_tp"], out["large_instance_fp"], out["large_instance_fn"]) == (1, 1, 0)
    assert out["large_instance_f1"] == pytest.approx(2 / 3)
    assert math.isnan(out["small_instance_tp"])  # no small reference lesion


def test_mets_small_lesions_only_count_as_detections():
    truth = np.zeros((12, 12, 12), bool)
    truth[1:4, 1:4, 1:4] = True  # 27 voxels: large
    truth[8:10, 8:10, 8:10] = True  # 8 voxels: small, missed
    pred = np.zeros_like(truth)
    pred[1:4, 1:4, 1:4] = True
    out = region_lesion_metrics(pred, truth, **METS)
    assert out["lesionwise_dsc_mean"] == 1.0 and out["lesionwise_hd95_mean"] == 0.0
    assert (out["small_instance_tp"], out["small_instance_fn"], out["small_instance_rec"]) == (0, 1, 0.0)
    assert (out["large_instance_tp"], out["large_instance_fn"]) == (1, 0)
    # a smaller voxel makes the 27-voxel lesion small too (volume 27 * 0.5 mm^3 < 20): no large lesion -> NaN
    half = region_lesion_metrics(pred, truth, (0.5, 1.0, 1.0), **METS)
    assert math.isnan(half["lesionwise_dsc_mean"]) and half["small_instance_tp"] == 1


def test_mets_large_lesions_need_dice_0_1_and_no_reference_lesion_is_nan():
    """Both as brats_evaluation.metrics_parser.parse_mets_results (checked against brats-evaluation 0.0.10): a matched
    large lesion below the detection Dice is a FN for the counts, but its Dice enters the lesion-wise mean; a region
    with no reference lesion has NaN lesion-wise means however many lesions were predicted (no Dice 0 for the FPs)."""
    truth = np.zeros((14, 14, 10), bool)
    truth[2:5, 2:5, 2:5] = True  # 27 voxels: large
    pred = np.zeros_like(truth)
    pred[4:12, 4:12, 4:8] = True  # 256 voxels touching it in one voxel: Dice 2 / (27 + 256) < 0.1
    out = region_lesion_metrics(pred, truth, **METS)
    assert (out["large_instance_tp"], out["large_instance_fn"], out["large_instance_fp"]) == (0, 1, 0)
    assert out["lesionwise_dsc_mean"] == pytest.approx(2 / 283) and out["all_instance_tp"] == 1

    specks = np.zeros((20, 20, 4), bool)
    specks[1::5, 1::5, 1] = True  # 16 isolated predicted lesions, no reference lesion
    out = region_lesion_metrics(specks, np.zeros_like(specks), **METS)
    assert out["all_instance_fp"] == 16 and out["global_dsc"] == 0.0
    assert all(math.isnan(out[k]) for k in out if k.startswith(("lesionwise_", "large_instance_", "small_instance_")))


def test_false_positive_only_and_empty_regions():
    pred = np.zeros((6, 6, 6), bool)
    pred[1:3, 1:3, 1:3] = True
    empty = np.zeros_like(pred)
    fp = region_lesion_metrics(pred, empty)
    assert (fp["all_instance_tp"], fp["all_instance_fp"], fp["all_instance_fn"]) == (0, 1, 0)
    assert fp["all_instance_prec"] == 0.0 and math.isnan(fp["all_instance_rec"]) and fp["all_instance_f1"] == 0.0
    assert (fp["global_dsc"], fp["global_hd95"], fp["global_nsd"]) == (0.0, OFFICIAL_HD95_PENALTY, 0.0)
    assert (fp["lesionwise_dsc_mean"], fp["lesionwise_hd95_mean"], fp["lesionwise_nsd_mean"]) == (0.0, 373.0, 0.0)
    assert math.isnan(fp["lesionwise_dsc_std"])
    assert math.isnan(region_lesion_metrics(pred, empty, **METS)["lesionwise_dsc_mean"])  # no reference lesion
    none = region_lesion_metrics(empty, empty)  # the official package scores a region absent on both sides NaN
    counts = ("all_instance_tp", "all_instance_fp", "all_instance_fn")
    assert [none[k] for k in counts] == [0, 0, 0] and all(math.isnan(v) for k, v in none.items() if k not in counts)


def test_distances_use_the_spacing():
    # 2-voxel bars along axis 0 overlapping in one voxel: pooled distances [0, 1, 1, 0] voxels -> HD95 1 voxel
    truth, pred = np.zeros((5, 3, 3), bool), np.zeros((5, 3, 3), bool)
    truth[0:2, 1, 1] = True
    pred[1:3, 1, 1] = True
    assert region_lesion_metrics(pred, truth, (2.0, 1.0, 1.0))["lesionwise_hd95_mean"] == pytest.approx(2.0)
    assert region_lesion_metrics(pred, truth, (1.0, 3.0, 3.0))["lesionwise_hd95_mean"] == pytest.approx(1.0)


def test_matching_maximises_total_dice_one_to_one():
    # truth 1 = z0..9, truth 2 = z11..13; predicted 1 = z0..2, predicted 2 = z4..13 (touches both truths).
    # Dice t1-p2 = 12/20 is the single best pair, so greedy matching would leave truth 2 unmatched; the bipartite
    # optimum t1-p1 (6/13) + t2-p2 (6/13) has the larger sum and matches both.
    truth, pred = np.zeros((1, 1, 20), bool), np.zeros((1, 1, 20), bool)
    truth[0, 0, 0:10] = truth[0, 0, 11:14] = True
    pred[0, 0, 0:3] = pred[0, 0, 4:14] = True
    t, nt = label_lesions(truth)
    p, np_ = label_lesions(pred)
    assert match_lesions(p, np_, t, nt) == [(1, 1, pytest.approx(6 / 13)), (2, 2, pytest.approx(6 / 13))]


def test_equal_dice_ties_go_to_the_lesion_first_in_file_order():
    """Issue 19's shape: one true ET lesion, two predicted fragments inside it with the same Dice, and specks of false
    positives (15 FP in all). The official package numbers lesions in the NIfTI file's voxel order (first axis
    fastest) and matches the first of equal candidates; scipy's own numbering (last axis fastest) matched the other
    fragment, so the lesion-wise HD95 differed.

    Truth: a one-voxel-thick 10x8 plate in x-z (x 1..10, z 1..8, y 1). A at (x 2, z 5), B at (x 9, z 2): both Dice
    2 / (80 + 1). File order takes B (z 2 < 5). Pooled distances: 81 values, B's own 0 and the plate's distances to
    it; the 95th percentile is the 77th smallest = 5th largest: for B 10, sqrt(89), sqrt(85), sqrt(80), sqrt(74); for
    A sqrt(80), sqrt(73), sqrt(73), sqrt(68), sqrt(68)."""
    truth = np.zeros((12, 4, 10), np.uint8)
    truth[1:11, 1, 1:9] = 3
    pred = np.zeros_like(truth)
    pred[2, 1, 5] = pred[9, 1, 2] = 3
    for x, z in [(x, z) for z in (0, 4, 8) for x in (0, 2, 4, 6, 8, 10)][:14]:
        pred[x, 3, z] = 3  # isolated specks, two voxels from everything else
    labels, n = label_lesions(pred == 3)
    # numbered z slowest, x fastest: the 6 specks at z 0, then B (z 2), the 6 at z 4, A (z 5), the 2 at z 8
    assert n == 16 and (labels[0, 3, 0], labels[9, 1, 2], labels[2, 1, 5], labels[2, 3, 8]) == (1, 7, 14, 16)
    row = lesionwise_metrics(pred, truth, "brats2023")
    assert (row["all_instance_tp_et"], row["all_instance_fp_et"], row["all_instance_fn_et"]) == (1, 15, 0)
    assert row["lesionwise_dsc_mean_et"] == pytest.approx(2 / 81)
    assert row["lesionwise_hd95_mean_et"] == pytest.approx(math.sqrt(74))  # A would give sqrt(68)


def test_label_maps_are_checked_against_the_challenge():
    truth = np.zeros((4, 4, 4), np.uint8)
    truth[1, 1, 1] = 4
    with pytest.raises(BratsError, match=r"truth: label values \[4\] are not brats2023 labels \(allowed \[0, 1, 2, 3"):
        lesionwise_metrics(truth * 0, truth, "brats2023")
    with pytest.raises(BratsError, match="unknown challenge 'brats2099'"):
        lesionwise_metrics(truth, truth, "brats2099")
    out = lesionwise_metrics(truth, truth, "brats2024_gli")
    assert list(out)[:6] == [f"all_instance_{k}_snfh" for k in ("tp", "fp", "fn", "prec", "rec", "f1")]
    assert out["lesionwise_dsc_mean_rc"] == 1.0 and math.isnan(out["lesionwise_dsc_mean_et"])


def test_challenge_regions_use_only_their_labels():
    for challenge in CHALLENGES.values():
        for labels in challenge.regions.values():
            assert set(labels) <= set(challenge.labels), challenge.name


def _tie_case(challenge):
    """One true lesion (a plate) and two predicted voxels inside it with equal Dice, in the challenge's ET label."""
    et = next(v for v, n in challenge.labels.items() if n in ("et", "gtv"))
    truth = np.zeros((12, 4, 10), np.uint8)
    truth[1:11, 1, 1:9] = et
    pred = np.zeros_like(truth)
    pred[2, 1, 5] = pred[9, 1, 2] = et
    return pred, truth


# The only deliberate difference on 1 mm data: official "seg" lesion-wise HD95 is inf where ours is 373.
CROSS_CHECK = ["brats2024_gli", "brats_met", "brats_ped", "brats_men_rt"]


@pytest.mark.slow
def test_agrees_with_the_official_package():
    pytest.importorskip("brats_evaluation")
    pytest.importorskip("panoptica")
    worst: dict[str, float] = {}
    for name in CROSS_CHECK:
        challenge = CHALLENGES[name]
        evaluator = official_evaluator(challenge)
        cases = [synthetic_case(challenge, (64, 64, 40), seed=s, tumours=1, satellites=3) for s in range(2)]
        cases += [(np.zeros_like(cases[0][1]), cases[0][1]), (np.zeros_like(cases[0][1]),) * 2]
        cases.append(_tie_case(challenge))
        for pred, truth in cases:
            official = official_metrics(pred, truth, challenge, evaluator)
            ours = lesionwise_metrics(pred, truth, challenge, global_nsd_tolerance_mm=0.5)
            assert set(ours) == set(official), name
            for key, diff in compare(ours, official).items():
                if math.isinf(official[key]) and key.startswith("lesionwise_hd95_mean"):
                    assert ours[key] == OFFICIAL_HD95_PENALTY
                    continue
                worst[key] = max(worst.get(key, 0.0), diff)
    print(f"\nlargest |ours - official| over {len(CROSS_CHECK)} challenges x 4 cases: {max(worst.values()):.3g}")
    assert max(worst.values()) < 1e-9, {k: v for k, v in worst.items() if v >= 1e-9}
