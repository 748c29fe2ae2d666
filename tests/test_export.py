"""Model packages (brats-export): prediction from a package equals prediction from the checkpoints bit for bit, a
changed byte or a planted `_target_` is refused, the model card carries the run's facts, ONNX matches torch, a sweep's
post-processing travels with its package, and a package written before that still loads."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from helpers import FIXTURES, compose_cli, make_sweep, nudged_checkpoint, run_script, save_checkpoint

from brats_unet.cli.export import export as export_command
from brats_unet.cli.predict import command_line
from brats_unet.cli.predict import predict as predict_command
from brats_unet.inference import onnx as onnx_module
from brats_unet.inference.card import model_card
from brats_unet.inference.export import export_package
from brats_unet.inference.package import content_hash, read_package
from brats_unet.inference.segmenter import Segmenter
from brats_unet.inference.uncertainty import segment_with_uncertainty
from brats_unet.utils import BratsError

OLD = FIXTURES / "v0_1"
CKPT = OLD / "tiny_region.ckpt"
CASE = OLD / "BraTS2021_00000"
HAS_ONNX = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
NEEDS_ONNX = pytest.mark.skipif(not HAS_ONNX, reason="onnx/onnxruntime not installed (pip install -e '.[export]')")


def labels_of(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    formats = ("safetensors", "onnx") if HAS_ONNX else ("safetensors",)
    return export_package(CKPT, tmp_path_factory.mktemp("pkg") / "tiny", formats=formats, measure=False)


def test_package_predicts_bit_identical_to_its_checkpoint(package: Path) -> None:
    for options in ({}, {"tta": True, "postprocess": True}):
        ckpt = Segmenter.from_checkpoint(CKPT, device="cpu", precision="fp32", **options)
        pkg = Segmenter.from_package(package, device="cpu", precision="fp32", **options)
        _, labels_a, probs_a = ckpt.segment(CASE, probabilities=True)
        _, labels_b, probs_b = pkg.segment(CASE, probabilities=True)
        assert torch.equal(torch.from_numpy(probs_a), torch.from_numpy(probs_b))
        assert np.array_equal(labels_a, labels_b)
    meta = json.loads((package / "model.json").read_text())
    assert meta["modalities"] == ["t1", "t1ce", "t2", "flair"] and meta["activation"] == "sigmoid"
    assert meta["members"][0]["network"]["architecture"] == "unet3d" and meta["versions"]["torch"] == torch.__version__
    assert "_target_" not in (package / "model.json").read_text()


def test_an_ensemble_package_equals_the_ensemble_of_its_checkpoints(tmp_path: Path) -> None:
    b = nudged_checkpoint(tmp_path / "b.ckpt")
    package = export_package([CKPT, b], tmp_path / "ens", measure=False, tta=True)
    ckpt = Segmenter.from_checkpoint([CKPT, b], device="cpu", precision="fp32", tta=True)
    pkg = Segmenter.from_package(package, device="cpu", precision="fp32")  # tta=true: the package's default
    assert pkg.tta and len(pkg.modules) == 2
    assert torch.equal(torch.from_numpy(ckpt.predict_proba(CASE)), torch.from_numpy(pkg.predict_proba(CASE)))


def test_a_resenc_run_exports_and_predicts_bit_identical(tmp_path: Path) -> None:
    # model=resenc (experiment=resenc's network) was missing from the architectures a package can carry
    ckpt = save_checkpoint(tmp_path / "resenc.ckpt", "model=resenc", "model.filters=[4,8,16]")
    pkg = export_package(ckpt, tmp_path / "pkg", measure=False)
    meta = json.loads((pkg / "model.json").read_text())
    assert meta["members"][0]["network"]["architecture"] == "resenc"
    a = Segmenter.from_checkpoint(ckpt, device="cpu", precision="fp32").segment(CASE, probabilities=True)
    b = Segmenter.from_package(pkg, device="cpu", precision="fp32").segment(CASE, probabilities=True)
    assert np.array_equal(a[2], b[2]) and np.array_equal(a[1], b[1])


def test_brats_predict_model_dir_writes_what_the_checkpoint_writes(package: Path, tmp_path: Path) -> None:
    assert command_line(["model=/m", "runtime=onnx", "runtime.threads=1"]) == ["package=/m", "engine=onnx",
                                                                                "runtime.threads=1"]
    common = [f"input={CASE}", "device=cpu", "precision=fp32"]
    predict_command(compose_cli("predict", [f"package={package}", f"output={tmp_path / 'a'}", *common]))
    predict_command(compose_cli("predict", [f"ckpt_path={CKPT}", f"output={tmp_path / 'b'}", *common]))
    name = f"{CASE.name}.nii.gz"
    assert np.array_equal(labels_of(tmp_path / "a" / name), labels_of(tmp_path / "b" / name))
    assert np.array_equal(labels_of(tmp_path / "a" / name), labels_of(OLD / "expected" / "plain.nii.gz"))


@pytest.mark.slow
def test_installed_scripts_export_and_predict_from_the_package(tmp_path: Path) -> None:
    onnx = ["format=onnx"] if HAS_ONNX else []
    result = run_script("brats-export", [f"ckpt_path={CKPT}", f"output={tmp_path / 'pkg'}", "zip=true",
                                         "license=CC-BY-4.0", "measure=false", *onnx], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "pkg.zip").is_file() and "CC-BY-4.0" in (tmp_path / "pkg" / "MODEL_CARD.md").read_text()
    for runtime in ["torch"] + (["onnx"] if HAS_ONNX else []):
        out = tmp_path / runtime
        result = run_script("brats-predict", [f"model={tmp_path / 'pkg'}", f"input={CASE}", f"output={out}",
                                              f"runtime={runtime}", "device=cpu", "precision=fp32"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        expected = labels_of(OLD / "expected" / "plain.nii.gz")
        assert (labels_of(out / f"{CASE.name}.nii.gz") == expected).mean() >= (1.0 if runtime == "torch" else 0.999)


def copy_package(package: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(package, tmp_path / "copy"))


def test_a_flipped_byte_is_refused(package: Path, tmp_path: Path) -> None:
    copy = copy_package(package, tmp_path)
    weights = copy / "weights" / "member_0.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor: still a loadable file, a different model
    weights.write_bytes(bytes(data))
    with pytest.raises(BratsError, match=r"member_0.safetensors does not match the SHA-256"):
        Segmenter.from_package(copy, device="cpu")
    shutil.copy(package / "weights" / "member_0.safetensors", weights)
    meta = json.loads((copy / "model.json").read_text())
    meta["defaults"]["overlap"] = 0.25
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BratsError, match="content hash mismatch"):
        read_package(copy)


def test_a_crafted_package_with_targets_is_refused_even_with_a_fresh_hash(package: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    crafted = {
        "network": {"_target_": "pathlib.Path.write_text", "self": str(marker), "data": "x"},
        "preprocessing": {"normalize": {"_target_": "os.system", "_args_": [f"touch {marker}"]}},
    }
    for key, value in crafted.items():
        copy = copy_package(package, tmp_path / key)
        meta = json.loads((copy / "model.json").read_text())
        (meta["members"][0] if key == "network" else meta)[key] = value
        meta["content_hash"] = content_hash(meta)  # an attacker recomputes the hash
        (copy / "model.json").write_text(json.dumps(meta))
        with pytest.raises(BratsError, match=r"_target_ .* is refused"):
            Segmenter.from_package(copy, device="cpu")
    # A network named by an import path instead of a known architecture is refused too.
    copy = copy_package(package, tmp_path / "arch")
    meta = json.loads((copy / "model.json").read_text())
    meta["members"][0]["network"]["architecture"] = "pathlib.Path"
    meta["content_hash"] = content_hash(meta)
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BratsError, match="architecture 'pathlib.Path' is not one of"):
        Segmenter.from_package(copy, device="cpu")
    assert not marker.exists()


def test_export_refuses_a_nonempty_output_and_a_checkpoint_folder(package: Path, tmp_path: Path) -> None:
    with pytest.raises(BratsError, match="already exists and is not empty"):
        export_package(CKPT, package, measure=False)
    with pytest.raises(BratsError, match="not a model package"):
        Segmenter.from_package(CKPT.parent, device="cpu")


def test_model_card_has_the_runs_metrics_split_and_overrides(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "fold0"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    shutil.copy(CKPT, run / "checkpoints" / "best.ckpt")
    (run / "metrics.json").write_text(json.dumps({"final": {"val/dice_wt": 0.8125, "val/dice_tc": 0.5, "val/dice_et":
                                                            0.25, "val/dice_mean": 0.5208, "train/loss": 1.0}}))
    (run / "split.json").write_text(json.dumps({"train": ["a", "b", "c"], "val": ["d"], "test": ["e", "f"],
                                                "fold": 0, "num_folds": 2, "seed": 0}))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["loss=region", "trainer.max_epochs=3"]))
    out = export_command(compose_cli("export", [f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}",
                                                f"output={tmp_path / 'pkg'}", "measure_input=" + str(CASE)]))
    card = (out / "MODEL_CARD.md").read_text()
    assert "| member_0 | fold0 | 0 | 0.8125 | 0.5000 | 0.2500 | 0.5208 |" in card
    assert "3 train, 1 validation, 2 test" in card and "2 folds" in card
    assert "`loss=region` `trainer.max_epochs=3`" in card
    assert "s for case BraTS2021_00000" in card  # inference time measured at export
    meta = json.loads((out / "model.json").read_text())
    assert meta["members"][0]["source"] == "fold0/checkpoints/best.ckpt" and meta["inference_time"]["seconds"] > 0


@NEEDS_ONNX
def test_onnx_runtime_matches_torch(package: Path) -> None:
    for tta in (False, True):
        torch_seg = Segmenter.from_package(package, device="cpu", precision="fp32", tta=tta)
        onnx_seg = Segmenter.from_package(package, device="cpu", precision="fp32", tta=tta, runtime="onnx")
        _, labels_t, probs_t = torch_seg.segment(CASE, probabilities=True)
        _, labels_o, probs_o = onnx_seg.segment(CASE, probabilities=True)
        assert (labels_t == labels_o).mean() >= 0.999
        assert np.abs(probs_t - probs_o).max() <= 1e-3


def test_onnx_missing_is_a_clear_error(package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def no_onnxruntime(name: str, *args: object) -> object:
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real(name, *args)

    monkeypatch.setattr(onnx_module.importlib, "import_module", no_onnxruntime)
    meta = json.loads((package / "model.json").read_text())
    if "onnx" not in meta["members"][0]:
        with pytest.raises(BratsError, match="no ONNX graph; export with format=onnx"):
            Segmenter.from_package(package, device="cpu", runtime="onnx")
        return
    with pytest.raises(BratsError, match=r"runtime=onnx needs the `onnxruntime` package.*pip install -e '.\[export\]'"):
        Segmenter.from_package(package, device="cpu", runtime="onnx")


def test_a_predictions_folder_records_the_package_and_refuses_another(package: Path, tmp_path: Path) -> None:
    other = export_package(nudged_checkpoint(tmp_path / "b.ckpt"), tmp_path / "other", measure=False)
    out = tmp_path / "pred"
    common = [f"input={CASE}", f"output={out}", "device=cpu", "precision=fp32"]
    predict_command(compose_cli("predict", [f"package={package}", *common]))
    record = json.loads((out / "prediction.json").read_text())["model"]["members"]
    assert record == [{"checkpoint": str(package / "weights" / "member_0.safetensors"),
                       "sha256": json.loads((package / "model.json").read_text())["files"][
                           "weights/member_0.safetensors"]}]
    with pytest.raises(BratsError, match="holds predictions by another model"):
        predict_command(compose_cli("predict", [f"package={other}", "resume=true", *common]))


def test_the_training_spacing_a_checkpoint_records_goes_into_model_json(tmp_path: Path) -> None:
    checkpoint = torch.load(CKPT, map_location="cpu", weights_only=True)
    checkpoint["brats_spacing"] = [2.0, 2.0, 1.5]
    torch.save(checkpoint, tmp_path / "spaced.ckpt")
    package = export_package(tmp_path / "spaced.ckpt", tmp_path / "pkg", measure=False)
    meta = read_package(package)
    assert meta["training_spacing"] == {"spacing": [2.0, 2.0, 1.5], "source": "checkpoint (brats_spacing)"}
    # ... and the package resamples inputs to it exactly as the checkpoint does
    ckpt = Segmenter.from_checkpoint(tmp_path / "spaced.ckpt", device="cpu", precision="fp32")
    pkg = Segmenter.from_package(package, device="cpu", precision="fp32")
    assert pkg.spacing == ckpt.spacing == (2.0, 2.0, 1.5)
    assert torch.equal(torch.from_numpy(ckpt.predict_proba(CASE)), torch.from_numpy(pkg.predict_proba(CASE)))
    _, labels, _, unc = segment_with_uncertainty(pkg, CASE)  # maps come back to the input's grid too
    assert unc.entropy.shape == labels.shape == nib.load(next(CASE.glob("*_t1.nii.gz"))).shape


# ---- a sweep's post-processing (brats-postprocess) carried by its package --------------------------------------------
# Two rules as brats-postprocess writes them (with their scores). On the fixture case the sweep's ensemble predicts one
# whole-tumour component of ~21,600 voxels (kept) and ~10,200 enhancing-tumour voxels (under 20,000: all to necrosis).
RULES = [{"rule": "min_size", "region": "wt", "min_size": 10, "score_before": 0.5, "score_after": 0.55},
         {"rule": "et_to_ncr", "min_total": 20000, "score_before": 0.55, "score_after": 0.6}]


def sweep_with_rules(tmp_path: Path) -> Path:
    """A real two-fold sweep (the fixture model and a nudged copy) with a postprocessing.json."""
    sweep = make_sweep(tmp_path, [CKPT, nudged_checkpoint(tmp_path / "b.ckpt")], [CASE.name, "BraTS2021_00001"], OLD)
    (sweep / "postprocessing.json").write_text(json.dumps({
        "version": 1, "sweep": str(sweep), "predictions": str(sweep / "postprocess" / "oof"), "truth": str(OLD),
        "challenge": "brats2021", "metric": "dice_mean", "cases": 2, "score_before": 0.5, "score_after": 0.6,
        "rules": RULES, "tried": [{**r, "score": r["score_after"]} for r in RULES]}))
    return sweep


def predicted(tmp_path: Path, name: str, *source: str) -> tuple[np.ndarray, dict]:
    """brats-predict on the fixture case: (labels, the model prediction.json records)."""
    out = tmp_path / name
    predict_command(compose_cli("predict", [*source, f"input={CASE}", f"output={out}", "device=cpu",
                                            "precision=fp32"]))
    return labels_of(out / f"{CASE.name}.nii.gz"), json.loads((out / "prediction.json").read_text())["model"]


def test_a_sweep_package_carries_its_postprocessing_and_predicts_what_the_sweep_predicts(tmp_path: Path) -> None:
    sweep = sweep_with_rules(tmp_path)
    package = export_command(compose_cli("export", [f"ckpt_path={sweep}", f"output={tmp_path / 'pkg'}",
                                                    "measure=false"]))
    carried = read_package(package)["cv_postprocessing"]
    assert carried["rules"] == RULES and carried["score_before"] == 0.5 and carried["score_after"] == 0.6
    assert not {"sweep", "predictions", "truth"} & set(carried)  # folders of the exporting machine stay there
    assert len(carried["source_sha256"]) == 64

    sweep_labels, sweep_model = predicted(tmp_path, "sweep", f"ckpt_path={sweep}")
    package_labels, package_model = predicted(tmp_path, "package", f"package={package}")
    raw, raw_model = predicted(tmp_path, "raw", f"package={package}", "cv_postprocess=false")
    assert np.array_equal(package_labels, sweep_labels)  # bit-identical to the sweep with its postprocessing.json
    assert np.array_equal(raw, predicted(tmp_path, "sweep_raw", f"ckpt_path={sweep}", "cv_postprocess=false")[0])
    assert (raw == 4).sum() > 1000 and not (package_labels == 4).any()  # the rules did something: ET -> necrosis
    assert np.array_equal(package_labels, np.where(raw == 4, 1, raw))
    # The manifest names the rules as it does for the sweep (a resume without them is another model) ...
    assert package_model["cv_postprocessing"] == sweep_model["cv_postprocessing"] == RULES
    assert "cv_postprocessing" not in raw_model
    with pytest.raises(BratsError, match=r"holds predictions by another model.*cv_postprocessing"):
        predicted(tmp_path, "package", f"package={package}", "cv_postprocess=false", "resume=true")
    # ... the API applies them too, unless turned off
    api = Segmenter.from_package(package, device="cpu", precision="fp32")
    assert np.array_equal(api.segment(CASE)[1], sweep_labels)
    assert Segmenter.from_package(package, device="cpu", cv_postprocess=False).cv_postprocessing is None
    # The card states the rules and the scores, and regenerates from the checked model.json byte for byte.
    card = (package / "MODEL_CARD.md").read_text()
    assert "## Post-processing chosen on cross-validation" in card
    assert "2 out-of-fold cases (brats2021, dice_mean): 0.5000 before, 0.6000 after" in card
    assert "- `min_size` wt: remove connected components below 10 voxels (0.5000 -> 0.5500)." in card
    assert "- `et_to_ncr` enhancing tumour totalling under 20000 voxels becomes necrosis" in card
    assert model_card(read_package(package), sweep) == card


def test_a_tampered_rule_set_is_refused(tmp_path: Path) -> None:
    package = export_package(sweep_with_rules(tmp_path), tmp_path / "pkg", measure=False)
    meta = json.loads((package / "model.json").read_text())
    meta["cv_postprocessing"]["rules"][1]["min_total"] = 10  # would keep the enhancing tumour
    (package / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BratsError, match="content hash mismatch"):
        Segmenter.from_package(package, device="cpu")
    meta["cv_postprocessing"]["rules"][1] = {"rule": "erase_everything"}
    meta["content_hash"] = content_hash(meta)  # a fresh hash does not make an unknown rule runnable
    (package / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BratsError, match=r"model.json: cv_postprocessing: rules\[1\] = .* is not a known rule"):
        Segmenter.from_package(package, device="cpu")


def test_only_a_sweep_dir_carries_its_rules(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sweep = sweep_with_rules(tmp_path)
    one = export_package(sweep / "0" / "checkpoints" / "best.ckpt", tmp_path / "one", measure=False)
    assert "postprocessing.json is not carried: its rules were chosen for the sweep's ensemble" in caplog.text
    off = export_package(sweep, tmp_path / "off", measure=False, cv_postprocess=False)
    for package in (one, off):
        assert "cv_postprocessing" not in read_package(package)
        assert Segmenter.from_package(package, device="cpu").cv_postprocessing is None
        assert "- None carried:" in (package / "MODEL_CARD.md").read_text()


def test_a_package_written_before_rules_were_carried_still_loads(tmp_path: Path) -> None:
    """tests/fixtures/package_v1: exported by brats-unet at commit 341ecad, before packages carried post-processing."""
    old = FIXTURES / "package_v1"
    assert "cv_postprocessing" not in read_package(old)
    labels, model = predicted(tmp_path, "old", f"package={old}")
    assert np.array_equal(labels, labels_of(OLD / "expected" / "plain.nii.gz"))
    assert "cv_postprocessing" not in model
