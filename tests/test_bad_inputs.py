"""Every command on every kind of bad input: an `error:` paragraph naming the file or key, a non-zero exit, no
traceback, nothing half-written. File-level checks live in test_io.py; these are the commands on top of them.

Most cases call the plain functions (preprocess(cfg), train(cfg), ...) and match the BratsError; a representative set
per command runs the installed console script to check exit code 2 and the absence of a traceback.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import compose_cli, compose_train, run_evaluate, run_predict, save_checkpoint, script, tiny_overrides
from omegaconf import DictConfig

from brats_unet.cli import synth
from brats_unet.cli.preprocess import preprocess
from brats_unet.cli.report import report
from brats_unet.synth.generator import write_dataset
from brats_unet.training.fit import train
from brats_unet.utils import BratsError, atomic_save_npy

SHAPE = (32, 32, 32)
CASE = "BraTS2021_00000"


def one_case(tmp_path: Path, name: str = "root") -> tuple[Path, Path]:
    root = tmp_path / name
    write_dataset(root, cases=1, seed=1, shape=SHAPE, progress=False, workers=1)
    return root, root / CASE


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def rewrite(case_dir: Path, key: str, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    path = case_dir / f"{case_dir.name}_{key}.nii.gz"
    old = nib.load(path)
    nib.save(nib.Nifti1Image(data, old.affine if affine is None else affine), path)


def image(case_dir: Path, key: str) -> np.ndarray:
    return np.asarray(nib.load(case_dir / f"{case_dir.name}_{key}.nii.gz").dataobj)


def truncate(case_dir: Path) -> None:
    path = case_dir / f"{CASE}_flair.nii.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def not_nifti(case_dir: Path) -> None:
    (case_dir / f"{CASE}_flair.nii.gz").write_bytes(gzip.compress(b"just some text, not an image\n" * 50))


def nan_voxels(case_dir: Path, value: float = np.nan) -> None:
    data = image(case_dir, "t1").astype(np.float32)
    data[5, 5, 5] = value
    rewrite(case_dir, "t1", data)


def shifted_affine(case_dir: Path) -> None:
    affine = nib.load(case_dir / f"{CASE}_t2.nii.gz").affine.copy()
    affine[0, 3] += 2.0
    rewrite(case_dir, "t2", image(case_dir, "t2"), affine)


def rename_case(case_dir: Path) -> None:
    case_dir.rename(case_dir.with_name("Renamed_001"))


def with_seg(case_dir: Path, change: Callable[[np.ndarray], np.ndarray]) -> None:
    rewrite(case_dir, "seg", change(image(case_dir, "seg")))


# (corruption, regex of the message); each names the file and the problem. Used by preprocess, train and predict.
IMAGE_PROBLEMS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (truncate, rf"{CASE}_flair\.nii\.gz: cannot read the voxels: truncated or corrupt gzip"),
    "not_nifti": (not_nifti, rf"{CASE}_flair\.nii\.gz: not a NIfTI file"),
    "missing_modality": (lambda d: (d / f"{CASE}_t2.nii.gz").unlink(), rf"{CASE}_t2\.nii\.gz"),
    "shapes_differ": (lambda d: rewrite(d, "t1ce", image(d, "t1ce")[:, :, :30]),
                      rf"{CASE}_t1ce\.nii\.gz: shape \(32, 32, 30\) differs from t1 \(32, 32, 32\)"),
    "affines_differ": (shifted_affine, rf"{CASE}_t2\.nii\.gz: affine differs from t1 by up to 2"),
    "4d_image": (lambda d: rewrite(d, "flair", np.stack([image(d, "flair")] * 2, axis=-1)),
                 rf"{CASE}_flair\.nii\.gz: 4D image of shape \(32, 32, 32, 2\) where a 3D volume was expected"),
    "nan_voxels": (nan_voxels, rf"{CASE}_t1\.nii\.gz: 1 NaN or Inf voxels"),
    "inf_voxels": (lambda d: nan_voxels(d, np.inf), rf"{CASE}_t1\.nii\.gz: 1 NaN or Inf voxels"),
    "all_zero": (lambda d: rewrite(d, "t1ce", np.zeros(SHAPE, np.int16)),
                 rf"{CASE}_t1ce\.nii\.gz: t1ce image is all zero"),
    "name_mismatch": (rename_case, rf"Renamed_001: {CASE}_t1\.nii\.gz: file name does not match the case folder name"),
}
LABEL_PROBLEMS = {
    "labels_outside": (lambda d: with_seg(d, lambda s: np.where(np.indices(s.shape)[0] == 0, 5, s).astype(s.dtype)),
                       rf"{CASE}_seg\.nii\.gz: label values \[5\] are not brats2021 labels \(allowed \[0, 1, 2, 4\];"),
    "float_labels": (lambda d: with_seg(d, lambda s: (s + 0.5).astype(np.float32)),
                     rf"{CASE}_seg\.nii\.gz: label map holds non-integer values \(e\.g\. 0\.5\)"),
}
DATA_PROBLEMS = {**IMAGE_PROBLEMS, **LABEL_PROBLEMS}


def no_temp_files(path: Path) -> bool:
    return not [p for p in path.rglob(".tmp-*")]


# ---- brats-preprocess ---------------------------------------------------------------------------------------------
def preprocess_cfg(root: Path, cache: Path, *extra: str) -> DictConfig:
    return compose_cli("preprocess", [f"data.root={root}", f"paths.cache_dir={cache}", "preprocess=modern",
                                      "num_workers=0", *extra])


@pytest.mark.parametrize("problem", sorted(DATA_PROBLEMS))
def test_preprocess_names_the_file_and_writes_nothing(problem: str, tmp_path: Path) -> None:
    root, case_dir = one_case(tmp_path)
    corrupt, message = DATA_PROBLEMS[problem]
    corrupt(case_dir)
    with pytest.raises(BratsError, match=message):
        preprocess(preprocess_cfg(root, tmp_path / "cache"))
    # The only case is bad: no array, no meta, no temp file; at most the empty cache folders.
    assert files_under(tmp_path / "cache") == []


@pytest.mark.parametrize("setup, message", [
    (lambda root: None, r"data root .*nowhere does not exist; expected <root>/<case>/<case>_\{t1,t1ce,t2,flair,seg\}"),
    (lambda root: root.mkdir(), r"data root .*nowhere holds no case folders; expected"),
    (lambda root: root.write_text("x"), r"data root .*nowhere is not a folder"),
], ids=["missing_root", "empty_root", "root_is_a_file"])
def test_preprocess_bad_roots(setup, message: str, tmp_path: Path) -> None:
    setup(tmp_path / "nowhere")
    with pytest.raises(BratsError, match=message + r".*\(config key data\.root\)"):
        preprocess(preprocess_cfg(tmp_path / "nowhere", tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


def test_extra_unknown_files_are_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root, case_dir = one_case(tmp_path)
    (case_dir / "notes.txt").write_text("scanner: 3T\n")
    (case_dir / f"{CASE}_t1_backup.nii.gz").write_bytes(b"junk")
    (root / "README").write_text("a file beside the case folders\n")
    with caplog.at_level("INFO"):
        out = preprocess(preprocess_cfg(root, tmp_path / "cache"))
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", *(f"{CASE}{s}" for s in (".json", "_x.npy",
                                                                                                "_y.npy"))])
    assert "ignoring 2 unknown files" in caplog.text and f"{CASE}/notes.txt" in caplog.text
    # the other dataset tools that list cases say what they ignored too
    caplog.clear()
    with caplog.at_level("INFO"):
        report(compose_cli("report", [f"run={fake_run(tmp_path)}", f"data_root={root}", f"output={tmp_path / 'r'}"]))
    assert "ignoring 2 unknown files" in caplog.text and "notes.txt" in caplog.text


def test_output_folder_not_writable(tmp_path: Path) -> None:
    """Root ignores permission bits, so "not writable" is a path under a regular file: every OS refuses that."""
    root, _ = one_case(tmp_path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError):  # the CLI turns it into `error: Not a directory: <path>`, exit 2
        preprocess(preprocess_cfg(root, tmp_path / "afile" / "sub"))


def test_disk_full_leaves_no_temp_file_and_the_target_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC half way through a write (simulated: the one monkeypatch in this file)."""
    target = tmp_path / "x.npy"
    atomic_save_npy(target, np.arange(10))

    def full_disk(fp, array, **kwargs):
        fp.write(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np.lib.format, "write_array", full_disk)
    with pytest.raises(BratsError, match=rf"cannot write {target}: No space left on device \(the file was left "):
        atomic_save_npy(target, np.zeros(1000))
    monkeypatch.undo()
    assert np.array_equal(np.load(target), np.arange(10))
    assert [p.name for p in tmp_path.iterdir()] == ["x.npy"]
    # and through a whole command: the cache case is not half-written
    root, _ = one_case(tmp_path)
    monkeypatch.setattr(np.lib.format, "write_array", full_disk)
    with pytest.raises(BratsError, match=r"cannot write .*_x\.npy: No space left on device"):
        preprocess(preprocess_cfg(root, tmp_path / "cache"))
    assert files_under(tmp_path / "cache") == []


