"""brats-report on real files: TensorBoard event files, metrics.json and .hydra/overrides.yaml as brats-train writes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from helpers import compose_cli, compose_train, tiny_overrides
from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter

from brats_unet.cli.report import report
from brats_unet.data.cases import load_nifti, save_nifti
from brats_unet.data.discovery import find_cases
from brats_unet.reporting.plots import plot_class_distribution, plot_overlays
from brats_unet.runs import clean_series, epoch_series, parse_overrides, read_scalars
from brats_unet.utils import BratsError


def compose_report(overrides: list[str]) -> DictConfig:
    return compose_cli("report", overrides)


def write_events(run: Path, scalars: dict[str, list[tuple[int, float]]], echo: dict[str, float] | None = None) -> None:
    """Scalars the way Lightning logs them: each tag at its steps, then (like log_hyperparams) the echo at step 0."""
    writer = SummaryWriter(log_dir=str(run / "tensorboard"))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    for tag, value in (echo or {}).items():
        writer.add_scalar(tag, value)  # no step: what log_hyperparams(metrics=...) writes
    writer.close()


def write_job(sweep: Path, job: int, overrides: list[str], metrics: dict | None) -> Path:
    run = sweep / str(job)
    (run / ".hydra").mkdir(parents=True)
    # Hydra saves the job's task overrides as a YAML list of strings.
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run / ".hydra" / "config.yaml").write_text("seed: 42\n")
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return run


def metrics_json(best: float | None, final: dict[str, float], epochs: int = 79) -> dict:
    return {"final": final, "best": {"val/dice_mean": best, "checkpoint": "checkpoints/best.ckpt"},
            "epochs": epochs, "global_step": epochs * 25}


# Two epochs of two steps each (steps 0-3): per-step train/dice, epoch-level train/loss_epoch and val metrics.
RUN_SCALARS = {
    "epoch": [(0, 0), (1, 0), (2, 1), (3, 1)],
    "train/dice": [(0, 0.1), (1, 0.3), (2, 0.5), (3, 0.7)],
    "train/loss_epoch": [(1, 0.9), (3, 0.6)],
    "val/loss": [(1, 0.8), (3, 0.7)],
    "val/dice_mean": [(1, 0.25), (3, 0.45)],
    "lr-Adam": [(0, 1e-4), (1, 2e-4), (2, 1.5e-4), (3, 5e-5)],
}


def sweep_dir(root: Path) -> Path:
    """Table 1 as a 3-job sweep: job 2 never finished; job 1 has the best validation Dice."""
    sweep = root / "sweep"
    common = ["experiment=paper_augment", "paths.cache_dir=/tmp/cache"]
    write_job(sweep, 0, [*common, "data.train_cases=50", "augment=none"], metrics_json(
        0.4743, {"val/dice_mean": 0.47, "val/dice_wt": 0.6, "val/dice_tc": 0.5, "val/dice_et": 0.31,
                 "val/dice_paper": 0.81, "val/loss": 0.2956, "train/loss_epoch": 0.0184, "train/loss_step": 0.5}))
    write_job(sweep, 1, [*common, "data.train_cases=50", "augment=brightness"], metrics_json(
        0.4961, {"val/dice_mean": 0.49, "val/dice_wt": 0.7, "val/dice_tc": 0.45, "val/dice_et": 0.32,
                 "val/dice_paper": 0.83, "val/loss": 0.2349, "train/loss_epoch": 0.0423}))
    write_job(sweep, 2, [*common, "data.train_cases=100", "augment=none"], None)
    for job, losses in ((0, [0.5, 0.3, 0.4]), (1, [0.6, 0.2, 0.25])):
        write_events(sweep / str(job), {"epoch": [(9, 0), (19, 1), (29, 2)],
                                        "val/loss": list(zip((9, 19, 29), losses, strict=True))})
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def assert_png(path: Path) -> None:
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.shape[2] in (3, 4)


# ---- pure pieces ------------------------------------------------------------------------------------------------
def test_clean_series_drops_the_hparams_echo_and_replays_a_resume() -> None:
    assert clean_series([(1, 0.1), (3, 0.3), (0, 0.9)]) == [(1, 0.1), (3, 0.3)]
    resumed = [(1, 0.1), (3, 0.3), (5, 0.5), (3, 0.33), (7, 0.7)]
    assert clean_series(resumed) == [(1, 0.1), (3, 0.33), (7, 0.7)]


def test_parse_overrides_handles_every_hydra_prefix() -> None:
    parsed = parse_overrides(["data.train_cases=50", "+extra=1", "++model.dropout=[0.1,0.2]", "~callbacks.lr_monitor",
                              "data.root=/a=b"])
    assert parsed == {"data.train_cases": "50", "extra": "1", "model.dropout": "[0.1,0.2]",
                      "callbacks.lr_monitor": "(removed)", "data.root": "/a=b"}


def test_epoch_series_from_event_files_averages_steps_and_ignores_the_echo(tmp_path: Path) -> None:
    write_events(tmp_path, RUN_SCALARS, echo={"val/dice_mean": 0.45, "val/loss": 0.7})
    scalars = read_scalars(tmp_path / "tensorboard")
    assert epoch_series(scalars, "train/dice") == pytest.approx({0: 0.2, 1: 0.6})
    assert epoch_series(scalars, "train/loss") == pytest.approx({0: 0.9, 1: 0.6})  # read from train/loss_epoch
    assert epoch_series(scalars, "val/dice_mean") == pytest.approx({0: 0.25, 1: 0.45})
    assert epoch_series(scalars, "val/dice_paper") == {}


def test_class_distribution_bars_hold_the_shares() -> None:
    fig = plot_class_distribution({"background": 98.80, "ncr": 0.16, "ed": 0.79, "et": 0.25}, cases=3)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == pytest.approx([98.80, 0.16, 0.79, 0.25])


def test_overlays_colour_the_truth_and_leave_an_empty_prediction_grey() -> None:
    image = np.arange(16 * 16 * 8, dtype=np.float32).reshape(16, 16, 8)
    truth = np.zeros((16, 16, 8), np.uint8)
    truth[4:8, 5:9, 2:5] = 2
    fig = plot_overlays([("c0", image, truth, np.zeros_like(truth))])
    tiles = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    assert len(tiles) == 6  # axial, coronal, sagittal x (truth, prediction)
    for truth_tile, pred_tile in zip(tiles[0::2], tiles[1::2], strict=True):
        assert np.any(truth_tile[..., 1] != truth_tile[..., 0])  # oedema green blended in
        assert np.array_equal(pred_tile[..., 0], pred_tile[..., 1])  # grey only
    axial = tiles[0]
    assert axial.shape[:2] == (16, 16) and np.ptp(axial) > 0


# ---- brats-report on a sweep -------------------------------------------------------------------------------------
def test_sweep_ablation_table_rows_order_and_values(tmp_path: Path) -> None:
    sweep = sweep_dir(tmp_path)
    written = report(compose_report([f"run={sweep}"]))
    out = sweep / "report"
    assert written["ablation_csv"] == out / "ablation.csv"
    columns, rows = read_csv(out / "ablation.csv")
    assert columns == ["job", "status", "experiment", "data.train_cases", "augment", "best val/dice_mean",
                       "val/dice_mean", "val/dice_wt", "val/dice_tc", "val/dice_et", "val/dice_paper", "val/loss",
                       "train/loss", "epochs"]
    assert [r["job"] for r in rows] == ["1", "0", "2"]
    assert [r["status"] for r in rows] == ["complete", "complete", "incomplete"]
    first = rows[0]
    assert (first["data.train_cases"], first["augment"], first["experiment"]) == ("50", "brightness", "paper_augment")
    assert float(first["best val/dice_mean"]) == 0.4961 and float(first["val/dice_mean"]) == 0.49
    assert float(first["val/dice_wt"]) == 0.7 and float(first["val/dice_paper"]) == 0.83
    assert float(first["train/loss"]) == 0.0423 and first["epochs"] == "79"
    assert float(rows[1]["train/loss"]) == 0.0184  # the epoch mean, not train/loss_step
    assert rows[2]["data.train_cases"] == "100" and rows[2]["best val/dice_mean"] == "" and rows[2]["epochs"] == ""

    md = (out / "ablation.md").read_text()
    assert "Common overrides: `experiment=paper_augment`" in md
    assert "| 1 | complete | 50 | brightness | 0.4961 | 0.4900 |" in md
    assert "| 2 | incomplete | 100 | none |" in md
    assert_png(out / "figures" / "ablation.png")


def test_sweep_ranked_by_a_loss_uses_the_lowest_epoch_in_tensorboard(tmp_path: Path) -> None:
    sweep = sweep_dir(tmp_path)
    report(compose_report([f"run={sweep}", "metric=val/loss", f"output={tmp_path / 'by_loss'}"]))
    columns, rows = read_csv(tmp_path / "by_loss" / "ablation.csv")
    assert "best val/loss" in columns and columns.index("val/loss") == columns.index("best val/loss") + 1
    assert [(r["job"], r["best val/loss"]) for r in rows[:2]] == [("1", "0.2"), ("0", "0.3")]  # float32 kept short


# ---- brats-report on a single run --------------------------------------------------------------------------------
def test_single_run_curves_lr_and_summary(tmp_path: Path) -> None:
    run = write_job(tmp_path, 0, ["experiment=paper_final", "loss.alpha=0.25"],
                    metrics_json(0.45, {"val/dice_mean": 0.45, "val/loss": 0.7}, epochs=2))
    write_events(run, RUN_SCALARS, echo={"val/dice_mean": 0.45})
    written = report(compose_report([f"run={run}"]))
    assert set(written) == {"curves", "lr", "summary"}
    assert_png(run / "report" / "figures" / "curves.png")
    assert_png(run / "report" / "figures" / "lr.png")
    summary = (run / "report" / "summary.md").read_text()
    assert "best val/dice_mean: 0.45 (checkpoint: checkpoints/best.ckpt)" in summary
    assert "- `loss.alpha=0.25`" in summary and "| val/loss | 0.7 |" in summary
    assert "![curves](figures/curves.png)" in summary


def test_missing_and_unrecognised_run_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(BratsError, match=f"run folder {tmp_path / 'nope'} does not exist"):
        report(compose_report([f"run={tmp_path / 'nope'}"]))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(BratsError, match=f"run folder {tmp_path / 'empty'} holds neither a training run"):
        report(compose_report([f"run={tmp_path / 'empty'}"]))
    with pytest.raises(BratsError, match="pass run="):
        report(compose_report([]))


def test_existing_report_needs_overwrite(tmp_path: Path) -> None:
    sweep = sweep_dir(tmp_path)
    report(compose_report([f"run={sweep}"]))
    with pytest.raises(BratsError, match="already holds files; pass overwrite=true"):
        report(compose_report([f"run={sweep}"]))
    (sweep / "report" / "ablation.csv").write_text("stale\n")
    report(compose_report([f"run={sweep}", "overwrite=true"]))
    assert (sweep / "report" / "ablation.csv").read_text().startswith("job,status,")


def test_cli_reports_a_sweep_and_exits_2_on_a_missing_folder(tmp_path: Path) -> None:
    sweep = sweep_dir(tmp_path)
    env = {**os.environ, "BRATS_LOG_DIR": str(tmp_path / "logs")}
    ok = subprocess.run([sys.executable, "-m", "brats_unet.cli.report", f"run={sweep}"], capture_output=True, text=True,
                        cwd=tmp_path, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (sweep / "report" / "ablation.md").is_file()
    bad = subprocess.run([sys.executable, "-m", "brats_unet.cli.report", f"run={tmp_path / 'nope'}"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert bad.returncode == 2 and f"error: run folder {tmp_path / 'nope'} does not exist" in bad.stderr


# ---- data figures: class distribution and overlays on synthetic cases ------------------------------------------
def test_class_distribution_and_overlays_from_predictions(synthetic_root: Path, tmp_path: Path) -> None:
    cases = find_cases(synthetic_root, "brats2021")[:2]
    preds = tmp_path / "preds"
    for c in cases:  # a prediction that is the truth with the ET turned into NCR
        seg, affine, _ = load_nifti(c.seg)
        save_nifti(preds / f"{c.case}.nii.gz", np.where(seg == 4, 1, seg).astype(np.uint8), affine)
    run = write_job(tmp_path, 0, [], None)
    written = report(compose_report([f"run={run}", f"predictions={preds}", f"data_root={synthetic_root}"]))
    assert {"overlays", "class_distribution", "summary"} <= set(written)
    assert_png(written["overlays"])
    assert_png(written["class_distribution"])
    summary = (run / "report" / "summary.md").read_text()
    assert "**incomplete**" in summary and "figures/overlays.png" in summary

    with pytest.raises(BratsError, match="predictions= needs data_root="):
        report(compose_report([f"run={run}", f"predictions={preds}", "overwrite=true"]))
    seg, affine, _ = load_nifti(cases[0].seg)
    save_nifti(preds / f"{cases[0].case}.nii.gz", seg[:-1].astype(np.uint8), affine[:, :])
    with pytest.raises(BratsError, match=f"{cases[0].case}.nii.gz: shape .* differs from the truth"):
        report(compose_report([f"run={run}", f"predictions={preds}", f"data_root={synthetic_root}",
                               "overwrite=true"]))


# ---- end to end: a real tiny training run --------------------------------------------------------------------------
@pytest.mark.slow
def test_report_on_a_real_tiny_training_run(synthetic_root: Path, cache_dir: Path, tmp_path: Path) -> None:
    from brats_unet.training.fit import train

    run = tmp_path / "run"
    train(compose_train([*tiny_overrides(synthetic_root, cache_dir, run), "trainer.max_epochs=2",
                         "scheduler.warmup_steps=1"]))
    metrics = json.loads((run / "metrics.json").read_text())
    written = report(compose_report([f"run={run}"]))
    assert_png(written["curves"])
    assert_png(written["lr"])
    val = epoch_series(read_scalars(run / "tensorboard"), "val/dice_mean")
    assert list(val) == [0, 1]  # one point per epoch; the hparams echo at step 0 is not a third
    assert val[1] == pytest.approx(metrics["final"]["val/dice_mean"], abs=1e-6)
    assert max(val.values()) == pytest.approx(metrics["best"]["val/dice_mean"], abs=1e-6)


def _run_with_data(tmp_path: Path, layout: str, schema: str) -> Path:
    """A run folder whose stored config names its data's layout and schema (as brats-train writes .hydra/)."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(f"data:\n  layout: {layout}\n  schema: {schema}\n  root: /elsewhere\n")
    return run


