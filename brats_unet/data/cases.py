"""Checking and reading BraTS cases on disk (NIfTI via nibabel), and writing NIfTI atomically; finding them is
brats_unet.data.discovery.

Every user-facing problem is a BratsError that names the case, the file and what is wrong, so a bad case in a
folder of 1,250 can be found and fixed without a debugger.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from brats_unet.data.discovery import EXTENSIONS, CaseFiles, detect_case_files, resolve_layout
from brats_unet.data.labels import MODALITIES, LabelSchema, Layout, label_problem, resolve_schema
from brats_unet.utils import BratsError, atomic_path


@dataclass
class Case:
    """One case in memory: images per canonical modality (float32), the label map in the dataset's own labels
    (None for unlabelled cases), the geometry (affine, the first image's header) and the file naming it came in."""

    name: str
    images: dict[str, np.ndarray]
    affine: np.ndarray
    header: nib.Nifti1Header | None
    layout: Layout
    seg: np.ndarray | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm (the header's zooms; the affine's column norms for in-memory cases)."""
        if self.header is not None:
            return tuple(float(z) for z in self.header.get_zooms()[:3])  # type: ignore[return-value]
        return tuple(float(v) for v in np.linalg.norm(np.asarray(self.affine)[:3, :3], axis=0))  # type: ignore


class _Problem(Exception):
    """What is wrong with one file; callers add the case and file name to make a BratsError."""


def _why(e: BaseException, path: Path) -> str:
    """nibabel's message without the path (the caller names the file) and on one line."""
    text = " ".join(str(e).replace(f'"{path}"', "it").replace(str(path), "it").split())
    return f"{type(e).__name__}: {text}"


_READ_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError)


def _read(path: Path, channels: int | None = None) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Read one 3D NIfTI fully (no mmap, so truncation shows up here), or with `channels` a 4D one of that many
    volumes (MSD: the modalities as the last axis); raises _Problem."""
    if not path.is_file():
        raise _Problem("file does not exist")
    gz = path.name.endswith(".gz")
    try:
        img = nib.load(path, mmap=False)
    except nib.filebasedimages.ImageFileError as e:
        if gz and "gzip" in str(e):
            raise _Problem("not a gzip file (corrupt, or an uncompressed file named .gz)") from e
        raise _Problem(f"not a NIfTI file ({_why(e, path)})") from e
    except _READ_ERRORS as e:
        raise _Problem(f"cannot read the header: truncated or corrupt file ({_why(e, path)})") from e
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise _Problem(f"not a NIfTI file (nibabel read it as {type(img).__name__})")
    try:
        data = np.asarray(img.dataobj)
    except _READ_ERRORS as e:
        kind = "truncated or corrupt gzip" if gz else "truncated or corrupt file"
        raise _Problem(f"cannot read the voxels: {kind} ({_why(e, path)})") from e
    if channels is not None:
        if data.ndim != 4 or data.shape[-1] != channels:
            raise _Problem(f"image of shape {tuple(data.shape)} where a 4D image of {channels} volumes was expected")
        return data, np.asarray(img.affine, dtype=np.float64), img.header
    # Some tools write 3D volumes as (x, y, z, 1); that is still one volume.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise _Problem(f"{data.ndim}D image of shape {tuple(data.shape)} where a 3D volume was expected")
    return data, np.asarray(img.affine, dtype=np.float64), img.header


def load_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """(data as stored, 4x4 affine, header). BratsError naming the file if it cannot be read as a 3D NIfTI."""
    path = Path(path)
    try:
        return _read(path)
    except _Problem as e:
        raise BratsError(f"{path}: {e}") from e


def save_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None = None) -> None:
    """Write a NIfTI atomically (temp file with the same suffix, then rename)."""
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64), header=header)
    if header is not None:
        img.set_data_dtype(np.asarray(data).dtype)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def _as_labels(seg: np.ndarray) -> np.ndarray:
    """Integer label map; raises _Problem for non-integer values (a float mask, a probability map)."""
    if np.issubdtype(seg.dtype, np.integer):
        return seg
    if not np.all(np.isfinite(seg)):
        raise _Problem("label map holds NaN or Inf voxels")
    frac = seg != np.round(seg)
    if frac.any():
        example = float(seg[frac].flat[0])
        raise _Problem(f"label map holds non-integer values (e.g. {example}); expected integer BraTS labels")
    # Checked before the cast: int16 wraps larger values (65540.0 becomes 4, i.e. ET in BraTS 2021).
    limit = np.iinfo(np.int16)
    huge = (seg < limit.min) | (seg > limit.max)
    if huge.any():
        raise _Problem(f"label map holds values far outside the BraTS labels (e.g. {float(seg[huge].flat[0])})")
    return seg.astype(np.int16)


def _check_allowed(data: np.ndarray, allowed: Sequence[int], name: str, hint: str = "") -> np.ndarray:
    """Integer label map with only `allowed` values; raises _Problem naming the label set."""
    seg = _as_labels(data)
    problem = label_problem(seg, allowed, name, hint)
    if problem:
        raise _Problem(problem)
    return seg


def et_hint(schema: LabelSchema | Layout) -> str:
    """'; brats2023 cases label ET as 3': the usual cause of a wrong label value (2021 and 2023 files differ)."""
    schema = schema.label_schema if isinstance(schema, Layout) else schema
    et = dict((n, v) for v, n in schema.labels).get("et")
    hint = f"; {schema.name} cases label ET as {et}" if et is not None else ""
    if schema.name == "brats2023":  # 2024+ releases name their files as 2023 does but label them otherwise
        hint += ("; a 2024+ release (2024 GLI, MET, PED, ...) names its files the same way: give its label schema "
                 "(data.schema, or schema= in Python, e.g. brats2024_gli)")
    return hint


def _check_labels(data: np.ndarray, schema: LabelSchema) -> np.ndarray:
    """Integer label map with only `schema`'s label values; raises _Problem."""
    return _check_allowed(data, schema.values, schema.name, et_hint(schema))


