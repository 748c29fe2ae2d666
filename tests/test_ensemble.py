"""Ensembles at prediction: several checkpoints averaged per voxel (brats-predict ckpt_path=[a,b] or a sweep dir)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import FIXTURES, compose_cli, nifti_array

import brats_unet
from brats_unet.cli.predict import predict as predict_command
from brats_unet.data.labels import SCHEMAS
from brats_unet.inference.decoding import decode
from brats_unet.inference.ensemble import check_compatible, out_of_fold_jobs, resolve_checkpoints
from brats_unet.utils import BratsError

OLD = FIXTURES / "v0_1"
CKPT = OLD / "tiny_region.ckpt"
CASE = OLD / "BraTS2021_00000"


def variant(path: Path, seed: int = 1, **config: dict[str, Any]) -> Path:
    """A copy of the fixture checkpoint with its float weights nudged by seeded noise and config sections updated:
    a second, genuinely different model of the same architecture."""
    checkpoint = torch.load(CKPT, map_location="cpu", weights_only=True)
    generator = torch.Generator().manual_seed(seed)
    for key, value in checkpoint["state_dict"].items():
        if key.startswith("net.") and value.is_floating_point():
            checkpoint["state_dict"][key] = value + 0.05 * torch.randn(value.shape, generator=generator)
    for section, changes in config.items():
        checkpoint["brats_config"][section] = {**checkpoint["brats_config"][section], **changes}
    torch.save(checkpoint, path)
    return path


def predict(tmp_path: Path, name: str, ckpt: str, *extra: str) -> Path:
    out = tmp_path / name
    predict_command(compose_cli("predict", [f"ckpt_path={ckpt}", f"input={CASE}", f"output={out}", "device=cpu",
                                            *extra]))
    return out


@pytest.mark.slow
def test_an_ensemble_of_one_checkpoint_twice_is_the_single_model_bit_for_bit(tmp_path: Path) -> None:
    # precision pinned: the fixtures were written in fp32, and `auto` is bf16 on AVX512-BF16 / AMX CPUs
    twice = predict(tmp_path, "twice", f"[{CKPT},{CKPT}]", "tta=true", "postprocess=true", "save_probabilities=true",
                    "precision=fp32")
    expected = OLD / "expected"  # the single model's outputs, written before ensembles existed
    assert np.array_equal(nifti_array(twice / "BraTS2021_00000.nii.gz"),
                          nifti_array(expected / "tta_postprocess.nii.gz"))
    assert np.array_equal(nifti_array(twice / "BraTS2021_00000_prob.nii.gz"),
                          nifti_array(expected / "tta_prob.nii.gz"))
    single = brats_unet.Segmenter.from_checkpoint(CKPT, device="cpu")  # auto: the same for both
    double = brats_unet.Segmenter.from_checkpoint([CKPT, CKPT], device="cpu")
    assert len(double.modules) == 2 and double.names == [str(CKPT), str(CKPT)]
    assert np.array_equal(double.predict_proba(CASE), single.predict_proba(CASE))


@pytest.mark.slow
def test_an_ensemble_of_two_is_the_mean_of_their_probabilities(tmp_path: Path) -> None:
    # b also predicts with another window size (one window): each model slides its own patch.
    b = variant(tmp_path / "b.ckpt", data={"patch_size": [48, 48, 32]})
    pa = brats_unet.Segmenter.from_checkpoint(CKPT, device="cpu").predict_proba(CASE)
    pb = brats_unet.Segmenter.from_checkpoint(b, device="cpu").predict_proba(CASE)
    assert np.abs(pa - pb).max() > 0.05  # two different models
    ensemble = brats_unet.Segmenter.from_checkpoint([CKPT, b], device="cpu")
    mean = (pa + pb) / 2
    np.testing.assert_allclose(ensemble.predict_proba(CASE), mean, rtol=0, atol=1e-6)
    labels = SCHEMAS["brats2021"].from_classes(decode(mean, "sigmoid")[0])  # decoded from the mean, not per model
    assert np.array_equal(np.asarray(ensemble.predict(CASE).dataobj), labels)

    # The command: save_probabilities=true saves the ensemble's probabilities (uint8 steps of 1/255 in the file).
    out = predict(tmp_path, "ab", f"[{CKPT},{b}]", "save_probabilities=true")
    saved = nib.load(out / "BraTS2021_00000_prob.nii.gz").get_fdata()
    assert np.abs(saved - np.moveaxis(mean, 0, -1)).max() <= 0.5 / 255 + 1e-6
    assert np.array_equal(nifti_array(out / "BraTS2021_00000.nii.gz"), labels)


@pytest.mark.parametrize(("section", "change", "message"), [
    ("data", {"layout": "brats2023"}, r"disagree on the layout \(data\.layout\): brats2021 vs brats2023"),
    ("preprocess", {"normalize": "minmax"},
     r"disagree on the preprocessing \(preprocess\): normalize='zscore' vs normalize='minmax'"),
])
def test_checkpoints_that_disagree_are_refused_naming_both(tmp_path: Path, section: str, change: dict,
                                                           message: str) -> None:
    other = variant(tmp_path / "other.ckpt", **{section: change})
    with pytest.raises(BratsError, match=rf"cannot ensemble {CKPT} and {other}: they {message}\. An ensemble"):
        brats_unet.Segmenter.from_checkpoint([CKPT, other], device="cpu")
    with pytest.raises(BratsError, match=message):
        predict(tmp_path, "refused", f"[{CKPT},{other}]")
    assert not (tmp_path / "refused").exists()  # refused before any output


def test_channels_and_heads_must_agree() -> None:
    config = torch.load(CKPT, map_location="cpu", weights_only=True)["brats_config"]
    three = {**config, "preprocess": {**config["preprocess"], "modalities": ["t1ce", "t2", "flair"]}}
    with pytest.raises(BratsError, match=r"cannot ensemble a and b: they disagree on the input channels: 4 vs 3"):
        check_compatible(["a", "b"], [config, three], ["sigmoid", "sigmoid"])
    with pytest.raises(BratsError, match=r"on the output head: sigmoid regions \(wt, tc, et\) vs softmax classes"):
        check_compatible(["a", "b"], [config, config], ["sigmoid", "softmax"])
    stored_as_fp32 = {**config, "preprocess": {**config["preprocess"], "dtype": "float32"}}
    check_compatible(["a", "b"], [config, stored_as_fp32], ["sigmoid", "sigmoid"])  # cache storage only: fine


def test_a_sweep_dir_names_every_jobs_best_checkpoint(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for job in ("0", "1", "10", "2"):
        (sweep / job / ".hydra").mkdir(parents=True)
        (sweep / job / ".hydra" / "overrides.yaml").write_text(f"- data.fold={job}\n")
        if job != "2":
            (sweep / job / "checkpoints").mkdir()
            shutil.copy(CKPT, sweep / job / "checkpoints" / "best.ckpt")
    with pytest.raises(BratsError, match=r"sweep: jobs 2 have no checkpoints/best\.ckpt \(still training"):
        resolve_checkpoints(sweep)
    (sweep / "2" / "checkpoints").mkdir()
    shutil.copy(CKPT, sweep / "2" / "checkpoints" / "best.ckpt")
    best = [sweep / job / "checkpoints" / "best.ckpt" for job in ("0", "1", "2", "10")]  # numeric job order
    assert resolve_checkpoints(sweep) == best
    assert resolve_checkpoints(sweep / "0") == [best[0]]  # a run dir: its best.ckpt
    with pytest.raises(BratsError, match=r"sweep/0 is a single run's folder, not a sweep .*: out-of-fold predictions"):
        out_of_fold_jobs(sweep / "0")
    with pytest.raises(BratsError, match=r"is a folder but neither a sweep \(job folders .*\) nor a run \(checkpoints"):
        resolve_checkpoints(sweep / "0" / ".hydra")
    assert resolve_checkpoints([sweep, CKPT]) == [*best, CKPT]
    with pytest.raises(BratsError, match=r"ckpt_path is an empty list"):
        resolve_checkpoints([])
    four = brats_unet.Segmenter.from_checkpoint(sweep, device="cpu")
    assert len(four.modules) == 4 and four.names == [str(p) for p in best]
