"""Reading finished runs back: TensorBoard scalars per epoch, sweep ablation tables, and the report figures.

Functions here read files or build matplotlib figures; `brats_unet.cli.report` decides what to write where.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # figures are files; never open a window (headless servers, CI)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from brats_unet.data.labels import CLASS_NAMES  # noqa: E402
from brats_unet.utils import BratsError, atomic_path  # noqa: E402
from brats_unet.visualize import CLASS_COLORS, overlay, tumour_slice  # noqa: E402

Series = list[tuple[int, float]]  # (step, value) in logging order
EXCLUDED_OVERRIDE_PREFIXES = ("hydra.", "paths.")
# Final values shown beside the ranking metric; optional ones appear only when some job logged them.
FINAL_COLUMNS = ("val/dice_wt", "val/dice_tc", "val/dice_et")
OPTIONAL_COLUMNS = ("val/dice_paper", "val/loss", "train/loss", "train/dice_paper")
VIEWS = (("axial", 2), ("coronal", 1), ("sagittal", 0))


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


# ---- figures ----------------------------------------------------------------------------------------------------
def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write a PNG atomically (rendered to a temp file beside it, then renamed) and close the figure."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _plot_epochs(ax: Any, series: Mapping[int, float], **kw: Any) -> None:
    if series:
        ax.plot([e + 1 for e in series], list(series.values()), marker="o", markersize=3, **kw)


def plot_curves(scalars: Mapping[str, Series], title: str = "") -> Figure | None:
    """Loss and Dice per epoch, training vs validation (the paper's Figures 4-6). None when nothing was logged."""
    panels = {
        "loss": [("train/loss", "train", "C0", "-"), ("val/loss", "validation", "C1", "-")],
        "Dice": [("train/dice", "train (WT/TC/ET)", "C0", "-"), ("val/dice_mean", "validation (WT/TC/ET)", "C1", "-"),
                 ("train/dice_paper", "train (paper, 4 classes)", "C0", "--"),
                 ("val/dice_paper", "validation (paper, 4 classes)", "C1", "--")],
    }
    series = {name: epoch_series(scalars, name) for lines in panels.values() for name, *_ in lines}
    if not any(series.values()):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (ylabel, lines) in zip(axes, panels.items(), strict=True):
        for name, label, color, style in lines:
            _plot_epochs(ax, series[name], label=label, color=color, linestyle=style)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    best = series["val/dice_mean"]
    if best:
        epoch = max(best, key=best.get)
        axes[1].axvline(epoch + 1, color="grey", linestyle=":", linewidth=1)
        axes[1].set_title(f"best validation Dice {best[epoch]:.4f} at epoch {epoch + 1}", fontsize=9)
    fig.suptitle(title)
    return fig


def plot_lr(scalars: Mapping[str, Series], title: str = "") -> Figure | None:
    """Learning rate per optimiser step (LearningRateMonitor's `lr-*` tags). None when none was logged."""
    tags = sorted(t for t in scalars if t.startswith("lr-"))
    if not tags:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for tag in tags:
        steps, values = zip(*scalars[tag], strict=True)
        ax.plot(steps, values, label=tag.removeprefix("lr-"))
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return fig


def plot_class_distribution(mean_percent: Mapping[str, float], cases: int | None = None) -> Figure:
    """Bar chart of the mean share of voxels per class (the paper's Figure 3), on a log axis so tumour shows."""
    names = list(CLASS_NAMES)
    values = [float(mean_percent[n]) for n in names]
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = [(0.6, 0.6, 0.6), *CLASS_COLORS[1:].tolist()]
    bars = ax.bar([n.upper() if n != "background" else n for n in names], values, color=colours, edgecolor="black")
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(f"{value:.2f}%", (bar.get_x() + bar.get_width() / 2, max(value, 1e-3)), ha="center",
                    va="bottom", fontsize=9)
    ax.set_yscale("log")
    ax.set_ylim(top=300)
    ax.set_ylabel("mean % of voxels per case (log scale)")
    ax.set_title("class distribution" + (f" ({cases} cases)" if cases else ""))
    return fig


def _view(volume: np.ndarray, index: int, axis: int) -> np.ndarray:
    return np.take(volume, index, axis=axis).T[::-1]  # rows = the second remaining axis, flipped up (radiological)


def plot_overlays(cases: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> Figure:
    """Rows of (case, image, truth, prediction) as 3D arrays (x, y, z), classes 0..3: axial, coronal and sagittal
    slices through the most tumour, truth beside prediction (the paper's Figure 7)."""
    if not cases:
        raise ValueError("plot_overlays needs at least one case")
    fig, axes = plt.subplots(len(cases), 2 * len(VIEWS), figsize=(2.2 * 2 * len(VIEWS), 2.4 * len(cases)),
                             squeeze=False)
    for row, (case, image, truth, pred) in enumerate(cases):
        if not (image.shape == truth.shape == pred.shape):
            raise ValueError(f"{case}: image {image.shape}, truth {truth.shape} and prediction {pred.shape} differ")
        reference = truth if (truth > 0).any() else pred
        for v, (view, axis) in enumerate(VIEWS):
            index = tumour_slice(reference, axis)
            for k, (label, classes) in enumerate((("truth", truth), ("prediction", pred))):
                ax = axes[row, 2 * v + k]
                ax.imshow(overlay(_view(image, index, axis), _view(classes, index, axis)))
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(f"{view} {label}", fontsize=9)
        axes[row, 0].set_ylabel(case, fontsize=8)
    handles = [Patch(color=CLASS_COLORS[i], label=CLASS_NAMES[i].upper()) for i in range(1, len(CLASS_NAMES))]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.subplots_adjust(wspace=0.03, hspace=0.08, bottom=0.08 if len(cases) > 1 else 0.14)
    return fig


def plot_ablation(rows: Sequence[Mapping[str, Any]], metric: str, label_keys: Sequence[str]) -> Figure | None:
    """Best and final `metric` per finished job, in table order. None when no job finished."""
    done = [r for r in rows if r.get("status") == "complete"]
    if not done:
        return None
    labels = [f"{r['job']}\n" + "\n".join(f"{k}={r.get(k)}" for k in label_keys) for r in done]
    x = np.arange(len(done))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(done) + 2), 4.5))
    for offset, (name, label) in zip((-0.2, 0.2), ((f"best {metric}", "best"), (metric, "final")), strict=True):
        values = [np.nan if r.get(name) is None else r[name] for r in done]
        ax.bar(x + offset, values, width=0.4, label=label)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel(metric)
    ax.set_xlabel("job")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig
