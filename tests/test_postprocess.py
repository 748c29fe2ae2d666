"""Post-processing rules (inference/postprocess.py), their choice on out-of-fold predictions (brats-postprocess) and
brats-predict applying the choice of a sweep."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import FIXTURES, compose_cli, make_run, make_sweep

from brats_unet.cli.postprocess import postprocess as postprocess_command
from brats_unet.cli.predict import predict as predict_command
from brats_unet.evaluation.challenges import CHALLENGES
from brats_unet.inference.postprocess import (
    apply_rule,
    apply_rules,
    case_score,
    choose_rules,
    fill_label,
    foreground_box,
    keep_largest_component,
    lesion_score,
    remove_small_components,
    tied_middle,
)
from brats_unet.inference.segmenter import Segmenter
from brats_unet.utils import BratsError, file_sha256

B21 = CHALLENGES["brats2021"]  # labels 1 ncr, 2 ed, 4 et


def hand_made_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    """Case 1: the prediction is the truth plus a 2-voxel false oedema blob (WT false positive) and 1 voxel of ET in
    the necrosis of a tumour without ET. Its TC has two true components, the second only 2 voxels. Case 2: perfect.
    So removing WT components < 5 voxels and ET components < 5 helps; any TC rule (< 5, largest only) hurts."""
    truth = np.zeros((16, 16, 16), dtype=np.uint8)
    truth[2:8, 2:8, 2:8] = 2
    truth[3:5, 3:5, 3:5] = 1  # 8 voxels of necrosis
    truth[6, 6, 6:8] = 1  # a second necrotic component of 2 voxels, not 26-connected to the first
    pred = truth.copy()
    pred[12:14, 12, 12] = 2  # a 2-voxel false positive far from the tumour
    pred[3, 3, 3] = 4  # 1 voxel of ET on an ET-free case
    perfect = np.zeros((16, 16, 16), dtype=np.uint8)
    perfect[4:10, 4:10, 4:10] = 2
    perfect[5:8, 5:8, 5:8] = 4
    return [(pred, truth), (perfect.copy(), perfect)]


def test_component_rules_by_hand() -> None:
    labels = np.zeros((8, 8, 8), dtype=np.uint8)
    labels[0:3, 0:3, 0:3] = 4  # 27 voxels
    labels[5, 5, 5] = 4  # 1 voxel
    labels[6, 6, 6] = 4  # touches (5,5,5) only by a corner: one 26-connected component of 2
    small = remove_small_components(labels, (4,), min_size=3, fill=1)
    assert (small == 4).sum() == 27 and (small == 1).sum() == 2
    assert (remove_small_components(labels, (4,), min_size=2, fill=1) == labels).all()
    largest = keep_largest_component(labels, (4,), fill=0)
    assert (largest == 4).sum() == 27 and largest[5, 5, 5] == 0 and largest[6, 6, 6] == 0
    assert fill_label(B21, "et") == 1 and fill_label(B21, "tc") == 2 and fill_label(B21, "wt") == 0
    assert fill_label(CHALLENGES["brats2024_gli"], "et") == 1  # netc


def test_lesion_score_counts_missed_and_false_lesions_as_zero() -> None:
    assert lesion_score(tp=2, fp=1, fn=1, mean_dice=0.8) == pytest.approx(1.6 / 4)
    assert lesion_score(tp=0, fp=3, fn=0, mean_dice=float("nan")) == 0.0
    assert lesion_score(tp=0, fp=0, fn=0, mean_dice=float("nan")) == 1.0


def test_choice_keeps_the_rule_that_helps_and_not_the_ones_that_hurt() -> None:
    cases = hand_made_cases()
    (pred, truth), _ = cases
    # By hand, case 1: WT Dice 2*216 / (218 + 216); TC 1 (ET voxel is inside TC either way); ET 0 (1 vs 0 voxels).
    assert case_score(pred, truth, B21, lesionwise=False) == pytest.approx((432 / 434 + 1 + 0) / 3)
    before = ((432 / 434 + 1 + 0) / 3 + 1) / 2
    result = choose_rules(cases, B21, sizes=(5,), et_totals=(50,))
    assert result["score_before"] == pytest.approx(before)
    kept = [{k: v for k, v in r.items() if not k.startswith("score")} for r in result["rules"]]
    assert kept == [{"rule": "min_size", "region": "wt", "min_size": 5},
                    {"rule": "min_size", "region": "et", "min_size": 5}]
    assert result["score_after"] == pytest.approx(1.0)
    tried = {(t["rule"], t.get("region")): t["score"] for t in result["tried"]}
    assert tried[("min_size", "tc")] < tried[("min_size", "wt")]  # the TC rules were tried and lost
    assert tried[("largest", "tc")] < result["rules"][0]["score_after"]
    fixed = apply_rules(pred, result["rules"], B21)
    assert (fixed == truth).all()


def test_of_tied_sizes_the_middle_one_is_kept() -> None:
    # Case 1's false WT blob (2 voxels) goes at every size from 5 to 30 (the true WT is 216 voxels): 4 tied sizes; its
    # false ET (1 voxel) at every size from 2 to 20, and 30 would also take case 2's 27 voxels of true ET.
    result = choose_rules(hand_made_cases(), B21, sizes=(30, 2, 10, 5, 20, 5), et_totals=(50,))  # sorted, deduplicated
    assert [(r["region"], r["min_size"]) for r in result["rules"]] == [("wt", 10), ("et", 5)]
    assert [t["min_size"] for t in result["tried"] if t.get("region") == "wt" and "min_size" in t] == [2, 5, 10, 20, 30]
    assert result["score_after"] == pytest.approx(1.0)
    tried = [(t.get("region"), t.get("min_size"), t["score"]) for t in result["tried"]]
    assert len({score for region, size, score in tried if region == "wt" and size in (5, 10, 20, 30)}) == 1
    # Only thresholds of the same rule next to the best count; "largest" ties with them but is another rule.
    group = [{"rule": "min_size"}] * 3 + [{"rule": "largest"}]
    assert tied_middle(group, [0.5, 0.9, 0.9, 0.9]) == 1
    assert tied_middle(group[:3], [0.9, 0.9, 0.9]) == 1 and tied_middle(group[:3], [0.9, 0.8, 0.9]) == 0
    assert tied_middle(group[:3], [0.5, 0.9, 0.9]) == 1  # even run: the smaller of the two middle thresholds


def test_choice_keeps_nothing_when_nothing_helps() -> None:
    perfect = hand_made_cases()[1]
    result = choose_rules([perfect], B21, sizes=(5,), et_totals=(50,))
    assert result["rules"] == [] and result["score_before"] == result["score_after"] == 1.0


# ---- brats-postprocess on a (hand-made) sweep, and brats-predict applying its choice ------------------------------
def write_nifti(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), np.eye(4)), path)


def test_brats_postprocess_writes_the_choice_into_the_sweep(tmp_path: Path) -> None:
    names = ["BraTS2021_00000", "BraTS2021_00001"]
    root, preds = tmp_path / "data", tmp_path / "oof"
    for name, (pred, truth) in zip(names, hand_made_cases(), strict=True):
        write_nifti(root / name / f"{name}_seg.nii.gz", truth)
        write_nifti(preds / f"{name}.nii.gz", pred)
    sweep = make_sweep(tmp_path, None, names, root)
    args = [f"run={sweep}", f"predictions={preds}", "sizes=[5]", "et_totals=[50]"]
    record = postprocess_command(compose_cli("postprocess", args))
    stored = json.loads((sweep / "postprocessing.json").read_text())
    assert stored == json.loads(json.dumps(record))
    assert stored["metric"] == "dice_mean" and stored["cases"] == 2 and stored["challenge"] == "brats2021"
    assert stored["chosen_on"] == "out-of-fold predictions of 2 folds" and stored["sweep"] == str(sweep)
    assert [c["checkpoint"] for c in stored["checkpoints"]] == [f"{i}/checkpoints/best.ckpt" for i in range(2)]
    assert [(r["rule"], r["region"]) for r in stored["rules"]] == [("min_size", "wt"), ("min_size", "et")]
    assert stored["score_after"] == pytest.approx(1.0) and stored["score_before"] < 1.0
    with pytest.raises(BratsError, match=r"postprocessing\.json already exists; pass overwrite=true"):
        postprocess_command(compose_cli("postprocess", args))
    lesionwise = postprocess_command(compose_cli("postprocess", [*args, "overwrite=true", "lesionwise=true"]))
    assert lesionwise["metric"] == "lesionwise_dice_mean"
    (preds / "prediction.json").write_text(json.dumps({"format": 1, "model": {"cv_postprocessing": []},
                                                       "cases": names}))
    with pytest.raises(BratsError, match=r"were written with post-processing already applied"):
        postprocess_command(compose_cli("postprocess", [*args, "overwrite=true"]))
    (preds / "prediction.json").unlink()
    (preds / f"{names[1]}.nii.gz").unlink()
    with pytest.raises(BratsError, match=r"lack 1 of the 2 out-of-fold cases \(e\.g\. BraTS2021_00001\)"):
        postprocess_command(compose_cli("postprocess", [*args, "overwrite=true"]))


def test_brats_predict_applies_the_sweeps_choice_unless_turned_off(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    old = FIXTURES / "v0_1"
    case = old / "BraTS2021_00000"
    sweep = make_sweep(tmp_path, old / "tiny_region.ckpt", [case.name, "BraTS2021_00001"], old)
    rule = {"rule": "min_size", "region": "wt", "min_size": 10**9}  # drops every tumour voxel
    (sweep / "postprocessing.json").write_text(json.dumps({"version": 1, "challenge": "brats2021", "rules": [rule],
                                                           "metric": "dice_mean", "score_before": 0.5,
                                                           "score_after": 0.6}))

    def run(name: str, *extra: str) -> np.ndarray:
        out = tmp_path / name
        predict_command(compose_cli("predict", [f"ckpt_path={sweep}", f"input={case}", f"output={out}", "device=cpu",
                                                "precision=fp32", *extra]))
        return np.asarray(nib.load(out / f"{case.name}.nii.gz").dataobj)

    plain = np.asarray(nib.load(old / "expected" / "plain.nii.gz").dataobj)
    assert plain.any()
    with caplog.at_level("WARNING"):
        assert not run("applied").any()
    assert "does not name the checkpoints its rules were chosen for (written by an older" in caplog.text
    assert np.array_equal(run("off", "cv_postprocess=false"), plain)  # two copies of one model = the model
    # The rules are part of what wrote the folder: a resume without them would mix two kinds of predictions.
    manifests = {name: json.loads((tmp_path / name / "prediction.json").read_text())["model"]
                 for name in ("applied", "off")}
    assert manifests["applied"]["cv_postprocessing"] == [rule] and "cv_postprocessing" not in manifests["off"]
    with pytest.raises(BratsError, match=r"holds predictions by another model.*cv_postprocessing"):
        run("applied", "cv_postprocess=false", "resume=true")


def test_out_of_fold_predictions_apply_the_sweeps_choice(tmp_path: Path) -> None:
    """oof=true: every fold's model applies the sweep's rules, and the manifest names them."""
    case = FIXTURES / "v0_1" / "BraTS2021_00000"
    root = tmp_path / "data"
    for name in (case.name, "BraTS2021_00001"):  # the fixture case twice, so that each fold validates one
        (root / name).mkdir(parents=True)
        for file in case.glob("*.nii.gz"):
            shutil.copy(file, root / name / file.name.replace(case.name, name))
    sweep = make_sweep(tmp_path, FIXTURES / "v0_1" / "tiny_region.ckpt", sorted(p.name for p in root.iterdir()), root)
    rule = {"rule": "et_to_ncr", "min_total": 10**9}  # all enhancing tumour becomes necrosis
    (sweep / "postprocessing.json").write_text(json.dumps({"version": 1, "challenge": "brats2021", "rules": [rule],
                                                           "metric": "dice_mean", "score_before": 0.5,
                                                           "score_after": 0.6}))
    out = tmp_path / "oof"
    predict_command(compose_cli("predict", [f"ckpt_path={sweep}", "oof=true", f"input={root}", f"output={out}",
                                            "device=cpu", "precision=fp32"]))
    plain = np.asarray(nib.load(FIXTURES / "v0_1" / "expected" / "plain.nii.gz").dataobj)
    assert (plain == 4).any()
    for name in (case.name, "BraTS2021_00001"):
        assert np.array_equal(np.asarray(nib.load(out / f"{name}.nii.gz").dataobj), np.where(plain == 4, 1, plain))
    model = json.loads((out / "prediction.json").read_text())["model"]
    assert model["oof"] and model["cv_postprocessing"] == [rule]


# ---- brats-postprocess on one run (its validation cases), brats-predict ckpt_path=<run dir> -----------------------
def one_run(tmp_path: Path, val: list[str] | None = None) -> tuple[Path, Path, np.ndarray]:
    """A single run of the fixture model whose one validation case is a tumour without enhancing tumour: the truth is
    the model's own prediction with its ET (one component of 11,585 voxels at the fixture's 5 mm) called necrosis, so
    all of the model's ET is false. Its .hydra/config.yaml holds data.root unresolved, as Hydra stores it (the demo's
    `${paths.data_dir}/synthetic`); the checkpoint's config holds it resolved. Returns (run, root, prediction)."""
    case = FIXTURES / "v0_1" / "BraTS2021_00000"
    plain = np.asarray(nib.load(FIXTURES / "v0_1" / "expected" / "plain.nii.gz").dataobj)
    root = tmp_path / "data"
    (root / case.name).mkdir(parents=True)
    for file in case.glob("*.nii.gz"):
        if not file.name.endswith("_seg.nii.gz"):
            shutil.copy(file, root / case.name / file.name)
    seg = nib.load(case / f"{case.name}_seg.nii.gz")
    nib.save(nib.Nifti1Image(np.where(plain == 4, 1, plain).astype(np.uint8), seg.affine, seg.header),
             root / case.name / f"{case.name}_seg.nii.gz")
    split = {"train": ["BraTS2021_00001"], "val": [case.name] if val is None else val, "test": [], "seed": 0,
             "fold": 0, "num_folds": 1}
    run = make_run(tmp_path / "run", FIXTURES / "v0_1" / "tiny_region.ckpt", root, split)
    (run / ".hydra" / "config.yaml").write_text("data:\n  root: ${paths.data_dir}/synthetic\npaths:\n  data_dir: "
                                                "nowhere\n")
    return run, root, plain


