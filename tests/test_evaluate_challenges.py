"""brats-evaluate's challenge-grade options (challenge, lesionwise, hd95_mode, nsd_tolerance) on label maps whose
numbers are worked out by hand, and today's output kept byte for byte for BraTS 2021 data."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import FIXTURES, read_metrics_csv, run_evaluate

from brats_unet.evaluation.folder import CSV_COLUMNS
from brats_unet.utils import BratsError

# Three 72x64x48 cases at 1.2 x 0.9 x 1.5 mm: benchmarks.evaluation.synthetic_case(CHALLENGES["brats2021"], seed=i,
# tumours=1, satellites=2); metrics.csv written by brats-evaluate (default options) before the options existed.
REFERENCE = FIXTURES / "evaluate_2021"
LINE = (24, 3, 3)  # lesions on the line y = z = 1: every distance is a difference of x


def save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.eye(4) if affine is None else affine), path)


def line_pair(tmp_path: Path) -> tuple[Path, Path]:
    """2023 names (ET = 3). Case L: truth = a 3-voxel bar x 2..4 plus a lone voxel at x 20; prediction = the same bar
    plus a lone voxel at x 10. Case N: tumour-free, predicted tumour-free."""
    truth, pred = np.zeros(LINE, np.uint8), np.zeros(LINE, np.uint8)
    truth[2:5, 1, 1] = pred[2:5, 1, 1] = 3
    truth[20, 1, 1] = pred[10, 1, 1] = 3
    save(tmp_path / "truth" / "L" / "L-seg.nii.gz", truth)
    save(tmp_path / "pred" / "L.nii.gz", pred)
    save(tmp_path / "truth" / "N" / "N-seg.nii.gz", np.zeros(LINE))
    save(tmp_path / "pred" / "N.nii.gz", np.zeros(LINE))
    return tmp_path / "pred", tmp_path / "truth"


def test_brats2021_defaults_write_todays_metrics_csv_byte_for_byte(tmp_path) -> None:
    summary = run_evaluate(REFERENCE / "pred", REFERENCE / "truth", tmp_path / "eval")
    assert (tmp_path / "eval" / "metrics.csv").read_bytes() == (REFERENCE / "metrics.csv").read_bytes()
    assert summary["metrics"] == json.loads((REFERENCE / "summary_metrics.json").read_text())
    assert summary["lesionwise"] is False and summary["challenges"] == ["brats2021"]


def test_brats2023_defaults_add_nsd_and_lesionwise_columns_after_todays(tmp_path) -> None:
    """The same label maps with 2023 names and ET = 3: today's 15 columns and values, then the new ones."""
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    for seg in sorted((REFERENCE / "truth").glob("*/*_seg.nii.gz")):
        case = seg.parent.name
        for src, dst in ((seg, truth / case / f"{case}-seg.nii.gz"), (REFERENCE / "pred" / f"{case}.nii.gz",
                                                                      pred / f"{case}.nii.gz")):
            img = nib.load(src)
            data = np.asarray(img.dataobj)
            save(dst, np.where(data == 4, 3, data), img.affine)
    summary = run_evaluate(pred, truth, tmp_path / "eval")
    columns, rows = read_metrics_csv(tmp_path / "eval" / "metrics.csv")
    ref_columns, ref_rows = read_metrics_csv(REFERENCE / "metrics.csv")
    assert columns[:15] == ref_columns == list(CSV_COLUMNS)
    assert all(rows[c][k] == ref_rows[c][k] for c in ref_rows for k in ref_columns)
    assert columns[15:18] == ["nsd_wt", "nsd_tc", "nsd_et"]
    assert columns[18:24] == [f"all_instance_{k}_et" for k in ("tp", "fp", "fn", "prec", "rec", "f1")]
    assert {"lesionwise_dsc_mean_et", "lesionwise_hd95_mean_tc", "lesionwise_nsd_mean_wt", "global_nsd_et"} <= \
        set(columns)
    assert summary["lesionwise"] is True and summary["challenges"] == ["brats2023"]
    assert summary["nsd_tolerance"] == 1.0 and summary["hd95_mode"] == "pooled"


