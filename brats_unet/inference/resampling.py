"""Input at another voxel size, as nnU-Net handles it: a model learnt its sizes at the training spacing (recorded in
every checkpoint as `brats_spacing`, the training cases' median voxel size), so a case at another spacing is resampled
to it, predicted, and its probabilities resampled back to the case's own grid before decoding: the labels keep the
input's geometry exactly (shape, affine, header). Spacings that agree within SPACING_TOLERANCE are left alone."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

SPACING_TOLERANCE = 0.01  # 1%: header rounding (0.9999 mm) is not another voxel size


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float] | None,
                    tolerance: float = SPACING_TOLERANCE) -> tuple[int, ...] | None:
    """The shape of the case at the `target` spacing (the same field of view), or None when no resampling is due (no
    target recorded, or every axis within `tolerance`)."""
    if target is None:
        return None
    ratios = [float(s) / float(t) for s, t in zip(spacing, target, strict=True)]
    if all(abs(r - 1) <= tolerance for r in ratios):
        return None
    return tuple(max(1, round(n * r)) for n, r in zip(shape, ratios, strict=True))


def resample(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """(*S) or (C, *S) float -> the same on `shape`, trilinear over the same extent (voxel centres as align_corners
    False places them), float32."""
    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    batched = x[None] if x.ndim == 4 else x[None, None]
    with torch.inference_mode():
        out = F.interpolate(batched, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=False)
    return (out[0] if x.ndim == 4 else out[0, 0]).numpy()
