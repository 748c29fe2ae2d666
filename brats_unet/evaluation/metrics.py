"""Segmentation metrics: the one implementation used in validation and by brats-evaluate.

BraTS conventions: a region empty in both prediction and truth scores Dice 1 / HD95 0 / NSD 1; empty in exactly one
scores Dice 0 / HD95 `HD95_EMPTY` (the 240x240x155 volume diagonal in mm) / NSD 0, so missed or hallucinated small
regions are punished instead of silently skipped. Lesion-wise metrics (the challenges' ranking since 2023) live in
`brats_unet.evaluation.lesionwise` and reuse `surface_distances`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.spatial import cKDTree
from torch import Tensor
from torchmetrics import Metric

from brats_unet.data.labels import SCHEMAS, LabelSchema
from brats_unet.utils import BratsError

HD95_EMPTY = 373.13
HD95_MODES = ("pooled", "max")
NSD_MODES = ("pooled", "mean")


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; both empty -> 1.0, exactly one empty -> 0.0."""
    pred, truth = _as_masks(pred, truth)
    total = np.count_nonzero(pred) + np.count_nonzero(truth)
    if total == 0:
        return 1.0
    return 2.0 * np.count_nonzero(pred & truth) / total


def hd95(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), mode: str = "pooled"
) -> float:
    """95th-percentile Hausdorff distance (mm) between the surfaces of two boolean masks.

    Definition: medpy's `hd95`, which the BraTS organisers' own tooling (CBICA HausdorffCLI / CaPTk, and panoptica in
    today's `brats-evaluation`) builds on: surface = mask minus its erosion with the face-connected (6-neighbour)
    cross; distances from every surface voxel of one mask to the nearest surface voxel of the other, in both
    directions. mode="pooled" pools both directions, then takes the 95th percentile (linear interpolation);
    mode="max" takes the larger of the two directed 95th percentiles (MONAI's `compute_hausdorff_distance`; DeepMind's
    surface-distance does the same on surfel-area-weighted surfaces): usually >= pooled, not always (interpolation).
    Both empty -> 0.0, exactly one empty -> HD95_EMPTY.
    """
    _check_mode(mode, HD95_MODES, "hd95 mode")
    distances = surface_distances(pred, truth, spacing)
    if distances is None:
        pred, truth = _as_masks(pred, truth)
        return 0.0 if not pred.any() and not truth.any() else HD95_EMPTY
    return hd95_from_distances(*distances, mode=mode)


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
    distance equal to the tolerance counts as within. Both empty -> 1.0, exactly one empty -> 0.0.
    """
    _check_mode(mode, NSD_MODES, "nsd mode")
    distances = surface_distances(pred, truth, spacing)
    if distances is None:
        pred, truth = _as_masks(pred, truth)
        return 1.0 if not pred.any() and not truth.any() else 0.0
    return nsd_from_distances(*distances, tolerance_mm=tolerance_mm, mode=mode)


def surface_distances(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> tuple[np.ndarray, np.ndarray] | None:
    """(pred surface -> nearest truth surface, truth surface -> nearest pred surface) in mm; None if either is empty.

    One computation serves every distance metric (HD95 both ways, NSD at any tolerance), as panoptica does.
    """
    pred, truth = _as_masks(pred, truth)
    sampling = _spacing(spacing, pred.ndim)
    if not pred.any() or not truth.any():
        return None
    # Every surface voxel lies inside the union's bounding box, so distances computed there are exact; the
    # 1-voxel margin keeps erosion at the crop edge identical to the full volume (border_value=0 at true edges).
    box = _bbox(pred | truth, margin=1)
    pred, truth = pred[box], truth[box]
    cross = ndimage.generate_binary_structure(pred.ndim, 1)
    surf_pred = pred & ~ndimage.binary_erosion(pred, structure=cross)
    surf_truth = truth & ~ndimage.binary_erosion(truth, structure=cross)
    return _directed_distances(surf_pred, surf_truth, sampling)


def hd95_from_distances(pred_to_truth: np.ndarray, truth_to_pred: np.ndarray, mode: str = "pooled") -> float:
    """HD95 from `surface_distances` output (both non-empty); mode as in `hd95`."""
    if mode == "max":
        return float(max(np.percentile(pred_to_truth, 95), np.percentile(truth_to_pred, 95)))
    _check_mode(mode, HD95_MODES, "hd95 mode")
    return float(np.percentile(np.concatenate([pred_to_truth, truth_to_pred]), 95))


def nsd_from_distances(
    pred_to_truth: np.ndarray, truth_to_pred: np.ndarray, tolerance_mm: float = 1.0, mode: str = "pooled"
) -> float:
    """NSD from `surface_distances` output (both non-empty); mode as in `nsd`."""
    if not (np.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise BratsError(f"nsd tolerance must be a finite distance >= 0 mm, got {tolerance_mm}")
    within_p = np.count_nonzero(pred_to_truth <= tolerance_mm)
    within_t = np.count_nonzero(truth_to_pred <= tolerance_mm)
    if mode == "mean":
        return float((within_p / pred_to_truth.size + within_t / truth_to_pred.size) / 2)
    _check_mode(mode, NSD_MODES, "nsd mode")
    return float((within_p + within_t) / (pred_to_truth.size + truth_to_pred.size))


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
    box = _bbox(union, margin=max(margin, 1))
    return pred[box], truth[box]


def _check_mode(mode: str, allowed: tuple[str, ...], what: str) -> None:
    if mode not in allowed:
        raise BratsError(f"{what} must be one of {list(allowed)}, got {mode!r}")


def _surface_distances(
    surf_a: np.ndarray, surf_b: np.ndarray, sampling: tuple[float, ...], max_tree_points: int = 200_000
) -> np.ndarray:
    """Exact Euclidean distances a->nearest b and b->nearest a, concatenated (the pooled set)."""
    return np.concatenate(_directed_distances(surf_a, surf_b, sampling, max_tree_points))


def _directed_distances(
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


MaskPairs = dict[str, tuple[np.ndarray, np.ndarray]]


def mask_metrics(regions: MaskPairs, classes: MaskPairs, spacing: Sequence[float], *, hd95: bool = True,
                 hd95_mode: str = "pooled", nsd_tolerance: float | None = None) -> dict[str, float | None]:
    """The one per-case row behind validation and brats-evaluate, from (prediction, truth) boolean masks.

    Keys in metrics.csv order: dice_<region>, hd95_<region> (None with hd95=False), dice_<class>, vol_pred_<region>,
    vol_true_<region> (mL)[, nsd_<region> with an nsd_tolerance in mm]. Empty masks follow the module's conventions.
    One surface-distance computation per region serves HD95 and NSD.
    """
    sampling = _spacing(spacing, next(iter(regions.values()))[0].ndim)
    voxel_ml = float(np.prod(sampling)) / 1000.0
    distances = {r: surface_distances(*pair, sampling) for r, pair in regions.items()} if hd95 else {}

    def from_distances(region: str, both_empty: float, one_empty: float, compute) -> float | None:
        if not hd95:
            return None
        if distances[region] is None:
            pred, truth = regions[region]
            return both_empty if not pred.any() and not truth.any() else one_empty
        return compute(distances[region])

    out: dict[str, float | None] = {f"dice_{r}": dice(*pair) for r, pair in regions.items()}
    for r in regions:
        out[f"hd95_{r}"] = from_distances(r, 0.0, HD95_EMPTY, lambda d: hd95_from_distances(*d, mode=hd95_mode))
    for name, pair in classes.items():
        out[f"dice_{name}"] = dice(*pair)
    for which, side in (("pred", 0), ("true", 1)):
        for r, pair in regions.items():
            out[f"vol_{which}_{r}"] = np.count_nonzero(pair[side]) * voxel_ml
    if nsd_tolerance is not None:
        for r in regions:
            out[f"nsd_{r}"] = from_distances(
                r, 1.0, 0.0, lambda d: nsd_from_distances(*d, tolerance_mm=nsd_tolerance, mode="pooled"))
    return out


def case_metrics(
    pred_classes: np.ndarray,
    true_classes: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    with_hd95: bool = True,
    schema: LabelSchema = SCHEMAS["brats2021"],
) -> dict[str, float]:
    """All per-case numbers for one internal class map pair of `schema` (brats2021: 0 bg, 1 NCR, 2 ED, 3 ET), in
    metrics.csv order.

    Keys: dice_<region>, hd95_<region> (unless with_hd95=False), dice_<class> for each class that is not a region by
    itself (brats2021: ncr, ed), vol_pred_<region>, vol_true_<region> (mL). Regions: the schema's (wt, tc, et).
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


