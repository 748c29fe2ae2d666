"""One metrics.csv row from two label maps in a challenge's own labels: region-wise Dice / HD95 / NSD / volumes, then
(optionally) the lesion-wise numbers of the official BraTS parsers. Pure: arrays in, numbers out, no IO.

Columns come from the challenge's regions (evaluation.challenges), outermost region first: for brats2021/2023 that
reproduces the original metrics.csv exactly (dice_wt, dice_tc, dice_et, hd95_*, dice_ncr, dice_ed, vol_pred_*,
vol_true_*). Extra columns follow: nsd_<region> (with an NSD tolerance), then lesion-wise keys named like the official
parser's CSV (all_instance_tp_et, global_dsc_et, lesionwise_dsc_mean_et, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from brats_unet.evaluation.challenges import Challenge, resolve_challenge
from brats_unet.evaluation.lesionwise import lesionwise_metrics
from brats_unet.evaluation.region import class_columns, mask_metrics
from brats_unet.evaluation.surface import HD95_MODES, check_mode, crop_pair
from brats_unet.utils import BratsError

Row = dict[str, float | None]


def region_order(challenge: Challenge) -> list[str]:
    """Regions with the most labels first (wt, tc, et for gliomas, as the first metrics.csv), ties in official order."""
    return sorted(challenge.regions, key=lambda r: -len(challenge.regions[r]))


def label_columns(challenge: Challenge) -> dict[str, int]:
    """Label name -> value of the classes with a Dice column of their own (region.class_columns: brats2021's ncr,
    ed)."""
    value = {name: v for v, name in challenge.schema.labels}
    return {name: value[name] for name in class_columns(challenge.schema)}


def check_options(hd95_mode: str, nsd_tolerance: float | None) -> None:
    check_mode(hd95_mode, HD95_MODES, "hd95_mode")
    if nsd_tolerance is not None and not (np.isfinite(nsd_tolerance) and nsd_tolerance >= 0):
        raise BratsError(f"nsd_tolerance must be a distance >= 0 in mm (or null), got {nsd_tolerance}")


def region_row(pred: np.ndarray, truth: np.ndarray, challenge: Challenge, spacing: Sequence[float], *,
               hd95: bool = True, hd95_mode: str = "pooled", nsd_tolerance: float | None = None) -> Row:
    """dice_<r>, hd95_<r>, dice_<label>, vol_pred_<r>, vol_true_<r> (mL)[, nsd_<r>]: region.mask_metrics
    on the challenge's regions (outermost first) and its labels that are no region by themselves. Distance columns
    are None (not computed) with hd95=False."""
    regions = {r: (np.isin(pred, challenge.regions[r]), np.isin(truth, challenge.regions[r]))
               for r in region_order(challenge)}
    labels = {name: (pred == value, truth == value) for name, value in label_columns(challenge).items()}
    return mask_metrics(regions, labels, spacing, hd95=hd95, hd95_mode=hd95_mode, nsd_tolerance=nsd_tolerance)


def score_labels(pred_labels: np.ndarray, truth_labels: np.ndarray, challenge: str | Challenge,
                 spacing: Sequence[float] = (1.0, 1.0, 1.0), *, hd95: bool = True, hd95_mode: str = "pooled",
                 nsd_tolerance: float | None = None, lesionwise: bool = False) -> Row:
    """The metrics.csv row (without `case`) of two label maps in `challenge`'s own labels; spacing in mm.

    nsd_tolerance (mm) adds nsd_<region> and sets the lesion-wise NSD tolerance (None: 1 mm there); hd95_mode applies
    to region-wise and lesion-wise HD95; hd95=False leaves every distance column (HD95, NSD) None.
    """
    challenge = resolve_challenge(challenge)
    check_options(hd95_mode, nsd_tolerance)
    pred, truth = np.asarray(pred_labels), np.asarray(truth_labels)
    if pred.shape != truth.shape:
        raise BratsError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
    # Every metric is unchanged by cutting both maps to the box of their non-zero voxels (plus a 1-voxel margin);
    # outside it both are 0, so the label check below sees every value at a few percent of the cost.
    pred, truth = crop_pair(pred, truth)
    challenge.check_labels(pred, truth)
    out = region_row(pred, truth, challenge, spacing, hd95=hd95, hd95_mode=hd95_mode, nsd_tolerance=nsd_tolerance)
    if lesionwise:
        tolerance = 1.0 if nsd_tolerance is None else nsd_tolerance
        lesion = lesionwise_metrics(pred, truth, challenge, spacing, nsd_tolerance_mm=tolerance, hd95_mode=hd95_mode,
                                    distances=hd95)
        out.update({k: None if not hd95 and _is_distance(k) else v for k, v in lesion.items()})
    return out


def _is_distance(key: str) -> bool:
    return key.startswith(("global_hd95_", "global_nsd_", "lesionwise_hd95_", "lesionwise_nsd_"))