def test_report_reads_data_root_with_the_runs_own_layout_and_schema(tmp_path: Path) -> None:
    """A brats2024_gli run (2023 file names, labels 1-4 incl. RC): the report reads its data as the run did, with no
    layout= or schema= on the command line; a label set given as layout= is refused naming both keys."""
    from brats_unet.synth.generator import write_dataset

    root = tmp_path / "data"
    write_dataset(root, cases=1, seed=3, layout="2024_gli", shape=(48, 48, 32))
    run = _run_with_data(tmp_path, "brats2023", "brats2024_gli")
    written = report(compose_report([f"run={run}", f"data_root={root}"]))
    assert {"class_distribution", "case", "summary"} <= set(written)
    assert "Figures" in (run / "report" / "summary.md").read_text()
    with pytest.raises(BratsError, match=r"layout='2024_gli' is not a file layout; .*\(config key layout; a label "
                                         r"set such as brats2024_gli is schema="):
        report(compose_report([f"run={run}", f"data_root={root}", "layout=2024_gli", f"output={tmp_path / 'r2'}"]))


def test_report_labels_follow_the_run_unless_asked_otherwise(tmp_path: Path) -> None:
    from brats_unet.reporting.writer import report_labels

    gli = _run_with_data(tmp_path / "gli", "brats2023", "brats2024_gli")
    assert [x.name for x in report_labels(gli)] == ["brats2023", "brats2024_gli"]
    assert [x.name for x in report_labels(gli, schema="brats_ped")] == ["brats2023", "brats_ped"]
    plain = _run_with_data(tmp_path / "plain", "brats2021", "brats2021")
    # another layout asked for a plain glioma run: that layout's own labels (ET 3 in 2023 names)
    assert [x.name for x in report_labels(plain, layout="brats2023")] == ["brats2023", "brats2023"]
    assert [x.name for x in report_labels(tmp_path / "no_config")] == ["brats2021", "brats2021"]
    assert [x.name for x in report_labels(_run_with_data(tmp_path / "msd", "msd", "msd_brain"))] == ["msd",
                                                                                                       "msd_brain"]