def class_columns(schema: LabelSchema) -> list[str]:
    """Classes scored on their own beside the regions: those that are not a region by themselves."""
    singles = {cs[0] for _, cs in schema.regions if len(cs) == 1}
    return [c for c in schema.class_names[1:] if c not in singles]


def metric_columns(schema: LabelSchema, hd95: bool = True) -> list[str]:
    """metrics.csv's metric columns for a schema, in case_metrics' order."""
    regions = schema.region_names
    return [*(f"dice_{r}" for r in regions), *(f"hd95_{r}" for r in regions if hd95),
            *(f"dice_{c}" for c in class_columns(schema)), *(f"vol_pred_{r}" for r in regions),
            *(f"vol_true_{r}" for r in regions)]


class BratsMetrics(Metric):
    """Per-case Dice (and HD95) of WT/TC/ET over a validation epoch; DDP gathers the cases, compute() averages.

    update() takes internal class maps (B, *S) on any device; they are moved to CPU numpy for the distance maps.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, hd95: bool = True, schema: LabelSchema = SCHEMAS["brats2021"], **kwargs) -> None:
        super().__init__(**kwargs)
        self.with_hd95, self.schema = hd95, schema
        self.regions = schema.region_names
        self.case_keys = [f"dice_{r}" for r in self.regions]
        if hd95:
            self.case_keys += [f"hd95_{r}" for r in self.regions]
        for key in self.case_keys:
            self.add_state(key, default=[], dist_reduce_fx="cat")

    def update(self, pred_classes: Tensor, true_classes: Tensor, spacing: Sequence[float] | Tensor = (1, 1, 1)) -> None:
        if pred_classes.shape != true_classes.shape or pred_classes.ndim < 2:
            raise ValueError(
                f"expected class maps (B, *S) of equal shape, got {tuple(pred_classes.shape)} and "
                f"{tuple(true_classes.shape)}"
            )
        batch, ndim = pred_classes.shape[0], pred_classes.ndim - 1
        spacings = torch.as_tensor(spacing, dtype=torch.float64).cpu().numpy()
        if spacings.shape == (ndim,):
            spacings = np.broadcast_to(spacings, (batch, ndim))
        if spacings.shape != (batch, ndim):
            raise ValueError(f"spacing must have {ndim} values or shape ({batch}, {ndim}), got {spacings.shape}")
        preds = pred_classes.detach().cpu().numpy()
        truths = true_classes.detach().cpu().numpy()
        rows = [
            case_metrics(p, t, tuple(s), with_hd95=self.with_hd95, schema=self.schema)
            for p, t, s in zip(preds, truths, spacings, strict=True)
        ]
        for key in self.case_keys:
            values = torch.tensor([row[key] for row in rows], dtype=torch.float32, device=self.device)
            getattr(self, key).append(values)

    def per_case(self) -> dict[str, Tensor]:
        """Per-case values seen so far on this process (before any DDP gather), each of shape (cases,)."""
        return {key: _cat(getattr(self, key), self.device) for key in self.case_keys}

    def compute(self) -> dict[str, Tensor]:
        cases = {key: _cat(getattr(self, key), self.device) for key in self.case_keys}
        out = {key: values.mean() if values.numel() else torch.tensor(float("nan"), device=self.device)
               for key, values in cases.items()}
        out["dice_mean"] = torch.stack([out[f"dice_{r}"] for r in self.regions]).mean()
        # Order for logging: dice_wt, dice_tc, dice_et, dice_mean, hd95_*.
        order = [f"dice_{r}" for r in self.regions] + ["dice_mean"] + [k for k in self.case_keys if k[:4] == "hd95"]
        return {key: out[key] for key in order}


def paper_dice(probs: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """The seed paper's Dice: mean over all classes (background included) of (2 sum(t*p) + s) / (sum t + sum p + s).

    Sums run over the batch and all voxels per class (Keras style), on soft probabilities, in float32.
    """
    if probs.ndim != target.ndim + 1 or probs.shape[0] != target.shape[0] or probs.shape[2:] != target.shape[1:]:
        raise ValueError(
            f"expected probs (B,K,*S) and target (B,*S), got {tuple(probs.shape)} and {tuple(target.shape)}"
        )
    p = probs.float()
    onehot = F.one_hot(target.long(), probs.shape[1]).movedim(-1, 1).to(p.dtype)
    dims = [0, *range(2, p.ndim)]
    intersection = (p * onehot).sum(dims)
    denominator = p.sum(dims) + onehot.sum(dims)
    return ((2.0 * intersection + smooth) / (denominator + smooth)).mean()


def _as_masks(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"mask shapes differ: prediction {pred.shape}, truth {truth.shape}")
    return pred, truth


def _spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    values = tuple(float(s) for s in np.asarray(spacing, dtype=np.float64).reshape(-1))
    if len(values) != ndim or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be {ndim} positive finite voxel sizes, got {values}")
    return values


def _bbox(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of the bounding box of a non-empty mask, grown by `margin` voxels and clipped to the array."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(hits[0] - margin, 0), min(hits[-1] + 1 + margin, mask.shape[axis])))
    return tuple(box)


def _cat(values: list[Tensor] | Tensor, device: torch.device) -> Tensor:
    # After a DDP sync torchmetrics may already have concatenated the list into one tensor.
    if isinstance(values, Tensor):
        return values.reshape(-1)
    return torch.cat(values) if values else torch.zeros(0, device=device)
