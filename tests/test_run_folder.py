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


def _job(sweep: Path, job: int, split_fold: int, ckpt_fold: int) -> None:
    folder = sweep / str(job)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(f"- data.fold={ckpt_fold}\n")
    (folder / "checkpoints").mkdir()
    cases = [f"BraTS2021_{i:05d}" for i in range(6)]
    (folder / "split.json").write_text(json.dumps(make_split(cases, seed=0, num_folds=2, fold=split_fold)))
    config = {"data": {"fold": ckpt_fold, "num_folds": 2, "split_seed": 0}}
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
