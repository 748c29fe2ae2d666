"""Cross-validation table of a sweep over `data.fold`: each fold's validation metrics and their mean ± std.

Per region, Dice and HD95 are each fold's final validation values (metrics.json "final"); `best val/dice_mean` is
the best epoch's, the one its checkpoints/best.ckpt holds. The spread is the sample standard deviation over the
folds that finished (n - 1 in the denominator; empty with one fold).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brats_unet.data.split import load_split
from brats_unet.runs import NEVER_VALIDATED, final_value, find_jobs, format_csv, read_metrics, read_overrides, validated
from brats_unet.utils import BratsError

REGION_METRICS = ("val/dice_wt", "val/dice_tc", "val/dice_et", "val/dice_mean", "val/hd95_wt", "val/hd95_tc",
                  "val/hd95_et")
BEST = "best val/dice_mean"
COLUMNS = ("fold", "job", "status", BEST, *REGION_METRICS)


def is_cv_sweep(sweep: Path) -> bool:
    """A sweep whose jobs differ in data.fold (`brats-train -m ... data.num_folds=N data.fold=0,1,...`)."""
    folds = {read_overrides(job).get("data.fold") for job in find_jobs(sweep)}
    return len(folds - {None}) > 1


def _fold_of(job: Path) -> tuple[int | None, int | None]:
    """(fold, num_folds) from the job's split.json, else from its overrides (a job that never reached setup)."""
    if (job / "split.json").is_file():
        try:
            split = load_split(job / "split.json", need_train=False)
            return split["fold"], split["num_folds"]
        except BratsError:
            pass
    overrides = read_overrides(job)
    return _as_int(overrides.get("data.fold")), _as_int(overrides.get("data.num_folds"))


def _as_int(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def cv_rows(sweep: Path) -> tuple[list[dict[str, Any]], int | None]:
    """(one row per job in fold order, data.num_folds when the jobs say it)."""
    rows, num_folds = [], None
    for job in find_jobs(sweep):
        fold, n = _fold_of(job)
        num_folds = num_folds or n
        metrics = read_metrics(job)
        status = "incomplete" if not metrics else "complete" if validated(metrics) else "never validated"
        row: dict[str, Any] = {"fold": fold, "job": job.name, "status": status}
        if metrics:
            best = (metrics.get("best") or {}).get("val/dice_mean")
            row[BEST] = float(best) if best is not None else None
            row |= {m: final_value(metrics, m) for m in REGION_METRICS}
        rows.append(row)
    rows.sort(key=lambda r: (r["fold"] is None, r["fold"] if r["fold"] is not None else 0, r["job"]))
    return rows, num_folds


def mean_std(rows: Sequence[Mapping[str, Any]]) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Per metric column: mean and sample std over the finished folds that have a value."""
    means, stds = {}, {}
    for column in (BEST, *REGION_METRICS):
        values = [float(r[column]) for r in rows if r["status"] == "complete" and r.get(column) is not None]
        means[column] = float(np.mean(values)) if values else None
        stds[column] = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return means, stds


def cv_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """One row per fold, then a `mean` and a `std` row."""
    means, stds = mean_std(rows)
    summary = [{"fold": "mean", "status": "", **means}, {"fold": "std", "status": "", **stds}]
    return format_csv(COLUMNS, [*rows, *summary])


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def cv_markdown(sweep: Path, rows: Sequence[Mapping[str, Any]], num_folds: int | None) -> str:
    means, stds = mean_std(rows)
    done = [r for r in rows if r["status"] == "complete"]
    folds = f"data.num_folds={num_folds}" if num_folds else "folds"
    lines = [f"# Cross-validation: {sweep}", "",
             f"{len(done)} of {num_folds or len(rows)} folds finished and validated ({folds}). Dice and HD95 per "
             "region are each "
             "fold's final validation values; best val/dice_mean is the best epoch's (checkpoints/best.ckpt). "
             "mean ± std: over the finished folds (sample std).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [str(row.get(c) if row.get(c) is not None else "") for c in ("fold", "job", "status")]
        lines.append("| " + " | ".join(cells + [_number(row.get(c)) for c in COLUMNS[3:]]) + " |")
    spread = [f"{_number(means[c])} ± {_number(stds[c])}" if stds[c] is not None else _number(means[c])
              for c in COLUMNS[3:]]
    lines += ["| mean ± std | | " + f"{len(done)} folds | " + " | ".join(spread) + " |", ""]
    unfinished = [f"fold {r['fold']} (job {r['job']})" for r in rows if r["status"] == "incomplete"]
    if unfinished:
        lines += [f"Did not finish (no metrics.json; left out of the mean): {', '.join(unfinished)}.", ""]
    unvalidated = [f"fold {r['fold']} (job {r['job']})" for r in rows if r["status"] == "never validated"]
    if unvalidated:
        lines += [f"Never validated (left out of the mean): {', '.join(unvalidated)}: each {NEVER_VALIDATED}.", ""]
    absent = sorted(set(range(num_folds or 0)) - {r["fold"] for r in rows})
    if absent:
        lines += [f"No job for folds {', '.join(map(str, absent))} of data.num_folds={num_folds}.", ""]
    return "\n".join(lines)
