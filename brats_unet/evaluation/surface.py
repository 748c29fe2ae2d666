"""Surface geometry of boolean masks: surfaces, exact surface distances, HD95 and NSD from them, bounding-box crops.

Pure geometry, no scoring conventions: a distance needs two non-empty masks (`surface_distances` returns None
otherwise). What an empty mask scores is decided once, in `brats_unet.evaluation.region.empty_score` (region-wise)
and by the official parsers' edge cases in `brats_unet.evaluation.lesionwise`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from brats_unet.utils import BratsError

HD95_MODES = ("pooled", "max")
NSD_MODES = ("pooled", "mean")


def check_mode(mode: str, allowed: tuple[str, ...], what: str) -> None:
    if mode not in allowed:
        raise BratsError(f"{what} must be one of {list(allowed)}, got {mode!r}")


def as_masks(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two boolean masks of one shape (ValueError naming both shapes)."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"mask shapes differ: prediction {pred.shape}, truth {truth.shape}")
    return pred, truth


def check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    """`ndim` positive finite voxel sizes (mm) as floats; ValueError otherwise."""
    values = tuple(float(s) for s in np.asarray(spacing, dtype=np.float64).reshape(-1))
    if len(values) != ndim or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be {ndim} positive finite voxel sizes, got {values}")
    return values


def bbox(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of the bounding box of a non-empty mask, grown by `margin` voxels and clipped to the array."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(hits[0] - margin, 0), min(hits[-1] + 1 + margin, mask.shape[axis])))
    return tuple(box)


def crop_pair(pred: np.ndarray, truth: np.ndarray, margin: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Views of two label maps cut to the bounding box of their non-zero voxels plus `margin` (at least 1, so that
    surfaces stay exact). Every region-wise and lesion-wise metric is unchanged by it, and a whole-tumour box is a
    few percent of a 240x240x155 volume. Both empty: returned as they are."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise BratsError(f"label map shapes differ: prediction {pred.shape}, truth {truth.shape}")
    union = (pred != 0) | (truth != 0)
    if not union.any():
        return pred, truth
    box = bbox(union, margin=max(margin, 1))
    return pred[box], truth[box]


def surface(mask: np.ndarray) -> np.ndarray:
    """medpy's surface: the mask minus its erosion with the face-connected cross (border voxels count as surface)."""
    cross = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=cross)


def surface_distances(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> tuple[np.ndarray, np.ndarray] | None:
    """(pred surface -> nearest truth surface, truth surface -> nearest pred surface) in mm; None if either is empty.

    One computation serves every distance metric (HD95 both ways, NSD at any tolerance), as panoptica does.
    """
    pred, truth = as_masks(pred, truth)
    sampling = check_spacing(spacing, pred.ndim)
    if not pred.any() or not truth.any():
        return None
    # Every surface voxel lies inside the union's bounding box, so distances computed there are exact; the
    # 1-voxel margin keeps erosion at the crop edge identical to the full volume (border_value=0 at true edges).
    box = bbox(pred | truth, margin=1)
    return directed_distances(surface(pred[box]), surface(truth[box]), sampling)


def directed_distances(
    surf_a: np.ndarray, surf_b: np.ndarray, sampling: tuple[float, ...], max_tree_points: int = 200_000
) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean distances (a->nearest b, b->nearest a) between two non-empty surfaces.

    Two equivalent methods: nearest neighbours in a k-d tree of surface points (fast while surfaces are small, which
    is the usual case; scattered false positives blow up the bounding box, not the surface) or two distance transforms
    over the box (bounded cost when early-training predictions are mostly noise and surfaces hold millions of voxels).
    """
    if np.count_nonzero(surf_a) + np.count_nonzero(surf_b) <= max_tree_points:
        scale = np.asarray(sampling)
        points_a, points_b = np.argwhere(surf_a) * scale, np.argwhere(surf_b) * scale
        return cKDTree(points_b).query(points_a)[0], cKDTree(points_a).query(points_b)[0]
    a_to_b = ndimage.distance_transform_edt(~surf_b, sampling=sampling)[surf_a]
    b_to_a = ndimage.distance_transform_edt(~surf_a, sampling=sampling)[surf_b]
    return a_to_b, b_to_a


def hd95_from_distances(pred_to_truth: np.ndarray, truth_to_pred: np.ndarray, mode: str = "pooled") -> float:
    """HD95 from `surface_distances` output (both non-empty). mode="pooled": the 95th percentile (linear
    interpolation) of both directions pooled (medpy, the official BraTS tooling); "max": the larger directed 95th
    percentile (MONAI)."""
    if mode == "max":
        return float(max(np.percentile(pred_to_truth, 95), np.percentile(truth_to_pred, 95)))
    check_mode(mode, HD95_MODES, "hd95 mode")
    return float(np.percentile(np.concatenate([pred_to_truth, truth_to_pred]), 95))


def nsd_from_distances(
    pred_to_truth: np.ndarray, truth_to_pred: np.ndarray, tolerance_mm: float = 1.0, mode: str = "pooled"
) -> float:
    """NSD from `surface_distances` output (both non-empty). mode="pooled": surface voxels within tolerance over all
    surface voxels (DeepMind, MONAI); "mean": the mean of the two directed fractions (panoptica). A distance equal to
    the tolerance counts as within."""
    if not (np.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise BratsError(f"nsd tolerance must be a finite distance >= 0 mm, got {tolerance_mm}")
    within_p = np.count_nonzero(pred_to_truth <= tolerance_mm)
    within_t = np.count_nonzero(truth_to_pred <= tolerance_mm)
    if mode == "mean":
        return float((within_p / pred_to_truth.size + within_t / truth_to_pred.size) / 2)
    check_mode(mode, NSD_MODES, "nsd mode")
    return float((within_p + within_t) / (pred_to_truth.size + truth_to_pred.size))
