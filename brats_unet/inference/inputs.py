"""What a user hands the Segmenter, read into a checked Case: a case folder, {modality: NIfTI path} or
{modality: (array, 4x4 affine)}, with either release's modality names. The checks are data/cases.py's (one home)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brats_unet.data.cases import Case, check_images, load_case, load_nifti
from brats_unet.data.discovery import EXTENSIONS
from brats_unet.data.labels import LAYOUTS, MODALITIES, Layout
from brats_unet.utils import BratsError

# A case: a case folder, {modality: NIfTI path}, or {modality: (array, 4x4 affine)}.
CaseInput = str | Path | Mapping[str, Any]


def canonical_modality(key: str) -> str:
    """t1/t1ce/t2/flair, or a release's own name for one (t1n, t1c, t2w, t2f)."""
    if key in MODALITIES:
        return key
    for layout in LAYOUTS.values():
        for canonical, suffix in layout.suffixes.items():
            if suffix == key and canonical in MODALITIES:
                return canonical
    raise BratsError(f"unknown modality {key!r}: use {list(MODALITIES)} (or a release's names, e.g. t1n, t1c, t2w, "
                     "t2f)")


def load_input(case: CaseInput, modalities: Sequence[str], layout: Layout) -> Case:
    """A case folder, {modality: path} or {modality: (array, affine)} -> Case, checked as preprocessing checks."""
    if isinstance(case, str | Path):
        return load_case(case, layout, modalities, labels=False)  # the label map, if any, is not read to predict
    if not isinstance(case, Mapping):
        raise BratsError(f"a case is a folder, a {{modality: path}} or a {{modality: (array, affine)}} mapping, got "
                         f"{type(case).__name__}")
    given = {canonical_modality(str(k)): v for k, v in case.items()}
    missing = [m for m in modalities if m not in given]
    if missing:
        raise BratsError(f"the model needs modalities {list(modalities)}; the case lacks {missing}")
    images, affines, header = {}, {}, None
    for m in modalities:
        value = given[m]
        if isinstance(value, str | Path):
            data, affine, hdr = load_nifti(value)
            header = header or hdr
        elif isinstance(value, Sequence) and len(value) == 2:
            data, affine = np.asarray(value[0]), np.asarray(value[1], dtype=np.float64)
            if affine.shape != (4, 4):
                raise BratsError(f"{m}: the affine must be a 4x4 matrix, got shape {affine.shape}")
        else:
            raise BratsError(f"{m}: expected a NIfTI path or an (array, affine) pair, got {type(value).__name__}")
        images[m], affines[m] = data, affine
    check_images("case", images, affines)  # NaN, shape, affine: the checks a case folder gets
    images = {m: data.astype(np.float32, copy=False) for m, data in images.items()}
    return Case("case", images, affines[modalities[0]], header, layout)


def is_case_folder(path: Path) -> bool:
    """A folder holding files named <folder name>_<modality>.nii.gz in some release's naming."""
    prefixes = tuple(f"{path.name}{layout.separator}" for layout in LAYOUTS.values())
    return any(p.is_file() and p.name.startswith(prefixes) and p.name.endswith(EXTENSIONS) for p in path.iterdir())
