"""BraTS labels, internal classes and evaluation regions: the only place that knows them.

BraTS 2021 files mark enhancing tumour (ET) as 4, BraTS 2023+ as 3. Internally every label map uses classes
0 background, 1 NCR (necrotic core), 2 ED (oedema), 3 ET. Regions: WT = NCR+ED+ET, TC = NCR+ET, ET.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASS_NAMES = ("background", "ncr", "ed", "et")
NUM_CLASSES = len(CLASS_NAMES)
# Regions as sets of internal classes; always looked up by name, never by position.
REGIONS: dict[str, tuple[int, ...]] = {"wt": (1, 2, 3), "tc": (1, 3), "et": (3,)}
REGION_NAMES = tuple(REGIONS)
# Canonical modality names used everywhere inside the package.
MODALITIES = ("t1", "t1ce", "t2", "flair")


@dataclass(frozen=True)
class Layout:
    """How one BraTS release names its files: `<case>/<case><sep><suffix>.nii.gz`."""

    name: str
    suffixes: dict[str, str]  # canonical modality (or "seg") -> file suffix
    separator: str
    et_label: int

    def filename(self, case: str, key: str, ext: str = ".nii.gz") -> str:
        return f"{case}{self.separator}{self.suffixes[key]}{ext}"


LAYOUTS: dict[str, Layout] = {
    "brats2021": Layout(
        "brats2021", {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"}, "_", 4
    ),
    "brats2023": Layout(
        "brats2023", {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}, "-", 3
    ),
}




def allowed_labels(et_label: int) -> tuple[int, ...]:
    return (0, 1, 2, et_label)


def brats_to_classes(seg: np.ndarray, et_label: int) -> np.ndarray:
    """Map a BraTS label map ({0,1,2,et_label}) to internal classes 0..3 (uint8). Raises on any other value."""
    values = np.unique(seg)
    bad = sorted(set(values.tolist()) - set(allowed_labels(et_label)))
    if bad:
        raise ValueError(f"label values {bad} are not BraTS labels (allowed {list(allowed_labels(et_label))})")
    lut = np.zeros(max(et_label, 2) + 1, dtype=np.uint8)
    lut[1], lut[2], lut[et_label] = 1, 2, 3
    return lut[seg.astype(np.int64)]


def classes_to_brats(classes: np.ndarray, et_label: int) -> np.ndarray:
    """Map internal classes 0..3 back to the dataset's own labels (uint8)."""
    lut = np.array([0, 1, 2, et_label], dtype=np.uint8)
    return lut[np.asarray(classes, dtype=np.int64)]


def region_masks(classes: np.ndarray) -> np.ndarray:
    """Boolean masks (3, *shape) for WT, TC, ET (in REGION_NAMES order) from an internal class map."""
    return np.stack([np.isin(classes, REGIONS[name]) for name in REGION_NAMES])


def classes_from_regions(regions: np.ndarray) -> np.ndarray:
    """Internal class map from boolean WT/TC/ET masks (3, *shape): the nested-region decoding of NVIDIA's nnU-Net.

    ET wins over TC, TC over WT: et -> 3, tc \\ et -> 1 (NCR), wt \\ tc -> 2 (ED).
    """
    wt, tc, et = (np.asarray(regions[i], dtype=bool) for i in range(3))
    out = np.zeros(wt.shape, dtype=np.uint8)
    out[wt] = 2
    out[tc] = 1
    out[et] = 3
    return out
