"""How each BraTS release stores a synthetic case: folder and file names, label schema, the sequences it ships, and
the generator version its files carry (brats-synth --layout NAME)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from brats_unet.data.discovery import resolve_layout
from brats_unet.data.labels import MODALITIES, LabelSchema, Layout, resolve_schema
from brats_unet.utils import BratsError

# Bump when the generator changes (per release: Release.version), so old folders are not mistaken for complete cases.
_VERSION = "v3"  # v3: non-enhancing core T1-hypointense and textured (appearance.py)


@dataclass(frozen=True)
class Release:
    """How one BraTS release stores a case: file naming, label schema, case names, the sequences it ships."""

    files: str  # a data.labels.LAYOUTS name
    schema: str  # a data.labels.SCHEMAS name
    case_pattern: str  # str.format pattern of the case folder name, given the index
    modalities: tuple[str, ...] = MODALITIES
    version: str = _VERSION  # the generator version of this release's cases (in every file's header)
    metastases: bool = False  # several mostly small lesions instead of a glioma

    @property
    def layout(self) -> Layout:
        return resolve_layout(self.files)

    @property
    def label_schema(self) -> LabelSchema:
        return resolve_schema(self.schema)


# brats-synth --layout NAME (data=... in brackets): each sub-challenge's naming and labels.
RELEASES: dict[str, Release] = {
    "2021": Release("brats2021", "brats2021", "BraTS2021_{:05d}"),  # data=brats2021
    "2023": Release("brats2023", "brats2023", "BraTS-GLI-{:05d}-000"),  # data=brats2023
    "2024_gli": Release("brats2023", "brats2024_gli", "BraTS-GLI-{:05d}-100"),  # data=brats2024_gli
    "met": Release("brats2023", "brats_met", "BraTS-MET-{:05d}-000", version="v4", metastases=True),  # data=brats_met
    "men": Release("brats2023", "brats_men", "BraTS-MEN-{:05d}-000"),  # data=brats_men
    "men_rt": Release("brats2023", "brats_men_rt", "BraTS-MEN-RT-{:04d}-1", ("t1ce",)),  # data=brats_men_rt
    "ped": Release("brats2023", "brats_ped", "BraTS-PED-{:05d}-000", version="v4"),  # data=brats_ped: cysts (CC)
    "ssa": Release("brats2023", "brats2023", "BraTS-SSA-{:05d}-000"),  # data=brats_ssa
    "msd": Release("msd", "msd_brain", "BRATS_{:03d}"),  # data=msd_brain: 4D imagesTr/, labelsTr/, dataset.json
}
RELEASE_ALIASES = {"brats2021": "2021", "brats2023": "2023"}


def resolve_release(layout: str) -> Release:
    key = RELEASE_ALIASES.get(layout, layout)
    if key not in RELEASES:
        raise BratsError(f"unknown data layout {layout!r}; choose one of {sorted([*RELEASES, *RELEASE_ALIASES])}")
    return RELEASES[key]


def layout_files(release: Release, name: str) -> dict[str, str]:
    """Array key -> file path of one case relative to its folder (MSD: to the root); the seg comes last (written
    last, it marks a complete case)."""
    if release.layout.channels:
        return {"image": f"imagesTr/{name}.nii.gz", "seg": f"labelsTr/{name}.nii.gz"}
    return {key: release.layout.filename(name, key) for key in (*release.modalities, "seg")}


def case_folder(out: Path, release: Release, name: str) -> Path:
    """Where a case's files live: its own folder, or (MSD) the dataset root with imagesTr/ and labelsTr/."""
    return out if release.layout.channels else out / name


MSD_DATASET = {"name": "BrainTumour", "description": "brats-synth: synthetic cases in the MSD Task01 layout",
               "tensorImageSize": "4D", "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
               "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}}


def case_name(layout: str, index: int) -> str:
    """Folder name of case `index` as the release names it (BraTS2021_00000, BraTS-GLI-00000-000, ...)."""
    release = resolve_release(layout)
    return release.case_pattern.format(index + 1 if release.layout.channels else index)  # MSD counts from 1
