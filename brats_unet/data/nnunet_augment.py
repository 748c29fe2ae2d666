"""nnU-Net v2's training augmentation (nnUNetTrainer.get_training_transforms, batchgeneratorsv2), step by step, drawn
from the sample's own np.random.Generator so a sample is the same whichever worker makes it.

| step (config name)        | nnU-Net p    | what                                                             |
|---------------------------|--------------|------------------------------------------------------------------|
| spatial                   | 0.2 and 0.2  | rotate each axis U(-30, 30) deg; zoom U(0.7, 1.4); elastic off   |
| gaussian_noise            | 0.1          | sigma U(0, 0.1), one noise field for all channels                |
| blur                      | 0.2          | per channel p 0.5, sigma U(0.5, 1) per axis                      |
| multiplicative_brightness | 0.15         | per channel x * m, m from (0.75, 1.25)                           |
| contrast                  | 0.15         | per channel (x - mean) * c + mean, c from (0.75, 1.25), clipped  |
| low_resolution            | 0.25         | per channel p 0.5: down by U(0.5, 1) (nearest), up (trilinear)   |
| inverted_gamma            | 0.1          | per channel gamma from (0.7, 1.5) on -x, mean and std kept       |
| gamma                     | 0.3          | per channel gamma from (0.7, 1.5), mean and std kept             |
| flip (transforms.flip)    | 0.5 per axis | mirror, image and label together                                 |

"from (a, b)" is nnU-Net's BGContrast: half the draws below 1, half above. The resampling of the spatial step (linear
for the image, nearest for labels, so labels stay in the label set) and the elastic deformation are MONAI's
(`monai.transforms.Affine`, `Rand3DElastic`), imported on first use so commands that never augment do not pay
MONAI's import time; the intensity steps are a few array operations each, written here to nnU-Net's definitions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from brats_unet.utils import BratsError

Range = Sequence[float]
# The region cut for a rotated / zoomed patch is at most this many patch sizes per axis (nnU-Net's initial patch for
# its +-30 degree rotations is ~1.6x); what a larger zoom-out would reach beyond it is zeros, as nnU-Net pads.
MAX_INPUT_FACTOR = 1.6


@cache
def _monai() -> Any:
    try:
        from monai.transforms import Affine, Rand3DElastic
        from monai.transforms.utils import create_rotate, create_scale
    except ImportError as e:  # pragma: no cover - monai is a dependency
        raise BratsError("augment.spatial needs MONAI (pip install monai)") from e
    return Affine, Rand3DElastic, create_rotate, create_scale


def bg_factor(rng: np.random.Generator, low: float, high: float) -> float:
    """nnU-Net's BGContrast draw: with probability 1/2 U(low, 1) (if low < 1), else U(max(low, 1), high)."""
    if rng.random() < 0.5 and low < 1:
        return float(rng.uniform(low, 1.0))
    return float(rng.uniform(max(low, 1.0), high))


# ---- spatial ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpatialDraw:
    """One sample's spatial parameters: rotation angles (radians, per axis), zoom factor, elastic seed (or None)."""

    angles: tuple[float, ...] | None
    scale: float | None
    elastic_seed: int | None

    @property
    def resamples(self) -> bool:
        return self.angles is not None or self.scale is not None

    def matrix(self, ndim: int) -> np.ndarray:
        """The (ndim x ndim) map from output to input coordinates that monai.transforms.Affine applies."""
        _, _, create_rotate, create_scale = _monai()
        a = np.eye(ndim + 1)
        if self.angles is not None:
            a = a @ np.asarray(create_rotate(ndim, list(self.angles)))
        if self.scale is not None:
            a = a @ np.asarray(create_scale(ndim, [self.scale] * ndim))
        return a[:ndim, :ndim]

    def input_size(self, patch: Sequence[int]) -> tuple[int, ...]:
        """The region to cut so the transformed patch stays inside it (capped at MAX_INPUT_FACTOR x the patch);
        size - patch is even per axis, so the patch centre falls on a voxel centre."""
        if not self.resamples:
            return tuple(int(p) for p in patch)
        extent = np.abs(self.matrix(len(patch))) @ np.asarray(patch, dtype=np.float64)
        out = []
        for p, e in zip(patch, extent, strict=True):
            size = min(max(int(math.ceil(e)) + 2, p), int(math.ceil(MAX_INPUT_FACTOR * p)))
            out.append(size + (size - p) % 2)
        return tuple(out)