# ---- brats-train: config values and checkpoints ----------------------------------------------------------------
@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small")
    write_dataset(root, cases=3, seed=2, shape=(64, 64, 48), progress=False, workers=1)
    return root


def train_cfg(root: Path, tmp_path: Path, *extra: str) -> DictConfig:
    return compose_train([*tiny_overrides(root, tmp_path / "cache", tmp_path / "run"), "logger=none", *extra])


@pytest.mark.parametrize("override, message", [
    ("loss.alpha=1.5", r"loss\.alpha must be a number in \[0, 1\], got 1\.5"),
    ("loss.alpha=-0.1", r"loss\.alpha must be a number in \[0, 1\], got -0\.1"),
    ("data.patch_size=[32,0,32]", r"data\.patch_size must be positive .*\[32, 0, 32\]"),
    ("data.patch_size=[32,-32,32]", r"data\.patch_size must be positive"),
    ("data.patch_size=[32,32]", r"data\.patch_size must hold 3 positive integers, got 2"),
    ("data.batch_size=0", r"data\.batch_size must be a positive integer, got 0"),
    ("data.batch_size=-2", r"data\.batch_size must be a positive integer, got -2"),
    ("model.filters=[4,-8,16]", r"model\.filters must be positive .*\[-8\] <= 0"),
    ("model.filters=[0,8,16]", r"model\.filters must be positive"),
    ("data.patch_size=[34,34,34]", r"data\.patch_size \[34, 34, 34\] must be a multiple of 4 .*\[32,32,32\]"),
    ("data.patch_size=[96,96,96]", r"data\.patch_size \[96, 96, 96\] is larger than every volume it would be cut "
                                   r"from: e\.g\. BraTS2021_00000 is \[64, 64, 48\]"),
    ("optimizer.lr=0", r"optimizer\.lr must be a positive number"),
], ids=lambda v: v if "=" in str(v) else "")
def test_train_refuses_bad_config_values_before_any_work(override: str, message: str, small_root: Path,
                                                         tmp_path: Path) -> None:
    with pytest.raises(BratsError, match=message):
        train(train_cfg(small_root, tmp_path, override))
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_patch_larger_than_the_seed_crop_box(small_root: Path, tmp_path: Path) -> None:
    cfg = compose_train([*tiny_overrides(small_root, tmp_path / "cache", tmp_path / "run", preprocess="seed"),
                         "data.patch_size=[64,64,32]"])
    with pytest.raises(BratsError, match=r"\[64, 64, 32\] is larger than every volume .*crop_box\) is \[48, 48, 32\]"):
        train(cfg)


