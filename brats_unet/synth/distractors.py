"""Bright healthy tissue that is not tumour (brats-synth --distractors), labelled background.

Real scans hold structures as bright as a tumour on one sequence: the choroid plexus, cortical veins and the dural
sinuses enhance on T1ce like an enhancing rim; periventricular caps and small-vessel white-matter hyperintensities
(Fazekas lesions) are bright on FLAIR and T2 like oedema. A model that only ever saw tumour brighter than everything
else labels them tumour on real heads. Each is drawn here from the head's own anatomy (ventricles, the brain's
surface, deep white matter), away from the lesions, with its own random stream so the rest of the case is unchanged.
Their contrasts are appearance.DISTRACTOR_CONTRAST.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from brats_unet.synth.anatomy import SmoothField

DISTRACTORS = ("none", "plexus", "vessel", "cap", "wmh")
NONE, PLEXUS, VESSEL, CAP, WMH = range(len(DISTRACTORS))
PRESENT = {PLEXUS: 0.9, VESSEL: 0.9, CAP: 0.6, WMH: 0.5}  # share of heads showing each kind


def _paint_ball(out: np.ndarray, code: int, allowed: np.ndarray, axes: Sequence[np.ndarray], centre: np.ndarray,
                radius: float) -> None:
    """out[ball & allowed] = code for a ball of `radius` mm at `centre` (mm), computed in its bounding box only."""
    box = tuple(slice(int(np.searchsorted(a, c - radius)), int(np.searchsorted(a, c + radius, side="right")))
                for a, c in zip(axes, centre, strict=True))
    sub = [a[s] - np.float32(c) for a, s, c in zip(axes, box, centre, strict=True)]
    ball = sub[0][:, None, None] ** 2 + sub[1][None, :, None] ** 2 + sub[2][None, None, :] ** 2 <= radius ** 2
    region = out[box]
    region[ball & allowed[box]] = code


def _centres(rng: np.random.Generator, where: np.ndarray, axes: Sequence[np.ndarray], n: int) -> list[np.ndarray]:
    idx = np.argwhere(where)
    if len(idx) == 0:
        return []
    return [np.array([a[k] for a, k in zip(axes, idx[rng.integers(len(idx))], strict=True)]) for _ in range(n)]


def draw_distractors(rng: np.random.Generator, probs: np.ndarray, lesions: np.ndarray, axes: Sequence[np.ndarray],
                     spacing: Sequence[float]) -> np.ndarray:
    """Distractor map (uint8, DISTRACTORS codes, 0 elsewhere) on the grid `axes` from the healthy tissue
    probabilities (3, ...: wm, gm, csf) and the lesion map (0 where healthy): never on a lesion voxel."""
    mm = np.asarray(spacing, np.float64)
    voxel = float(mm.max())
    brain = probs.sum(0) > 0.5
    healthy = brain & (lesions == 0)
    depth = ndi.distance_transform_edt(brain, sampling=mm)  # mm below the brain's surface
    wm, csf = probs[0], probs[2]
    ventricles = (csf > 0.6) & (depth > 10)  # deep CSF: the ventricles, not the sulci
    out = np.zeros(brain.shape, np.uint8)
    present = {code: rng.random() < share for code, share in PRESENT.items()}
    if present[CAP] and ventricles.any():  # caps and rims: white matter hugging the ventricles, patchy
        near = ndi.distance_transform_edt(~ventricles, sampling=mm) < max(rng.uniform(2.0, 5.0), 1.2 * voxel)
        patchy = SmoothField(rng, 15.0, axes)(axes) > 0.3
        out[near & ~ventricles & (wm > 0.4) & healthy & patchy] = CAP
    if present[WMH]:  # small round lesions in deep white matter
        for centre in _centres(rng, (wm > 0.7) & (depth > 15) & healthy, axes, int(rng.poisson(5))):
            _paint_ball(out, WMH, (wm > 0.4) & healthy, axes, centre, max(rng.uniform(1.5, 4.5), 0.6 * voxel))
    if present[VESSEL]:  # cortical veins: a smooth field's zero set cut by the brain's outer shell; the sinus
        shell = healthy & (depth < max(2.5, 1.2 * voxel))
        field, keep = SmoothField(rng, 10.0, axes)(axes), SmoothField(rng, 20.0, axes)(axes)
        out[shell & (np.abs(field) < 0.04) & (keep > 0)] = VESSEL
        columns = brain.sum(axis=(1, 2))
        midline = float(np.average(axes[0], weights=columns)) if columns.any() else float(np.mean(axes[0]))
        top = float(np.average(axes[2], weights=brain.sum(axis=(0, 1)))) if brain.any() else 0.0
        sinus = shell & (np.abs(axes[0] - midline)[:, None, None] < max(2.5, 0.6 * voxel)) & \
            (axes[2] > top)[None, None, :]
        out[sinus] = VESSEL  # the superior sagittal sinus along the top of the midline
    if present[PLEXUS]:  # tufts in the ventricles (atria, temporal horns)
        for centre in _centres(rng, ventricles, axes, int(rng.integers(2, 5))):
            _paint_ball(out, PLEXUS, (csf > 0.3) & healthy, axes, centre, max(rng.uniform(2.5, 5.0), 0.8 * voxel))
    return out
