"""Faithful to the seed paper: experiment configs, the README's loss sweep, steps per epoch, Table 1, Figures 1-2."""

from __future__ import annotations

import csv
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_train, tiny_overrides
from hydra.utils import instantiate
from matplotlib.patches import FancyBboxPatch
from omegaconf import OmegaConf
from test_report import assert_png, compose_report, metrics_json, read_csv, sweep_dir, write_job

from brats_unet.cli.report import report
from brats_unet.data.datamodule import steps_per_epoch
from brats_unet.evaluation.overlays import CLASS_COLORS
from brats_unet.models.unet2d import UNet2D
from brats_unet.models.unet3d import UNet3D
from brats_unet.reporting.paper import network_spec
from brats_unet.reporting.plots import plot_case, plot_network
from brats_unet.training.losses import CombinedLoss, CrossEntropyLoss, DiceLoss

PAPER_DOC = Path(__file__).parents[1] / "docs" / "paper.md"
PAPER = ("paper_baseline", "paper_combined", "paper_dropout", "paper_final", "paper_two_legs", "paper_augment")


# ---- configs ---------------------------------------------------------------------------------------------------
def test_base_model_is_cross_entropy_and_the_later_models_stay_combined() -> None:
    configs = {e: compose_train([f"experiment={e}"]) for e in PAPER}
    losses = {e: c.loss for e, c in configs.items()}
    assert losses["paper_baseline"]._target_.endswith("CrossEntropyLoss")
    assert losses["paper_augment"]._target_.endswith("CrossEntropyLoss")  # Table 1: "the initial categorical CE"
    for e in ("paper_combined", "paper_dropout", "paper_final", "paper_two_legs"):
        assert losses[e]._target_.endswith("CombinedLoss") and losses[e].alpha == 0.5, e
    for e in PAPER:  # the paper's rule, training scans / batch size, not a fixed count
        assert configs[e].data.steps_per_epoch is None and configs[e].data.batch_size == 2, e


def readme_row(label: str) -> list[str]:
    """The brats-train arguments of docs/paper.md's table row starting with `label`."""
    row = next(line for line in PAPER_DOC.read_text().splitlines() if line.startswith(f"| {label}"))
    command = re.search(r"`brats-train ([^`]+)`", row).group(1).split()
    return [a for a in command if a != "-m"]


def expand(arguments: list[str]) -> list[list[str]]:
    """Every job of a Hydra basic sweep: comma-separated values form a cartesian product."""
    choices = [[f"{a.split('=', 1)[0]}={v}" for v in a.split("=", 1)[1].split(",")] for a in arguments]
    return [list(job) for job in itertools.product(*choices)]


def test_readme_loss_comparison_is_one_sweep_over_ce_dice_and_the_three_alphas() -> None:
    jobs = expand(readme_row("loss comparison"))
    losses = [instantiate(compose_train(job).loss) for job in jobs]
    assert [loss.alpha for loss in losses] == [0.0, 0.25, 0.5, 0.75, 1.0]
    torch.manual_seed(0)
    logits, target = torch.randn(2, 4, 6, 6, 6), torch.randint(0, 4, (2, 6, 6, 6))
    ce, dice = CrossEntropyLoss()(logits, target), DiceLoss()(logits, target)
    assert abs(ce.item() - dice.item()) > 0.1  # the endpoints below are distinguishable
    assert losses[0](logits, target).item() == ce.item()  # alpha 0: cross-entropy only, exactly
    assert losses[-1](logits, target).item() == dice.item()  # alpha 1: Dice only, exactly
    assert all(isinstance(loss, CombinedLoss) for loss in losses)


def test_readme_table1_sweep_composes_its_four_jobs_with_the_papers_steps() -> None:
    jobs = [compose_train(job) for job in expand(readme_row("Table 1"))]
    assert [(c.data.train_cases, c.augment.brightness.p) for c in jobs] == [(50, 0.0), (50, 1.0), (100, 0.0),
                                                                          (100, 1.0)]
    steps = [steps_per_epoch(c.data.train_cases, c.data.batch_size, c.data.steps_per_epoch) for c in jobs]
    assert steps == [25, 25, 50, 50]


