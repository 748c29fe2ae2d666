"""The public Python API: the docs' example verbatim, API == commands, old checkpoints, unsafe checkpoints."""

from __future__ import annotations

import csv
import pathlib
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import FIXTURES, compose_cli, compose_train, nifti_array, tiny_overrides

import brats_unet
from brats_unet.cli.evaluate import evaluate as evaluate_command
from brats_unet.cli.predict import predict as predict_command
from brats_unet.reporting.paper import network_of
from brats_unet.runtime import auto_precision, detect
from brats_unet.utils import BratsError

API_DOC = Path(__file__).parents[1] / "docs" / "python-api.md"
OLD = FIXTURES / "v0_1"  # written by the code before the library refactor (see its README.md)
OLD_CASE = OLD / "BraTS2021_00000"


def readme_api_example() -> str:
    return re.search(r"```python\n(.*?)```", API_DOC.read_text(), re.S).group(1)


@pytest.mark.slow
def test_readme_python_api_example_runs_verbatim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_api_example(), "docs/python-api.md", "exec"), scope)
    metrics = scope["metrics"]  # val/dice_mean is the mean of the three regions' Dice
    assert metrics["val/dice_mean"] == pytest.approx(np.mean([metrics[f"val/dice_{r}"] for r in ("wt", "tc", "et")]))
    image, probs, case = scope["image"], scope["probs"], scope["case"]
    assert image.get_data_dtype() == np.uint8 and image.shape == (64, 64, 48)
    assert np.allclose(image.affine, case.affine)
    assert probs.dtype == np.float32 and probs.shape == (3, 64, 64, 48)
    labels = np.asarray(image.dataobj)
    assert np.array_equal(np.asarray(scope["same"].dataobj), labels)  # arrays in memory == the folder
    assert np.array_equal(labels > 0, (probs > 0.5).any(0))  # tumour label <=> some region above 0.5
    rows, summary = scope["rows"], scope["summary"]
    assert [r["case"] for r in rows] == ["BraTS2021_00000"] and summary["n_cases"] == 1
    assert rows[0]["dice_wt"] == scope["scores"]["dice_wt"]
    # a run trained from Python records its config as brats-train's does, so brats-report can draw Figure 1 from it
    job, spec, patch = network_of(tmp_path / "outputs" / "api")
    assert spec["name"] == "UNet3D" and list(patch) == [32, 32, 32]


def test_load_case_takes_an_msd_case_by_its_file_and_explains_a_root_or_a_2024_label_map(tmp_path: Path) -> None:
    brats_unet.synthesize(tmp_path / "msd", cases=1, seed=0, layout="msd", shape=(40, 40, 32))
    case = brats_unet.load_case(tmp_path / "msd" / "imagesTr" / "BRATS_001.nii.gz")
    assert case.layout.name == "msd" and case.seg.shape == (40, 40, 32)
    with pytest.raises(BratsError, match=r"msd is an MSD dataset root \(it holds imagesTr/\), not one case: pass a "
                                         r"case, e\.g\. .*imagesTr/BRATS_001\.nii\.gz"):
        brats_unet.load_case(tmp_path / "msd")
    (gli,) = brats_unet.synthesize(tmp_path / "gli", cases=1, seed=0, layout="2024_gli", shape=(40, 40, 32))
    with pytest.raises(BratsError, match=r"are not brats2023 labels .*a 2024\+ release .* give its label schema"):
        brats_unet.load_case(gli)
    assert set(np.unique(brats_unet.load_case(gli, schema="brats2024_gli").seg)) <= {0, 1, 2, 3, 4}


