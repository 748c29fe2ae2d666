"""MRI appearance of a synthetic head: tissue contrasts around DESIGN.md's table, randomised per case.

In the spirit of SynthSeg's domain randomisation, every case gets its own scanner: contrasts (+-15 % per tissue and
sequence), an intensity gamma, resolution (blur, sometimes thick slices along one axis), a smooth bias field and
Rician noise, so a model learns shapes and relations rather than one scanner's grey values. Healthy tissue mixes the
atlas probabilities (partial volume at every border); lesions are textured and oedema blends with what it invades.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from brats_unet.data.labels import MODALITIES
from brats_unet.synth.anatomy import SmoothField
from brats_unet.synth.distractors import DISTRACTORS
from brats_unet.synth.tumour import ED, NET, TISSUES

# Mean intensity relative to white matter, columns in MODALITIES order (t1, t1ce, t2, flair); rows TISSUES[1:].
CONTRAST = np.array(
    [
        [1.00, 1.00, 1.00, 1.00],  # wm
        [0.80, 0.84, 1.30, 1.12],  # gm
        [0.35, 0.38, 3.00, 0.45],  # csf
        [0.70, 0.74, 2.30, 2.10],  # ed
        [0.62, 1.70, 2.00, 1.85],  # et
        [0.45, 0.48, 2.70, 1.30],  # ncr
        [0.55, 0.58, 2.10, 1.70],  # net: non-enhancing tumour, T1-hypointense against oedema, bright on T2/FLAIR
        [0.33, 0.36, 3.00, 0.60],  # cavity: fluid like CSF, a little brighter on FLAIR (protein)
    ],
    dtype=np.float32,
)
assert CONTRAST.shape[0] == len(TISSUES) - 1
# Bright healthy tissue that is not tumour (synth/distractors.py), rows DISTRACTORS[1:], same columns. Enhancing ones
# sit at the enhancing tumour's 1.7 on T1ce, the FLAIR-bright ones a little below oedema's 2.1.
DISTRACTOR_CONTRAST = np.array(
    [
        [0.95, 1.70, 1.40, 1.05],  # choroid plexus: avid enhancement, ~1.6-1.8 x WM on T1ce
        [0.90, 1.90, 0.70, 0.80],  # veins and dural sinuses: enhancing blood on T1ce, flow void (dark) on T2
        [0.85, 0.88, 1.80, 1.60],  # periventricular caps: ~1.6 x WM on FLAIR, bright on T2, no enhancement
        [0.82, 0.86, 1.90, 1.70],  # small-vessel white-matter hyperintensities: as the caps, in deep white matter
    ],
    dtype=np.float32,
)
assert DISTRACTOR_CONTRAST.shape[0] == len(DISTRACTORS) - 1


def draw_distractor_contrast(rng: np.random.Generator) -> np.ndarray:
    """One case's distractor contrasts: the table with each entry varied by +-10 %."""
    return DISTRACTOR_CONTRAST * rng.uniform(0.9, 1.1, DISTRACTOR_CONTRAST.shape).astype(np.float32)


@dataclass
class Scanner:
    """One case's acquisition: per-sequence contrast table, gamma, blur (mm per axis), bias and noise levels."""

    contrast: np.ndarray  # (tissues, sequences), WM row = 1
    wm_level: np.ndarray  # stored intensity of white matter per sequence
    gamma: np.ndarray
    blur_mm: np.ndarray  # (sequences, 3) Gaussian sigma in mm
    bias: np.ndarray  # amplitude of log bias field per sequence
    bias_corr_mm: np.ndarray
    noise: np.ndarray  # Rician sigma relative to WM level

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Scanner:
        n = len(MODALITIES)
        contrast = CONTRAST * rng.uniform(0.85, 1.15, CONTRAST.shape).astype(np.float32)
        contrast[0] = 1.0
        blur = np.repeat(rng.uniform(0.2, 0.8, (n, 1)), 3, axis=1)
        for m in range(n):  # 2D acquisitions: thick slices along one axis, resampled to the grid
            if rng.random() < 0.25:
                blur[m, rng.integers(3)] = rng.uniform(3.0, 6.0) / 2.355
        return cls(contrast, rng.uniform(300, 1200, n).astype(np.float32), np.exp(rng.normal(0, 0.1, n)), blur,
                   rng.uniform(0.02, 0.25, n), rng.uniform(50, 90, n), rng.uniform(0.01, 0.05, n))


