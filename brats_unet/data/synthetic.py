"""Synthetic BraTS-like cases: a skull-stripped head with a glioma, four MRI sequences and a BraTS label map.

Real BraTS cannot be downloaded here, so demos and tests use these stand-ins. Anatomy is laid out in millimetres of
a full-size 240x240x155 grid and sampled at the requested shape, so a small shape is the same head at coarser
resolution (class shares are kept). Contrasts follow DESIGN.md: no single sequence separates every class.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from brats_unet.data.cases import resolve_layout
from brats_unet.data.labels import MODALITIES, SCHEMAS
from brats_unet.data.preprocess import nonzero_bbox
from brats_unet.utils import BratsError, atomic_path

FULL_SHAPE = (240, 240, 155)
TISSUES = ("background", "wm", "gm", "csf", "ed", "et", "ncr")  # tissue-map values 0..6
BG, WM, GM, CSF, ED, ET, NCR = range(7)
# Mean intensity relative to white matter, columns in MODALITIES order (t1, t1ce, t2, flair); rows WM..NCR.
CONTRAST = np.array(
    [
        [1.00, 1.00, 1.00, 1.00],  # wm
        [0.80, 0.84, 1.30, 1.12],  # gm
        [0.35, 0.38, 3.00, 0.45],  # csf
        [0.70, 0.74, 2.30, 2.10],  # ed
        [0.62, 1.70, 2.00, 1.85],  # et
        [0.45, 0.48, 2.70, 1.30],  # ncr
    ],
    dtype=np.float32,
)
_VERSION = "v1"  # bump when the generator changes, so old folders are not mistaken for complete new cases


def brats_affine(shape: Sequence[int] = FULL_SHAPE, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """BraTS-like voxel-to-world affine: diag(-1, -1, 1) * spacing with the y origin at the far edge (as in BraTS)."""
    affine = np.diag([-float(spacing[0]), -float(spacing[1]), float(spacing[2]), 1.0])
    affine[1, 3] = (shape[1] - 1) * float(spacing[1])
    return affine


def _smooth_field(rng: np.random.Generator, axes: Sequence[np.ndarray], corr_mm: float) -> np.ndarray:
    """Unit-variance smooth random field on the grid `axes` (mm): iid normals on knots `corr_mm` apart, summed with
    Gaussian weights. Separable, so it costs three matrix products instead of a full-size filter or zoom."""
    mats = []
    for a in axes:
        knots = np.arange(a[0] - 2 * corr_mm, a[-1] + 3 * corr_mm, corr_mm, dtype=np.float32)
        m = np.exp(-0.5 * ((a[:, None] - knots[None, :]) / corr_mm) ** 2).astype(np.float32)
        # Row-normalising each axis makes the variance exactly 1 everywhere (the weights are a product over axes).
        mats.append(m / np.sqrt((m**2).sum(axis=1, keepdims=True)))
    coarse = rng.standard_normal(tuple(m.shape[1] for m in mats), dtype=np.float32)
    # Contract one axis at a time as a single 2D product each (batched products are slow with threaded BLAS).
    (k0, k1, k2), (n0, n1, n2) = coarse.shape, (len(a) for a in axes)
    f = (coarse.reshape(k0 * k1, k2) @ mats[2].T).reshape(k0, k1, n2)
    f = (mats[1] @ f.transpose(1, 0, 2).reshape(k1, k0 * n2)).reshape(n1, k0, n2)
    f = np.ascontiguousarray(f.transpose(1, 0, 2)).reshape(k0, n1 * n2)
    return (mats[0] @ f).reshape(n0, n1, n2)


def _ellipsoid_r2(axes: Sequence[np.ndarray], centre: Sequence[float], semi: Sequence[float]) -> np.ndarray:
    x, y, z = ((a - c) / s for a, c, s in zip(axes, centre, semi, strict=True))
    return x[:, None, None] ** 2 + y[None, :, None] ** 2 + z[None, None, :] ** 2


def _box(centre: Sequence[float], half: Sequence[float], mm: np.ndarray, shape: Sequence[int]) -> tuple[slice, ...]:
    lo = [max(int(np.floor((c - h) / v)), 0) for c, h, v in zip(centre, half, mm, strict=True)]
    hi = [min(int(np.ceil((c + h) / v)) + 1, n) for c, h, v, n in zip(centre, half, mm, shape, strict=True)]
    return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))


def make_tissue(rng: np.random.Generator, shape: Sequence[int] = FULL_SHAPE) -> np.ndarray:
    """Tissue map (uint8, values index TISSUES): brain with WM/GM/CSF and one nested glioma (ED > ET rim > NCR)."""
    shape = tuple(int(n) for n in shape)
    mm = np.array(FULL_SHAPE, np.float32) / np.array(shape, np.float32)  # reference mm per voxel
    centre = np.array([120, 122, 75], np.float32) + rng.uniform(-4, 4, 3).astype(np.float32)
    semi = np.array([68, 84, 61], np.float32) * rng.uniform(0.92, 1.05, 3).astype(np.float32)
    box = _box(centre, semi * 1.2, mm, shape)
    axes = [((np.arange(s.start, s.stop) + 0.5) * v).astype(np.float32) for s, v in zip(box, mm, strict=True)]

    # Brain: a randomly warped ellipsoid; `depth` ~ mm below the brain surface drives the cortex and sulci.
    warp = 1 + 0.045 * _smooth_field(rng, axes, 28.0)
    r = np.sqrt(_ellipsoid_r2(axes, centre, semi)) * warp
    depth = (1 - r) * 70.0
    brain = depth > 0
    # Sulci are thin sheets at zero crossings of a smooth field; grey matter lines them and the outer surface.
    gyri = np.abs(_smooth_field(rng, axes, 4.0))
    sulcal_depth = 14 + 4 * _smooth_field(rng, axes, 20.0)
    in_sulcus = depth < sulcal_depth
    tissue = np.where(brain, WM, BG).astype(np.uint8)
    tissue[brain & ((depth < 4.0) | (in_sulcus & (gyri < 0.75)))] = GM
    for side in (-1, 1):  # deep grey matter (thalamus, basal ganglia) and lateral ventricles, bilateral
        for off, half in (((11, -6, -4), (9, 15, 10)), ((23, 10, 2), (6, 15, 11))):
            _paint_ellipsoid(tissue, axes, mm, warp, centre + [side * off[0], off[1], off[2]],
                             np.array(half) * rng.uniform(0.9, 1.1), GM)
    for side in (-1, 1):
        _paint_ellipsoid(tissue, axes, mm, warp**2, centre + [side * 8, 2, 10],
                         np.array([7, 26, 10]) * rng.uniform(0.8, 1.2), CSF)
    tissue[brain & ((depth < 1.2) | (in_sulcus & (gyri < 0.12)))] = CSF

    _add_tumour(rng, tissue, axes, mm, centre, semi)
    out = np.zeros(shape, np.uint8)
    out[box] = tissue
    return out


def _paint_ellipsoid(tissue: np.ndarray, axes: Sequence[np.ndarray], mm: np.ndarray, warp: np.ndarray,
                     centre: np.ndarray, semi: np.ndarray, label: int) -> None:
    """Set brain voxels inside a warped ellipsoid to `label`, touching only its bounding box (speed)."""
    origin = np.array([a[0] for a in axes], np.float32)
    box = _box(centre - origin, semi * 1.3, mm, tissue.shape)
    region = tissue[box]  # a view
    inside = _ellipsoid_r2([a[b] for a, b in zip(axes, box, strict=True)], centre, semi) * warp[box] < 1
    region[inside & (region > BG)] = label


def _add_tumour(rng: np.random.Generator, tissue: np.ndarray, axes: Sequence[np.ndarray], mm: np.ndarray,
                centre: np.ndarray, semi: np.ndarray) -> None:
    """Paint one glioma into `tissue` in place: oedema around an enhancing rim around a necrotic core."""
    while True:  # uniform point in the inner half of the brain ellipsoid
        v = rng.uniform(-1, 1, 3)
        if v @ v < 1:
            break
    c = centre + 0.45 * semi * v.astype(np.float32)
    radius = (3 * rng.uniform(45e3, 130e3) / (4 * np.pi)) ** (1 / 3)  # whole tumour ~45-130 cm3 before clipping
    origin = np.array([a[0] for a in axes], np.float32)  # mm of the crop's first voxel: local index = (p - origin)/mm
    box = _box(c - origin, [1.7 * radius] * 3, mm, tissue.shape)
    sub = [a[s] for a, s in zip(axes, box, strict=True)]
    dist = np.sqrt(_ellipsoid_r2(sub, c, [radius] * 3))  # in units of the tumour radius
    core_ratio = rng.uniform(0.62, 0.82)
    # Necrosis is usually a large share of the core, occasionally small or absent.
    ncr_ratio = rng.uniform(0.6, 0.82) if rng.random() < 0.85 else rng.uniform(0.0, 0.4)
    wt = dist * np.clip(1 + 0.2 * _smooth_field(rng, sub, 12.0), 0.6, None) < 1
    t_core = dist / core_ratio * np.clip(1 + 0.2 * _smooth_field(rng, sub, 8.0), 0.6, None)
    tc = t_core < 1
    ncr = (t_core < ncr_ratio * (1 + 0.1 * np.clip(_smooth_field(rng, sub, 6.0), -1.5, 1.5))) & ndi.binary_erosion(tc)
    region = tissue[box]  # a view: writes below go into `tissue`
    brain = region > BG
    region[brain & (wt | tc)] = ED
    region[brain & tc] = ET
    region[brain & ncr] = NCR


def tissue_to_seg(tissue: np.ndarray, et_label: int = 4) -> np.ndarray:
    """BraTS label map (uint8 {0, 1, 2, et_label}) from a tissue map."""
    lut = np.zeros(len(TISSUES), np.uint8)
    lut[ED], lut[ET], lut[NCR] = 2, et_label, 1
    return lut[tissue]


def render_images(rng: np.random.Generator, tissue: np.ndarray) -> dict[str, np.ndarray]:
    """int16 images per canonical modality: per-case contrasts, texture, partial-volume blur, bias and Rician noise."""
    shape = tissue.shape
    brain_full = tissue > BG
    box = tuple(slice(a, b) for a, b in nonzero_bbox([brain_full]))
    t = tissue[box]
    brain = t > BG
    mm = np.array(FULL_SHAPE, np.float32) / np.array(shape, np.float32)
    axes = [((np.arange(s.start, s.stop) + 0.5) * v).astype(np.float32) for s, v in zip(box, mm, strict=True)]
    contrast = CONTRAST * rng.uniform(0.88, 1.12, CONTRAST.shape).astype(np.float32)
    contrast[0] = 1.0  # intensities are relative to WM
    wm_level = rng.uniform(400, 1000, len(MODALITIES)).astype(np.float32)
    # Tissue texture, stronger in the (heterogeneous) tumour; shared by all sequences like real microstructure.
    texture = 1 + np.where(t >= ED, 0.07, 0.025).astype(np.float32) * _smooth_field(rng, axes, 2.5)
    images = {}
    for m, name in enumerate(MODALITIES):
        lut = np.concatenate([[0.0], contrast[:, m]]).astype(np.float32) * wm_level[m]
        img = lut[t] * texture
        img = ndi.gaussian_filter(img, 0.6, truncate=2.0)  # partial volume at the voxel scale (3-tap kernel)
        img *= np.exp(0.12 * _smooth_field(rng, axes, 70.0))  # scanner bias field
        values = img[brain]  # noise only where it is kept: outside the brain is zero (skull-stripped like BraTS)
        sigma = wm_level[m] * rng.uniform(0.02, 0.04)
        real = values + sigma * rng.standard_normal(values.shape, dtype=np.float32)
        imag = sigma * rng.standard_normal(values.shape, dtype=np.float32)
        values = np.sqrt(real * real + imag * imag)  # magnitude of complex Gaussian noise: Rician
        np.minimum(np.rint(values, out=values), np.iinfo(np.int16).max, out=values)
        crop = np.zeros(t.shape, np.int16)
        crop[brain] = values
        out = np.zeros(shape, np.int16)
        out[box] = crop
        images[name] = out
    return images


def physical_spacing(shape: Sequence[int]) -> list[float]:
    """Voxel size (mm) at which `shape` covers the 240 x 240 x 155 mm BraTS field of view."""
    return [full / n for full, n in zip(FULL_SHAPE, shape, strict=True)]


def make_case(
    rng: np.random.Generator, shape: Sequence[int] = FULL_SHAPE, spacing: Sequence[float] | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """One synthetic case: images (int16) per canonical modality, seg (uint8, BraTS 2021 labels {0,1,2,4}), affine.

    The head has the same physical size whatever `shape`; by default the affine's voxel size says so
    (240 / shape[0] mm ...), so a 120 x 120 x 78 case is the same head at 2 mm and HD95 stays in mm.
    """
    spacing = physical_spacing(shape) if spacing is None else spacing
    tissue = make_tissue(rng, shape)
    return render_images(rng, tissue), tissue_to_seg(tissue, 4), brats_affine(shape, spacing)


def case_name(layout: str, index: int) -> str:
    """Folder name of case `index` as the release names it (BraTS2021_00000, BraTS-GLI-00000-000)."""
    return f"BraTS2021_{index:05d}" if resolve_layout(layout).name == "brats2021" else f"BraTS-GLI-{index:05d}-000"


def case_rng(seed: int, index: int) -> np.random.Generator:
    """Generator of case `index`: a child seed of `seed`, so a case does not depend on how many are generated."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def _tag(seed: int, index: int) -> bytes:
    return f"brats-synth {_VERSION} seed={seed} case={index}".encode()