def draw_spatial(rng: np.random.Generator, p_rotation: float = 0.2, rotation: Range = (-30.0, 30.0),
                 p_scaling: float = 0.2, scaling: Range = (0.7, 1.4), p_elastic: float = 0.0, ndim: int = 3,
                 **_: Any) -> SpatialDraw | None:
    """Three gates (always drawn), then the parameters of the gates that opened; None when none did."""
    rotate, zoom, elastic = rng.random() < p_rotation, rng.random() < p_scaling, rng.random() < p_elastic
    angles = tuple(float(a) for a in np.deg2rad(rng.uniform(*rotation, size=ndim))) if rotate else None
    scale = float(rng.uniform(*scaling)) if zoom else None
    seed = int(rng.integers(2**31)) if elastic else None
    return SpatialDraw(angles, scale, seed) if rotate or zoom or elastic else None


def apply_spatial(x: np.ndarray, y: np.ndarray | None, draw: SpatialDraw, patch: Sequence[int],
                  elastic_sigma: Range = (5.0, 8.0), elastic_magnitude: Range = (100.0, 200.0), **_: Any
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """Resample x (C, *S) linearly and y (*S) by nearest neighbour onto the `patch` grid at the centre of S (rotation
    and zoom about the centre; outside S zeros), then the elastic deformation if drawn."""
    Affine, Rand3DElastic, _, _ = _monai()
    patch = tuple(int(p) for p in patch)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = None if y is None else torch.from_numpy(np.asarray(y, dtype=np.float32)[None])
    if draw.resamples or xt.shape[1:] != patch:
        kwargs = {"rotate_params": list(draw.angles) if draw.angles else None,
                  "scale_params": [draw.scale] * len(patch) if draw.scale else None,
                  "spatial_size": patch, "padding_mode": "zeros", "image_only": True}
        xt = torch.as_tensor(Affine(mode="bilinear", **kwargs)(xt))
        if yt is not None:
            yt = torch.as_tensor(Affine(mode="nearest", **kwargs)(yt))
    if draw.elastic_seed is not None:
        elastic = Rand3DElastic(sigma_range=tuple(elastic_sigma), magnitude_range=tuple(elastic_magnitude), prob=1.0,
                                padding_mode="zeros")
        elastic.set_random_state(seed=draw.elastic_seed)
        xt = torch.as_tensor(elastic(xt, mode="bilinear"))
        if yt is not None:
            yt = torch.as_tensor(elastic(yt, mode="nearest", randomize=False))
    xo = xt.numpy().astype(np.float32, copy=False)
    yo = None if yt is None else np.rint(yt.numpy()[0]).astype(y.dtype)
    return xo, yo


# ---- intensity: x (C, *S) float32 -> new array -------------------------------------------------------------------
def gaussian_noise(x: np.ndarray, rng: np.random.Generator, sigma: Range = (0.0, 0.1)) -> np.ndarray:
    """One noise field N(0, s), s ~ U(sigma), added to every channel (nnU-Net's synchronize_channels=True; its
    'noise_variance' is used as the standard deviation)."""
    s = rng.uniform(*sigma)
    field = rng.normal(0.0, s, size=x.shape[1:]).astype(np.float32)
    return (x + field[None]).astype(np.float32, copy=False)


def blur(x: np.ndarray, rng: np.random.Generator, sigma: Range = (0.5, 1.0), p_per_channel: float = 0.5
         ) -> np.ndarray:
    """Per channel with probability p_per_channel: Gaussian blur, sigma ~ U(sigma) drawn per axis."""
    out = x.copy()
    for c in range(x.shape[0]):
        if rng.random() < p_per_channel:
            out[c] = ndimage.gaussian_filter(x[c], rng.uniform(*sigma, size=x.ndim - 1), mode="nearest")
    return out


def multiplicative_brightness(x: np.ndarray, rng: np.random.Generator, multiplier: Range = (0.75, 1.25)
                              ) -> np.ndarray:
    """Per channel x * m, m from BGContrast(multiplier)."""
    m = np.array([bg_factor(rng, *multiplier) for _ in range(x.shape[0])], dtype=np.float32)
    return x * m.reshape(-1, *([1] * (x.ndim - 1)))


def contrast(x: np.ndarray, rng: np.random.Generator, factor: Range = (0.75, 1.25)) -> np.ndarray:
    """Per channel (x - mean) * c + mean, c from BGContrast(factor), clipped to the channel's former range."""
    out = np.empty_like(x)
    for ch in range(x.shape[0]):
        c = bg_factor(rng, *factor)
        v = x[ch]
        mean = float(v.mean())
        out[ch] = np.clip((v - mean) * c + mean, v.min(), v.max())
    return out


def low_resolution(x: np.ndarray, rng: np.random.Generator, scale: Range = (0.5, 1.0), p_per_channel: float = 0.5
                   ) -> np.ndarray:
    """Per channel with probability p_per_channel: downsample by s ~ U(scale) on every axis (nearest-exact), then
    back to the size (trilinear), as nnU-Net's SimulateLowResolutionTransform."""
    out = x.copy()
    shape = x.shape[1:]
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(shape)]
    for c in range(x.shape[0]):
        if rng.random() < p_per_channel:
            s = rng.uniform(*scale)
            small = [max(1, round(n * s)) for n in shape]
            v = torch.from_numpy(np.ascontiguousarray(x[c]))[None, None]
            down = F.interpolate(v, size=small, mode="nearest-exact")
            out[c] = F.interpolate(down, size=shape, mode=mode)[0, 0].numpy()
    return out


