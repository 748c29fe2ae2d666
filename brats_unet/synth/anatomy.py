"""Healthy heads from real anatomy: the MNI152 2009 template's tissue maps placed in BraTS space, varied per case.

nilearn ships the ICBM152 2009 (symmetric, nonlinear) T1 template and its grey/white-matter probability maps inside
its wheel, so no network is needed. CSF is what the (skull-stripped) template's brain holds beyond grey and white
matter: ventricles, cisterns and sulci. Each case samples these maps through its own pose (size, rotation, shift), a
smooth random warp (asymmetry: no two heads alike) and, around each tumour, a mass effect that pushes tissue outwards.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from brats_unet.utils import BratsError

FULL_SHAPE = (240, 240, 155)
FULL_MM = np.array(FULL_SHAPE, np.float64)  # BraTS field of view in mm (1 mm voxels)
# Where the template brain's bounding-box centre lands, in mm from the corner of voxel 0 of the BraTS grid: like
# BraTS (SRI24 space), the brain sits centred left-right, a little posterior, and reaches down to the lowest slices.
HEAD_CENTRE_MM = np.array([120.0, 122.0, 75.0])
# The MNI152 template brain (~1.9 l with brainstem) is larger than a typical BraTS brain (~1.4 l): shrink it.
MEAN_SCALE = 0.9
HEALTHY = ("wm", "gm", "csf")  # channel order of the tissue maps


@dataclass(frozen=True)
class Atlas:
    """Template on its own 1 mm grid, axes flipped to the BraTS voxel order (left->right becomes right->left etc.)."""

    tissue: np.ndarray  # (3, X, Y, Z) float32 probabilities in HEALTHY order; 0 outside the brain
    t1: np.ndarray  # (X, Y, Z) float32 real T1 template scaled to 0..1 (skull-stripped)
    centre: np.ndarray  # voxel coordinates of the brain's bounding-box centre
    brain_z_mm: float  # z of the tentorium level relative to `centre` (tumours are placed above it)


TEMPLATE_FILES = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                  "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                  "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}


def _template_images() -> dict[str, nib.Nifti1Image]:
    """The 1 mm MNI152 2009 T1, GM and WM images that ship inside nilearn's wheel.

    `import nilearn.datasets` takes 3-10 s (it pulls in pandas, sklearn...), more than generating a case, so the
    files are read straight from nilearn's package folder; if a nilearn release moves them, nilearn's own loaders
    (`load_mni152_template` and friends) are used instead.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise BratsError("the synthetic generator needs nilearn (pip install nilearn) for the MNI152 template")
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    if all((folder / f).is_file() for f in TEMPLATE_FILES.values()):
        return {k: nib.load(folder / f) for k, f in TEMPLATE_FILES.items()}
    from nilearn.datasets import load_mni152_gm_template, load_mni152_template, load_mni152_wm_template

    return {"t1": load_mni152_template(resolution=1), "gm": load_mni152_gm_template(resolution=1),
            "wm": load_mni152_wm_template(resolution=1)}


