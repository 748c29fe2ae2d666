"""Cross-validation end to end on a real tiny 2-fold sweep: split files, cv.md/cv.csv, out-of-fold predictions and the
sweep as an ensemble (brats-train -m data.num_folds=2 data.fold=0,1)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import compose_cli, tiny_overrides

import brats_unet
from brats_unet.cli.evaluate import evaluate as evaluate_command
from brats_unet.cli.postprocess import postprocess as postprocess_command
from brats_unet.cli.predict import predict as predict_command
from brats_unet.evaluation.challenges import CHALLENGES
from brats_unet.inference.export import export_package
from brats_unet.inference.postprocess import apply_rules
from brats_unet.reporting.writer import write_report
from brats_unet.utils import BratsError, file_sha256

pytestmark = pytest.mark.slow
REGIONS = ("val/dice_wt", "val/dice_tc", "val/dice_et", "val/dice_mean", "val/hd95_wt", "val/hd95_tc", "val/hd95_et")


@pytest.fixture(scope="module")
def sweep(synthetic_root: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cv")
    overrides = [o for o in tiny_overrides(synthetic_root, cache_dir, tmp)
                 if not o.startswith(("paths.output", "module.val_hd95"))]  # HD95 on: cv.md reports it
    folder = tmp / "sweep"
    cmd = [sys.executable, "-m", "brats_unet.cli.train", "-m", *overrides, "logger=none", "data.num_folds=2",
           "data.fold=0,1", f"hydra.sweep.dir={folder}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def split(job: Path) -> dict:
    return json.loads((job / "split.json").read_text())


def labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def test_each_job_validates_its_own_fold_with_the_same_test_cases(sweep: Path, synthetic_root: Path) -> None:
    a, b = split(sweep / "0"), split(sweep / "1")
    assert (a["fold"], b["fold"], a["num_folds"], b["num_folds"], a["seed"], b["seed"]) == (0, 1, 2, 2, 0, 0)
    assert a["test"] == b["test"] and len(a["test"]) == 1  # data=synthetic: test_fraction 0.2 of 6 cases
    assert not set(a["val"]) & set(b["val"])
    assert sorted(a["val"] + b["val"] + a["test"]) == sorted(p.name for p in synthetic_root.iterdir())
    assert set(a["train"]) == set(b["val"]) and set(b["train"]) == set(a["val"])


def test_report_writes_per_fold_metrics_with_mean_and_std(sweep: Path, tmp_path: Path) -> None:
    finals = [json.loads((sweep / job / "metrics.json").read_text()) for job in ("0", "1")]
    write_report(sweep, tmp_path / "report")
    with open(tmp_path / "report" / "cv.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["fold"] for r in rows] == ["0", "1", "mean", "std"]
    assert [r["status"] for r in rows[:2]] == ["complete", "complete"]
    for metric in REGIONS:
        values = [m["final"][metric] for m in finals]
        assert [float(r[metric]) for r in rows[:2]] == values
        assert float(rows[2][metric]) == pytest.approx((values[0] + values[1]) / 2)
        assert float(rows[3][metric]) == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)  # sample std, n=2
    best = [m["best"]["val/dice_mean"] for m in finals]
    assert [float(r["best val/dice_mean"]) for r in rows[:2]] == best
    text = (tmp_path / "report" / "cv.md").read_text()
    assert "2 of 2 folds finished and validated (data.num_folds=2)" in text and "Did not finish" not in text
    mean_row = next(line for line in text.splitlines() if line.startswith("| mean ± std"))
    assert f"{np.mean(best):.4f} ± {np.std(best, ddof=1):.4f}" in mean_row

    # An interrupted fold (no metrics.json) is named and left out of the mean.
    partial = tmp_path / "partial"
    shutil.copytree(sweep, partial)
    (partial / "1" / "metrics.json").unlink()
    write_report(partial, tmp_path / "partial_report")
    text = (tmp_path / "partial_report" / "cv.md").read_text()
    assert "1 of 2 folds finished and validated" in text
    assert "Did not finish (no metrics.json; left out of the mean): fold 1 (job 1)." in text
    with open(tmp_path / "partial_report" / "cv.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[1]["status"] == "incomplete" and rows[1]["val/dice_wt"] == ""
    assert float(rows[2]["val/dice_wt"]) == finals[0]["final"]["val/dice_wt"] and rows[3]["val/dice_wt"] == ""


def test_out_of_fold_predicts_each_case_with_the_model_that_did_not_train_on_it(
        sweep: Path, synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "oof"
    predict_command(compose_cli("predict", [f"ckpt_path={sweep}", "oof=true", f"input={synthetic_root}",
                                            f"output={out}", "device=cpu"]))
    folds = [split(sweep / job) for job in ("0", "1")]
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"{c}.nii.gz" for f in folds for c in f["val"]),
                                                            "prediction.json"])
    for job, fold in zip(("0", "1"), folds, strict=True):
        own = brats_unet.Segmenter.from_checkpoint(sweep / job / "checkpoints" / "best.ckpt", device="cpu")
        case = fold["val"][0]
        assert np.array_equal(labels(out / f"{case}.nii.gz"), np.asarray(own.predict(synthetic_root / case).dataobj))

    summary = evaluate_command(compose_cli("evaluate", [f"pred={out}", f"truth={synthetic_root}",
                                                        f"output={tmp_path / 'eval'}"]))
    assert summary["n_cases"] == 5 and summary["missing_predictions"] == folds[0]["test"]
    with pytest.raises(BratsError, match=r"already holds 6 files; pass overwrite=true"):
        predict_command(compose_cli("predict", [f"ckpt_path={sweep}", "oof=true", f"input={synthetic_root}",
                                                f"output={out}", "device=cpu"]))
    # prediction.json names one model, the set of fold models; resuming with it predicts nothing new.
    model = json.loads((out / "prediction.json").read_text())["model"]
    assert model["oof"] and [m["checkpoint"] for m in model["members"]] == [
        str(sweep / job / "checkpoints" / "best.ckpt") for job in ("0", "1")]
    assert summary["model"] == model
    predict_command(compose_cli("predict", [f"ckpt_path={sweep}", "oof=true", f"input={synthetic_root}",
                                            f"output={out}", "device=cpu", "resume=true"]))
    one_split = f"split_file={sweep / '0' / 'split.json'}"
    with pytest.raises(BratsError, match=r"oof=true predicts each fold's own split\.json validation cases"):
        predict_command(compose_cli("predict", [f"ckpt_path={sweep}", "oof=true", f"input={synthetic_root}",
                                                f"output={tmp_path / 'x'}", one_split]))


def test_the_sweep_dir_is_an_ensemble_of_its_folds(sweep: Path, synthetic_root: Path, tmp_path: Path) -> None:
    test_case = split(sweep / "0")["test"][0]
    out = tmp_path / "ensemble"
    predict_command(compose_cli("predict", [f"ckpt_path={sweep}", f"input={synthetic_root}", f"output={out}",
                                            f"split_file={sweep / '0' / 'split.json'}", "device=cpu"]))
    assert sorted(p.name for p in out.iterdir()) == [f"{test_case}.nii.gz", "prediction.json"]
    best = [sweep / job / "checkpoints" / "best.ckpt" for job in ("0", "1")]
    listed = brats_unet.Segmenter.from_checkpoint(best, device="cpu")
    assert np.array_equal(labels(out / f"{test_case}.nii.gz"),
                          np.asarray(listed.predict(synthetic_root / test_case).dataobj))


def test_a_sweep_exports_as_one_package_with_its_cv_table(sweep: Path, synthetic_root: Path, tmp_path: Path) -> None:
    write_report(sweep, sweep / "report")  # <sweep>/report/cv.md, where brats-report writes it
    try:
        package = export_package(sweep, tmp_path / "cv_model", measure=False)
    finally:
        shutil.rmtree(sweep / "report")  # the sweep is shared by this module's tests
    meta = json.loads((package / "model.json").read_text())
    assert [m["source"] for m in meta["members"]] == ["0/checkpoints/best.ckpt", "1/checkpoints/best.ckpt"]
    assert [m["run"]["fold"] for m in meta["members"]] == [0, 1]
    first = next((synthetic_root / split(sweep / "0")["train"][0]).glob("*_t1.nii.gz"))
    zooms = [float(z) for z in nib.load(first).header.get_zooms()]
    assert meta["training_spacing"]["spacing"] == pytest.approx(zooms, abs=1e-4)  # stored to 4 decimals
    card = (package / "MODEL_CARD.md").read_text()
    assert "| mean ± sd |" in card and "### Cross-validation (report/cv.md)" in card
    test_case = synthetic_root / split(sweep / "0")["test"][0]
    best = [sweep / job / "checkpoints" / "best.ckpt" for job in ("0", "1")]
    from_ckpts = brats_unet.Segmenter.from_checkpoint(best, device="cpu").predict_proba(test_case)
    from_package = brats_unet.Segmenter.from_package(package, device="cpu").predict_proba(test_case)
    assert torch.equal(torch.from_numpy(from_ckpts), torch.from_numpy(from_package))


def test_postprocessing_chosen_on_the_folds_is_what_predict_applies(sweep: Path, synthetic_root: Path,
                                                                    tmp_path: Path) -> None:
    cv = tmp_path / "cv"
    shutil.copytree(sweep, cv)  # postprocessing.json goes into the sweep: keep the shared one as it was
    record = postprocess_command(compose_cli("postprocess", [f"run={cv}", "device=cpu", "precision=fp32",
                                                             "sizes=[5,50]", "et_totals=[50]"]))
    oof = sorted(p.name for p in (cv / "postprocess" / "oof").glob("*.nii.gz"))
    assert oof == sorted(f"{c}.nii.gz" for job in ("0", "1") for c in split(cv / job)["val"])
    assert record["cases"] == len(oof) and record["score_after"] >= record["score_before"]
    assert json.loads((cv / "postprocessing.json").read_text())["rules"] == json.loads(json.dumps(record["rules"]))
    test_case = split(cv / "0")["test"][0]
    outs = {}
    for name, extra in (("applied", []), ("raw", ["cv_postprocess=false"])):
        predict_command(compose_cli("predict", [f"ckpt_path={cv}", f"input={synthetic_root / test_case}",
                                                f"output={tmp_path / name}", "device=cpu", "precision=fp32", *extra]))
        outs[name] = labels(tmp_path / name / f"{test_case}.nii.gz")
    assert np.array_equal(outs["applied"], apply_rules(outs["raw"], record["rules"], CHALLENGES["brats2021"]))
    # The sweep exported as one package carries the choice: brats-predict model=<package> writes the same labels.
    package = export_package(cv, tmp_path / "package", measure=False)
    predict_command(compose_cli("predict", [f"package={package}", f"input={synthetic_root / test_case}",
                                            f"output={tmp_path / 'from_package'}", "device=cpu", "precision=fp32"]))
    assert np.array_equal(labels(tmp_path / "from_package" / f"{test_case}.nii.gz"), outs["applied"])
    # Fold 0 retrained after brats-postprocess: its rules are refused until chosen again, and choosing again
    # (overwrite=true) replaces the old models' out-of-fold predictions rather than resuming into them.
    best = cv / "0" / "checkpoints" / "best.ckpt"
    torch.save({**torch.load(best, map_location="cpu", weights_only=True), "global_step": 7}, best)
    with pytest.raises(BratsError, match=r"cv/postprocessing\.json: its rules were chosen for other weights than "
                                         r"0/checkpoints/best\.ckpt now holds"):
        predict_command(compose_cli("predict", [f"ckpt_path={cv}", f"input={synthetic_root / test_case}",
                                                f"output={tmp_path / 'stale'}", "device=cpu", "precision=fp32"]))
    with pytest.raises(BratsError, match=r"0/checkpoints/best\.ckpt now holds"):
        export_package(cv, tmp_path / "stale_package", measure=False)
    unruled = export_package(cv, tmp_path / "package_without_rules", measure=False, cv_postprocess=False)
    assert "cv_postprocessing" not in json.loads((unruled / "model.json").read_text())
    postprocess_command(compose_cli("postprocess", [f"run={cv}", "device=cpu", "precision=fp32", "sizes=[5,50]",
                                                    "et_totals=[50]", "overwrite=true"]))
    members = json.loads((cv / "postprocess" / "oof" / "prediction.json").read_text())["model"]["members"]
    assert [m["sha256"] for m in members] == [file_sha256(cv / j / "checkpoints" / "best.ckpt") for j in ("0", "1")]
    assert [c["sha256"] for c in json.loads((cv / "postprocessing.json").read_text())["checkpoints"]] == \
        [m["sha256"] for m in members]