@pytest.mark.parametrize("problem", ["nan_voxels", "labels_outside", "truncated"])
def test_train_stops_on_a_bad_case_with_its_file_named(problem: str, small_root: Path, tmp_path: Path) -> None:
    root, case_dir = one_case(tmp_path)
    corrupt, message = DATA_PROBLEMS[problem]
    corrupt(case_dir)
    with pytest.raises(BratsError, match=message):
        train(train_cfg(root, tmp_path, "data.patch_size=[16,16,16]"))
    assert files_under(tmp_path / "cache") == [] and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("root, message", [("nowhere", r"data root .*nowhere does not exist"),
                                           ("empty", r"data root .*empty holds no case folders")])
def test_train_bad_roots(root: str, message: str, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(BratsError, match=message):
        train(train_cfg(tmp_path / root, tmp_path))


def test_train_run_dir_under_a_file(small_root: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    cfg = compose_train([*tiny_overrides(small_root, tmp_path / "cache", tmp_path / "afile" / "run"), "logger=none"])
    with pytest.raises(BratsError, match=r"cannot create the run dir .*afile/run \(paths\.output_dir\): Not a dir"):
        train(cfg)


def test_train_resume_from_a_different_model_config(small_root: Path, tmp_path: Path) -> None:
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    save_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", "model.filters=[4,8,32]")
    with pytest.raises(BratsError, match=r"last\.ckpt was written by a different model config \(changed config keys: "
                                         r".*model\.filters\); its weights do not fit this model: .*\(32, 8, 3, 3, 3\) "
                                         r"vs model \(16, 8, 3, 3, 3\)"):
        train(train_cfg(small_root, tmp_path, "ckpt_path=last"))
    assert files_under(tmp_path / "run") == [tmp_path / "run" / "checkpoints" / "last.ckpt"]


def test_train_truncated_checkpoint(small_root: Path, tmp_path: Path) -> None:
    good = save_checkpoint(tmp_path / "good.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(BratsError, match=r"checkpoint .*bad\.ckpt cannot be read .*is it truncated\?"):
        train(train_cfg(small_root, tmp_path, f"ckpt_path={bad}"))
    with pytest.raises(BratsError, match=r"ckpt_path .*absent\.ckpt does not exist"):
        train(train_cfg(small_root, tmp_path, f"ckpt_path={tmp_path / 'absent.ckpt'}"))
    # ckpt_path=last with only a damaged last.ckpt: named, not a fresh start that would overwrite it
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(bad.read_bytes())
    with pytest.raises(BratsError, match=r"ckpt_path=last: no checkpoint in .*checkpoints can be read: .*last\.ckpt "
                                         r"cannot be read"):
        train(train_cfg(small_root, tmp_path, "ckpt_path=last"))


# ---- brats-predict -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.ckpt", "preprocess=modern",
                           "data.patch_size=[16,16,16]")


PREDICT_MESSAGES = {**{k: v for k, (_, v) in IMAGE_PROBLEMS.items()},
                    "missing_modality": rf"{CASE}: the model needs modalities .*expected e\.g\. .*{CASE}_t2\.nii\.gz",
                    "name_mismatch": r"Renamed_001: the model needs modalities .*expected e\.g\. Renamed_001_t1\.nii"}


@pytest.mark.parametrize("problem", sorted(IMAGE_PROBLEMS))
def test_predict_names_the_file_and_writes_nothing(problem: str, model_ckpt: Path, tmp_path: Path) -> None:
    root, case_dir = one_case(tmp_path)
    IMAGE_PROBLEMS[problem][0](case_dir)
    with pytest.raises(BratsError, match=PREDICT_MESSAGES[problem]):
        run_predict(model_ckpt, root, tmp_path / "pred")
    assert files_under(tmp_path / "pred") == []


def test_predict_bad_roots_outputs_and_checkpoints(model_ckpt: Path, tmp_path: Path) -> None:
    root, _ = one_case(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BratsError, match=r"input .*empty holds no case folders"):
        run_predict(model_ckpt, tmp_path / "empty", tmp_path / "pred")
    with pytest.raises(BratsError, match=r"input .*nowhere does not exist"):
        run_predict(model_ckpt, tmp_path / "nowhere", tmp_path / "pred")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BratsError, match=r"cannot create output folder .*afile/sub"):
        run_predict(model_ckpt, root, tmp_path / "afile" / "sub")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(model_ckpt.read_bytes()[:2000])
    with pytest.raises(BratsError, match=r"bad\.ckpt cannot be read .*truncated"):
        run_predict(bad, root, tmp_path / "pred")
    other = torch.load(model_ckpt, weights_only=False)
    other["brats_config"]["model"]["filters"] = [4, 8, 32]
    torch.save(other, tmp_path / "other.ckpt")
    with pytest.raises(BratsError, match=r"other\.ckpt: .*model config differs"):
        run_predict(tmp_path / "other.ckpt", root, tmp_path / "pred")
    assert not (tmp_path / "pred").exists()


# ---- brats-evaluate ----------------------------------------------------------------------------------------------
def prediction(tmp_path: Path, data: np.ndarray, affine: np.ndarray | None = None, raw: bytes | None = None) -> Path:
    pred = tmp_path / "pred"
    pred.mkdir(exist_ok=True)
    path = pred / f"{CASE}.nii.gz"
    if raw is not None:
        path.write_bytes(raw)
    else:
        nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return pred


@pytest.mark.parametrize("problem, make, message", [
    ("truncated", lambda seg: {"data": seg, "truncate": True}, r"\.nii\.gz: cannot read the voxels: truncated"),
    ("not_nifti", lambda seg: {"raw": gzip.compress(b"text, not an image\n" * 40)}, r"\.nii\.gz: not a NIfTI file"),
    ("4d", lambda seg: {"data": np.stack([seg, seg], -1)}, r"\.nii\.gz: 4D image of shape \(32, 32, 32, 2\)"),
    ("nan", lambda seg: {"data": np.full(SHAPE, np.nan, np.float32)}, r"\.nii\.gz: label map holds NaN or Inf voxels"),
    ("labels_outside", lambda seg: {"data": np.full(SHAPE, 7, np.uint8)}, r"\.nii\.gz: label values \[7\]"),
])
def test_evaluate_bad_prediction_files(problem: str, make, message: str, tmp_path: Path) -> None:
    root, case_dir = one_case(tmp_path)
    seg = nib.load(case_dir / f"{CASE}_seg.nii.gz")
    kwargs = make(np.asarray(seg.dataobj))
    pred = prediction(tmp_path, kwargs.get("data"), seg.affine, kwargs.get("raw"))
    if kwargs.get("truncate"):
        path = pred / f"{CASE}.nii.gz"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BratsError, match=rf"{CASE}{message}"):
        run_evaluate(pred, root, tmp_path / "eval")
    assert files_under(tmp_path / "eval") == []


