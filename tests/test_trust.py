"""What a shared file can do: a stored config builds only allowed `_target_`s (a planted one never runs, by any load
path), and one predictions folder holds one model's predictions (prediction.json)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from helpers import FIXTURES, compose_cli, compose_train, nudged_checkpoint, run_evaluate, tiny_overrides
from hydra.utils import instantiate
from omegaconf import OmegaConf

import brats_unet
from brats_unet.cli.predict import predict as predict_command
from brats_unet.cli.report import report as report_command
from brats_unet.evaluation.manifest import MANIFEST
from brats_unet.training.losses import RegionDiceBCELoss
from brats_unet.training.targets import PROJECT_TARGETS, check_targets, is_trusted
from brats_unet.utils import BratsError

CONF = Path(__file__).parents[1] / "conf"
CKPT = FIXTURES / "v0_1" / "tiny_region.ckpt"
CASE = FIXTURES / "v0_1" / "BraTS2021_00000"


class MyLoss(RegionDiceBCELoss):
    """A user's own loss: a checkpoint naming it loads only when the user trusts it."""


# ---- the allowlist -------------------------------------------------------------------------------------------------
def targets_in(node: Any) -> set[str]:
    if isinstance(node, dict):
        return {v for k, v in node.items() if k == "_target_"} | {t for v in node.values() for t in targets_in(v)}
    if isinstance(node, list):
        return {t for v in node for t in targets_in(v)}
    return set()


def conf_targets() -> set[str]:
    """Every `_target_` written in conf/ (a composed config holds only these), except under the `hydra` node (the
    hydra/ group, hparams_search's sweeper): no run stores that node."""
    found: set[str] = set()
    for path in CONF.rglob("*.yaml"):
        if path.relative_to(CONF).parts[0] == "hydra":
            continue
        config = yaml.safe_load(path.read_text()) or {}
        found |= targets_in({k: v for k, v in config.items() if k != "hydra"})
    return found


def test_every_target_the_configs_name_is_allowed_and_the_list_names_nothing_else() -> None:
    found = conf_targets()
    assert len(found) >= 15 and "brats_unet.training.losses.CombinedLoss" in found
    assert {t for t in found if not is_trusted(t)} == set()
    assert {t for t in found if not t.startswith("torch.optim.")} == PROJECT_TARGETS  # no stale entry either
    assert is_trusted("torch.optim.SGD") and not is_trusted("torch.load") and not is_trusted("os.system")


def test_check_targets_names_the_file_the_key_path_and_the_target() -> None:
    config = {"loss": {"_target_": "brats_unet.training.losses.DiceLoss", "w": [1, {"_target_": "os.system"}]}}
    with pytest.raises(BratsError, match=r"^a\.ckpt: loss\.w\.1\._target_ names 'os\.system', which is not allowed"):
        check_targets(config, "a.ckpt")
    assert check_targets(config, "a.ckpt", allow=["os.system"]) == config
    assert check_targets(config, "a.ckpt", allow=["os.*"]) == config
    with pytest.raises(BratsError, match=r"loss\.w\.1\._target_ names 'os\.system'"):
        check_targets(config, "a.ckpt", allow=["o.*", "os.sys"])
    with pytest.raises(BratsError, match=r"a\.ckpt: model\._target_ names \{'_target_': 'os\.system'\}"):
        check_targets({"model": {"_target_": {"_target_": "os.system"}}}, "a.ckpt")
    with pytest.raises(BratsError, match=r"a\.ckpt: loss\.w holds an interpolation \(.\$\{oc\.decode:"):
        check_targets({"loss": {"w": "${oc.decode:'{_target_: os.system}'}"}}, "a.ckpt")


# ---- a planted target never runs ------------------------------------------------------------------------------------
def planted(marker: Path) -> dict:
    """Path(marker).write_text("x") as a nested Hydra node: what the issue's attacker hides in a loss config."""
    return {"_target_": "pathlib.Path.write_text", "self": {"_target_": "pathlib.Path", "_args_": [str(marker)]},
            "data": "x"}