def test_lesionwise_columns_on_a_hand_made_pair(tmp_path) -> None:
    summary = run_evaluate(*line_pair(tmp_path), tmp_path / "eval")
    _, rows = read_metrics_csv(tmp_path / "eval" / "metrics.csv")
    row = {k: float(v) for k, v in rows["L"].items() if k != "case"}
    # ET = TC = WT (only label 3). Dice 2*3/(4+4). Surface distances (every voxel of a bar one voxel thick is surface):
    # prediction -> truth 0, 0, 0, 6 (x 10 to x 4); truth -> prediction 0, 0, 0, 10 (x 20 to x 10). Pooled, sorted
    # [0 x6, 6, 10]: the 95th percentile at rank 0.95*7 = 6.65 is 6 + 0.65*4 = 8.6. NSD within 1 mm: 6 of 8.
    for region in ("wt", "tc", "et"):
        assert row[f"dice_{region}"] == 0.75
        assert row[f"hd95_{region}"] == pytest.approx(8.6)
        assert row[f"nsd_{region}"] == 0.75
    assert row["vol_true_et"] == pytest.approx(0.004) and row["vol_pred_et"] == pytest.approx(0.004)  # 4 mm^3
    # Lesions: truth {bar, x 20}, prediction {bar, x 10}; the bars match (Dice 1): TP 1, FP 1, FN 1. The official
    # "seg" parser averages matched lesions only: Dice 1, HD95 0, NSD 1. Global = the whole region, NSD as the mean
    # of the two directed fractions (3/4, 3/4).
    assert [row[f"all_instance_{k}_et"] for k in ("tp", "fp", "fn", "prec", "rec", "f1")] == [1, 1, 1, .5, .5, .5]
    assert (row["lesionwise_dsc_mean_et"], row["lesionwise_hd95_mean_et"], row["lesionwise_nsd_mean_et"]) == (1, 0, 1)
    assert row["global_dsc_et"] == 0.75 and row["global_nsd_et"] == 0.75
    assert row["global_hd95_et"] == pytest.approx(8.6)
    # Case N: nothing anywhere. Region-wise: Dice 1, HD95 0; lesion-wise: undefined (nan), skipped by the means.
    assert rows["N"]["dice_et"] == "1.0" and rows["N"]["hd95_et"] == "0.0"
    assert math.isnan(float(rows["N"]["lesionwise_dsc_mean_et"])) and math.isnan(float(rows["N"]["global_dsc_et"]))
    assert summary["metrics"]["lesionwise_dsc_mean_et"]["n"] == 1
    assert summary["metrics"]["lesionwise_dsc_mean_et"]["mean"] == 1.0
    # [0.75, 1.0]: sample std |0.75 - 1.0| / sqrt(2); a single value has none
    assert summary["metrics"]["dice_et"] == pytest.approx({"mean": 0.875, "std": 0.25 / math.sqrt(2), "median": 0.875,
                                                           "p25": 0.8125, "p75": 0.9375, "n": 2})
    assert summary["metrics"]["lesionwise_dsc_mean_et"]["std"] is None
    assert "NaN" in summary["statistics"]


def test_hd95_mode_nsd_tolerance_and_hd95_off_reach_the_csv(tmp_path) -> None:
    pred, truth = line_pair(tmp_path)
    summary = run_evaluate(pred, truth, tmp_path / "max", "hd95_mode=max", "nsd_tolerance=6", "lesionwise=false")
    columns, rows = read_metrics_csv(tmp_path / "max" / "metrics.csv")
    # Directed 95th percentiles: [0, 0, 0, 6] -> 0.85*6 = 5.1, [0, 0, 0, 10] -> 8.5: max 8.5 (below pooled 8.6,
    # percentiles interpolate). Within 6 mm: 4 of 4 and 3 of 4 -> 7/8.
    assert float(rows["L"]["hd95_et"]) == pytest.approx(8.5)
    assert float(rows["L"]["nsd_et"]) == 0.875
    assert columns == [*CSV_COLUMNS, "nsd_wt", "nsd_tc", "nsd_et"]
    assert summary["hd95_mode"] == "max" and summary["nsd_tolerance"] == 6.0
    run_evaluate(pred, truth, tmp_path / "lesion_max", "hd95_mode=max")
    _, rows = read_metrics_csv(tmp_path / "lesion_max" / "metrics.csv")
    assert float(rows["L"]["global_hd95_et"]) == pytest.approx(8.5)

    run_evaluate(pred, truth, tmp_path / "off", "hd95=false")
    columns, rows = read_metrics_csv(tmp_path / "off" / "metrics.csv")
    row = rows["L"]
    assert row["hd95_et"] == row["nsd_et"] == row["global_hd95_et"] == row["lesionwise_nsd_mean_et"] == ""
    assert row["dice_et"] == row["global_dsc_et"] == "0.75" and row["lesionwise_dsc_mean_et"] == "1.0"