def test_case_figure_colours_and_names_classes_by_the_schema() -> None:
    """MSD's class 1 is oedema: painted green and named ED (it was painted red and named NCR, the glioma class 1)."""
    from brats_unet.data.labels import SCHEMAS
    from brats_unet.evaluation.overlays import NAME_COLORS
    from brats_unet.reporting.plots import plot_case

    classes = np.zeros((6, 6, 3), np.uint8)
    classes[1, 1:5, 1], classes[2, 1:5, 1], classes[3, 1:5, 1] = 1, 2, 3  # ed, netc, et
    images = {m: np.ones((6, 6, 3), np.float32) for m in ("flair", "t1")}
    fig = plot_case("BRATS_001", images, classes, schema=SCHEMAS["msd_brain"])
    assert [t.get_text() for t in fig.legends[0].texts] == ["ED", "NETC", "ET"]
    label = fig.axes[-1].images[0].get_array()  # the slice as shown: rows = y flipped, columns = x
    assert np.allclose(label[-2, 1], NAME_COLORS["ed"]) and np.allclose(label[-2, 3], NAME_COLORS["et"])
    assert np.allclose(label[-2, 2], NAME_COLORS["netc"])


def test_a_sweep_that_never_validated_says_so_in_cv_md_and_in_the_refusal(tmp_path: Path) -> None:
    """quickstart's check_val_every_n_epoch=5 with max_epochs=1: every fold finishes (metrics.json) without a val/
    metric or best.ckpt. cv.md must not call them finished folds with blank cells, and using the sweep as an
    ensemble (or for oof=true) must say why there is no best.ckpt instead of asking for a rerun that trains nothing."""
    from brats_unet.inference.ensemble import sweep_checkpoints
    from brats_unet.reporting.cv import cv_markdown, cv_rows

    sweep = tmp_path / "sweep"
    for fold in range(3):
        write_job(sweep, fold, [f"data.fold={fold}", "data.num_folds=3"],
                  {"final": {"train/loss": 0.9}, "best": {"val/dice_mean": None, "checkpoint": None}, "epochs": 1,
                   "global_step": 3})
    rows, num_folds = cv_rows(sweep)
    assert [r["status"] for r in rows] == ["never validated"] * 3 and num_folds == 3
    text = cv_markdown(sweep, rows, num_folds)
    assert "0 of 3 folds finished and validated (data.num_folds=3)" in text
    assert "Never validated (left out of the mean): fold 0 (job 0), fold 1 (job 1), fold 2 (job 2): each finished " \
        "without validating once: validation runs every trainer.check_val_every_n_epoch epochs" in text
    with pytest.raises(BratsError, match=r"jobs 0, 1, 2 have no checkpoints/best\.ckpt: each finished without "
                                         r"validating once: .*trains nothing more; retrain with "
                                         r"trainer\.check_val_every_n_epoch=1"):
        sweep_checkpoints(sweep)


@pytest.mark.slow
def test_a_training_run_that_never_validated_says_so_at_its_end(synthetic_root: Path, cache_dir: Path, tmp_path: Path,
                                                                caplog) -> None:
    import logging

    from brats_unet.training.fit import train

    cfg = compose_train([*tiny_overrides(synthetic_root, cache_dir, tmp_path / "run"), "logger=none",
                         "trainer.check_val_every_n_epoch=2"])
    with caplog.at_level(logging.WARNING):
        train(cfg)
    assert "this run finished without validating once" in caplog.text
    assert not (tmp_path / "run" / "checkpoints" / "best.ckpt").exists()
