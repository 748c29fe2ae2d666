"""Region-wise metrics: Dice, HD95, NSD and volumes of whole regions, and the per-case row built from them.

The one implementation behind validation (training's BratsMetrics) and brats-evaluate's metrics.csv. BraTS conventions
for empty masks live in `empty_score` alone: a region empty in both prediction and truth scores Dice 1 / HD95 0 /
NSD 1; empty in exactly one scores Dice 0 / HD95 `HD95_EMPTY` (the 240x240x155 volume diagonal in mm) / NSD 0, so
missed or hallucinated small regions are punished instead of silently skipped. Lesion-wise metrics (the challenges'
ranking since 2023) live in `brats_unet.evaluation.lesionwise`, on the same surface geometry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from brats_unet.data.labels import SCHEMAS, LabelSchema
from brats_unet.evaluation.surface import (
    HD95_MODES,
    NSD_MODES,
    as_masks,
    check_mode,
    check_spacing,
    hd95_from_distances,
    nsd_from_distances,
    surface_distances,
)

HD95_EMPTY = 373.13
# metric -> (both masks empty, exactly one empty)
EMPTY_SCORES = {"dice": (1.0, 0.0), "hd95": (0.0, HD95_EMPTY), "nsd": (1.0, 0.0)}


def empty_score(metric: str, pred: np.ndarray, truth: np.ndarray) -> float | None:
    """The BraTS convention's value of `metric` (dice, hd95, nsd) when either mask is empty; None when both hold
    voxels (then the metric is computed)."""
    has_pred, has_truth = bool(np.any(pred)), bool(np.any(truth))
    if has_pred and has_truth:
        return None
    both_empty, one_empty = EMPTY_SCORES[metric]
    return both_empty if not has_pred and not has_truth else one_empty


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; empty masks as in `empty_score` (both -> 1.0, exactly one -> 0.0)."""
    pred, truth = as_masks(pred, truth)
    empty = empty_score("dice", pred, truth)
    if empty is not None:
        return empty
    return 2.0 * np.count_nonzero(pred & truth) / (np.count_nonzero(pred) + np.count_nonzero(truth))


def hd95(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), mode: str = "pooled"
) -> float:
    """95th-percentile Hausdorff distance (mm) between the surfaces of two boolean masks.

    Definition: medpy's `hd95`, which the BraTS organisers' own tooling (CBICA HausdorffCLI / CaPTk, and panoptica in
    `brats-evaluation`) builds on: surface = mask minus its erosion with the face-connected (6-neighbour) cross;
    distances from every surface voxel of one mask to the nearest surface voxel of the other, in both directions.
    mode="pooled" pools both directions, then takes the 95th percentile (linear interpolation); mode="max" takes the
    larger of the two directed 95th percentiles (MONAI's `compute_hausdorff_distance`; DeepMind's surface-distance
    does the same on surfel-area-weighted surfaces): usually >= pooled, not always (interpolation).
    Empty masks as in `empty_score` (both -> 0.0, exactly one -> HD95_EMPTY).
    """
    check_mode(mode, HD95_MODES, "hd95 mode")
    return _from_distances("hd95", *as_masks(pred, truth), spacing, lambda d: hd95_from_distances(*d, mode=mode))


def nsd(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    tolerance_mm: float = 1.0,
    mode: str = "pooled",
) -> float:
    """Normalized surface Dice: the share of both surfaces lying within `tolerance_mm` of the other surface.

    mode="pooled" is DeepMind's definition (Nikolov et al. 2021, MONAI's `compute_surface_dice`):
    (|S_p within tol| + |S_t within tol|) / (|S_p| + |S_t|), with every surface voxel counted once (DeepMind weighs
    surfels by their area instead). mode="mean" is panoptica's (GaNDLF's), which `brats-evaluation` reports: the mean
    of the two directed fractions, so a small surface weighs as much as a large one. Surfaces as in `hd95`; a
    distance equal to the tolerance counts as within. Empty masks as in `empty_score` (both -> 1.0, one -> 0.0).
    """
    check_mode(mode, NSD_MODES, "nsd mode")
    return _from_distances("nsd", *as_masks(pred, truth), spacing,
                           lambda d: nsd_from_distances(*d, tolerance_mm=tolerance_mm, mode=mode))


