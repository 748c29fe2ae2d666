"""Pure array -> RGB helpers for slice overlays (TensorBoard images during training, report figures after)."""

from __future__ import annotations

import numpy as np

from brats_unet.data.labels import SCHEMAS, LabelSchema

# Class name -> RGB: the usual BraTS viewer colours by what a class is, whatever its label value or class index (MSD's
# class 1 is oedema, the 2024 glioma's 1 is the non-enhancing core, the paediatric 1 is enhancing tumour):
# necrotic / non-enhancing core red, oedema / infiltration green, enhancing tumour yellow, resection cavity blue,
# cystic component magenta, gross tumour volume orange.
NAME_COLORS = {"background": (0.0, 0.0, 0.0), "ncr": (1.0, 0.1, 0.1), "netc": (1.0, 0.1, 0.1),
               "ed": (0.1, 0.8, 0.1), "snfh": (0.1, 0.8, 0.1), "et": (1.0, 0.9, 0.0), "rc": (0.2, 0.4, 1.0),
               "cc": (1.0, 0.3, 0.9), "gtv": (1.0, 0.55, 0.0)}
_SPARE = [(0.0, 0.9, 0.9), (0.6, 0.3, 0.0), (0.6, 0.6, 1.0)]  # classes of a schema added later


def class_colors(schema: LabelSchema) -> np.ndarray:
    """(K, 3) RGB per internal class of `schema` (row 0 background), by class name (NAME_COLORS)."""
    spare = iter(_SPARE * len(schema.class_names))
    return np.array([NAME_COLORS.get(name) or next(spare) for name in schema.class_names], dtype=np.float32)


# By class index where no schema is given: brats2021/2023 classes (background, ncr, ed, et), then blue and magenta for
# a 4th and 5th class. Prefer class_colors(schema), which names the classes right for every schema.
CLASS_COLORS = np.concatenate([class_colors(SCHEMAS["brats2021"]), np.array([NAME_COLORS["rc"], NAME_COLORS["cc"]],
                                                                              dtype=np.float32)])


def to_unit(image: np.ndarray) -> np.ndarray:
    """Scale a 2D slice to [0, 1] by its 1st and 99th percentiles (robust to a few hot voxels)."""
    lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
    return np.clip((image - lo) / (hi - lo), 0, 1).astype(np.float32) if hi > lo else np.zeros_like(image, np.float32)


def overlay(image: np.ndarray, classes: np.ndarray, alpha: float = 0.45, colors: np.ndarray = CLASS_COLORS
            ) -> np.ndarray:
    """Grey slice (H, W) with class colours (`colors[class]`, see class_colors) blended on top -> RGB (H, W, 3) in
    [0, 1]."""
    grey = np.repeat(to_unit(image)[..., None], 3, axis=-1)
    colours = colors[np.asarray(classes, dtype=np.int64)]
    mask = (np.asarray(classes) > 0)[..., None]
    return np.where(mask, (1 - alpha) * grey + alpha * colours, grey)


def slice_view(volume: np.ndarray, index: int, axis: int) -> np.ndarray:
    """Slice `index` along `axis` of a 3D array, shown radiologically: rows = the second remaining axis, flipped up."""
    return np.take(volume, index, axis=axis).T[::-1]


def tumour_slice(classes: np.ndarray, axis: int = 2) -> int:
    """Index along `axis` of the slice with the most tumour (the middle slice if there is none)."""
    other = tuple(a for a in range(classes.ndim) if a != axis)
    counts = (classes > 0).sum(axis=other)
    return int(counts.argmax()) if counts.any() else classes.shape[axis] // 2


def case_panel(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, axis: int = 2, colors: np.ndarray = CLASS_COLORS
               ) -> np.ndarray:
    """One row: every channel of `image` (C, X, Y, Z) in grey, then truth and prediction overlaid on the last channel.

    The slice is the one with the most true tumour along `axis` (2 = axial). Returns RGB (H, W * (C + 2), 3).
    """
    index = tumour_slice(truth, axis)

    def take(volume: np.ndarray) -> np.ndarray:
        return slice_view(volume, index, axis)

    channels = [np.repeat(to_unit(take(c))[..., None], 3, axis=-1) for c in image]
    base = take(image[-1])  # last channel: FLAIR in both presets, where the whole tumour shows best
    tiles = [*channels, overlay(base, take(truth), colors=colors), overlay(base, take(pred), colors=colors)]
    return np.concatenate(tiles, axis=1)