def test_steps_per_epoch_hand_counts() -> None:
    assert steps_per_epoch(100, 2) == 50 and steps_per_epoch(50, 2) == 25  # the paper, 3.3.7
    assert steps_per_epoch(5, 2) == 2  # rounded down: the last, incomplete batch is dropped
    assert steps_per_epoch(1, 2) == 1  # never 0
    assert steps_per_epoch(100, 2, steps=7) == 7  # set explicitly: wins
    assert steps_per_epoch(100, 2, world_size=2) == 25  # DDP: each of 2 ranks takes half the patches
    assert steps_per_epoch(5, 2, world_size=2) == 1  # 5 patches -> 3 per rank (padded) -> 1 full batch of 2


# ---- Figure 1: the network, read off the built module -------------------------------------------------------------
def figure_texts(fig) -> str:
    return "\n".join(t.get_text() for ax in fig.axes for t in ax.texts)


def test_network_spec_and_figure_follow_the_configured_model() -> None:
    net = UNet3D(3, 4, filters=[4, 8, 16], dropout=[0.1, 0.2, 0.3], norm="instance")
    spec = network_spec(net)
    assert (spec["dim"], spec["in_channels"], spec["out_channels"]) == (3, 3, 4)
    assert [(b["width"], b["dropout"]) for b in spec["encoder"]] == [(4, 0.1), (8, 0.2), (16, 0.3)]
    assert [(b["in"], b["width"]) for b in spec["decoder"]] == [(8, 4), (16, 8)]  # [up, skip] concatenated
    assert spec["encoder"][0]["norm"] == "InstanceNorm3d"
    assert spec["parameters"] == sum(p.numel() for p in net.parameters())
    fig = plot_network(spec, patch_size=[32, 32, 16])
    boxes = [p for p in fig.axes[0].patches if isinstance(p, FancyBboxPatch)]
    text = figure_texts(fig)
    assert len(boxes) == 5  # 3 encoder levels (the last is the bottleneck) + 2 decoder levels
    assert "16 ch\ndropout 0.3, InstanceNorm3d\n8x8x4" in text and text.count("8 ch\ndropout 0.2") == 2
    assert "in: 3 ch" in text and "1x1 conv: 4 ch" in text and "3 levels, two 3x3x3 convs" in text

    flat = plot_network(network_spec(UNet2D(4, 3, filters=[2, 4], dropout=0.0)), patch_size=[16, 16, 8])
    text = figure_texts(flat)
    assert len([p for p in flat.axes[0].patches if isinstance(p, FancyBboxPatch)]) == 3
    assert "2 levels, two 3x3 convs" in text and "4 ch\ndropout 0\n8x8x8" in text  # z is never pooled in 2D


def test_run_report_draws_the_runs_own_network_and_survives_a_config_it_cannot_build(tmp_path: Path, caplog) -> None:
    run = write_job(tmp_path, 0, ["experiment=paper_final"], metrics_json(0.5, {"val/dice_mean": 0.5}))
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(compose_train(["experiment=paper_final"])))
    written = report(compose_report([f"run={run}"]))
    assert_png(written["network"])
    assert "![network](figures/network.png)" in (run / "report" / "summary.md").read_text()

    broken = write_job(tmp_path, 1, [], None)
    bad = compose_train(["experiment=paper_final", "model.dropout=[0.1,0.2]"])  # 2 rates for 5 levels
    (broken / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(bad))
    written = report(compose_report([f"run={broken}"]))
    assert "network" not in written and "summary" in written
    assert "cannot rebuild the network" in caplog.text and "model.dropout has 2 rates" in caplog.text