def _from_distances(metric: str, pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                    compute: Callable[[tuple[np.ndarray, np.ndarray]], float],
                    distances: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """A distance metric with the empty-mask convention; `distances` reuses a `surface_distances` result."""
    check_spacing(spacing, pred.ndim)
    empty = empty_score(metric, pred, truth)
    if empty is not None:
        return empty
    return compute(surface_distances(pred, truth, spacing) if distances is None else distances)


MaskPairs = dict[str, tuple[np.ndarray, np.ndarray]]


def mask_metrics(regions: MaskPairs, classes: MaskPairs, spacing: Sequence[float], *, hd95: bool = True,
                 hd95_mode: str = "pooled", nsd_tolerance: float | None = None) -> dict[str, float | None]:
    """The one per-case row behind validation and brats-evaluate, from (prediction, truth) boolean masks.

    Keys in metrics.csv order: dice_<region>, hd95_<region> (None with hd95=False), dice_<class>, vol_pred_<region>,
    vol_true_<region> (mL)[, nsd_<region> with an nsd_tolerance in mm]. Empty masks as in `empty_score`.
    One surface-distance computation per region serves HD95 and NSD.
    """
    sampling = check_spacing(spacing, next(iter(regions.values()))[0].ndim)
    voxel_ml = float(np.prod(sampling)) / 1000.0
    distances = {r: surface_distances(*pair, sampling) for r, pair in regions.items()} if hd95 else {}

    def distance_metric(region: str, metric: str, compute) -> float | None:
        if not hd95:
            return None
        return _from_distances(metric, *regions[region], sampling, compute, distances[region])

    out: dict[str, float | None] = {f"dice_{r}": dice(*pair) for r, pair in regions.items()}
    for r in regions:
        out[f"hd95_{r}"] = distance_metric(r, "hd95", lambda d: hd95_from_distances(*d, mode=hd95_mode))
    for name, pair in classes.items():
        out[f"dice_{name}"] = dice(*pair)
    for which, side in (("pred", 0), ("true", 1)):
        for r, pair in regions.items():
            out[f"vol_{which}_{r}"] = np.count_nonzero(pair[side]) * voxel_ml
    if nsd_tolerance is not None:
        for r in regions:
            out[f"nsd_{r}"] = distance_metric(
                r, "nsd", lambda d: nsd_from_distances(*d, tolerance_mm=nsd_tolerance, mode="pooled"))
    return out


def class_columns(schema: LabelSchema) -> list[str]:
    """Classes scored with a Dice column of their own beside the regions: those that are not a region by themselves
    (brats2021: ncr, ed). The one rule for validation rows and metrics.csv."""
    singles = {cs[0] for _, cs in schema.regions if len(cs) == 1}
    return [c for c in schema.class_names[1:] if c not in singles]


def class_metrics(
    pred_classes: np.ndarray,
    true_classes: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    with_hd95: bool = True,
    schema: LabelSchema = SCHEMAS["brats2021"],
) -> dict[str, float]:
    """All per-case numbers for one internal class map pair of `schema` (brats2021: 0 bg, 1 NCR, 2 ED, 3 ET), in
    metrics.csv order.

    Keys: dice_<region>, hd95_<region> (unless with_hd95=False), dice_<class> for each of `class_columns`,
    vol_pred_<region>, vol_true_<region> (mL). Regions: the schema's (wt, tc, et).
    """
    pred_classes, true_classes = np.asarray(pred_classes), np.asarray(true_classes)
    if pred_classes.shape != true_classes.shape:
        raise ValueError(f"prediction shape {pred_classes.shape} != truth shape {true_classes.shape}")
    regions = dict(zip(schema.region_names, zip(schema.region_masks(pred_classes),
                                                schema.region_masks(true_classes), strict=True), strict=True))
    classes = {c: (pred_classes == schema.class_names.index(c), true_classes == schema.class_names.index(c))
               for c in class_columns(schema)}
    row = mask_metrics(regions, classes, spacing, hd95=with_hd95)
    return {k: v for k, v in row.items() if with_hd95 or not k.startswith("hd95_")}