@functools.lru_cache(maxsize=1)
def load_atlas() -> Atlas:
    """The MNI152 2009 template and tissue maps in BraTS axis order, cropped to the brain (read once per process)."""
    imgs = _template_images()
    for name, img in imgs.items():
        if img.shape != imgs["t1"].shape or not np.allclose(img.affine, imgs["t1"].affine) \
                or not np.allclose(img.affine[:3, :3], np.eye(3)):
            raise BratsError(f"nilearn's MNI152 {name} image is not on the template's 1 mm RAS grid "
                             f"(shape {img.shape}, affine {img.affine.tolist()})")
    # RAS voxel order -> BraTS (LPS: x runs right->left, y anterior->posterior): flip the first two axes.
    arr = {k: np.asarray(v.dataobj)[::-1, ::-1, :] for k, v in imgs.items()}
    t1 = arr["t1"].astype(np.float32) / max(float(arr["t1"].max()), 1e-6)
    brain = t1 > 0.2  # nilearn's load_mni152_brain_mask rule (the template is skull-stripped)
    lo, hi = np.zeros(3, int), np.zeros(3, int)
    for axis in range(3):  # bounding box from projections (cheaper than listing 2 million voxels)
        hit = np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))
        lo[axis], hi[axis] = hit[0], hit[-1]
    centre = (lo + hi) / 2.0
    lo, hi = np.maximum(lo - 4, 0), np.minimum(hi + 5, brain.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    brain = brain[crop]
    unit = {k: 255.0 if imgs[k].get_data_dtype() == np.uint8 else 1.0 for k in ("gm", "wm")}  # files: uint8 0..255
    gm, wm = (np.where(brain, np.clip(arr[k][crop] / np.float32(unit[k]), 0, 1), 0).astype(np.float32)
              for k in ("gm", "wm"))
    csf = np.where(brain, np.clip(1 - gm - wm, 0, 1), 0).astype(np.float32)
    centre = centre - lo
    # Just above the tentorium: MNI z = -5 mm, relative to the centre (the template's voxel 0 is at MNI z0).
    tentorium = -5 - imgs["t1"].affine[2, 3] - lo[2] - centre[2]
    return Atlas(np.ascontiguousarray(np.stack([wm, gm, csf])), np.ascontiguousarray(t1[crop]), centre,
                 float(tentorium))


@functools.lru_cache(maxsize=4)
def tissue_for_spacing(spacing: tuple[float, float, float]) -> np.ndarray:
    """Atlas tissue maps pre-blurred for sampling at `spacing` mm: a coarse voxel averages its footprint
    (partial volume) instead of aliasing thin sulci in or out."""
    tissue = load_atlas().tissue
    sigma = antialias_sigma(spacing)
    if max(sigma) < 0.2:
        return tissue
    return np.stack([ndi.gaussian_filter(t, sigma, truncate=3.0) for t in tissue])


def antialias_sigma(spacing: Sequence[float]) -> list[float]:
    """Gaussian sigma (atlas voxels) that averages the atlas over an output voxel of `spacing` mm."""
    return [0.4 * float(np.sqrt(max(s / MEAN_SCALE, 1.0) ** 2 - 1.0)) for s in spacing]


class SmoothField:
    """Unit-variance smooth random field over the BraTS field of view: iid normals on knots `corr_mm` apart, summed
    with Gaussian weights. Evaluated separably on any grid, so a coarse and a fine grid see the same field, and a
    full-size field costs three matrix products instead of a full-size filter."""

    def __init__(self, rng: np.random.Generator, corr_mm: float, axes: Sequence[np.ndarray] | None = None):
        """Knots over the whole field of view, or only over the span of `axes` (cheaper; then evaluate it there)."""
        self.corr = float(corr_mm)
        span = [(0.0, e) for e in FULL_MM] if axes is None else [(float(a[0]), float(a[-1])) for a in axes]
        self.knots = [np.arange(lo - 2 * self.corr, hi + 3 * self.corr, self.corr, dtype=np.float32)
                      for lo, hi in span]
        self.coef = rng.standard_normal(tuple(len(k) for k in self.knots), dtype=np.float32)

    def __call__(self, axes: Sequence[np.ndarray]) -> np.ndarray:
        mats = []
        for a, knots in zip(axes, self.knots, strict=True):
            m = np.exp(-0.5 * ((np.asarray(a, np.float32)[:, None] - knots[None, :]) / self.corr) ** 2)
            # Row-normalising each axis makes the variance exactly 1 everywhere (the weights are a product).
            mats.append((m / np.sqrt((m**2).sum(axis=1, keepdims=True))).astype(np.float32))
        (k0, k1, k2), (n0, n1, n2) = self.coef.shape, (len(a) for a in axes)
        # One axis at a time as a single 2D product each (batched products are slow with threaded BLAS).
        f = (self.coef.reshape(k0 * k1, k2) @ mats[2].T).reshape(k0, k1, n2)
        f = (mats[1] @ f.transpose(1, 0, 2).reshape(k1, k0 * n2)).reshape(n1, k0, n2)
        f = np.ascontiguousarray(f.transpose(1, 0, 2)).reshape(k0, n1 * n2)
        return (mats[0] @ f).reshape(n0, n1, n2)


def _rotation(angles: np.ndarray) -> np.ndarray:
    (ca, cb, cc), (sa, sb, sc) = np.cos(angles), np.sin(angles)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rz = np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _no_warp(axes: Sequence[np.ndarray]) -> np.ndarray:
    return np.zeros((1, 1, 1), np.float32)


@dataclass
class Pose:
    """How one head maps BraTS-grid millimetres to atlas voxels: atlas = centre + matrix @ (p - HEAD_CENTRE - shift)
    + warp(p). Drawn once per case, then evaluated on any grid."""

    matrix: np.ndarray
    shift: np.ndarray
    warp: list[SmoothField]
    warp_mm: float
    atrophy: float  # 0: template CSF; larger: wider sulci and ventricles (older brains)

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Pose:
        scale = MEAN_SCALE * rng.uniform(0.93, 1.05) * rng.uniform(0.96, 1.04, 3)
        angles = np.deg2rad(np.clip(rng.normal(0, 3.0, 3), -8, 8))  # registered to an atlas: small residual tilt
        matrix = _rotation(angles) @ np.diag(1 / scale)
        shift = rng.uniform(-3, 3, 3)
        warp = [SmoothField(rng, rng.uniform(25, 40)) for _ in range(3)]
        return cls(matrix, shift, warp, float(rng.uniform(1.5, 4.0)), float(rng.uniform(0, 0.7)))

    @classmethod
    def standard(cls) -> Pose:
        """The template itself at the mean size: no tilt, shift, warp or atrophy (to compare with the real T1)."""
        return cls(np.diag([1 / MEAN_SCALE] * 3), np.zeros(3), [_no_warp] * 3, 0.0, 0.0)


@dataclass(frozen=True)
class Push:
    """Mass effect of one lesion: tissue outside a ball of radius `radius` mm at `centre` moves out so that a ball of
    radius `volume_radius` mm appears at the centre (volume-preserving: r_source^3 = r^3 - volume_radius^3)."""

    centre: np.ndarray
    volume_radius: float


def atlas_coordinates(pose: Pose, axes: Sequence[np.ndarray], pushes: Sequence[Push] = ()) -> np.ndarray:
    """(3, nx, ny, nz) atlas voxel coordinates of the grid `axes` (mm in the BraTS grid)."""
    grids = np.meshgrid(*[np.asarray(a, np.float32) for a in axes], indexing="ij", sparse=True)
    p = [np.broadcast_to(g, tuple(len(a) for a in axes)).astype(np.float32) for g in grids]
    for push in pushes:  # pull sampling positions towards the lesion: its surroundings appear pushed away
        d = [p[i] - np.float32(push.centre[i]) for i in range(3)]
        r = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2) + np.float32(1e-3)
        factor = np.cbrt(np.maximum(r**3 - np.float32(push.volume_radius) ** 3, 0)) / r
        p = [np.float32(push.centre[i]) + d[i] * factor for i in range(3)]
    centre = load_atlas().centre
    origin = HEAD_CENTRE_MM + pose.shift
    out = np.empty((3, *p[0].shape), np.float32)
    for i in range(3):
        out[i] = centre[i] + sum(np.float32(pose.matrix[i, j]) * (p[j] - np.float32(origin[j])) for j in range(3))
        out[i] += np.float32(pose.warp_mm) * pose.warp[i](axes)
    return out


