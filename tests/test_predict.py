"""brats-predict on tiny checkpoints built without training: geometry, labels, crop, resume and error messages."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import compose_cli, make_case, run_predict, save_checkpoint, script

from brats_unet.cli.predict import predict
from brats_unet.data.labels import LAYOUTS
from brats_unet.inference.decoding import decode
from brats_unet.inference.loading import TRAINING_STATE
from brats_unet.synth.generator import write_dataset
from brats_unet.utils import BratsError

SEED_BOX = ((8, 56), (8, 56), (8, 40))  # conftest's TINY_SEED_CROP


def write_case(root: Path, name: str, shape: tuple[int, int, int], affine: np.ndarray, layout: str = "brats2021",
               full: tuple[int, int, int] = (64, 64, 48)) -> Path:
    """A synthetic head of shape `full` cut to `shape` and written with `affine` (any orientation)."""
    images, seg, _ = make_case(np.random.default_rng(3), shape=full)
    cut = tuple(slice(0, s) for s in shape)
    case_dir = root / name
    case_dir.mkdir(parents=True)
    for key, data in {**images, "seg": seg}.items():
        nib.save(nib.Nifti1Image(data[cut], affine), case_dir / LAYOUTS[layout].filename(name, key))
    return case_dir


def oblique_affine() -> np.ndarray:
    a, b = np.deg2rad(20), np.deg2rad(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([1.2, 0.9, 1.5])
    affine[:3, 3] = [-80.0, 30.0, -12.5]
    return affine


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpts")
    return {
        # patch = the seed crop: one window per case
        "seed_et": save_checkpoint(d / "seed_et.ckpt", "data.patch_size=[48,48,32]", preprocess="seed",
                                   et_everywhere=True),
        "modern": save_checkpoint(d / "modern.ckpt"),
        "region": save_checkpoint(d / "region.ckpt", "loss=region", "model.filters=[2,4,8]",
                                  "data.patch_size=[32,32,32]"),
    }


@pytest.fixture(scope="module")
def oblique_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_case(tmp_path_factory.mktemp("oblique"), "Oblique_001", (61, 60, 45), oblique_affine())


def read(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(path)
    return np.asarray(img.dataobj), img


def crop_mask(shape: tuple[int, ...]) -> np.ndarray:
    inside = np.zeros(shape, dtype=bool)
    inside[tuple(slice(a, b) for a, b in SEED_BOX)] = True
    return inside


def test_seed_model_fills_its_crop_in_the_inputs_oblique_geometry(ckpts, oblique_case, tmp_path) -> None:
    (out,) = run_predict(ckpts["seed_et"], oblique_case, tmp_path / "pred")  # one case folder as input
    assert out == tmp_path / "pred" / "Oblique_001.nii.gz"
    labels, img = read(out)
    _, ref = read(oblique_case / "Oblique_001_t1ce.nii.gz")
    assert labels.dtype == np.uint8 and labels.shape == (61, 60, 45)
    assert np.allclose(img.affine, oblique_affine()) and np.allclose(img.affine, ref.affine)
    assert img.header["sform_code"] == ref.header["sform_code"] and img.header["qform_code"] == ref.header["qform_code"]
    inside = crop_mask(labels.shape)
    assert (labels[inside] == 4).all() and (labels[~inside] == 0).all()  # outside the fixed crop = background


def test_brats2023_names_are_found_and_get_et_label_3(ckpts, tmp_path) -> None:
    root = tmp_path / "brats2023"
    write_dataset(root, cases=1, seed=1, layout="brats2023", shape=(64, 64, 48))
    (out,) = run_predict(ckpts["seed_et"], root, tmp_path / "pred")  # checkpoint trained on brats2021 names
    case = next(p.name for p in root.iterdir() if p.is_dir())
    assert out.name == f"{case}.nii.gz"
    labels, img = read(out)
    assert np.allclose(img.affine, read(root / case / f"{case}-t1c.nii.gz")[1].affine)
    inside = crop_mask(labels.shape)
    assert set(np.unique(labels).tolist()) == {0, 3}
    assert (labels[inside] == 3).all() and (labels[~inside] == 0).all()


def test_split_file_restricts_cases_and_labels_are_brats_labels(ckpts, tmp_path) -> None:
    root = tmp_path / "root"
    cases = [p.name for p in write_dataset(root, cases=2, seed=2, shape=(64, 64, 48))]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [cases[0]], "val": [], "test": [cases[1]]}))
    outputs = run_predict(ckpts["modern"], root, tmp_path / "pred", f"split_file={split}", "window_batch=4")
    assert outputs == [tmp_path / "pred" / f"{cases[1]}.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [f"{cases[1]}.nii.gz", "prediction.json"]
    labels, img = read(outputs[0])
    assert labels.dtype == np.uint8 and labels.shape == (64, 64, 48)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 4}
    assert np.allclose(img.affine, read(root / cases[1] / f"{cases[1]}_flair.nii.gz")[1].affine)


def test_region_model_with_tta_postprocess_and_probabilities(ckpts, tmp_path) -> None:
    # Smaller than the patch along y and z: the window is padded and cropped back.
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    case_dir = write_case(tmp_path / "small", "Small_001", (36, 30, 24), affine, full=(36, 32, 24))
    (out,) = run_predict(ckpts["region"], case_dir, tmp_path / "pred", "tta=true", "postprocess=true",
                         "save_probabilities=true")
    labels, _ = read(out)
    prob_img = nib.load(tmp_path / "pred" / "Small_001_prob.nii.gz")
    probs = prob_img.get_fdata()
    assert labels.shape == (36, 30, 24) and probs.shape == (36, 30, 24, 3)  # wt, tc, et
    assert np.allclose(prob_img.affine, affine)
    assert probs.min() >= 0 and probs.max() <= 1 + 1e-6
    # Tumour = any region probability above 0.5 (nested decoding; postprocessing only turns ET into NCR). The stored
    # probabilities are quantised to 1/255 of their range, so only voxels right at the threshold may disagree.
    disagree = (labels > 0) != (probs > 0.5).any(-1)
    assert np.all(np.abs(probs[disagree] - 0.5).min(-1) < 0.01)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 4}


def test_decode_softmax_argmax_and_nested_regions() -> None:
    softmax = np.zeros((4, 1, 1, 3), dtype=np.float32)
    softmax[[0, 2, 3], 0, 0, [0, 1, 2]] = 0.9
    classes, et = decode(softmax, "softmax")
    assert classes.tolist() == [[[0, 2, 3]]] and np.allclose(et, [[[0.0, 0.0, 0.9]]])
    regions = np.array([[0.9, 0.9, 0.9, 0.2], [0.1, 0.7, 0.8, 0.2], [0.1, 0.1, 0.6, 0.9]])[:, None, None, :]
    classes, et = decode(regions, "sigmoid")  # ED, NCR, ET; an ET outside WT still wins (nested decoding)
    assert classes.tolist() == [[[2, 1, 3, 3]]] and np.allclose(et, [[[0.1, 0.1, 0.6, 0.9]]])


def test_existing_output_is_refused_resumed_or_overwritten(ckpts, oblique_case, tmp_path) -> None:
    pred = tmp_path / "pred"
    (out,) = run_predict(ckpts["seed_et"], oblique_case, pred)
    with pytest.raises(BratsError, match=r"already holds 2 files; pass overwrite=true .* or resume=true"):
        run_predict(ckpts["seed_et"], oblique_case, pred)
    out.write_bytes(b"marker")  # resume keeps finished cases untouched
    assert run_predict(ckpts["seed_et"], oblique_case, pred, "resume=true") == [out]
    assert out.read_bytes() == b"marker"
    run_predict(ckpts["seed_et"], oblique_case, pred, "overwrite=true")
    assert read(out)[0].shape == (61, 60, 45)
    with pytest.raises(BratsError, match="contradict"):
        run_predict(ckpts["seed_et"], oblique_case, pred, "overwrite=true", "resume=true")


def test_checkpoint_problems_are_clear(ckpts, oblique_case, tmp_path) -> None:
    with pytest.raises(BratsError, match=r"checkpoint .*nope\.ckpt does not exist \(config key ckpt_path\)"):
        run_predict(tmp_path / "nope.ckpt", oblique_case, tmp_path / "a")
    truncated = tmp_path / "truncated.ckpt"
    data = ckpts["modern"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(BratsError, match=r"truncated\.ckpt cannot be read .*truncated"):
        run_predict(truncated, oblique_case, tmp_path / "b")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(BratsError, match="is not a brats-unet checkpoint"):
        run_predict(foreign, oblique_case, tmp_path / "c")
    other = torch.load(ckpts["modern"], weights_only=False)
    other["brats_config"]["model"]["filters"] = [4, 8, 32]  # weights are from filters [4, 8, 16]
    changed = tmp_path / "changed.ckpt"
    torch.save(other, changed)
    with pytest.raises(BratsError, match=r"changed\.ckpt: .*model config differs.*net\.encoders\.2\.conv1\.weight: "
                                         r"checkpoint \(16, 8, 3, 3, 3\) vs model \(32, 8, 3, 3, 3\)"):
        run_predict(changed, oblique_case, tmp_path / "d")
    # The module's own training buffers are all inference leaves out; anything else in the weights is reported.
    own = torch.load(ckpts["modern"], weights_only=False)
    assert {k for k in own["state_dict"] if not k.startswith(("net.", "loss."))} == TRAINING_STATE
    own["state_dict"]["head2.weight"] = torch.zeros(3)
    extra = tmp_path / "extra.ckpt"
    torch.save(own, extra)
    with pytest.raises(BratsError, match=r"extra\.ckpt: .*model config differs.*unexpected head2\.weight"):
        run_predict(extra, oblique_case, tmp_path / "e")
    assert not any((tmp_path / d).exists() for d in "abcde")  # nothing written before the model loads


def test_input_problems_are_clear(ckpts, oblique_case, tmp_path) -> None:
    with pytest.raises(BratsError, match=r"missing required key\(s\) input, output"):
        predict(compose_cli("predict", [f"ckpt_path={ckpts['modern']}"]))
    root = tmp_path / "root"
    case_dir = write_case(root, "Case_001", (64, 64, 48), np.eye(4))
    (case_dir / "Case_001_flair.nii.gz").unlink()
    with pytest.raises(BratsError, match=r"Case_001: the model needs modalities .*expected e\.g\. .*Case_001_flair"):
        run_predict(ckpts["modern"], root, tmp_path / "pred")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [], "val": [], "test": ["Case_404"]}))
    with pytest.raises(BratsError, match="lacks 1 cases named by split_file: Case_404"):
        run_predict(ckpts["modern"], root, tmp_path / "pred", f"split_file={split}")
    with pytest.raises(BratsError, match=r"input .*missing does not exist"):
        run_predict(ckpts["modern"], tmp_path / "missing", tmp_path / "pred")
    with pytest.raises(BratsError, match="precision=fp16 needs a CUDA device"):
        run_predict(ckpts["modern"], root, tmp_path / "pred", "precision=fp16", "device=cpu")


def _cli(tool: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "BRATS_DEBUG")}
    return subprocess.run([script(tool), *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env=env)


@pytest.mark.slow  # two interpreter start-ups (torch, lightning, hydra)
def test_installed_scripts_predict_then_evaluate(ckpts, tmp_path) -> None:
    root = tmp_path / "data"
    write_dataset(root, cases=1, seed=4, shape=(64, 64, 48))
    work = tmp_path / "cwd"
    work.mkdir()
    result = _cli("brats-predict", [f"ckpt_path={ckpts['seed_et']}", f"input={root}", "output=pred"], work)
    assert result.returncode == 0, result.stderr
    case = next(p.name for p in root.iterdir())
    assert (work / "pred" / f"{case}.nii.gz").is_file()
    result = _cli("brats-evaluate", [f"pred={work / 'pred'}", f"truth={root}", "output=eval"], work)
    assert result.returncode == 0, result.stderr
    summary = json.loads((work / "eval" / "summary.json").read_text())
    assert summary["n_cases"] == 1 and summary["missing_predictions"] == [] and summary["extra_predictions"] == []
    assert (work / "eval" / "metrics.csv").read_text().startswith("case,dice_wt,dice_tc,dice_et,hd95_wt")
    assert "dice_wt" in result.stdout
    assert list((work / "outputs").glob("*/runs/*/predict.log")) and list((work / "outputs").glob("evaluate/runs/*"))


@pytest.mark.slow
def test_installed_script_reports_bad_input_without_traceback(tmp_path) -> None:
    result = _cli("brats-predict", [f"ckpt_path={tmp_path / 'none.ckpt'}", "input=x", "output=y"], tmp_path)
    assert result.returncode == 2
    assert "error: checkpoint" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_prediction_without_tta_is_what_validation_scored(ckpts) -> None:
    """brats-predict (the network rebuilt without Lightning) and whole-volume validation (the LightningModule) blend
    the same window logits, so their labels agree exactly."""
    import torch
    from omegaconf import OmegaConf

    from brats_unet.inference.loading import build_model, read_checkpoint
    from brats_unet.inference.probabilities import predict_probabilities
    from brats_unet.training.build import build_module

    stored = read_checkpoint(ckpts["region"])
    model, config = build_model(stored)
    module = build_module(OmegaConf.create(config), stored.in_channels)
    module.load_state_dict(stored.state_dict, strict=True)
    module.eval()
    patch = config["data"]["patch_size"]
    x = np.random.default_rng(0).normal(size=(4, 45, 50, 37)).astype(np.float32)
    probs = predict_probabilities(model, x, patch, overlap=module.hparams.val_overlap, window_batch=2, tta=False,
                                  device=torch.device("cpu"), autocast=contextlib.nullcontext)
    with torch.inference_mode():
        logits = module.predict_logits(torch.from_numpy(x)[None])
    torch.testing.assert_close(torch.from_numpy(probs), module.loss.probabilities(logits)[0], rtol=1e-5, atol=1e-5)
    # Labels agree wherever no region logit sits on the threshold (an untrained net has many near-zero logits,
    # where sigmoid(l) > 0.5 and l > 0 can round differently).
    decided = (logits[0].abs() > 1e-4).all(0).numpy()
    labels, scored = decode(probs, "sigmoid")[0], module.loss.to_classes(logits)[0].numpy()
    assert decided.mean() > 0.9 and np.array_equal(labels[decided], scored[decided])