def poisoned_checkpoint(path: Path, marker: Path, **config: Any) -> Path:
    """The fixture checkpoint (a real trained model) with a planted `loss.weight` (or the `config` sections given)."""
    checkpoint = torch.load(CKPT, map_location="cpu", weights_only=True)
    changes = config or {"loss": {"weight": planted(marker)}}
    for section, values in changes.items():
        checkpoint["brats_config"][section] = {**checkpoint["brats_config"][section], **values}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def job(sweep: Path, name: str, ckpt: Path, fold: int, val: list[str]) -> None:
    (sweep / name / ".hydra").mkdir(parents=True)
    (sweep / name / ".hydra" / "overrides.yaml").write_text(f"- data.fold={fold}\n- data.num_folds=2\n")
    (sweep / name / "checkpoints").mkdir()
    # A real fold job: its checkpoint's own config trained this fold of this split (out-of-fold prediction checks it)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    checkpoint["brats_config"]["data"] = {**checkpoint["brats_config"]["data"], "fold": fold, "num_folds": 2,
                                          "split_seed": 0}
    torch.save(checkpoint, sweep / name / "checkpoints" / "best.ckpt")
    split = {"train": ["a"], "val": val, "test": [], "seed": 0, "fold": fold, "num_folds": 2}
    (sweep / name / "split.json").write_text(json.dumps(split))


def refused(path: Path, key: str = r"loss\.weight\._target_", target: str = r"pathlib\.Path\.write_text") -> str:
    return rf"{re.escape(str(path))}: {key} names '{target}', which is not allowed to be built from a stored config"


def predict_cli(ckpt: str, out: Path, *extra: str, case: Path = CASE) -> list[Path]:
    return predict_command(compose_cli("predict", [f"ckpt_path={ckpt}", f"input={case}", f"output={out}",
                                                   "device=cpu", "precision=fp32", *extra]))


