"""The report figures: training curves, LR, class distribution, overlays and the sweep ablation (matplotlib, Agg).

Pure figure builders over what brats_unet.report reads; `brats_unet.cli.report` decides what to write where.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # figures are files; never open a window (headless servers, CI)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from brats_unet.data.labels import CLASS_NAMES  # noqa: E402
from brats_unet.report import Series, epoch_series  # noqa: E402
from brats_unet.utils import atomic_path  # noqa: E402
from brats_unet.visualize import CLASS_COLORS, overlay, slice_view, tumour_slice  # noqa: E402

VIEWS = (("axial", 2), ("coronal", 1), ("sagittal", 0))


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
                ax.imshow(overlay(slice_view(image, index, axis), slice_view(classes, index, axis)))
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