def test_old_checkpoint_predicts_bit_identically_through_the_command_and_the_api(tmp_path: Path) -> None:
    ckpt = OLD / "tiny_region.ckpt"
    predict_command(compose_cli("predict", [f"ckpt_path={ckpt}", f"input={OLD_CASE}", f"output={tmp_path / 'a'}",
                                            "device=cpu", "precision=fp32"]))
    predict_command(compose_cli("predict", [f"ckpt_path={ckpt}", f"input={OLD_CASE}", f"output={tmp_path / 'b'}",
                                            "device=cpu", "precision=fp32", "tta=true", "postprocess=true",
                                            "save_probabilities=true"]))
    expected = OLD / "expected"
    assert np.array_equal(nifti_array(tmp_path / "a" / "BraTS2021_00000.nii.gz"),
                          nifti_array(expected / "plain.nii.gz"))
    assert np.array_equal(nifti_array(tmp_path / "b" / "BraTS2021_00000.nii.gz"),
                          nifti_array(expected / "tta_postprocess.nii.gz"))
    assert np.array_equal(nifti_array(tmp_path / "b" / "BraTS2021_00000_prob.nii.gz"),
                          nifti_array(expected / "tta_prob.nii.gz"))

    segmenter = brats_unet.Segmenter.from_checkpoint(ckpt, device="cpu", precision="fp32")  # as stored: fp32
    image = segmenter.predict(OLD_CASE)
    assert np.array_equal(np.asarray(image.dataobj), nifti_array(expected / "plain.nii.gz"))
    reference = nib.load(expected / "plain.nii.gz")
    assert image.get_data_dtype() == np.uint8 and np.array_equal(image.affine, reference.affine)
    assert image.header["qform_code"] == reference.header["qform_code"]
    tta = brats_unet.Segmenter.from_checkpoint(ckpt, device="cpu", tta=True, postprocess=True, precision="fp32")
    assert np.array_equal(np.asarray(tta.predict(OLD_CASE).dataobj), nifti_array(expected / "tta_postprocess.nii.gz"))
    probs = tta.predict_proba(OLD_CASE)
    stored = nib.load(expected / "tta_prob.nii.gz").get_fdata()  # uint8 steps of 1/255 in the file
    assert probs.shape == (3, *image.shape) and np.abs(np.moveaxis(probs, 0, -1) - stored).max() <= 0.5 / 255 + 1e-6
    assert segmenter.modalities == ["t1", "t1ce", "t2", "flair"] and segmenter.layout.name == "brats2021"
    assert segmenter.config["loss"]["_target_"].endswith("RegionDiceBCELoss")


@pytest.mark.parametrize("cpu", ["this machine", "forced bf16"])
def test_the_api_and_the_command_share_their_defaults_and_agree_under_auto(tmp_path: Path, monkeypatch,
                                                                          cpu: str) -> None:
    """`Segmenter.from_checkpoint(ckpt).predict(case)` is `brats-predict ckpt_path=ckpt input=case`: one set of defaults
    (conf/predict.yaml), `auto` included, on whatever CPU runs this; and again with auto forced to bf16
    (BRATS_UNET_CPU_FLAGS, as CI runs the precision-sensitive tests), where a pinned fp32 still gives the fixtures."""
    if cpu == "forced bf16":
        monkeypatch.setenv("BRATS_UNET_CPU_FLAGS", "avx512_bf16")
    ckpt = OLD / "tiny_region.ckpt"
    predict_command(compose_cli("predict", [f"ckpt_path={ckpt}", f"input={OLD_CASE}", f"output={tmp_path}"]))
    segmenter = brats_unet.Segmenter.from_checkpoint(ckpt)
    assert segmenter.precision == auto_precision(detect("cpu"))[0]
    assert (segmenter.tta, segmenter.postprocess, segmenter.overlap, segmenter.window_batch) == (False, False, 0.5, 2)
    assert segmenter.channels_last is False  # the session's probe cache says "no gain"
    api = np.asarray(segmenter.predict(OLD_CASE).dataobj)
    assert np.array_equal(api, nifti_array(tmp_path / "BraTS2021_00000.nii.gz"))
    if cpu == "forced bf16":
        assert segmenter.precision == "bf16"
        pinned = brats_unet.Segmenter.from_checkpoint(ckpt, precision="fp32").predict(OLD_CASE)
        assert np.array_equal(np.asarray(pinned.dataobj), nifti_array(OLD / "expected" / "plain.nii.gz"))
    with pytest.raises(BratsError, match=r"unknown prediction options \['overlapp'\]"):
        brats_unet.Segmenter.from_checkpoint(ckpt, overlapp=0.5)


def test_predict_accepts_paths_and_arrays_with_either_releases_names() -> None:
    segmenter = brats_unet.Segmenter.from_checkpoint(OLD / "tiny_region.ckpt", device="cpu", precision="fp32")
    folder = nifti_array(OLD / "expected" / "plain.nii.gz")
    paths = {m: OLD_CASE / f"BraTS2021_00000_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")}
    assert np.array_equal(np.asarray(segmenter.predict(paths).dataobj), folder)
    case = brats_unet.load_case(OLD_CASE)
    names_2023 = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
    arrays = {names_2023[m]: (case.images[m], case.affine) for m in case.images}
    image = segmenter.predict(arrays, layout="brats2023")
    expected_2023 = np.where(folder == 4, 3, folder)  # the same voxels, ET written as 3
    assert np.array_equal(np.asarray(image.dataobj), expected_2023)
    with pytest.raises(BratsError, match=r"the model needs modalities .*the case lacks \['flair'\]"):
        segmenter.predict({k: v for k, v in arrays.items() if k != "t2f"})
    with pytest.raises(BratsError, match=r"case: t2: shape \(4, 4, 4\) differs from t1 \(48, 48, 32\)"):
        segmenter.predict({**paths, "t2": (np.zeros((4, 4, 4)), case.affine)})
    # in-memory images get the checks a case folder gets (data/cases.py's, one home)
    nan = case.images["t1"].copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(BratsError, match=r"case: t1: 1 NaN or Inf voxels"):
        segmenter.predict({**paths, "t1": (nan, case.affine)})
    with pytest.raises(BratsError, match=r"case: t2: t2 image is all zero"):
        segmenter.predict({**paths, "t2": (np.zeros_like(nan), case.affine)})


def test_evaluate_api_gives_the_rows_and_summary_the_command_writes(tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "BraTS2021_00000.nii.gz").symlink_to(OLD / "expected" / "plain.nii.gz")
    truth = tmp_path / "truth"
    truth.mkdir()
    (truth / "BraTS2021_00000").symlink_to(OLD_CASE)
    summary = evaluate_command(compose_cli("evaluate", [f"pred={pred}", f"truth={truth}", f"output={tmp_path / 'e'}"]))
    rows, api_summary = brats_unet.evaluate(pred, truth)
    assert api_summary == summary
    with open(tmp_path / "e" / "metrics.csv") as f:
        written = list(csv.DictReader(f))
    assert [r["case"] for r in written] == [r["case"] for r in rows] == ["BraTS2021_00000"]
    for key, value in written[0].items():
        if key != "case":
            assert float(value) == rows[0][key], key
    case = brats_unet.load_case(OLD_CASE)
    scores = brats_unet.case_metrics(nifti_array(pred / "BraTS2021_00000.nii.gz"), case.seg, spacing=case.spacing)
    assert scores == {k: v for k, v in rows[0].items() if k != "case"}


# ---- a checkpoint cannot run code -------------------------------------------------------------------------------
class Payload:
    """What a crafted checkpoint hides: unpickling it calls Path.touch(marker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (pathlib.Path.touch, (self.marker,))


def crafted_checkpoint(path: Path, marker: Path, cfg) -> Path:
    module = brats_unet.training.build.build_module(cfg, in_channels=4)
    config = brats_unet.training.fit.run_config(cfg)
    config["model"]["note"] = Payload(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "brats_config": config, "epoch": 0, "global_step": 0}, path)
    return path


def test_a_crafted_checkpoint_is_refused_everywhere_and_its_payload_never_runs(synthetic_root: Path, cache_dir: Path,
                                                                               tmp_path: Path) -> None:
    import brats_unet.training.build  # noqa: F401  (crafted_checkpoint builds a real module)
    import brats_unet.training.fit  # noqa: F401

    marker = tmp_path / "payload-ran"
    run = tmp_path / "run"
    cfg = compose_train(tiny_overrides(synthetic_root, cache_dir, run))
    ckpt = crafted_checkpoint(run / "checkpoints" / "last.ckpt", marker, cfg)
    # The payload is real: a plain pickle load runs it.
    torch.load(ckpt, weights_only=False)
    assert marker.exists()
    marker.unlink()

    refused = rf"checkpoint {re.escape(str(ckpt))} holds objects other than tensors, numbers, strings and containers"
    with pytest.raises(BratsError, match=refused):
        predict_command(compose_cli("predict", [f"ckpt_path={ckpt}", f"input={synthetic_root}",
                                                f"output={tmp_path / 'pred'}", "device=cpu"]))
    with pytest.raises(BratsError, match=refused):
        brats_unet.Segmenter.from_checkpoint(ckpt)
    with pytest.raises(BratsError, match=refused):  # resume: ckpt_path=last finds it in the run dir
        brats_unet.train(compose_train([*tiny_overrides(synthetic_root, cache_dir, run), "ckpt_path=last"]))
    with pytest.raises(BratsError, match=refused):
        brats_unet.train(compose_train([*tiny_overrides(synthetic_root, cache_dir, tmp_path / "other"),
                                        f"ckpt_path={ckpt}"]))
    assert not marker.exists()
    assert not (tmp_path / "pred").exists()
