"""brats-evaluate: score predicted label maps against BraTS ground truth -> metrics.csv + summary.json.

    brats-evaluate pred=<dir of <case>.nii.gz> truth=<BraTS root> [output=<dir>] [split_file=<run>/split.json]

Predictions use the dataset's own labels (ET 4 for BraTS 2021 names, 3 for 2023), as brats-predict writes them.
Cases are never dropped silently: truth cases without a prediction and predictions without truth are listed.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from brats_unet.cli.common import CONFIG_PATH, read_split, require, user_errors
from brats_unet.data import io
from brats_unet.data.labels import Layout, brats_to_classes
from brats_unet.metrics import case_metrics
from brats_unet.utils import BratsError, atomic_path, atomic_write_json

log = logging.getLogger("brats_unet.evaluate")

CSV_COLUMNS = ("case", "dice_wt", "dice_tc", "dice_et", "hd95_wt", "hd95_tc", "hd95_et", "dice_ncr", "dice_ed",
               "vol_pred_wt", "vol_pred_tc", "vol_pred_et", "vol_true_wt", "vol_true_tc", "vol_true_et")
METRIC_COLUMNS = CSV_COLUMNS[1:]
AFFINE_ATOL = 1e-3


def find_predictions(pred_dir: str | Path) -> dict[str, Path]:
    """`<case>.nii.gz` (or `.nii`) files in a folder; probability maps (`*_prob`) and temp files are not predictions."""
    root = Path(pred_dir).expanduser()
    if not root.is_dir():
        raise BratsError(f"pred {root} is not a folder of <case>.nii.gz predictions")
    found: dict[str, Path] = {}
    for ext in reversed(io.EXTENSIONS):  # .nii.gz last, so it wins over a .nii of the same case
        for path in root.glob(f"*{ext}"):
            case = path.name[: -len(ext)]
            if path.is_file() and not path.name.startswith(".") and not case.endswith("_prob"):
                found[case] = path
    return dict(sorted(found.items()))


def find_truth(root: str | Path, layout: str | None) -> dict[str, tuple[Path, Layout]]:
    """Case -> (seg file, layout) under a BraTS root; the layout is detected per case unless `layout` is given."""
    layouts = [io.resolve_layout(layout)] if layout else io.layout_order(None)
    truth: dict[str, tuple[Path, Layout]] = {}
    unlabelled = []
    for case_dir in io.subfolders(Path(root).expanduser(), "truth"):
        hit = next(((seg, lay) for lay in layouts if (seg := io.find_file(case_dir, lay, "seg"))), None)
        if hit:
            truth[case_dir.name] = hit
        else:
            unlabelled.append(case_dir.name)
    if unlabelled:
        log.warning("%d case folders in %s have no segmentation and are not scored (e.g. %s)", len(unlabelled), root,
                    ", ".join(unlabelled[:3]))
    if not truth:
        names = " or ".join(lay.filename("<case>", "seg") for lay in layouts)
        raise BratsError(f"truth {root} holds no case folders with a segmentation ({names})")
    return truth


def read_labels(path: Path, layout: Layout) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """(internal classes, affine, spacing) of a BraTS label map; BratsError naming the file for bad values."""
    data, affine, header = io.load_nifti(path)
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
            raise BratsError(f"{path}: holds non-integer values; expected a label map")
        data = data.astype(np.int16)
    try:
        classes = brats_to_classes(data, layout.et_label)
    except ValueError as e:
        raise BratsError(f"{path}: {e}; {layout.name} cases label ET as {layout.et_label}") from e
    return classes, affine, tuple(float(z) for z in header.get_zooms()[:3])


def score_case(case: str, pred: Path | None, seg: Path, layout: Layout, hd95: bool) -> dict[str, Any]:
    """One metrics.csv row; `pred` None scores an empty prediction (the BraTS convention for a missing case)."""
    true_classes, true_affine, spacing = read_labels(seg, layout)
    if pred is None:
        pred_classes = np.zeros_like(true_classes)
    else:
        pred_classes, pred_affine, _ = read_labels(pred, layout)
        if pred_classes.shape != true_classes.shape:
            raise BratsError(f"prediction {pred} has shape {pred_classes.shape} but truth {seg} has "
                             f"{true_classes.shape}: was it written in another geometry?")
        if not np.allclose(pred_affine, true_affine, atol=AFFINE_ATOL):
            raise BratsError(f"prediction {pred} and truth {seg} have different affines (max difference "
                             f"{np.abs(pred_affine - true_affine).max():.4g}): they are not in the same space")
    return {"case": case, **case_metrics(pred_classes, true_classes, spacing, with_hd95=hd95)}


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | int | None]]:
    """Per metric: mean, std (population), median, p25, p75 (linear interpolation) and n over finite values."""
    out: dict[str, dict[str, float | int | None]] = {}
    for name in METRIC_COLUMNS:
        values = np.array([r[name] for r in rows if r.get(name) is not None and math.isfinite(r[name])], dtype=float)
        if values.size == 0:
            out[name] = {"mean": None, "std": None, "median": None, "p25": None, "p75": None, "n": 0}
            continue
        p25, median, p75 = np.percentile(values, [25, 50, 75])
        out[name] = {"mean": float(values.mean()), "std": float(values.std()), "median": float(median),
                     "p25": float(p25), "p75": float(p75), "n": int(values.size)}
    return out


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow([row["case"], *("" if row.get(k) is None else repr(float(row[k])) for k in METRIC_COLUMNS)])


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"brats-evaluate: {summary['n_cases']} cases")
    for column in ("metric", "mean", "std", "median", "p25", "p75", "n"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name, stats in summary["metrics"].items():
        cells = ["-" if stats[k] is None else f"{stats[k]:.4f}" for k in ("mean", "std", "median", "p25", "p75")]
        table.add_row(name, *cells, str(stats["n"]))
    console = Console()
    console.print(table)
    for key in ("missing_predictions", "extra_predictions", "outside_split_predictions"):
        cases = summary[key]
        if cases:
            console.print(f"{key}: {len(cases)} ({', '.join(cases[:5])}{' ...' if len(cases) > 5 else ''})")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score every prediction that has a truth case in scope; write metrics.csv and summary.json; return the summary."""
    require(cfg, "pred", "truth", "output", usage="brats-evaluate pred=<dir of <case>.nii.gz> truth=<BraTS root>")
    out_dir = Path(cfg.output).expanduser()
    targets = [out_dir / "metrics.csv", out_dir / "summary.json"]
    if not cfg.overwrite and any(p.exists() for p in targets):
        raise BratsError(f"{out_dir} already holds metrics.csv/summary.json; pass overwrite=true to replace them "
                         "or choose another output=")
    preds = find_predictions(cfg.pred)
    truth = find_truth(cfg.truth, cfg.get("layout"))
    scope = sorted(truth)
    if cfg.get("split_file"):
        wanted = read_split(cfg.split_file, cfg.split_subset)
        unknown = sorted(set(wanted) - set(truth))
        if unknown:
            raise BratsError(f"split_file {cfg.split_file} names {len(unknown)} {cfg.split_subset} cases that have no "
                             f"truth in {cfg.truth}: {', '.join(unknown[:5])}")
        scope = sorted(wanted)
    missing = [c for c in scope if c not in preds]
    extra = [c for c in preds if c not in truth]
    outside = [c for c in preds if c in truth and c not in scope]
    scored = [c for c in scope if c in preds or cfg.missing_as_empty]
    if not any(c in preds for c in scope):
        raise BratsError(f"none of the {len(preds)} predictions in {cfg.pred} matches one of the {len(scope)} truth "
                         f"cases in scope under {cfg.truth} (e.g. prediction {next(iter(preds), '-')}, truth "
                         f"{scope[0] if scope else '-'})")
    if missing:
        how = "scored as empty" if cfg.missing_as_empty else "not scored (missing_as_empty=true scores them as empty)"
        log.warning("%d truth cases have no prediction, %s: %s", len(missing), how, ", ".join(missing[:5]))
    if extra:
        log.warning("%d predictions have no truth case: %s", len(extra), ", ".join(extra[:5]))

    rows = [score_case(c, preds.get(c), *truth[c], hd95=bool(cfg.hd95)) for c in tqdm(scored, desc="evaluate")]
    summary = {
        "metrics": summarize(rows),
        "n_cases": len(rows),
        "missing_predictions": missing,
        "extra_predictions": extra,
        "outside_split_predictions": outside,
        "missing_as_empty": bool(cfg.missing_as_empty),
        "pred": str(Path(cfg.pred).expanduser().resolve()),
        "truth": str(Path(cfg.truth).expanduser().resolve()),
        "split_file": str(cfg.split_file) if cfg.get("split_file") else None,
        "split_subset": str(cfg.split_subset) if cfg.get("split_file") else None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(targets[0], rows)
    atomic_write_json(targets[1], summary)
    print_summary(summary)
    log.info("wrote %s and %s", *targets)
    return summary


@hydra.main(config_path=CONFIG_PATH, config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        evaluate(cfg)


if __name__ == "__main__":
    main()