def _save(path: Path, data: np.ndarray, affine: np.ndarray, tag: bytes) -> None:
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = tag
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def _is_ours(path: Path, tag: bytes, shape: tuple[int, ...]) -> bool:
    """True if `path` is a NIfTI this generator wrote for the same seed, case and shape."""
    try:
        header = nib.load(path).header
    except Exception:  # anything unreadable is not ours; the caller names the folder
        return False
    return bytes(header["descrip"]).rstrip(b"\0") == tag and tuple(header.get_data_shape()) == shape


def _case_done(folder: Path, files: dict[str, Path], tag: bytes, shape: tuple[int, ...]) -> bool:
    """Whether the case folder already holds this exact case (seg is written last, so it marks completion).

    Our own leftovers from an interrupted run (temp files, some images without seg) are fine to replace; anything
    else in the folder is refused, since it may be real data.
    """
    ours = {p.name for p in files.values()}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".tmp-"):
            entry.unlink()  # stale temp file from a killed run: never a complete file
        elif entry.name not in ours or not _is_ours(entry, tag, shape):
            raise BratsError(
                f"case folder {folder} already holds {entry.name}, which is not this synthetic case "
                f"({tag.decode()}, shape {list(shape)}); pass overwrite (brats-synth --overwrite) to replace it, "
                "or choose another output folder"
            )
    return files["seg"].exists()


