"""The BraTS sub-challenges as the official evaluation package (`brats-evaluation` 0.0.10, panoptica 2.1.7) scores
them: label values and names, evaluated regions (unions of labels) and lesion-wise rules. Plain data, no logic.

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

from dataclasses import dataclass, field

OFFICIAL_HD95_PENALTY = 373.0  # the parsers' "diameter of the cube in SRI space" (our region-wise HD95_EMPTY: 373.13)
MATCHING_DICE_THRESHOLD = 1e-6


@dataclass(frozen=True)
class Challenge:
    """One sub-challenge: its label map, evaluated regions and lesion-wise rules."""

    name: str
    official_config: str | None  # brats_evaluation.config_path(<this>); None: no official config
    labels: dict[int, str]  # label value -> short name (0 is background, not listed)
    regions: dict[str, tuple[int, ...]]  # region -> label values whose union it is, in the official order
    parser: str = "seg"  # "seg" or "mets" (brats_evaluation.metrics_parser)
    lesion_volume_threshold: float | None = None  # mets: reference lesions >= this volume (mm^3) are "large"
    detection_dice_threshold: float | None = None  # mets: a small lesion counts as detected at Dice >= this
    modalities: tuple[str, ...] = field(default=("t1n", "t1c", "t2w", "t2f"))


_GLIOMA_2023 = {1: "ncr", 2: "ed", 3: "et"}
_ET_TC_WT = {"et": (3,), "tc": (1, 3), "wt": (1, 2, 3)}

CHALLENGES: dict[str, Challenge] = {
    # Not in the official package (it predates it); the same three regions with ET = 4.
    "brats2021": Challenge("brats2021", None, {1: "ncr", 2: "ed", 4: "et"}, {"et": (4,), "tc": (1, 4), "wt": (1, 2, 4)},
                           modalities=("t1", "t1ce", "t2", "flair")),
    "brats2023": Challenge("brats2023", "GoAT", _GLIOMA_2023, _ET_TC_WT),
    "brats2024_gli": Challenge(
        "brats2024_gli", "gli", {1: "netc", 2: "snfh", 3: "et", 4: "rc"},
        {"snfh": (2,), "et": (3,), "netc": (1,), "rc": (4,), "tc": (1, 3), "wt": (1, 2, 3)},
    ),
    "brats_met": Challenge(
        "brats_met", "mets", {1: "netc", 2: "snfh", 3: "et", 4: "rc"},
        {"et": (3,), "rc": (4,), "tc": (1, 3), "wt": (1, 2, 3)},
        parser="mets", lesion_volume_threshold=20.0, detection_dice_threshold=0.1,
    ),
    "brats_men": Challenge("brats_men", "MenPre", {1: "netc", 2: "snfh", 3: "et"}, _ET_TC_WT),
    "brats_men_rt": Challenge("brats_men_rt", "MenRT", {1: "gtv"}, {"gtv": (1,)}, modalities=("t1c",)),
    "brats_ped": Challenge(
        "brats_ped", "ped", {1: "et", 2: "netc", 3: "cc", 4: "ed"},
        {"et": (1,), "netc": (2,), "cc": (3,), "ed": (4,), "tc": (1, 2, 3), "wt": (1, 2, 3, 4)},
    ),
    # Sub-Saharan Africa glioma: the 2023 adult glioma labels; scored with the same groups as GoAT/MenPre.
    "brats_ssa": Challenge("brats_ssa", "GoAT", _GLIOMA_2023, _ET_TC_WT),
    "brats_goat": Challenge("brats_goat", "GoAT", _GLIOMA_2023, _ET_TC_WT),
    # MSD Task01_BrainTumour (not a BraTS sub-challenge, no official config): 1 oedema, 2 non-enhancing, 3 enhancing.
    "msd_brain": Challenge("msd_brain", None, {1: "ed", 2: "netc", 3: "et"},
                           {"et": (3,), "tc": (2, 3), "wt": (1, 2, 3)}, modalities=("flair", "t1", "t1gd", "t2")),
}