def test_a_planted_target_never_runs_by_any_load_path(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    instantiate(planted(marker))  # the payload is real: Hydra runs it
    assert marker.read_text() == "x"
    marker.unlink()

    bad = poisoned_checkpoint(tmp_path / "bad.ckpt", marker)
    with pytest.raises(BratsError, match=refused(bad)):
        predict_cli(str(bad), tmp_path / "pred")
    with pytest.raises(BratsError, match=refused(bad)):
        brats_unet.Segmenter.from_checkpoint(bad)
    with pytest.raises(BratsError, match=refused(bad)):  # an ensemble: one poisoned member is enough
        predict_cli(f"[{CKPT},{bad}]", tmp_path / "pred")
    sweep = tmp_path / "sweep"
    job(sweep, "0", bad, 0, [CASE.name])
    job(sweep, "1", CKPT, 1, ["other"])
    best = sweep / "0" / "checkpoints" / "best.ckpt"
    with pytest.raises(BratsError, match=refused(best)):  # a sweep dir
        predict_cli(str(sweep), tmp_path / "pred")
    with pytest.raises(BratsError, match=refused(best)):  # out-of-fold
        predict_cli(str(sweep), tmp_path / "pred", "oof=true", case=CASE.parent)
    # Another node than the loss, another kind of target: the check covers the whole stored config.
    other = poisoned_checkpoint(tmp_path / "other.ckpt", marker, model={"_target_": "builtins.exec"})
    with pytest.raises(BratsError, match=refused(other, r"model\._target_", r"builtins\.exec")):
        brats_unet.Segmenter.from_checkpoint(other)

    # brats-report on a run folder: Figure 1 rebuilds the network from .hydra/config.yaml.
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("[]\n")
    config = OmegaConf.to_container(compose_train(["experiment=quickstart"]), resolve=False)
    config["loss"]["weight"] = planted(marker)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(BratsError, match=refused(run / ".hydra" / "config.yaml")):
        report_command(compose_cli("report", [f"run={run}"]))
    assert not marker.exists()
    assert not (tmp_path / "pred").exists() and not (run / "report").exists()


@pytest.mark.slow
def test_resuming_builds_the_command_lines_config_never_the_stored_one(synthetic_root: Path, cache_dir: Path,
                                                                      tmp_path: Path) -> None:
    """ckpt_path=last reads the stored config only to name what changed: a planted target in it never runs."""
    marker = tmp_path / "payload-ran"
    run = tmp_path / "run"
    overrides = [*tiny_overrides(synthetic_root, cache_dir, run), "logger=none"]
    brats_unet.train(compose_train(overrides))
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    checkpoint["brats_config"]["loss"]["weight"] = planted(marker)
    torch.save(checkpoint, last)
    metrics = brats_unet.train(compose_train([*overrides, "ckpt_path=last", "trainer.max_epochs=2"]))
    assert "val/dice_mean" in metrics and torch.load(last, weights_only=True)["epoch"] == 1
    assert not marker.exists()


def test_a_users_own_target_loads_only_when_trusted(tmp_path: Path) -> None:
    ckpt = poisoned_checkpoint(tmp_path / "mine.ckpt", tmp_path / "unused",
                               loss={"_target_": "test_trust.MyLoss"}, optimizer={"_target_": "torch.optim.SGD"})
    with pytest.raises(BratsError, match=refused(ckpt, r"loss\._target_", r"test_trust\.MyLoss") + r".*trust_targets"):
        brats_unet.Segmenter.from_checkpoint(ckpt)
    seg = brats_unet.Segmenter.from_checkpoint(ckpt, device="cpu", trust_targets=["test_trust.MyLoss"])
    assert type(seg.module.loss).__name__ == "MyLoss"
    out = predict_cli(str(ckpt), tmp_path / "pred", "trust_targets=[test_trust.*]")
    assert [p.name for p in out] == [f"{CASE.name}.nii.gz"] and out[0].is_file()


# ---- one predictions folder, one model ----------------------------------------------------------------------------
def split_of(tmp_path: Path, cases: list[str]) -> str:
    path = tmp_path / f"split{len(cases)}.json"
    path.write_text(json.dumps({"train": [], "val": [], "test": cases}))
    return f"split_file={path}"


def predict_cases(ckpt: Path, root: Path, out: Path, split: str, *extra: str) -> list[Path]:
    return predict_command(compose_cli("predict", [f"ckpt_path={ckpt}", f"input={root}", f"output={out}", split,
                                                   "device=cpu", "precision=fp32", *extra]))


def labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


@pytest.mark.slow
def test_one_predictions_folder_holds_one_models_predictions(synthetic_root: Path, tmp_path: Path) -> None:
    cases = sorted(p.name for p in synthetic_root.iterdir() if p.is_dir())[:4]
    a, b = CKPT, nudged_checkpoint(tmp_path / "b.ckpt")
    out = tmp_path / "out"
    three, four = split_of(tmp_path, cases[:3]), split_of(tmp_path, cases)
    predict_cases(a, synthetic_root, out, three)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["cases"] == cases[:3] and manifest["model"]["members"][0]["checkpoint"] == str(a)
    written = {c: labels(out / f"{c}.nii.gz") for c in cases[:3]}

    # Model B, or model A with other settings, cannot resume A's folder: refused naming both, nothing written.
    with pytest.raises(BratsError, match=rf"holds predictions by another model: {re.escape(str(a))} .*this run is "
                                         rf"{re.escape(str(b))} .*differs in sha256"):
        predict_cases(b, synthetic_root, out, four, "resume=true")
    with pytest.raises(BratsError, match=r"differs in tta: False vs True"):
        predict_cases(a, synthetic_root, out, four, "resume=true", "tta=true")
    assert not (out / f"{cases[3]}.nii.gz").exists()

    # The same model resumes: only the fourth case is predicted, and the manifest lists all four.
    predict_cases(a, synthetic_root, out, four, "resume=true")
    assert json.loads((out / MANIFEST).read_text())["cases"] == cases
    assert all(np.array_equal(labels(out / f"{c}.nii.gz"), written[c]) for c in cases[:3])

    # brats-evaluate scores one model's folder, and refuses a file the manifest does not list.
    summary = run_evaluate(out, synthetic_root, tmp_path / "eval")
    assert summary["n_cases"] == 4 and summary["model"]["members"][0]["sha256"] == manifest["model"]["members"][0][
        "sha256"]
    stray = sorted(p.name for p in synthetic_root.iterdir() if p.is_dir())[4]
    shutil.copy(out / f"{cases[0]}.nii.gz", out / f"{stray}.nii.gz")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(BratsError, match=rf"{MANIFEST} says {re.escape(str(a))} .*wrote this folder, but not 1 of the "
                                         rf"predictions to score: {stray}"):
        run_evaluate(out, synthetic_root, tmp_path / "eval2")

    # overwrite=true replaces the folder's predictions, all of A's (not only the case in scope); B's one case is
    # written; files brats-predict did not write stay.
    predict_cases(b, synthetic_root, out, split_of(tmp_path, cases[:1]), "overwrite=true")
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "notes.txt", f"{cases[0]}.nii.gz",
                                                            f"{stray}.nii.gz"])
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["cases"] == cases[:1] and manifest["model"]["members"][0]["checkpoint"] == str(b)


def test_a_folder_without_a_manifest_is_not_resumed_over(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(CASE / f"{CASE.name}_seg.nii.gz", out / f"{CASE.name}.nii.gz")  # an older version's, or anyone's
    with pytest.raises(BratsError, match=rf"resume=true: {re.escape(str(out))} holds {CASE.name}\.nii\.gz which "
                                         rf"{MANIFEST} does not list as written by this model"):
        predict_cli(str(CKPT), out, "resume=true")
    (out / MANIFEST).write_text('{"model": {}, "cases": ["../x"]}')
    with pytest.raises(BratsError, match=rf"{MANIFEST}: not a brats-predict manifest"):
        predict_cli(str(CKPT), out, "resume=true")