def sample_tissue(pose: Pose, axes: Sequence[np.ndarray], spacing: Sequence[float],
                  pushes: Sequence[Push] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Healthy tissue probabilities (3, nx, ny, nz) in HEALTHY order on the grid `axes`, and the atlas coordinates
    (3, nx, ny, nz) each voxel came from (for placing lesions by anatomy)."""
    coords = atlas_coordinates(pose, axes, pushes)
    atlas = tissue_for_spacing(tuple(round(float(s), 3) for s in spacing))
    probs = np.stack([ndi.map_coordinates(t, coords, order=1, cval=0.0, output=np.float32) for t in atlas])
    if pose.atrophy > 0:  # widen CSF spaces: a voxel that is partly CSF becomes more so, taken from GM and WM
        csf = probs[2]
        widened = np.minimum(csf * np.float32(1 + 1.5 * pose.atrophy), csf + probs[0] + probs[1])
        keep = np.where(csf < widened, (csf + probs[0] + probs[1] - widened) / np.maximum(probs[0] + probs[1],
                                                                                         1e-6), 1.0)
        probs[0] *= keep
        probs[1] *= keep
        probs[2] = widened
    return probs, coords


def grid_axes(shape: Sequence[int], box: Sequence[slice] | None = None) -> list[np.ndarray]:
    """Voxel-centre positions in mm (from the grid corner) of a `shape` grid covering the BraTS field of view."""
    mm = FULL_MM / np.array(shape, np.float64)
    box = box or [slice(0, n) for n in shape]
    return [((np.arange(s.start, s.stop) + 0.5) * v).astype(np.float32) for s, v in zip(box, mm, strict=True)]