def test_metastases_parser_penalises_false_positives_through_brats_evaluate(tmp_path) -> None:
    truth, pred = np.zeros((24, 8, 8), np.uint8), np.zeros((24, 8, 8), np.uint8)
    truth[2:5, 2:5, 2:5] = pred[2:5, 2:5, 2:5] = 3  # a 27 mm^3 ET lesion ("large": >= 20 mm^3), found exactly
    truth[20, 1, 1] = 3  # a 1 mm^3 ("small") lesion, missed: only a detection count
    pred[12, 6, 6] = 3  # a false positive: Dice 0, NSD 0, HD95 373 in the lesion-wise means
    truth[2, 6, 6] = 4  # resection cavity: a label the default brats2023 set does not have
    save(tmp_path / "truth" / "M" / "M-seg.nii.gz", truth)
    save(tmp_path / "pred" / "M.nii.gz", pred)
    with pytest.raises(BratsError, match=r"M-seg\.nii\.gz: label values \[4\] are not brats2023 labels .*"
                                         r"label ET as 3; another label set\? challenge= one of .*brats_met"):
        run_evaluate(tmp_path / "pred", tmp_path / "truth", tmp_path / "eval")
    run_evaluate(tmp_path / "pred", tmp_path / "truth", tmp_path / "eval", "challenge=brats_met")
    columns, rows = read_metrics_csv(tmp_path / "eval" / "metrics.csv")
    row = {k: float(v) for k, v in rows["M"].items() if k != "case"}
    assert columns[1:7] == ["dice_wt", "dice_tc", "dice_et", "dice_rc", "hd95_wt", "hd95_tc"]  # regions by size
    assert "dice_netc" in columns and "dice_ncr" not in columns  # labels that are no region of their own
    assert (row["lesionwise_dsc_mean_et"], row["lesionwise_hd95_mean_et"], row["lesionwise_nsd_mean_et"]) == \
        (0.5, 186.5, 0.5)
    assert [row[f"large_instance_{k}_et"] for k in ("tp", "fp", "fn")] == [1, 1, 0]
    assert [row[f"small_instance_{k}_et"] for k in ("tp", "fp", "fn")] == [0, 1, 1]
    assert row["dice_rc"] == 0.0 and row["vol_true_rc"] == pytest.approx(0.001)


def test_bad_option_values_name_the_key(tmp_path) -> None:
    pred, truth = line_pair(tmp_path)
    for extra, message in (("hd95_mode=mean", r"hd95_mode must be one of \['pooled', 'max'\], got 'mean'"),
                           ("challenge=brats2099", r"unknown challenge 'brats2099'; choose one of \[.*brats_ped"),
                           ("lesionwise=yes", "lesionwise must be true, false or null, got 'yes'"),
                           ("nsd_tolerance=-1", "nsd_tolerance must be a distance >= 0 in mm"),
                           ("nsd_tolerance=wide", "nsd_tolerance must be a distance in mm or null, got 'wide'")):
        with pytest.raises(BratsError, match=message):
            run_evaluate(pred, truth, tmp_path / "eval", extra)
    assert not (tmp_path / "eval").exists()
    shutil.rmtree(tmp_path / "truth" / "N")  # and a good run after all that
    assert run_evaluate(pred, truth, tmp_path / "eval", "lesionwise=false")["n_cases"] == 1