def schema_of(layout: Layout | str, schema: LabelSchema | str | None = None) -> LabelSchema:
    """The given schema, or the layout's own (brats2021 names: ET 4; brats2023 names: ET 3)."""
    if schema is not None:
        try:
            return resolve_schema(schema)
        except ValueError as e:
            raise BratsError(str(e)) from None
    return resolve_layout(layout).label_schema


def read_labels(path: str | Path, allowed: Sequence[int], name: str = "allowed", hint: str = ""
                ) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """(integer labels as in the file, affine, header) of a label map whose values must lie in `allowed` (0 included
    by the caller): the checks of `read_label_map` for any label set; `name` and `hint` go into the message.
    BratsError naming the file for a float map with non-integer values, values outside int16 or other labels."""
    path = Path(path)
    try:
        data, affine, header = _read(path)
        return _check_allowed(data, allowed, name, hint), affine, header
    except _Problem as e:
        raise BratsError(f"{path}: {e}") from e


def read_label_map(path: str | Path, layout: Layout | str, schema: LabelSchema | str | None = None
                   ) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """(internal classes uint8, affine, header) of a label map: THE reader every command uses for truth and
    predictions. BratsError naming the file for a float map with non-integer values, values outside int16 (which
    would wrap: 65540.0 -> 4), or labels outside the schema (default: the layout's)."""
    schema = schema_of(layout, schema)
    seg, affine, header = read_labels(path, schema.values, schema.name, et_hint(schema))
    return schema.to_classes(seg), affine, header


def _meta(affine: np.ndarray, shape: Sequence[int], header: nib.Nifti1Header, files: dict[str, Path]) -> dict:
    """The case geometry every consumer needs (JSON-ready): affine, shape, voxel spacing (mm) and source files."""
    return {
        "affine": np.asarray(affine).tolist(),
        "shape": [int(s) for s in shape],
        "spacing": [float(z) for z in header.get_zooms()[:3]],
        "files": {k: str(p) for k, p in files.items()},
    }


def _check_same_space(data: np.ndarray, affine: np.ndarray, ref_key: str, ref_shape: Sequence[int],
                      ref_affine: np.ndarray, atol: float) -> None:
    """Raises _Problem unless a volume lies on the grid of the case's first one (shape, affine within atol)."""
    if data.shape != tuple(ref_shape):
        raise _Problem(f"shape {tuple(data.shape)} differs from {ref_key} {tuple(ref_shape)}")
    if not np.allclose(affine, ref_affine, atol=atol):
        raise _Problem(f"affine differs from {ref_key} by up to {np.abs(affine - ref_affine).max():.4g} "
                       f"(tolerance {atol})")


def _check_image(key: str, data: np.ndarray) -> None:
    """Raises _Problem for an image with NaN/Inf voxels or nothing in it."""
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise _Problem(f"{int((~np.isfinite(data)).sum())} NaN or Inf voxels")
    if not np.any(data):
        raise _Problem(f"{key} image is all zero")


def check_images(case: str, images: Mapping[str, np.ndarray], affines: Mapping[str, np.ndarray],
                 atol: float = 1e-3) -> None:
    """The checks a case folder gets, for images given in memory: each 3D, finite, not all zero, and all on the first
    one's grid. BratsError: f"{case}: {modality}: {problem}"."""
    ref = next(iter(images))
    for key, data in images.items():
        try:
            if data.ndim != 3:
                raise _Problem(f"{data.ndim}D image of shape {tuple(data.shape)} where a 3D volume was expected")
            if key != ref:
                _check_same_space(data, affines[key], ref, images[ref].shape, affines[ref], atol)
            _check_image(key, data)
        except _Problem as e:
            raise BratsError(f"{case}: {key}: {e}") from e


