"""brats-evaluate on hand-made label maps whose Dice, HD95 and volumes are worked out on paper."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import compose_cli, read_metrics_csv, run_evaluate

from brats_unet.cli.evaluate import evaluate
from brats_unet.evaluation.folder import CSV_COLUMNS, read_results
from brats_unet.evaluation.folder import evaluate as evaluate_folder
from brats_unet.evaluation.region import HD95_EMPTY
from brats_unet.utils import BratsError

SHAPE = (10, 10, 10)
AFFINE = np.diag([2.0, 1.0, 1.0, 1.0])  # 2 mm voxels along x: a 1-voxel shift in x is 2 mm
E = HD95_EMPTY


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.uint8), affine), path)
    return path


def volume(*blocks: tuple[tuple[slice, slice, slice], int]) -> np.ndarray:
    out = np.zeros(SHAPE, dtype=np.uint8)
    for box, label in blocks:
        out[box] = label
    return out


CUBE = (slice(2, 6), slice(2, 6), slice(2, 6))  # 64 voxels
CORE = (slice(3, 5), slice(3, 5), slice(3, 5))  # 8 voxels
SHIFTED = (slice(3, 7), slice(2, 6), slice(2, 6))  # CUBE moved one voxel along x
SMALL = (slice(4, 6), slice(4, 6), slice(4, 6))  # 8 voxels
CORNER = (slice(0, 2), slice(0, 2), slice(0, 2))  # 8 voxels
DOT = (slice(1, 2), slice(1, 2), slice(1, 2))  # 1 voxel

TRUTH = {  # BraTS 2021 labels: 1 NCR, 2 ED, 4 ET
    "A": volume((CUBE, 2), (CORE, 1)),  # ED shell around a necrotic core
    "B": volume((SMALL, 4)),  # only enhancing tumour, which the prediction misses
    "C": volume(),  # tumour-free, predicted tumour-free
    "D": volume(),  # tumour-free, one false-positive oedema voxel
    "E": volume((CORNER, 1)),  # no prediction at all
}
PRED = {"A": volume((SHIFTED, 2)), "B": volume(), "C": volume(), "D": volume((DOT, 2)), "Z": volume((CUBE, 2))}

# Worked out by hand. A: WT cubes of 64 overlap in 3*4*4 = 48 -> 2*48/128; TC/NCR missed; ED: truth 56, prediction 64,
# overlap 48 - 8 core voxels = 40 -> 80/120. HD95(WT): of 112 pooled surface distances, 32 are 2 mm (the two x faces
# 1 voxel = 2 mm apart), 8 are 1 mm and 72 are 0, so the 95th percentile is 2 mm. Volumes: voxels * 2 mm^3 / 1000.
EXPECTED = {
    "A": dict(dice_wt=0.75, dice_tc=0.0, dice_et=1.0, hd95_wt=2.0, hd95_tc=E, hd95_et=0.0, dice_ncr=0.0,
              dice_ed=2 / 3, vol_pred_wt=0.128, vol_pred_tc=0.0, vol_pred_et=0.0, vol_true_wt=0.128,
              vol_true_tc=0.016, vol_true_et=0.0),
    "B": dict(dice_wt=0.0, dice_tc=0.0, dice_et=0.0, hd95_wt=E, hd95_tc=E, hd95_et=E, dice_ncr=1.0, dice_ed=1.0,
              vol_pred_wt=0.0, vol_pred_tc=0.0, vol_pred_et=0.0, vol_true_wt=0.016, vol_true_tc=0.016,
              vol_true_et=0.016),
    "C": dict(dice_wt=1.0, dice_tc=1.0, dice_et=1.0, hd95_wt=0.0, hd95_tc=0.0, hd95_et=0.0, dice_ncr=1.0, dice_ed=1.0,
              vol_pred_wt=0.0, vol_pred_tc=0.0, vol_pred_et=0.0, vol_true_wt=0.0, vol_true_tc=0.0, vol_true_et=0.0),
    "D": dict(dice_wt=0.0, dice_tc=1.0, dice_et=1.0, hd95_wt=E, hd95_tc=0.0, hd95_et=0.0, dice_ncr=1.0, dice_ed=0.0,
              vol_pred_wt=0.002, vol_pred_tc=0.0, vol_pred_et=0.0, vol_true_wt=0.0, vol_true_tc=0.0, vol_true_et=0.0),
    "E": dict(dice_wt=0.0, dice_tc=0.0, dice_et=1.0, hd95_wt=E, hd95_tc=E, hd95_et=0.0, dice_ncr=0.0, dice_ed=1.0,
              vol_pred_wt=0.0, vol_pred_tc=0.0, vol_pred_et=0.0, vol_true_wt=0.016, vol_true_tc=0.016,
              vol_true_et=0.0),
}


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    for case, seg in TRUTH.items():
        save(truth / case / f"{case}_seg.nii.gz", seg)
    for case, seg in PRED.items():
        save(pred / f"{case}.nii.gz", seg)
    save(pred / "A_prob.nii.gz", np.zeros(SHAPE))  # probability maps are not predictions
    return pred, truth


def test_metrics_csv_and_summary_match_hand_computed_values(dirs, tmp_path) -> None:
    summary = run_evaluate(*dirs, tmp_path / "eval")
    columns, rows = read_metrics_csv(tmp_path / "eval" / "metrics.csv")
    assert tuple(columns) == CSV_COLUMNS
    assert sorted(rows) == ["A", "B", "C", "D"]
    for case, row in rows.items():
        for key, value in EXPECTED[case].items():
            assert float(row[key]) == pytest.approx(value, abs=1e-9), (case, key)
    assert summary["missing_predictions"] == ["E"] and summary["extra_predictions"] == ["Z"]
    assert summary["n_cases"] == 4
    wt = summary["metrics"]["dice_wt"]  # [0.75, 0, 1, 0]
    assert wt["n"] == 4 and wt["mean"] == pytest.approx(0.4375) and wt["median"] == pytest.approx(0.375)
    assert wt["p25"] == pytest.approx(0.0) and wt["p75"] == pytest.approx(0.8125)
    # sample std (ddof=1): squared deviations 0.3125^2 + 0.4375^2 + 0.5625^2 + 0.4375^2 = 0.796875, over n - 1 = 3
    assert wt["std"] == pytest.approx(math.sqrt(0.796875 / 3))
    assert summary["metrics"]["hd95_wt"]["mean"] == pytest.approx((2.0 + E + 0.0 + E) / 4)
    assert json.loads((tmp_path / "eval" / "summary.json").read_text()) == summary


def test_missing_as_empty_scores_missing_cases_as_empty_predictions(dirs, tmp_path) -> None:
    summary = run_evaluate(*dirs, tmp_path / "eval", "missing_as_empty=true")
    _, rows = read_metrics_csv(tmp_path / "eval" / "metrics.csv")
    assert sorted(rows) == ["A", "B", "C", "D", "E"] and summary["n_cases"] == 5
    assert summary["missing_predictions"] == ["E"]  # still reported
    for key, value in EXPECTED["E"].items():
        assert float(rows["E"][key]) == pytest.approx(value, abs=1e-9), key
    assert summary["metrics"]["dice_wt"]["mean"] == pytest.approx(1.75 / 5)


def test_split_file_limits_the_scope(dirs, tmp_path) -> None:
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["C", "D", "E"], "val": [], "test": ["A", "B"]}))
    summary = run_evaluate(*dirs, tmp_path / "eval", f"split_file={split}")
    assert summary["n_cases"] == 2 and summary["missing_predictions"] == []
    assert summary["outside_split_predictions"] == ["C", "D"] and summary["extra_predictions"] == ["Z"]
    split.write_text(json.dumps({"test": ["A", "Q"]}))
    with pytest.raises(BratsError, match="names 1 test cases that have no truth .*: Q"):
        run_evaluate(*dirs, tmp_path / "eval2", f"split_file={split}")


def test_hd95_off_leaves_its_columns_empty(dirs, tmp_path) -> None:
    summary = run_evaluate(*dirs, tmp_path / "eval", "hd95=false")
    _, rows = read_metrics_csv(tmp_path / "eval" / "metrics.csv")
    assert rows["A"]["hd95_wt"] == "" and float(rows["A"]["dice_wt"]) == pytest.approx(0.75)
    assert summary["metrics"]["hd95_et"] == {"mean": None, "std": None, "median": None, "p25": None, "p75": None,
                                             "n": 0}


def test_geometry_mismatch_names_both_files(dirs, tmp_path) -> None:
    pred, truth = dirs
    save(pred / "A.nii.gz", np.zeros((10, 10, 9)))
    with pytest.raises(BratsError, match=r"prediction .*A\.nii\.gz has shape \(10, 10, 9\) but truth .*A_seg\.nii\.gz"):
        run_evaluate(pred, truth, tmp_path / "eval")
    save(pred / "A.nii.gz", PRED["A"], affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(BratsError, match=r"prediction .*A\.nii\.gz and truth .*A_seg\.nii\.gz have different affines"):
        run_evaluate(pred, truth, tmp_path / "eval")
    assert not (tmp_path / "eval" / "metrics.csv").exists()


def test_brats2023_names_use_et_label_3(tmp_path) -> None:
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    save(truth / "F" / "F-seg.nii.gz", volume((SMALL, 3), (CORE, 1)))
    save(pred / "F.nii.gz", volume((SMALL, 3)))
    summary = run_evaluate(pred, truth, tmp_path / "eval")
    _, rows = read_metrics_csv(tmp_path / "eval" / "metrics.csv")
    # CORE overwrites SMALL's voxel (4,4,4): truth ET 7 voxels, TC = CORE | SMALL = 15; prediction ET = TC = SMALL (8).
    assert float(rows["F"]["dice_et"]) == pytest.approx(2 * 7 / (7 + 8))
    assert float(rows["F"]["dice_tc"]) == pytest.approx(2 * 8 / (15 + 8))
    assert summary["n_cases"] == 1
    save(pred / "F.nii.gz", volume((SMALL, 4)))
    with pytest.raises(BratsError, match=r"F\.nii\.gz: label values \[4\] .*brats2023 cases label ET as 3"):
        run_evaluate(pred, truth, tmp_path / "eval2")


def test_output_and_input_problems(dirs, tmp_path) -> None:
    pred, truth = dirs
    run_evaluate(pred, truth, tmp_path / "eval")
    with pytest.raises(BratsError, match="already holds metrics.csv/summary.json; pass overwrite=true"):
        run_evaluate(pred, truth, tmp_path / "eval")
    assert run_evaluate(pred, truth, tmp_path / "eval", "overwrite=true")["n_cases"] == 4
    with pytest.raises(BratsError, match=r"none of the 1 predictions in .*other matches one of the 5 truth cases"):
        save(tmp_path / "other" / "Nope.nii.gz", volume())
        run_evaluate(tmp_path / "other", truth, tmp_path / "eval3")
    with pytest.raises(BratsError, match="not a folder of <case>.nii.gz predictions"):
        run_evaluate(tmp_path / "absent", truth, tmp_path / "eval4")
    with pytest.raises(BratsError, match=r"missing required key\(s\) truth"):
        evaluate(compose_cli("evaluate", [f"pred={pred}", f"output={tmp_path / 'eval5'}"]))
    float_pred = pred / "B.nii.gz"
    nib.save(nib.Nifti1Image(np.full(SHAPE, 0.5, dtype=np.float32), AFFINE), float_pred)
    with pytest.raises(BratsError, match=r"B\.nii\.gz: label map holds non-integer values"):
        run_evaluate(pred, truth, tmp_path / "eval6")


FIXTURE_2021 = Path(__file__).parent / "fixtures" / "evaluate_2021"


def test_metrics_csv_and_summary_json_are_one_pair(tmp_path, monkeypatch) -> None:
    """summary.json records metrics.csv's hash and row count, and is renamed into place last: a run interrupted between
    the two renames leaves a new metrics.csv beside the old summary.json, which read_results refuses to pair."""
    import os

    out = tmp_path / "eval"
    _, summary = evaluate_folder(FIXTURE_2021 / "pred", FIXTURE_2021 / "truth", output=out)
    rows, written = read_results(out)
    assert len(rows) == 3 and written == summary and summary["metrics_csv"]["rows"] == 3
    assert summary["metrics_csv"]["sha256"] == hashlib.sha256((out / "metrics.csv").read_bytes()).hexdigest()

    real_replace = os.replace

    def crash_before_summary(src, dst):
        if Path(dst).name == "summary.json":
            raise KeyboardInterrupt  # killed between the two renames
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_before_summary)
    with pytest.raises(KeyboardInterrupt):
        evaluate_folder(FIXTURE_2021 / "pred", FIXTURE_2021 / "truth", output=out, overwrite=True, hd95=False)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not list(out.glob(".tmp-*"))  # the summary's temp file was removed
    assert read_metrics_csv(out / "metrics.csv")[1]["Case0"]["hd95_wt"] == ""  # the new csv is there
    with pytest.raises(BratsError, match=r"metrics\.csv \(3 rows\) is not the metrics\.csv that .*summary\.json "
                                         r"summarises \(3 rows, sha256 [0-9a-f]{12}\.\.\.\): .*overwrite=true"):
        read_results(out)


def test_printed_summary_keeps_whole_metric_names_and_states_units(capsys) -> None:
    from brats_unet.cli.evaluate import print_summary

    stats = {"mean": 0.5, "std": 0.1, "median": 0.5, "p25": 0.4, "p75": 0.6, "n": 2}
    names = ["dice_wt", "vol_pred_wt", "all_instance_f1_snfh", "lesionwise_hd95_mean_netc", "global_nsd_snfh"]
    print_summary({"n_cases": 2, "metrics": dict.fromkeys(names, stats), "missing_predictions": [],
                   "extra_predictions": [], "outside_split_predictions": []})
    out = capsys.readouterr().out
    assert all(name in out for name in names), out
    assert "vol_pred_*, vol_true_* mL" in out and "hd95 mm" in out and "sample std" in out


def test_missing_predictions_are_not_blindly_offered_missing_as_empty(tmp_path, caplog) -> None:
    """After oof=true the held-out test cases have no prediction on purpose: scoring them as empty would count the
    unseen test set as all missed, so the warning names that case and split_file= before missing_as_empty."""
    import logging
    import shutil

    pred = tmp_path / "pred"
    shutil.copytree(FIXTURE_2021 / "pred", pred)
    (pred / "Case2.nii.gz").unlink()
    with caplog.at_level(logging.WARNING):
        evaluate_folder(pred, FIXTURE_2021 / "truth")
    message = next(r.getMessage() for r in caplog.records if "no prediction" in r.getMessage())
    assert message.startswith("1 truth cases have no prediction (Case2), not scored. Cases left out on purpose "
                              "(out-of-fold predictions hold no held-out test case) are rightly left out")
    assert message.index("split_file=") < message.index("missing_as_empty=true")


def test_an_out_of_fold_folder_never_suggests_scoring_the_test_cases_as_empty(tmp_path, caplog) -> None:
    """prediction.json of an oof=true folder says so: the held-out test case without a prediction is named as such."""
    import logging
    import shutil

    from brats_unet.evaluation.manifest import write_manifest

    pred = tmp_path / "pred"
    shutil.copytree(FIXTURE_2021 / "pred", pred)
    (pred / "Case2.nii.gz").unlink()
    write_manifest(pred, {"members": [{"checkpoint": "0/checkpoints/best.ckpt", "sha256": "ab"}], "oof": True},
                   ["Case0", "Case1"])
    with caplog.at_level(logging.WARNING):
        evaluate_folder(pred, FIXTURE_2021 / "truth")
    message = next(r.getMessage() for r in caplog.records if "no prediction" in r.getMessage())
    assert "this is an out-of-fold folder (prediction.json)" in message and "never as empty" in message
    assert "missing_as_empty=true" not in message