def _gamma(x: np.ndarray, rng: np.random.Generator, gamma: Range, invert: bool) -> np.ndarray:
    out = np.empty_like(x)
    for c in range(x.shape[0]):
        g = bg_factor(rng, *gamma)
        v = -x[c] if invert else x[c]
        mean, std = float(v.mean()), float(v.std())
        lo = float(v.min())
        span = max(float(v.max()) - lo, 1e-7)
        w = ((v - lo) / span) ** g * span + lo
        w = (w - w.mean()) * (std / max(float(w.std()), 1e-7)) + mean  # nnU-Net's retain_stats
        out[c] = -w if invert else w
    return out


def gamma(x: np.ndarray, rng: np.random.Generator, gamma: Range = (0.7, 1.5)) -> np.ndarray:
    """Per channel: min/max-rescale, power g from BGContrast(gamma), rescale back, restore mean and std."""
    return _gamma(x, rng, gamma, invert=False)


def inverted_gamma(x: np.ndarray, rng: np.random.Generator, gamma: Range = (0.7, 1.5)) -> np.ndarray:
    """`gamma` applied to -x (bright structures are compressed instead of dark ones)."""
    return _gamma(x, rng, gamma, invert=True)


# Config name -> (function, range keys, scalar keys besides p). Applied in this (nnU-Net's) order.
NNUNET_INTENSITY_STEPS = {
    "gaussian_noise": (gaussian_noise, ("sigma",), ()),
    "blur": (blur, ("sigma",), ("p_per_channel",)),
    "multiplicative_brightness": (multiplicative_brightness, ("multiplier",), ()),
    "contrast": (contrast, ("factor",), ()),
    "low_resolution": (low_resolution, ("scale",), ("p_per_channel",)),
    "inverted_gamma": (inverted_gamma, ("gamma",), ()),
    "gamma": (gamma, ("gamma",), ()),
}
SPATIAL_KEYS = (("rotation", "scaling", "elastic_sigma", "elastic_magnitude"), ("p_rotation", "p_scaling", "p_elastic"))
