"""Label schemas, internal classes, evaluation regions and file layouts: the only place that knows them.

A schema says which label values a dataset's segmentation files hold, what they are called, and which regions (unions
of labels) are evaluated. Internally every label map uses classes 0 (background), 1..K in the schema's label order;
region heads predict the regions in the schema's region order. BraTS 2021 files mark enhancing tumour (ET) as 4,
BraTS 2023 as 3: schemas brats2021 and brats2023 (classes background, ncr, ed, et; regions wt, tc, et).
The 2024+ sub-challenges and MSD Task01 have their own schemas, as the official BraTS evaluation configs define them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from brats_unet.utils import BratsError

# Canonical modality names used everywhere inside the package.
MODALITIES = ("t1", "t1ce", "t2", "flair")


@dataclass(frozen=True)
class LabelSchema:
    """Label values -> class names (file order = internal classes 1..K), and regions as unions of class names."""

    name: str
    labels: tuple[tuple[int, str], ...]  # (value in the files, class name), background 0 not listed
    regions: tuple[tuple[str, tuple[str, ...]], ...]  # (region name, class names); the region head's channel order

    @classmethod
    def build(cls, name: str, labels: Mapping[int, str], regions: Mapping[str, Sequence[str]]) -> LabelSchema:
        schema = cls(name, tuple((int(v), str(n)) for v, n in labels.items()),
                     tuple((str(r), tuple(str(c) for c in cs)) for r, cs in regions.items()))
        unknown = {c for _, cs in schema.regions for c in cs} - set(schema.class_names[1:])
        if unknown or 0 in schema.values[1:] or len(set(schema.class_names)) != len(schema.class_names):
            raise ValueError(f"label schema {name}: regions name unknown classes {sorted(unknown)}, or a label is 0 "
                             "or repeated")
        return schema

    @property
    def class_names(self) -> tuple[str, ...]:
        return ("background", *(n for _, n in self.labels))

    @property
    def num_classes(self) -> int:
        return len(self.labels) + 1

    @property
    def values(self) -> tuple[int, ...]:
        """Label values allowed in files (0 first)."""
        return (0, *(v for v, _ in self.labels))

    @property
    def region_names(self) -> tuple[str, ...]:
        return tuple(r for r, _ in self.regions)

    @cached_property
    def region_classes(self) -> dict[str, tuple[int, ...]]:
        """Region -> internal class indices."""
        index = {n: i for i, n in enumerate(self.class_names)}
        return {r: tuple(index[c] for c in cs) for r, cs in self.regions}

    @cached_property
    def decode_order(self) -> tuple[tuple[int, int], ...]:
        """(region index, class) pairs to paint, largest region first, for decoding region masks into classes.

        Each region paints the one class that no smaller region holds; later (smaller) regions paint over it. For
        WT > TC > ET this is NVIDIA's BraTS rule (WT -> ED, TC -> NCR, ET -> ET). A region whose classes all belong to
        smaller regions paints nothing; one left with several classes cannot be decoded (ValueError)."""
        sizes = sorted(range(len(self.regions)), key=lambda i: -len(self.regions[i][1]))  # stable: ties keep order
        order = []
        for rank, i in enumerate(sizes):
            smaller = {c for j in sizes[rank + 1:] for c in self.region_classes[self.region_names[j]]}
            own = [c for c in self.region_classes[self.region_names[i]] if c not in smaller]
            if len(own) > 1:
                raise ValueError(f"label schema {self.name}: region {self.region_names[i]} holds classes "
                                 f"{[self.class_names[c] for c in own]} that no other region separates, so region "
                                 "outputs cannot be decoded into classes (use a softmax loss: dice, ce, combined)")
            order += [(i, own[0])] if own else []
        return tuple(order)

    def to_classes(self, seg: np.ndarray) -> np.ndarray:
        """Label map in this schema's values -> internal classes (uint8). ValueError naming any other value."""
        problem = label_problem(seg, self.values, self.name)
        if problem:
            raise ValueError(problem)
        lut = np.zeros(max(self.values) + 1, dtype=np.uint8)
        for cls, (value, _) in enumerate(self.labels, start=1):
            lut[value] = cls
        return lut[seg.astype(np.int64)]

    def from_classes(self, classes: np.ndarray) -> np.ndarray:
        """Internal classes -> this schema's label values (uint8)."""
        lut = np.array(self.values, dtype=np.uint8)
        return lut[np.asarray(classes, dtype=np.int64)]

    def region_masks(self, classes: np.ndarray) -> np.ndarray:
        """Boolean masks (R, *shape) of the regions, in region order, from an internal class map."""
        return np.stack([np.isin(classes, self.region_classes[r]) for r in self.region_names])

    def classes_from_regions(self, regions: np.ndarray) -> np.ndarray:
        """Internal class map (uint8) from boolean region masks (R, *shape), painted in `decode_order`."""
        regions = np.asarray(regions, dtype=bool)
        out = np.zeros(regions.shape[1:], dtype=np.uint8)
        for i, cls in self.decode_order:
            out[regions[i]] = cls
        return out

    def class_index(self, name: str) -> int | None:
        return self.class_names.index(name) if name in self.class_names else None


