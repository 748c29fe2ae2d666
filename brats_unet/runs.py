"""Reading finished runs back: TensorBoard scalars per epoch, metrics, overrides and sweep ablation tables.

Functions here read files and build tables; `brats_unet.reporting.writer` decides what to write where.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from brats_unet.utils import BratsError

log = logging.getLogger(__name__)
Series = list[tuple[int, float]]  # (step, value) in logging order
EXCLUDED_OVERRIDE_PREFIXES = ("hydra.", "paths.")
# Final values shown beside the ranking metric; optional ones appear only when some job logged them.
FINAL_COLUMNS = ("val/dice_wt", "val/dice_tc", "val/dice_et")
OPTIONAL_COLUMNS = ("val/dice_paper", "val/loss", "train/loss", "train/dice_paper")


# ---- TensorBoard scalars ---------------------------------------------------------------------------------------
def clean_series(events: Series) -> Series:
    """Drop what is not part of the training curve, keeping logging order.

    Lightning's `log_hyperparams(metrics=...)` re-logs the final values at step 0 after training: an out-of-order
    step 0 is that echo. Any other step going backwards is a resumed run replaying steps after its checkpoint: the
    newer values replace the older ones from that step on (what TensorBoard's own purge does).
    """
    kept: Series = []
    for step, value in events:
        if kept and step < kept[-1][0]:
            if step == 0:
                continue
            kept = [(s, v) for s, v in kept if s < step]
        kept.append((step, value))
    return kept


def read_scalars(logdir: str | Path) -> dict[str, Series]:
    """Every scalar tag in the event files under `logdir` (all files, in order) -> cleaned (step, value) list."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    logdir = Path(logdir)
    if not logdir.is_dir():
        return {}
    acc = EventAccumulator(str(logdir), size_guidance={SCALARS: 0})  # 0: keep every point, not a sample
    acc.Reload()
    # Values are stored as float32: keep their shortest decimal (0.2, not 0.20000000298023224) for tables.
    return {tag: clean_series([(e.step, float(str(np.float32(e.value)))) for e in acc.Scalars(tag)])
            for tag in acc.Tags()["scalars"]}


def resolve_tag(scalars: Mapping[str, Series], name: str) -> str | None:
    """The tag holding `name` per epoch: Lightning writes `<name>_epoch` when a metric is logged on step and epoch."""
    return next((t for t in (f"{name}_epoch", name, f"{name}_step") if t in scalars), None)


def epoch_series(scalars: Mapping[str, Series], name: str) -> dict[int, float]:
    """Epoch -> value of metric `name` (the mean over an epoch's points when it was logged per step).

    Epochs come from Lightning's `epoch` scalar, written with every logging call at the same step.
    """
    tag = resolve_tag(scalars, name)
    if tag is None:
        return {}
    epoch_at = {step: int(round(v)) for step, v in scalars.get("epoch", [])}
    known = sorted(epoch_at)
    groups: dict[int, list[float]] = {}
    for index, (step, value) in enumerate(scalars[tag]):
        if not known:
            epoch = index  # no epoch scalar (not a Lightning log): one point per epoch
        elif step in epoch_at:
            epoch = epoch_at[step]
        else:  # the nearest earlier logged step's epoch
            earlier = [s for s in known if s <= step]
            epoch = epoch_at[earlier[-1]] if earlier else 0
        groups.setdefault(epoch, []).append(value)
    return {epoch: float(np.mean(values)) for epoch, values in sorted(groups.items())}


# ---- runs and sweeps --------------------------------------------------------------------------------------------
def is_run(path: Path) -> bool:
    return any((path / name).exists() for name in ("metrics.json", "tensorboard", ".hydra"))


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """The checkpoints a run folder holds (best, last, periodic; not the temp files of a save in progress)."""
    folder = Path(run_dir) / "checkpoints"
    return sorted(p for p in folder.rglob("*.ckpt") if not p.name.startswith(".")) if folder.is_dir() else []


def find_jobs(sweep: Path) -> list[Path]:
    """Job folders of a Hydra sweep (those with .hydra/overrides.yaml), numeric names in numeric order."""
    if not sweep.is_dir():
        return []
    jobs = [p for p in sweep.iterdir() if p.is_dir() and (p / ".hydra" / "overrides.yaml").is_file()]
    return sorted(jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def parse_overrides(lines: Sequence[str]) -> dict[str, str]:
    """Hydra override strings (`key=value`, `+key=v`, `++key=v`, `~key`) -> {key: value as typed}."""
    out: dict[str, str] = {}
    for line in lines:
        text = str(line).strip()
        if text.startswith("~"):
            out[text[1:].split("=", 1)[0]] = "(removed)"
            continue
        key, _, value = text.lstrip("+").partition("=")
        out[key] = value
    return out


def read_overrides(run_dir: Path) -> dict[str, str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    try:
        lines = yaml.safe_load(path.read_text()) or []
    except yaml.YAMLError as e:
        raise BratsError(f"{path}: not a Hydra overrides file ({e})") from e
    if not isinstance(lines, list):
        raise BratsError(f"{path}: expected a YAML list of overrides, got {type(lines).__name__}")
    return parse_overrides(lines)


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    """metrics.json as brats-train writes it, or None when the run did not finish (no or unreadable file)."""
    path = run_dir / "metrics.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


NEVER_VALIDATED = ("finished without validating once: validation runs every trainer.check_val_every_n_epoch epochs "
                   "and the run stopped before the first (e.g. quickstart's 5 with max_epochs=4), so it has no val/ "
                   "metrics and no checkpoints/best.ckpt, and resuming it (ckpt_path=last) trains nothing more; "
                   "retrain with trainer.check_val_every_n_epoch=1 or more epochs, or use its checkpoints/last.ckpt "
                   "explicitly")


def validated(metrics: Mapping[str, Any]) -> bool:
    """Whether a finished run (its metrics.json) ever validated: a best checkpoint, or a val/ metric at the end."""
    best = metrics.get("best") or {}
    return bool(best.get("checkpoint")) or any(str(k).startswith("val/") for k in (metrics.get("final") or {}))


def final_value(metrics: Mapping[str, Any], name: str) -> float | None:
    final = metrics.get("final") or {}
    for key in (f"{name}_epoch", name):  # an on_step+on_epoch metric: the epoch mean, not the last step
        if final.get(key) is not None:
            return float(final[key])
    return None


def lower_is_better(metric: str) -> bool:
    return "loss" in metric or "hd95" in metric


def best_value(run_dir: Path, metrics: Mapping[str, Any], metric: str) -> float | None:
    """The checkpoint's best score for val/dice_mean; otherwise the best epoch in TensorBoard, else the final value."""
    best = (metrics.get("best") or {}).get(metric)
    if best is not None and math.isfinite(best):
        return float(best)
    values = list(epoch_series(read_scalars(run_dir / "tensorboard"), metric).values())
    if values:
        return float(min(values) if lower_is_better(metric) else max(values))
    return final_value(metrics, metric)


def ablation_table(sweep: Path, metric: str = "val/dice_mean") -> tuple[list[str], list[dict[str, Any]]]:
    """One row per job: overrides, best and final `metric`, region Dice, epochs; best first, incomplete jobs last."""
    jobs = find_jobs(sweep)
    overrides = {job: read_overrides(job) for job in jobs}
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in overrides[job] if k not in keys and not k.startswith(EXCLUDED_OVERRIDE_PREFIXES)]
    finals = [metric, *(c for c in FINAL_COLUMNS if c != metric)]
    rows = []
    for job in jobs:
        metrics = read_metrics(job)
        row: dict[str, Any] = {"job": job.name, "status": "complete" if metrics else "incomplete"}
        row |= {k: overrides[job].get(k, "") for k in keys}
        if metrics:
            row[f"best {metric}"] = best_value(job, metrics, metric)
            row |= {c: final_value(metrics, c) for c in (*finals, *OPTIONAL_COLUMNS)}
            row["epochs"] = metrics.get("epochs")
        rows.append(row)
    optional = [c for c in OPTIONAL_COLUMNS if c not in finals and any(r.get(c) is not None for r in rows)]
    columns = ["job", "status", *keys, f"best {metric}", *finals, *optional, "epochs"]
    sign = 1 if lower_is_better(metric) else -1

    def order(row: dict[str, Any]) -> tuple:
        best = row.get(f"best {metric}")
        return (row["status"] != "complete", best is None, sign * best if best is not None else 0.0)

    rows = sorted(rows, key=order)  # stable: ties keep job order
    return columns, [{c: row.get(c) for c in columns} for row in rows]


def override_columns(columns: Sequence[str], metric: str) -> list[str]:
    """The override keys among ablation_table's columns: between `status` and `best <metric>`."""
    return list(columns[2 : columns.index(f"best {metric}")])


def varying_keys(columns: Sequence[str], rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[str]:
    return [k for k in keys if k in columns and len({r.get(k) for r in rows}) > 1]


def format_csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([["" if r.get(c) is None else r[c] for c in columns] for r in rows])
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value).replace("|", "\\|")


def format_markdown(columns: Sequence[str], rows: Sequence[Mapping[str, Any]], override_keys: Sequence[str]) -> str:
    """Markdown table; overrides shared by every job move to one line above it to keep the table narrow."""
    shared = [k for k in override_keys if k not in varying_keys(columns, rows, override_keys)]
    shown = [c for c in columns if c not in shared]
    lines = []
    if shared and rows:
        lines += ["Common overrides: " + " ".join(f"`{k}={rows[0].get(k)}`" for k in shared), ""]
    lines += ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in shown) + " |" for r in rows]
    return "\n".join(lines) + "\n"