def render(rng: np.random.Generator, probs: np.ndarray, lesions: np.ndarray, axes: Sequence[np.ndarray],
           spacing: Sequence[float], scanner: Scanner | None = None, distractors: np.ndarray | None = None,
           distractor_contrast: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """int16 images per canonical modality on the grid `axes` from healthy tissue probabilities (3, ...) and a lesion
    tissue map (0 where healthy); zero outside the brain (skull-stripped, like BraTS). `distractors` (DISTRACTORS
    codes, 0 elsewhere) replace healthy tissue with `distractor_contrast`'s rows; they draw nothing from `rng`."""
    scanner = scanner or Scanner.draw(rng)
    total = probs.sum(0)
    brain = (total > 0.5) | (lesions > 0)
    frac = probs / np.maximum(total, 1e-3)
    # Microstructure texture, shared by all sequences; stronger in the (heterogeneous) lesions.
    texture = SmoothField(rng, 3.0, axes)(axes)
    in_lesion = lesions > 0
    # Lesion fields only over the lesions' bounding box (they are a few percent of the head).
    where = np.argwhere(in_lesion)
    lbox = tuple(slice(a, b + 1) for a, b in zip(where.min(0), where.max(0), strict=True)) if len(where) else \
        tuple(slice(0, 1) for _ in axes)
    laxes = [a[s] for a, s in zip(axes, lbox, strict=True)]
    lesion_texture = SmoothField(rng, 2.5, laxes)(laxes)[in_lesion[lbox]]
    # How completely oedema replaces the tissue it invades (its borders fade into white matter).
    ed_weight = np.clip(0.8 + 0.25 * SmoothField(rng, 6.0, laxes)(laxes), 0.35, 1.0)[in_lesion[lbox]]
    codes = lesions[in_lesion].astype(np.intp) - 1
    # Raters tell non-enhancing core from oedema by its T1 hypointensity and its inhomogeneity on T2/FLAIR (Menze et
    # al. 2015, the BraTS annotation protocol): that core is textured more than the other lesion tissues.
    texture_amp = np.where(codes == NET - 1, np.float32(0.2), np.float32(0.08))
    in_distractor = distractors > 0 if distractors is not None else None
    dcodes = distractors[in_distractor].astype(np.intp) - 1 if distractors is not None else None
    images = {}
    for m, name in enumerate(MODALITIES):
        c = scanner.contrast[:, m]
        img = (frac[0] * c[0] + frac[1] * c[1] + frac[2] * c[2]) * (1 + 0.03 * texture)
        healthy = img[in_lesion]
        values = c[codes] * (1 + texture_amp * lesion_texture)
        is_ed = codes == ED - 1
        w = ed_weight[is_ed]
        values[is_ed] = healthy[is_ed] * (1 - w) + values[is_ed] * w
        img[in_lesion] = values
        if in_distractor is not None:
            img[in_distractor] = distractor_contrast[dcodes, m] * (1 + 0.03 * texture[in_distractor])
        np.power(np.maximum(img, 0), np.float32(scanner.gamma[m]), out=img)
        img[~brain] = 0
        sigma = scanner.blur_mm[m] / np.asarray(spacing, np.float64)
        if sigma.max() > 0.3:  # partial volume at tissue borders and the sequence's own resolution
            img = ndi.gaussian_filter(img, np.where(sigma > 0.3, sigma, 0), truncate=2.5)
        img *= np.exp(np.float32(scanner.bias[m]) * SmoothField(rng, scanner.bias_corr_mm[m], axes)(axes))
        level = scanner.wm_level[m]
        values = img[brain] * level
        sd = np.float32(level * scanner.noise[m])
        real = values + sd * rng.standard_normal(values.shape, dtype=np.float32)
        imag = sd * rng.standard_normal(values.shape, dtype=np.float32)
        values = np.sqrt(real * real + imag * imag)  # magnitude of complex Gaussian noise: Rician
        np.minimum(np.rint(values, out=values), np.iinfo(np.int16).max, out=values)
        out = np.zeros(brain.shape, np.int16)
        out[brain] = values
        images[name] = out
    return images
