"""The BraTS sub-challenges as the official evaluation package (`brats-evaluation` 0.0.10, panoptica 2.1.7) scores
them: which label schema (values, classes and regions: `brats_unet.data.labels`, the one label registry), the order
in which the official config lists the regions, and the lesion-wise rules. Data plus its lookup, no scoring.

Facts read from brats_evaluation/configs/config_<name>.yaml and brats_evaluation/metrics_parser.py:
- Every config: connected components by cc3d (26-connectivity in 3D; scipy's default cross in 2D), one-to-one
  matching of predicted to reference lesions by maximum bipartite matching (scipy linear_sum_assignment on cost
  1 - Dice) over pairs with Dice >= 1e-6 (any overlap), no dilation, no minimum lesion size; per matched lesion Dice,
  HD95 (pooled) and NSD (mean of the two directed fractions, tolerance = the smallest voxel spacing); global (whole
  region) Dice, HD95, NSD. Edge cases: with no true positive, the lesion-wise mean is NaN when neither side has a
  lesion, else 0 (Dice, NSD) or inf (HD95); global metrics take the same values whenever the masks do not overlap.
- Parser "seg" (every challenge but metastases): lesion-wise means over matched lesions only (no FP/FN penalty).
- Parser "mets": reference lesions of volume >= 20 (mm^3; voxels on 1 mm data) are "large"; matched large lesions
  contribute their scores, unmatched large lesions and every unmatched predicted lesion contribute Dice 0, NSD 0,
  HD95 373; small lesions only count as detections (Dice >= 0.1 -> TP). No large reference lesion -> NaN means.
- The 2023 challenge scripts' 3-voxel dilation and 50-voxel lesion filter are not in this package, so not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from brats_unet.data.labels import SCHEMAS, LabelSchema, check_labels
from brats_unet.utils import BratsError

OFFICIAL_HD95_PENALTY = 373.0  # the parsers' "diameter of the cube in SRI space" (our region-wise HD95_EMPTY: 373.13)
MATCHING_DICE_THRESHOLD = 1e-6


@dataclass(frozen=True)
class Challenge:
    """One sub-challenge: its label schema, the official order of its regions and its lesion-wise rules."""

    name: str
    schema: LabelSchema  # label values, class names and regions (data.labels.SCHEMAS)
    official_config: str | None  # brats_evaluation.config_path(<this>); None: no official config
    region_order: tuple[str, ...]  # the schema's regions in the official config's order (lesion-wise columns)
    parser: str = "seg"  # "seg" or "mets" (brats_evaluation.metrics_parser)
    lesion_volume_threshold: float | None = None  # mets: reference lesions >= this volume (mm^3) are "large"
    detection_dice_threshold: float | None = None  # mets: a small lesion counts as detected at Dice >= this

    def __post_init__(self) -> None:
        if sorted(self.region_order) != sorted(self.schema.region_names):
            raise ValueError(f"challenge {self.name}: region order {self.region_order} is not an order of schema "
                             f"{self.schema.name}'s regions {self.schema.region_names}")

    @property
    def labels(self) -> dict[int, str]:
        """Label value -> class name (0, background, not listed)."""
        return dict(self.schema.labels)

    @cached_property
    def regions(self) -> dict[str, tuple[int, ...]]:
        """Region -> the label values whose union it is, in the official order."""
        value = {n: v for v, n in self.schema.labels}
        regions = dict(self.schema.regions)
        return {r: tuple(sorted(value[c] for c in regions[r])) for r in self.region_order}

    def check_labels(self, pred: np.ndarray, truth: np.ndarray) -> None:
        """BratsError naming the side ("prediction", "truth") that holds values outside this challenge's labels."""
        for where, arr in (("prediction", pred), ("truth", truth)):
            check_labels(arr, self.schema.values, self.name, where)


_ET_TC_WT = ("et", "tc", "wt")


def _challenge(name: str, schema: str, config: str | None, order: tuple[str, ...] = _ET_TC_WT, **rules) -> Challenge:
    return Challenge(name, SCHEMAS[schema], config, order, **rules)


CHALLENGES: dict[str, Challenge] = {
    # Not in the official package (it predates it); the same three regions with ET = 4.
    "brats2021": _challenge("brats2021", "brats2021", None),
    "brats2023": _challenge("brats2023", "brats2023", "GoAT"),
    "brats2024_gli": _challenge("brats2024_gli", "brats2024_gli", "gli", ("snfh", "et", "netc", "rc", "tc", "wt")),
    "brats_met": _challenge("brats_met", "brats_met", "mets", ("et", "rc", "tc", "wt"), parser="mets",
                            lesion_volume_threshold=20.0, detection_dice_threshold=0.1),
    "brats_men": _challenge("brats_men", "brats_men", "MenPre"),
    "brats_men_rt": _challenge("brats_men_rt", "brats_men_rt", "MenRT", ("gtv",)),
    "brats_ped": _challenge("brats_ped", "brats_ped", "ped", ("et", "netc", "cc", "ed", "tc", "wt")),
    # Sub-Saharan Africa glioma and GoAT: the 2023 adult glioma labels, scored with the same groups as GoAT/MenPre.
    "brats_ssa": _challenge("brats_ssa", "brats2023", "GoAT"),
    "brats_goat": _challenge("brats_goat", "brats2023", "GoAT"),
    # MSD Task01_BrainTumour (not a BraTS sub-challenge, no official config): 1 oedema, 2 non-enhancing, 3 enhancing.
    "msd_brain": _challenge("msd_brain", "msd_brain", None),
}


def resolve_challenge(challenge: str | Challenge) -> Challenge:
    """A challenge by name (BratsError naming the config key for an unknown one), or the one given."""
    if isinstance(challenge, Challenge):
        return challenge
    if challenge not in CHALLENGES:
        raise BratsError(f"unknown challenge {challenge!r}; choose one of {sorted(CHALLENGES)} (config key challenge)")
    return CHALLENGES[challenge]