def test_brats_postprocess_on_one_run_chooses_on_its_validation_cases(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    run, root, plain = one_run(tmp_path)
    assert (plain == 4).sum() == 11585
    args = [f"run={run}", "device=cpu", "precision=fp32", "sizes=[1]", "et_totals=[2000,20000]"]
    record = postprocess_command(compose_cli("postprocess", args))
    # By hand: WT and TC are the truth's (ET and necrosis are both core), ET is 11,585 voxels against none: Dice 0.
    # The size rules (below 1 voxel) and `largest` (each region is one component) change nothing; ET under 2,000
    # voxels in all is not this ET; under 20,000 is: all of it becomes necrosis, ET Dice 1 (both empty).
    assert record["score_before"] == pytest.approx(2 / 3) and record["score_after"] == pytest.approx(1.0)
    assert [{k: v for k, v in r.items() if not k.startswith("score")} for r in record["rules"]] == \
        [{"rule": "et_to_ncr", "min_total": 20000}]
    tried = {(t["rule"], t.get("region"), t.get("min_total")): t["score"] for t in record["tried"]}
    assert tried[("et_to_ncr", None, 2000)] == pytest.approx(2 / 3)
    stored = json.loads((run / "postprocessing.json").read_text())
    assert stored == json.loads(json.dumps(record))
    assert stored["chosen_on"] == "validation cases of one run" and stored["cases"] == 1
    assert stored["run"] == str(run) and stored["truth"] == str(root) and "sweep" not in stored
    assert "choosing post-processing on 1 validation cases only" in caplog.text  # few cases: a noisy choice
    # The validation case was predicted by best.ckpt into <run>/postprocess/val (resumable, no rules applied).
    val = run / "postprocess" / "val"
    written = val / "BraTS2021_00000.nii.gz"
    assert np.array_equal(np.asarray(nib.load(written).dataobj), plain)
    manifest = json.loads((val / "prediction.json").read_text())["model"]
    assert manifest["members"][0]["checkpoint"] == str(run / "checkpoints" / "best.ckpt")
    assert "cv_postprocessing" not in manifest
    stamp = written.stat().st_mtime_ns
    with pytest.raises(BratsError, match=r"run/postprocessing\.json already exists; pass overwrite=true"):
        postprocess_command(compose_cli("postprocess", args))
    postprocess_command(compose_cli("postprocess", [*args, "overwrite=true"]))
    assert written.stat().st_mtime_ns == stamp  # resumed: not predicted again
    retrained = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    torch.save({**retrained, "global_step": 4}, run / "checkpoints" / "best.ckpt")  # another best.ckpt (its hash)
    postprocess_command(compose_cli("postprocess", [*args, "overwrite=true"]))  # replaces the old model's predictions
    assert written.stat().st_mtime_ns != stamp
    assert json.loads((val / "prediction.json").read_text())["model"]["members"][0]["sha256"] != \
        manifest["members"][0]["sha256"]

    def run_predict(name: str, ckpt: Path, *extra: str) -> tuple[np.ndarray, dict]:
        out = tmp_path / name
        predict_command(compose_cli("predict", [f"ckpt_path={ckpt}", f"input={root / 'BraTS2021_00000'}",
                                                f"output={out}", "device=cpu", "precision=fp32", *extra]))
        return (np.asarray(nib.load(out / "BraTS2021_00000.nii.gz").dataobj),
                json.loads((out / "prediction.json").read_text())["model"])

    applied, applied_model = run_predict("applied", run)
    raw, raw_model = run_predict("raw", run, "cv_postprocess=false")
    file, file_model = run_predict("file", run / "checkpoints" / "best.ckpt")
    assert np.array_equal(raw, plain) and np.array_equal(file, plain)  # a checkpoint file: no rules, as before
    assert np.array_equal(applied, apply_rules(plain, record["rules"], B21))
    assert np.array_equal(applied, np.where(plain == 4, 1, plain))
    assert applied_model["cv_postprocessing"] == json.loads(json.dumps(record["rules"]))
    assert "cv_postprocessing" not in raw_model and "cv_postprocessing" not in file_model
    assert applied_model["members"] == raw_model["members"] == file_model["members"]
    # From Python the run dir does what the command does (before, Segmenter.from_checkpoint ignored its rules).
    case = root / "BraTS2021_00000"
    for spec, options, expected in ((run, {}, applied), (run, {"cv_postprocess": False}, plain),
                                    (run / "checkpoints" / "best.ckpt", {}, plain)):
        seg = Segmenter.from_checkpoint(spec, device="cpu", precision="fp32", **options)
        assert np.array_equal(seg.segment(case)[1], expected), (spec, options)
    # The rules name the weights they were chosen for; a retrain after brats-postprocess makes them refused, not
    # silently applied to another model.
    best = run / "checkpoints" / "best.ckpt"
    assert json.loads((run / "postprocessing.json").read_text())["checkpoints"] == \
        [{"checkpoint": "checkpoints/best.ckpt", "sha256": file_sha256(best)}]
    torch.save({**retrained, "global_step": 5}, best)
    stale = r"run/postprocessing\.json: its rules were chosen for other weights than checkpoints/best\.ckpt now holds"
    with pytest.raises(BratsError, match=stale + r".*brats-postprocess run=.*run overwrite=true.*cv_postprocess=false"):
        run_predict("stale", run)
    with pytest.raises(BratsError, match=stale):
        Segmenter.from_checkpoint(run, device="cpu", precision="fp32")
    assert np.array_equal(run_predict("stale_off", run, "cv_postprocess=false")[0], plain)


def test_brats_postprocess_refuses_a_run_it_cannot_choose_on(tmp_path: Path) -> None:
    run, _, _ = one_run(tmp_path, val=[])
    with pytest.raises(BratsError, match=r"run/split\.json holds no validation cases: post-processing is chosen on "
                                         r"cases held out from the model"):
        postprocess_command(compose_cli("postprocess", [f"run={run}"]))
    (run / "checkpoints" / "best.ckpt").unlink()
    with pytest.raises(BratsError, match=r"run/checkpoints/best\.ckpt not found: the run .* has no best checkpoint"):
        postprocess_command(compose_cli("postprocess", [f"run={run}"]))
    with pytest.raises(BratsError, match=r"run/checkpoints/best\.ckpt not found"):
        predict_command(compose_cli("predict", [f"ckpt_path={run}", f"input={tmp_path}", f"output={tmp_path / 'o'}",
                                                "device=cpu"]))
    with pytest.raises(BratsError, match=r"run=.*nowhere is not a folder: pass a brats-train run dir or a cross-"):
        postprocess_command(compose_cli("postprocess", [f"run={tmp_path / 'nowhere'}"]))


def test_rules_are_chosen_on_the_foreground_box_with_the_same_scores_as_on_the_whole_head() -> None:
    """choose_rules cuts each pair to the box around their non-zero voxels (+1): the same rules and every tried score
    as on the uncut maps, here the hand-made cases placed in a 4x larger empty head."""
    pred, truth = np.zeros((16, 16, 16), np.uint8), np.zeros((16, 16, 16), np.uint8)
    pred[3, 4, 5], truth[9, 10, 11] = 2, 4
    box_pred, box_truth = foreground_box(pred, truth)
    assert box_pred.shape == (9, 9, 9) and box_pred[1, 1, 1] == 2 and box_truth[7, 7, 7] == 4
    assert foreground_box(np.zeros((5, 5, 5)), np.zeros((5, 5, 5)))[0].shape == (1, 1, 1)
    small = hand_made_cases()
    big = []
    for p, t in small:
        bp, bt = np.zeros((64, 40, 40), np.uint8), np.zeros((64, 40, 40), np.uint8)
        bp[30:46, 10:26, 20:36], bt[30:46, 10:26, 20:36] = p, t
        big.append((bp, bt))
    for lesionwise in (False, True):
        on_box = choose_rules(big, B21, lesionwise=lesionwise, sizes=[1, 5, 50])
        expected = choose_rules(small, B21, lesionwise=lesionwise, sizes=[1, 5, 50])
        assert on_box == expected and [r["rule"] for r in on_box["rules"]] == ["min_size", "min_size"]
        # The first group (whole tumour) is tried on the uncut predictions: its scores, recomputed on the whole
        # 64x40x40 maps without any cutting, are the ones recorded.
        for tried in on_box["tried"][:4]:
            rule = {k: v for k, v in tried.items() if k != "score"}
            whole = np.mean([case_score(apply_rule(p, rule, B21), t, B21, lesionwise) for p, t in big])
            assert tried["score"] == pytest.approx(whole), rule