# ---- Figure 2: one case's modalities and label ---------------------------------------------------------------------
def test_case_figure_shows_each_modality_and_the_label_on_the_tumour_slice() -> None:
    shape = (8, 6, 5)
    images = {m: np.random.default_rng(i).uniform(0, 1, shape) for i, m in enumerate(("t1", "t1ce", "t2", "flair"))}
    classes = np.zeros(shape, np.uint8)
    classes[2:4, 1:3, 3] = 3  # ET on axial slice 3 only
    classes[5, 4, 1] = 2
    fig = plot_case("c0", images, classes)
    tiles = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in fig.axes] == ["T1", "T1CE", "T2", "FLAIR", "label"]
    assert fig._suptitle.get_text() == "c0, axial slice 3"
    label = np.asarray(tiles[-1])
    assert label.shape == (6, 8, 3)  # (y, x) shown radiologically
    assert (np.all(label == CLASS_COLORS[3], axis=-1)).sum() == 4 and (label.sum(-1) > 0).sum() == 4
    flair = np.asarray(tiles[3])
    assert flair.shape == (6, 8) and flair.min() >= 0.0 and flair.max() <= 1.0


# ---- Table 1 -----------------------------------------------------------------------------------------------------
def test_table1_from_a_sweep_lays_rows_out_as_the_paper(tmp_path: Path) -> None:
    sweep = sweep_dir(tmp_path)  # jobs: 0 = 50 scans none, 1 = 50 brightness, 2 = 100 none (unfinished)
    written = report(compose_report([f"run={sweep}"]))
    assert written["table1_csv"] == sweep / "report" / "table1.csv"
    columns, rows = read_csv(written["table1_csv"])
    assert columns == ["Training data size", "Model", "Data augmentation", "Train loss", "Train Dice", "Val loss",
                       "Val Dice", "job"]
    assert [(r["Training data size"], r["Model"], r["Data augmentation"], r["job"]) for r in rows] == [
        ("50", "1", "none", "0"), ("50", "2", "brightness", "1"), ("100", "3", "none", "2")]
    assert (rows[0]["Train loss"], rows[0]["Val loss"], rows[0]["Val Dice"]) == ("0.0184", "0.2956", "0.81")
    assert rows[0]["Train Dice"] == "" and rows[2]["Val loss"] == ""  # not logged / not finished
    md = written["table1_md"].read_text()
    assert "| 50 | 1 | none | 0.0184 |  | 0.2956 | 0.8100 | 0 |" in md


@pytest.mark.slow
def test_report_on_a_real_table1_sweep(synthetic_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    """A real 4-job `-m experiment=paper_augment data.train_cases=.. augment=none,brightness` sweep, shrunk to CPU."""
    keep = [o for o in tiny_overrides(synthetic_root, cache_dir, tmp_path, preprocess="seed")
            if not o.startswith(("data=", "preprocess=", "model=", "paths.output", "data.steps_per_epoch"))]
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "brats_unet.cli.train", "-m", "experiment=paper_augment", "data=synthetic", *keep,
           "model.filters=[4,8,16]", "data.batch_size=1", "data.val_cases=1", "trainer.max_epochs=1", "logger=csv",
           "data.train_cases=2,3", "augment=none,brightness", f"hydra.sweep.dir={sweep}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for job, cases in (("0", 2), ("3", 3)):  # data.steps_per_epoch null: training cases / batch size 1
        log = "".join(p.read_text() for p in (sweep / job).glob("*.log"))
        assert f"steps per epoch: {cases} (data.steps_per_epoch=null: {cases} training cases / batch size 1)" in log
        assert json.loads((sweep / job / "metrics.json").read_text())["global_step"] == cases

    written = report(compose_report([f"run={sweep}", f"data_root={synthetic_root}", "case=BraTS2021_00001"]))
    with written["table1_csv"].open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["Training data size"], r["Data augmentation"], r["Model"]) for r in rows] == [
        ("2", "none", "1"), ("2", "brightness 0.8-1.2", "2"), ("3", "none", "3"), ("3", "brightness 0.8-1.2", "4")]
    for row in rows:
        final = json.loads((sweep / row["job"] / "metrics.json").read_text())["final"]
        for column, metric in (("Train loss", "train/loss_epoch"), ("Train Dice", "train/dice_paper"),
                               ("Val loss", "val/loss"), ("Val Dice", "val/dice_paper")):
            assert float(row[column]) == pytest.approx(final[metric], abs=1e-12), (row["job"], column)
    assert "| 3 | 4 | brightness 0.8-1.2 |" in written["table1_md"].read_text()
    assert_png(written["network"])
    assert_png(written["case"])