def distinct_values(arr: np.ndarray) -> list[int]:
    """Sorted distinct values of a label map; a histogram instead of a sort for small non-negative integers."""
    arr = np.asarray(arr)
    if arr.size and (arr.dtype.kind in "ub" or (arr.dtype.kind == "i" and arr.min() >= 0 and arr.max() < 65536)):
        return np.flatnonzero(np.bincount(arr.ravel().astype(np.intp, copy=False))).tolist()
    return np.unique(arr).tolist()


def label_problem(arr: np.ndarray, allowed: Sequence[int], name: str, hint: str = "") -> str | None:
    """The one allowed-label check: a message naming the values of `arr` outside `allowed` (the `name` label set,
    0 included by the caller), or None when there are none. `hint` is appended inside the parentheses."""
    bad = sorted(set(distinct_values(arr)) - set(allowed))
    if not bad:
        return None
    return f"label values {bad} are not {name} labels (allowed {sorted(allowed)}{hint})"


def check_labels(arr: np.ndarray, allowed: Sequence[int], name: str, where: str = "", hint: str = "") -> None:
    """BratsError (prefixed by `where`, e.g. a file or "prediction") when `arr` holds values outside `allowed`."""
    problem = label_problem(arr, allowed, name, hint)
    if problem:
        raise BratsError(f"{where}: {problem}" if where else problem)


def _glioma(name: str, et: int) -> LabelSchema:
    return LabelSchema.build(name, {1: "ncr", 2: "ed", et: "et"},
                             {"wt": ("ncr", "ed", "et"), "tc": ("ncr", "et"), "et": ("et",)})


# Region order = the region head's channels: WT, TC, ET first wherever they exist (checkpoints depend on it).
SCHEMAS: dict[str, LabelSchema] = {
    "brats2021": _glioma("brats2021", 4),
    "brats2023": _glioma("brats2023", 3),  # also the Sub-Saharan Africa (SSA) and GoAT glioma data
    "brats2024_gli": LabelSchema.build(
        "brats2024_gli", {1: "netc", 2: "snfh", 3: "et", 4: "rc"},
        {"wt": ("netc", "snfh", "et"), "tc": ("netc", "et"), "et": ("et",), "netc": ("netc",), "snfh": ("snfh",),
         "rc": ("rc",)}),
    "brats_met": LabelSchema.build(
        "brats_met", {1: "netc", 2: "snfh", 3: "et", 4: "rc"},
        {"wt": ("netc", "snfh", "et"), "tc": ("netc", "et"), "et": ("et",), "rc": ("rc",)}),
    "brats_men": LabelSchema.build(
        "brats_men", {1: "netc", 2: "snfh", 3: "et"},
        {"wt": ("netc", "snfh", "et"), "tc": ("netc", "et"), "et": ("et",)}),
    "brats_men_rt": LabelSchema.build("brats_men_rt", {1: "gtv"}, {"gtv": ("gtv",)}),
    "brats_ped": LabelSchema.build(
        "brats_ped", {1: "et", 2: "netc", 3: "cc", 4: "ed"},
        {"wt": ("et", "netc", "cc", "ed"), "tc": ("et", "netc", "cc"), "et": ("et",), "netc": ("netc",),
         "cc": ("cc",), "ed": ("ed",)}),
    # MSD Task01_BrainTumour (MONAI's tutorials): 1 oedema, 2 non-enhancing tumour, 3 enhancing tumour.
    "msd_brain": LabelSchema.build(
        "msd_brain", {1: "ed", 2: "netc", 3: "et"},
        {"wt": ("ed", "netc", "et"), "tc": ("netc", "et"), "et": ("et",)}),
}


def resolve_schema(schema: LabelSchema | str) -> LabelSchema:
    if isinstance(schema, LabelSchema):
        return schema
    if schema not in SCHEMAS:
        raise ValueError(f"unknown label schema {schema!r}; choose one of {sorted(SCHEMAS)} (config key data.schema)")
    return SCHEMAS[schema]


@dataclass(frozen=True)
class Layout:
    """How a release names its files: `<case>/<case><sep><suffix>.nii.gz`; or MSD's 4D `imagesTr/<case>.nii.gz` with
    the modalities as channels and `labelsTr/<case>.nii.gz` (`channels` set). `schema`: its labels by default."""

    name: str
    suffixes: dict[str, str]  # canonical modality (or "seg") -> file suffix
    separator: str
    schema: str
    channels: tuple[str, ...] = ()  # MSD: canonical modality of each channel of the 4D image

    def filename(self, case: str, key: str, ext: str = ".nii.gz") -> str:
        if self.channels:
            return f"{case}{ext}"
        return f"{case}{self.separator}{self.suffixes[key]}{ext}"

    @property
    def label_schema(self) -> LabelSchema:
        return SCHEMAS[self.schema]


_2023_NAMES = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}
LAYOUTS: dict[str, Layout] = {
    "brats2021": Layout("brats2021", {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"}, "_",
                        "brats2021"),
    "brats2023": Layout("brats2023", _2023_NAMES, "-", "brats2023"),  # BraTS-XXX-NNNNN-NNN-t1n.nii.gz, 2023+
    "msd": Layout("msd", {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"}, "", "msd_brain",
                  channels=("flair", "t1", "t1ce", "t2")),
}


def compatible(a: LabelSchema, b: LabelSchema) -> bool:
    """Same classes and regions, maybe other label values (brats2021 and brats2023 differ only in ET's value)."""
    return a.class_names == b.class_names and a.regions == b.regions