def test_evaluate_bad_roots_and_output(tmp_path: Path) -> None:
    root, case_dir = one_case(tmp_path)
    seg = nib.load(case_dir / f"{CASE}_seg.nii.gz")
    pred = prediction(tmp_path, np.asarray(seg.dataobj), seg.affine)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BratsError, match=r"truth .*nowhere does not exist"):
        run_evaluate(pred, tmp_path / "nowhere", tmp_path / "eval")
    with pytest.raises(BratsError, match=r"truth .*empty holds no case folders with a segmentation"):
        run_evaluate(pred, tmp_path / "empty", tmp_path / "eval")
    (tmp_path / "afile").write_text("x")
    with pytest.raises((BratsError, NotADirectoryError)):
        run_evaluate(pred, root, tmp_path / "afile" / "sub")
    assert files_under(tmp_path / "eval") == []
    assert run_evaluate(pred, root, tmp_path / "eval")["n_cases"] == 1  # and the good inputs do work


# ---- brats-report ------------------------------------------------------------------------------------------------
def fake_run(tmp_path: Path) -> Path:
    run = tmp_path / "fake_run"
    run.mkdir(exist_ok=True)
    (run / "metrics.json").write_text(json.dumps({"final": {"val/dice_mean": 0.5}, "best": {}, "epochs": 1,
                                                  "global_step": 2}))
    return run


