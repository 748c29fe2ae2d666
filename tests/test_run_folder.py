"""A run folder decides no more than the command line: a fresh run does not write over another run's checkpoints, two
runs launched in the same second get two folders, and out-of-fold prediction uses each job's own split."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_script
from omegaconf import OmegaConf

from brats_unet.cli.train import RunDirGuard
from brats_unet.data.split import make_split
from brats_unet.inference.ensemble import out_of_fold_jobs
from brats_unet.training.fit import check_fresh_run_dir, train
from brats_unet.utils import BratsError

CONF = Path(__file__).parents[1] / "conf"


def test_a_fresh_run_in_a_folder_with_checkpoints_is_refused(train_cfg) -> None:
    run = Path(train_cfg.paths.output_dir)
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"another run's weights")
    with pytest.raises(BratsError, match=r"already holds checkpoints \(.*last\.ckpt\) and this run would start afresh "
                                         r"\(no ckpt_path was given\): resume it with ckpt_path=last.*overwrite=true"):
        train(train_cfg)
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == b"another run's weights"
    assert not (run / "split.json").exists()  # refused before anything was written


def test_overwrite_true_lets_a_fresh_run_replace_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "checkpoints" / "periodic").mkdir(parents=True)
    (tmp_path / "checkpoints" / "periodic" / "step-0000500.ckpt").write_bytes(b"x")
    with pytest.raises(BratsError, match=r"ckpt_path=last found none it could resume"):
        check_fresh_run_dir(tmp_path, "last", overwrite=False)
    check_fresh_run_dir(tmp_path, None, overwrite=True)
    assert "overwrite=true: a fresh run" in caplog.text
    check_fresh_run_dir(tmp_path / "new", None, overwrite=False)  # an empty or new folder needs nothing


@pytest.mark.parametrize("mode", ["run", "sweep"])
def test_runs_launched_in_the_same_second_get_different_folders(mode: str) -> None:
    hydra = yaml.safe_load((CONF / "hydra" / "default.yaml").read_text())
    pattern = re.search(r"\$\{now:([^}]*)\}", hydra[mode]["dir"]).group(1)
    a, b = datetime(2026, 12, 4, 18, 30, 5, 1000), datetime(2026, 12, 4, 18, 30, 5, 2000)
    assert a.strftime(pattern) != b.strftime(pattern)
    assert a.strftime(pattern).startswith("2026-12-04_18-30-05")  # still sorts and reads by time
    assert hydra["sweep"]["subdir"] == "${hydra.job.num}"  # sweeps keep their numbered job folders


def _job(sweep: Path, job: int, split_fold: int, ckpt_fold: int, ckpt_stratify: bool = False) -> None:
    folder = sweep / str(job)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(f"- data.fold={ckpt_fold}\n")
    (folder / "checkpoints").mkdir()
    cases = [f"BraTS2021_{i:05d}" for i in range(6)]
    (folder / "split.json").write_text(json.dumps(make_split(cases, seed=0, num_folds=2, fold=split_fold)))
    config = {"data": {"fold": ckpt_fold, "num_folds": 2, "split_seed": 0, "stratify": ckpt_stratify}}
    torch.save({"state_dict": {}, "brats_config": config}, folder / "checkpoints" / "best.ckpt")


def test_out_of_fold_checks_each_split_against_its_checkpoints_fold(tmp_path: Path) -> None:
    good = tmp_path / "good"
    _job(good, 0, 0, 0)
    _job(good, 1, 1, 1)
    assert [len(val) for _, val in out_of_fold_jobs(good)] == [3, 3]
    # Job 1 trained fold 1, but its folder holds fold 0's split.json (a fold-0 run's folder reused): job 0's file
    # and job 1's name fold 0 each, yet the model of job 1 trained on fold 0's validation cases.
    bad = tmp_path / "bad"
    _job(bad, 0, 1, 0)
    _job(bad, 1, 0, 1)
    with pytest.raises(BratsError, match=r"0/split\.json is not the split .*0/checkpoints/best\.ckpt was trained on "
                                         r"\(data\.fold: checkpoint 0, split\.json 1\)"):
        out_of_fold_jobs(bad)
    # A stratified model's folder holding an unstratified split: the same fold number, other cases.
    mixed = tmp_path / "mixed"
    _job(mixed, 0, 0, 0, ckpt_stratify=True)
    with pytest.raises(BratsError, match=r"\(data\.stratify: checkpoint True, split\.json False\)"):
        out_of_fold_jobs(mixed)


def test_the_refusal_comes_before_hydra_rewrites_the_other_runs_config(tmp_path: Path) -> None:
    """Hydra writes `.hydra/` into the run dir before train() runs: the guard refuses first (a Hydra callback)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.ckpt").write_bytes(b"fold 0")
    config = OmegaConf.create({"hydra": {"run": {"dir": str(run)}, "sweep": {"dir": str(tmp_path)}},
                               "ckpt_path": None, "overwrite": False})
    with pytest.raises(SystemExit) as stop:
        RunDirGuard().on_run_start(config)
    assert stop.value.code == 2
    with pytest.raises(SystemExit):
        RunDirGuard().on_run_start(OmegaConf.merge(config, {"ckpt_path": "last"}))  # nothing it could resume
    with pytest.raises(SystemExit):
        RunDirGuard().on_multirun_start(config)  # a sweep dir whose job `run` holds checkpoints
    RunDirGuard().on_run_start(OmegaConf.merge(config, {"overwrite": True}))
    (run / "checkpoints" / "last.ckpt").write_bytes(b"resumable")
    RunDirGuard().on_run_start(OmegaConf.merge(config, {"ckpt_path": "last"}))
    assert "run_dir_guard" in yaml.safe_load((CONF / "train.yaml").read_text())["hydra"]["callbacks"]


@pytest.mark.slow
def test_brats_train_in_a_used_run_dir_exits_2_and_leaves_its_hydra_folder(synthetic_root: Path, tmp_path: Path
                                                                          ) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"fold 0")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text("- data.fold=0\n")
    result = run_script("brats-train", [f"hydra.run.dir={run}", f"data.root={synthetic_root}", "data.fold=2",
                                        "data.num_folds=3"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "already holds checkpoints" in result.stderr + result.stdout
    assert (run / ".hydra" / "overrides.yaml").read_text() == "- data.fold=0\n"