def _write_case(out: Path, layout: str, seed: int, index: int, shape: tuple[int, ...]) -> float:
    """Generate and save case `index` (images first, seg last: the seg file marks a complete case); returns seconds."""
    start = time.perf_counter()
    lay = resolve_layout(layout)
    name = case_name(layout, index)
    images, seg, affine = make_case(case_rng(seed, index), shape)
    for modality in MODALITIES:
        _save(out / name / lay.filename(name, modality), images[modality], affine, _tag(seed, index))
    seg = lay.label_schema.from_classes(SCHEMAS['brats2021'].to_classes(seg))
    _save(out / name / lay.filename(name, "seg"), seg, affine, _tag(seed, index))
    return time.perf_counter() - start


def write_dataset(
    out: str | Path,
    cases: int,
    seed: int,
    layout: str = "brats2021",
    shape: Sequence[int] = FULL_SHAPE,
    overwrite: bool = False,
    progress: bool = False,
    workers: int = 1,
) -> list[Path]:
    """Write `cases` synthetic cases in a BraTS layout under `out` (`workers` processes); returns the case folders.

    Re-running the same command skips finished cases (resumes after a kill); a folder holding anything else is
    refused unless `overwrite`.
    """
    lay = resolve_layout(layout)
    shape = tuple(int(n) for n in shape)
    if int(cases) < 1:
        raise BratsError(f"cases must be at least 1, got {cases}")
    if len(shape) != 3 or min(shape) < 16:
        raise BratsError(f"shape must be three sizes of at least 16 voxels, got {list(shape)}")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BratsError(f"cannot create output folder {out}: {e.strerror}") from e
    if not out.is_dir() or not os.access(out, os.W_OK):
        raise BratsError(f"output folder {out} is not a writable folder")

    def report(i: int, status: str) -> None:
        if progress:
            print(f"[{i + 1}/{cases}] {case_name(lay.name, i)}: {status}", flush=True)

    pending = []  # check every folder before writing anything, so a refusal comes first
    for i in range(int(cases)):
        name = case_name(lay.name, i)
        folder = out / name
        files = {key: folder / lay.filename(name, key) for key in (*MODALITIES, "seg")}
        if folder.exists() and not folder.is_dir():
            raise BratsError(f"{folder} exists and is not a case folder")
        if folder.is_dir() and not overwrite and _case_done(folder, files, _tag(seed, i), shape):
            report(i, "complete, skipped")
        else:
            pending.append(i)
    jobs = [(out, lay.name, seed, i, shape) for i in pending]
    if workers > 1 and len(pending) > 1:
        with ProcessPoolExecutor(min(workers, len(pending))) as pool:
            for i, seconds in zip(pending, pool.map(_write_case, *zip(*jobs, strict=True)), strict=True):
                report(i, f"written in {seconds:.1f} s")
    else:
        for job in jobs:
            report(job[3], f"written in {_write_case(*job):.1f} s")
    return [out / case_name(lay.name, i) for i in range(int(cases))]