@pytest.mark.parametrize("problem", ["truncated_seg", "float_labels", "labels_outside", "missing_seg"])
def test_report_bad_data_root(problem: str, tmp_path: Path) -> None:
    root, case_dir = one_case(tmp_path)
    seg = case_dir / f"{CASE}_seg.nii.gz"
    message = {"truncated_seg": rf"{CASE}_seg\.nii\.gz: cannot read the voxels: truncated",
               "float_labels": LABEL_PROBLEMS["float_labels"][1],
               "labels_outside": rf"{CASE}_seg\.nii\.gz: .*5",
               "missing_seg": rf"{CASE}: {CASE}_seg\.nii\.gz: missing seg file"}[problem]
    if problem == "truncated_seg":
        seg.write_bytes(seg.read_bytes()[: seg.stat().st_size // 2])
    elif problem == "missing_seg":
        seg.unlink()
    else:
        LABEL_PROBLEMS[problem][0](case_dir)
    with pytest.raises(BratsError, match=message):
        report(compose_cli("report", [f"run={fake_run(tmp_path)}", f"data_root={root}"]))
    assert not (tmp_path / "fake_run" / "report").exists()


def test_report_bad_predictions_and_output(tmp_path: Path) -> None:
    root, case_dir = one_case(tmp_path)
    seg = nib.load(case_dir / f"{CASE}_seg.nii.gz")
    pred = prediction(tmp_path, np.stack([np.asarray(seg.dataobj)] * 2, -1), seg.affine)
    run = fake_run(tmp_path)
    with pytest.raises(BratsError, match=rf"pred/{CASE}\.nii\.gz: 4D image"):
        report(compose_cli("report", [f"run={run}", f"data_root={root}", f"predictions={pred}"]))
    with pytest.raises(BratsError, match=r"predictions folder .*nowhere does not exist"):
        report(compose_cli("report", [f"run={run}", f"data_root={root}", f"predictions={tmp_path / 'nowhere'}"]))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BratsError, match=r"cannot create output folder .*afile/sub"):
        report(compose_cli("report", [f"run={run}", f"output={tmp_path / 'afile' / 'sub'}"]))
    assert not (run / "report").exists()


# ---- brats-synth (argparse; its main is called in-process) ------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--cases", "0"], r"error: cases must be at least 1, got 0"),
    (["--shape", "8", "32", "-4"], r"error: shape must be three sizes of at least 16 voxels, got \[8, 32, -4\]"),
    (["--out", "{tmp}/afile/sub"], r"error: cannot create output folder .*afile/sub: Not a directory"),
])
def test_synth_bad_arguments(args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "afile").write_text("x")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        synth.main([*out, *args, "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


# ---- the installed scripts: exit code 2 (Hydra's own errors: 1), one `error:` paragraph, no traceback ----------
def cli(tool: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "BRATS_DEBUG")}
    return subprocess.run([script(tool), *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env=env)


@pytest.mark.slow
@pytest.mark.parametrize("tool, args, message", [
    ("brats-synth", ["--out", "afile/sub", "--cases", "1"], "error: cannot create output folder afile/sub"),
    ("brats-preprocess", ["data.root=root", "paths.cache_dir=cache", "num_workers=0"],
     rf"error: {CASE}: {CASE}_flair.nii.gz: cannot read the voxels: truncated"),
    ("brats-preprocess", ["data.root=nowhere"], "error: data root nowhere does not exist"),
    ("brats-train", ["data.root=root", "loss.alpha=2"], "error: loss.alpha must be a number in [0, 1], got 2"),
    ("brats-train", ["data.root=root", "data.batch_size=0"], "error: data.batch_size must be a positive integer"),
    ("brats-predict", ["ckpt_path=bad.ckpt", "input=root", "output=pred"], "error: checkpoint bad.ckpt cannot be read"),
    ("brats-evaluate", ["pred=root", "truth=nowhere", "output=eval"], "error: truth nowhere does not exist"),
    ("brats-report", ["run=nowhere"], "error: run folder nowhere does not exist"),
], ids=lambda v: v if isinstance(v, str) and v.startswith("brats") else None)
def test_installed_scripts_exit_2_with_one_error_paragraph(tool: str, args: list[str], message: str,
                                                           tmp_path: Path) -> None:
    root, _ = one_case(tmp_path)
    truncate(root / CASE)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "bad.ckpt").write_bytes(b"PK\x03\x04 truncated")
    result = cli(tool, args, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["data.no_such_key=1"], "Could not override 'data.no_such_key'"),
    (["model=no_such_model"], "Could not find 'model/no_such_model'"),
], ids=["unknown_key", "unknown_group_option"])
def test_unknown_config_keys_and_options_get_hydras_message(args: list[str], message: str, tmp_path: Path) -> None:
    result = cli("brats-train", args, tmp_path)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists() or files_under(tmp_path / "outputs") == []
