"""The training entry point end to end on tiny synthetic cases: configs, overrides, fast_dev_run, resume, sweeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import compose_train, tiny_overrides
from torch import nn

from brats_unet.evaluation.region import HD95_EMPTY
from brats_unet.training.build import build_module
from brats_unet.training.fit import train

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml"))


def test_every_paper_experiment_composes_with_the_papers_settings() -> None:
    cfg = compose_train(["experiment=paper_final"])
    assert cfg.data.train_cases == 100 and cfg.data.val_cases == 20
    assert cfg.data.batch_size == 2 and cfg.data.steps_per_epoch is None  # null: 100 scans / batch 2 = 50 steps
    assert list(cfg.data.patch_size) == [128, 128, 128]
    assert cfg.preprocess.name == "seed" and list(cfg.preprocess.modalities) == ["t1ce", "t2", "flair"]
    assert list(cfg.model.filters) == [32, 64, 128, 256, 512]
    assert list(cfg.model.dropout) == [0.3, 0.3, 0.4, 0.4, 0.5]
    assert cfg.loss._target_.endswith("CombinedLoss") and cfg.loss.alpha == 0.5
    assert cfg.scheduler._target_.endswith("warmup_cosine")
    assert cfg.trainer.max_epochs == 40

    baseline = compose_train(["experiment=paper_baseline"])
    assert baseline.loss._target_.endswith("CrossEntropyLoss") and baseline.scheduler._target_.endswith("constant")
    assert list(baseline.model.dropout) == [0.1, 0.1, 0.2, 0.2, 0.2]
    table1 = compose_train(["experiment=paper_augment", "data.train_cases=50", "augment=brightness"])
    assert table1.trainer.max_epochs == 79 and table1.data.train_cases == 50
    assert table1.augment.brightness.p == 1.0 and list(table1.augment.brightness.alpha) == [0.8, 1.2]
    assert table1.loss._target_.endswith("CrossEntropyLoss")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(experiment: str) -> None:
    cfg = compose_train([f"experiment={experiment}"])
    assert cfg.task_name == experiment


def test_cli_overrides_reach_the_model_and_loss() -> None:
    cfg = compose_train([*tiny_overrides(Path("r"), Path("c"), Path("o")), "model.filters=[2,4,8,16]",
                         "model.dropout=[0.0,0.1,0.2,0.3]", "loss=combined", "loss.alpha=0.25"])
    module = build_module(cfg, in_channels=4)
    convs = [m for m in module.net.modules() if isinstance(m, nn.Conv3d)]
    assert convs[0].in_channels == 4 and convs[0].out_channels == 2
    assert max(c.out_channels for c in convs) == 16
    assert sorted({m.p for m in module.net.modules() if isinstance(m, nn.Dropout)}) == [0.0, 0.1, 0.2, 0.3]
    assert module.loss.alpha == 0.25


@pytest.mark.slow  # a full train()
def test_fast_dev_run_trains_and_validates(train_cfg) -> None:
    cfg = compose_train([*tiny_overrides(Path(train_cfg.data.root), Path(train_cfg.paths.cache_dir),
                                         Path(train_cfg.paths.output_dir)), "debug=fast_dev_run"])
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss_step"]))
    assert_region_metrics(metrics)


def assert_region_metrics(metrics: dict[str, float]) -> None:
    """Every BraTS region metric was logged, in range, and val/dice_mean is the mean of the three region Dice."""
    dices = [metrics[f"val/dice_{r}"] for r in ("wt", "tc", "et")]
    assert all(0.0 <= d <= 1.0 for d in dices), dices
    assert metrics["val/dice_mean"] == pytest.approx(sum(dices) / 3, abs=1e-6)
    hd95 = [metrics[f"val/hd95_{r}"] for r in ("wt", "tc", "et") if f"val/hd95_{r}" in metrics]  # off in tiny runs
    assert all(0.0 <= h <= HD95_EMPTY for h in hd95), hd95


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_fast_dev_run_every_experiment(experiment: str, synthetic_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    base = compose_train([f"experiment={experiment}"])
    overrides = tiny_overrides(synthetic_root, cache_dir, tmp_path, preprocess=base.preprocess.name)
    # The experiment's own data/preprocess/model choices stay; only sizes shrink to a CPU test.
    overrides = [o for o in overrides if not o.startswith(("data=", "preprocess=", "model="))]
    cfg = compose_train([f"experiment={experiment}", "data=synthetic", *overrides, "debug=fast_dev_run",
                         "data.train_cases=null", "data.val_cases=null"])
    metrics = train(cfg)
    assert "val/dice_mean" in metrics


def last_checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


# The best-checkpoint callback watches a metric that can never improve after the first validation (a running
# maximum, ranked as if lower were better): later epochs write no top-k checkpoint, which is where Lightning >= 2.6's
# save_last=true left last.ckpt behind.
NO_IMPROVEMENT = ["callbacks.model_checkpoint.monitor=val/dice_mean_best", "callbacks.model_checkpoint.mode=min"]


@pytest.mark.slow  # a full train()
def test_last_ckpt_holds_the_final_epoch_when_the_metric_does_not_improve(train_cfg, tmp_path: Path) -> None:
    run = tmp_path / "flat"
    cfg = compose_train([*tiny_overrides(Path(train_cfg.data.root), Path(train_cfg.paths.cache_dir), run),
                         *NO_IMPROVEMENT, "logger=none", "trainer.max_epochs=2"])
    train(cfg)
    last, best = last_checkpoint(run), torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["global_step"] == 2  # the only top-k save: epoch 0
    assert last["global_step"] == 4 and last["epoch"] == 1
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 4


@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_bit_identical(synthetic_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    """Two legs (1 epoch, then resume to 3) give exactly the weights of one 3-epoch run: LR, data, dropout, and
    last.ckpt is the newest state even though the monitored metric never improves after epoch 0."""
    common = ["scheduler=warmup_cosine", "scheduler.warmup_steps=1", "scheduler.total_steps=6", "logger=none",
              "model.dropout=0.3", "augment=modern", *NO_IMPROVEMENT]
    straight = tmp_path / "straight"
    train(compose_train([*tiny_overrides(synthetic_root, cache_dir, straight), *common, "trainer.max_epochs=3"]))
    legs = tmp_path / "legs"
    train(compose_train([*tiny_overrides(synthetic_root, cache_dir, legs), *common, "trainer.max_epochs=1"]))
    train(compose_train([*tiny_overrides(synthetic_root, cache_dir, legs), *common, "trainer.max_epochs=3",
                         "ckpt_path=last"]))
    a, b = last_checkpoint(straight), last_checkpoint(legs)
    assert (a["global_step"], a["epoch"]) == (b["global_step"], b["epoch"]) == (6, 2)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    metrics = json.loads((legs / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and metrics["epochs"] == 3


@pytest.mark.slow
def test_multirun_sweep_gives_one_directory_per_job(synthetic_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    overrides = [o for o in tiny_overrides(synthetic_root, cache_dir, tmp_path) if not o.startswith("paths.output")]
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "brats_unet.cli.train", "-m", *overrides, "loss=combined", "loss.alpha=0.25,0.75",
           "debug=fast_dev_run", f"hydra.sweep.dir={sweep}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env={**os.environ}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job, alpha in zip(jobs, ("0.25", "0.75"), strict=True):
        assert f"loss.alpha={alpha}" in (sweep / job / ".hydra" / "overrides.yaml").read_text()


def test_optuna_search_space_composes() -> None:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="brats_unet.conf", version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=optuna", "experiment=quickstart"], return_hydra_config=True)
    assert cfg.optimized_metric == "val/dice_mean_best"
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.params["model.dropout"] == "interval(0.0, 0.5)"


@pytest.mark.slow
def test_optuna_sweep_runs_trials_and_returns_the_metric(synthetic_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    overrides = [o for o in tiny_overrides(synthetic_root, cache_dir, tmp_path)
                 if not o.startswith(("paths.output", "model.dropout"))]
    sweep = tmp_path / "optuna"
    cmd = [sys.executable, "-m", "brats_unet.cli.train", "hparams_search=optuna", *overrides,
           "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2", "loss.alpha=interval(0.1,0.9)",
           "loss=combined", "optimized_metric=val/dice_mean", "logger=none", f"hydra.sweep.dir={sweep}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    best = (sweep / "optimization_results.yaml").read_text()
    assert "best_value" in best and "loss.alpha" in best and "model.dropout" in best


def test_warmup_longer_than_the_fit_is_a_clean_error(train_cfg) -> None:
    from brats_unet.utils import BratsError

    train_cfg.scheduler.warmup_steps = 50
    # Known from the config (1 epoch x 2 steps): refused by the preflight, before any case is cached.
    with pytest.raises(BratsError, match=r"scheduler.warmup_steps=50 must be shorter than the fit's 2 optimizer steps"):
        train(train_cfg)
    assert not Path(train_cfg.paths.output_dir).exists()
    # Known only once the data are split (steps per epoch = training cases / batch): the module refuses it at fit.
    train_cfg.data.steps_per_epoch = None
    with pytest.raises(BratsError, match=r"scheduler.warmup_steps must be in \[0, total_steps=\d+\).*optimizer steps"):
        train(train_cfg)


@pytest.mark.slow  # a full train()
def test_unet2d_trains_on_axial_slices_through_the_same_pipeline(train_cfg) -> None:
    cfg = compose_train([*tiny_overrides(Path(train_cfg.data.root), Path(train_cfg.paths.cache_dir),
                                         Path(train_cfg.paths.output_dir)), "model=unet2d", "model.filters=[4,8,16]",
                         "model.dropout=0.0", "debug=fast_dev_run"])
    assert cfg.model._target_.endswith("UNet2D")
    metrics = train(cfg)
    assert_region_metrics(metrics)
