"""The report figures: curves, LR, class distribution, overlays, the sweep ablation, and the paper's Figure 1
(network) and Figure 2 (a case) (matplotlib, Agg).

Pure figure builders over what brats_unet.runs reads; reporting.writer decides what to write where.
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
from matplotlib.patches import FancyBboxPatch, Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from brats_unet.data.labels import SCHEMAS, LabelSchema  # noqa: E402
from brats_unet.evaluation.overlays import NAME_COLORS, class_colors, overlay, slice_view, to_unit, tumour_slice  # noqa: E402,E501
from brats_unet.runs import Series, epoch_series  # noqa: E402
from brats_unet.utils import atomic_path  # noqa: E402

GLIOMA = SCHEMAS["brats2021"]  # figures' default classes: background, ncr, ed, et
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
    names = list(mean_percent)  # the dataset's classes, background first
    values = [float(mean_percent[n]) for n in names]
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = [(0.6, 0.6, 0.6), *(NAME_COLORS.get(n, (0.5, 0.5, 0.5)) for n in names[1:])]
    bars = ax.bar([n.upper() if n != "background" else n for n in names], values, color=colours, edgecolor="black")
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(f"{value:.2f}%", (bar.get_x() + bar.get_width() / 2, max(value, 1e-3)), ha="center",
                    va="bottom", fontsize=9)
    ax.set_yscale("log")
    ax.set_ylim(top=300)
    ax.set_ylabel("mean % of voxels per case (log scale)")
    ax.set_title("class distribution" + (f" ({cases} cases)" if cases else ""))
    return fig


def _legend(fig: Figure, schema: LabelSchema, colors: np.ndarray, fontsize: int) -> None:
    """One patch per tumour class of `schema`, in its colour and under its own name."""
    handles = [Patch(color=colors[i], label=name.upper()) for i, name in enumerate(schema.class_names) if i]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=fontsize, frameon=False)


def plot_overlays(cases: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], schema: LabelSchema = GLIOMA
                  ) -> Figure:
    """Rows of (case, image, truth, prediction) as 3D arrays (x, y, z) of `schema`'s internal classes: axial, coronal
    and sagittal slices through the most tumour, truth beside prediction (the paper's Figure 7)."""
    if not cases:
        raise ValueError("plot_overlays needs at least one case")
    colors = class_colors(schema)
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
                ax.imshow(overlay(slice_view(image, index, axis), slice_view(classes, index, axis), colors=colors))
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(f"{view} {label}", fontsize=9)
        axes[row, 0].set_ylabel(case, fontsize=8)
    _legend(fig, schema, colors, fontsize=9)
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


def _box(ax: Any, x: float, y: float, text: str, colour: str) -> None:
    ax.add_patch(FancyBboxPatch((x - 0.45, y - 0.32), 0.9, 0.64, boxstyle="round,pad=0.02", facecolor=colour,
                                edgecolor="black", linewidth=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=7)


def _arrow(ax: Any, start: tuple[float, float], end: tuple[float, float], label: str = "", **kw: Any) -> None:
    ax.annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": "->", "linewidth": 0.9, **kw})
    if label:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2, label, fontsize=6, ha="center", va="bottom",
                color="dimgrey")


def plot_network(spec: Mapping[str, Any], patch_size: Sequence[int] | None = None, title: str = "") -> Figure:
    """The paper's Figure 1 for the configured network: one box per encoder/decoder level with its width, dropout
    and (given the patch) feature-map size; max-pool down, up-conv up, copy-and-concat skips, the 1x1 head.

    `spec` is reporting.paper.network_spec of the built module, so the drawing follows the model, not a template.
    """
    enc, dec, dim = spec["encoder"], spec["decoder"], int(spec["dim"])
    levels = len(enc)
    conv = "x".join(["3"] * dim)

    def size(level: int) -> str:
        if patch_size is None:
            return ""
        pooled = [int(p) // 2 ** level if axis < dim else int(p) for axis, p in enumerate(patch_size)]
        return "\n" + "x".join(str(p) for p in pooled)

    def label(block: Mapping[str, Any], level: int) -> str:
        norm = "" if block["norm"] == "none" else f", {block['norm']}"
        return f"{block['width']} ch\ndropout {block['dropout']:g}{norm}{size(level)}"

    fig, ax = plt.subplots(figsize=(1.25 * (2 * levels + 1), 1.1 * levels + 1.6))
    right = 2 * (levels - 1)  # x of decoder level 0
    for i, block in enumerate(enc):
        colour = "#f2d7a6" if i == levels - 1 else "#a9c8e8"
        _box(ax, i, -i, label(block, i), colour)
        if i < levels - 1:
            _arrow(ax, (i + 0.1, -i - 0.33), (i + 0.9, -i - 0.67), "max-pool 2")
    for i, block in enumerate(dec):
        _box(ax, right - i, -i, label(block, i), "#b9dfb0")
        _arrow(ax, (right - i - 0.9, -i - 0.67), (right - i - 0.1, -i - 0.33), "up-conv 2")
        _arrow(ax, (i + 0.47, -i), (right - i - 0.47, -i), "copy and concat", linestyle="--", color="grey")
    _arrow(ax, (-1.1, 0), (-0.47, 0), f"in: {spec['in_channels']} ch")
    _arrow(ax, (right + 0.47, 0), (right + 1.1, 0), f"1x1 conv: {spec['out_channels']} ch")
    extras = f", deep supervision x{spec['deep_supervision_heads']}" if spec.get("deep_supervision_heads") else ""
    ax.text(levels - 1, 0.55, f"{spec['name']}: {levels} levels, two {conv} convs + ReLU per box, dropout between "
            f"them{extras}; {spec['parameters']:,} parameters", ha="center", fontsize=8)
    ax.set_xlim(-1.3, right + 1.3)
    ax.set_ylim(-levels + 0.4, 0.9)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    return fig


def plot_case(case: str, images: Mapping[str, np.ndarray], classes: np.ndarray, axis: int = 2,
              schema: LabelSchema = GLIOMA) -> Figure:
    """The paper's Figure 2: one case's modalities and its label (internal classes of `schema`, coloured and named
    by class) side by side, on the slice with the most tumour (axis 2: axial)."""
    colors = class_colors(schema)
    index = tumour_slice(classes, axis)
    fig, axes = plt.subplots(1, len(images) + 1, figsize=(2.3 * (len(images) + 1), 2.7))
    for ax, (name, volume) in zip(axes, images.items(), strict=False):
        ax.imshow(to_unit(slice_view(volume, index, axis)), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name.upper(), fontsize=9)
    axes[-1].imshow(colors[slice_view(classes, index, axis).astype(np.int64)])
    axes[-1].set_title("label", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    view = dict((a, v) for v, a in VIEWS)[axis]
    _legend(fig, schema, colors, fontsize=8)
    fig.suptitle(f"{case}, {view} slice {index}", fontsize=9)
    fig.subplots_adjust(wspace=0.03, bottom=0.12)
    return fig