def _check_case(files: CaseFiles, layout: Layout, atol: float, keep: Sequence[str], schema: LabelSchema
                ) -> tuple[dict, np.ndarray | None,
                                                                                             dict]:
    """Read every file of a case once, check all of it, keep the images in `keep` (float32)."""
    case = files.case
    entries = [*files.images.items(), *([("seg", files.seg)] if files.seg is not None else [])]
    ref_key, ref_shape, ref_affine, ref_header = None, None, None, None
    images: dict[str, np.ndarray] = {}
    seg = None
    volumes: dict[Path, tuple[np.ndarray, np.ndarray, nib.Nifti1Header]] = {}
    for key, path in entries:
        path = Path(path)
        try:
            ext = next((e for e in EXTENSIONS if path.name.endswith(e)), "")
            expected = layout.filename(case, key, ext)
            if path.name != expected:
                raise _Problem(f"file name does not match the case folder name (expected {expected})")
            if layout.channels and key != "seg":  # one 4D file holds every modality: read it once
                if path not in volumes:
                    volumes[path] = _read(path, channels=len(layout.channels))
                stack, affine, header = volumes[path]
                data = stack[..., layout.channels.index(key)]
            else:
                data, affine, header = _read(path)
            if ref_shape is None:
                ref_key, ref_shape, ref_affine, ref_header = key, data.shape, affine, header
            else:
                _check_same_space(data, affine, ref_key, ref_shape, ref_affine, atol)
            if key == "seg":
                seg = _check_labels(data, schema)
                continue
            _check_image(key, data)
            if key in keep:
                images[key] = data.astype(np.float32, copy=False)
        except _Problem as e:
            raise BratsError(f"{case}: {path.name}: {e}") from e
    return images, seg, _meta(ref_affine, ref_shape, ref_header, dict(entries))


def validate_case(files: CaseFiles, layout: Layout | str, atol: float = 1e-3, schema: LabelSchema | str | None = None
                  ) -> None:
    """Every modality present, same shape and affine (within atol), 3D, finite, not all-zero; seg integer-valued and
    within the layout's labels. BratsError: f"{case}: {file}: {problem}"."""
    _check_case(files, resolve_layout(layout), atol, keep=(), schema=schema_of(layout, schema))


def load_validated_case(files: CaseFiles, layout: Layout | str, modalities: Sequence[str], atol: float = 1e-3,
                        schema: LabelSchema | str | None = None
                        ) -> tuple[dict[str, np.ndarray], np.ndarray | None, dict]:
    """validate_case + read_case_files reading each file once (what the cache builder uses)."""
    return _check_case(files, resolve_layout(layout), atol, keep=tuple(modalities), schema=schema_of(layout, schema))


def read_case_files(files: CaseFiles, modalities: Sequence[str]
                    ) -> tuple[dict[str, np.ndarray], np.ndarray | None, dict]:
    """Images per modality (float32), seg as stored (integer), meta {affine, shape, spacing, files}. No deep checks."""
    images: dict[str, np.ndarray] = {}
    affine, header = None, None
    for mod in modalities:
        if mod not in files.images:
            raise BratsError(f"{files.case}: no {mod} image (have {sorted(files.images)})")
        data, aff, hdr = load_nifti(files.images[mod])
        images[mod] = data.astype(np.float32, copy=False)
        if affine is None:
            affine, header = aff, hdr
    seg = None
    if files.seg is not None:
        data, aff, hdr = load_nifti(files.seg)
        try:
            seg = _as_labels(data)
        except _Problem as e:
            raise BratsError(f"{files.case}: {files.seg.name}: {e}") from e
        if affine is None:
            affine, header = aff, hdr
    if affine is None:
        raise BratsError(f"{files.case}: nothing to load (no modalities requested and no seg)")
    shape = next(iter(images.values())).shape if images else seg.shape
    paths = {m: files.images[m] for m in modalities} | ({"seg": files.seg} if files.seg else {})
    return images, seg, _meta(affine, shape, header, paths)


def load_case(path: str | Path, layout: Layout | str | None = None, modalities: Sequence[str] = MODALITIES,
              schema: LabelSchema | str | None = None, *, labels: bool = True) -> Case:
    """One case folder, validated as brats-preprocess validates it (shapes, affines, NaNs, label values); the layout
    (file naming, ET label) is detected from the file names unless given. labels=False: the label map, if any, is
    neither read nor checked (what prediction needs)."""
    files, found = detect_case_files(path, modalities, layout)
    if not labels:
        files = CaseFiles(files.case, files.images, None)
    images, seg, meta = load_validated_case(files, found, modalities, schema=schema)
    header = nib.load(files.images[modalities[0]]).header
    return Case(files.case, images, np.asarray(meta["affine"]), header, found, seg)
