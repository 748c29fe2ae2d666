"""Training augmentations on numpy arrays: x float32 (C, *S), y (*S), and an np.random.Generator.

Pure functions; inputs are never modified. Intensity transforms treat a channel whose values all lie in [0, 1]
(the seed paper's MinMax data) in absolute terms, and any other channel (z-scored data) relative to its own range or
standard deviation, so one config works for both preprocessings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from brats_unet.data.nnunet_augment import (
    NNUNET_INTENSITY_STEPS,
    SPATIAL_KEYS,
    SpatialDraw,
    apply_spatial,
    draw_spatial,
)
from brats_unet.utils import BratsError

Range = Sequence[float]


def _in_unit_range(channel: np.ndarray) -> bool:
    return bool(channel.min() >= 0.0 and channel.max() <= 1.0)


def _per_channel(values: np.ndarray, ndim: int) -> np.ndarray:
    """Shape a (C,) vector to broadcast against (C, *S)."""
    return np.asarray(values, dtype=np.float32).reshape(-1, *([1] * (ndim - 1)))


def brightness(
    x: np.ndarray, rng: np.random.Generator, alpha: Range = (0.8, 1.2), gamma: Range = (0.8, 1.2)
) -> np.ndarray:
    """The seed paper's randomised gamma correction v' = a * v**g, a ~ U(alpha), g ~ U(gamma) (drawn in that order).

    One (a, g) per sample, shared by all channels, as the paper draws one per image. A channel in [0, 1] gets the
    exact formula; any other channel is min/max-rescaled to [0, 1], transformed and mapped back (nnU-Net's gamma).
    """
    a = rng.uniform(*alpha)
    g = rng.uniform(*gamma)
    out = np.empty(x.shape, dtype=np.float32)
    for c, v in enumerate(x):
        lo, hi = float(v.min()), float(v.max())
        if lo >= 0.0 and hi <= 1.0:
            out[c] = a * v**g
        elif hi > lo:
            out[c] = lo + a * ((v - lo) / (hi - lo)) ** g * (hi - lo)
        else:  # constant channel: no intensities to reshape
            out[c] = v
    return out


def flip(
    x: np.ndarray, y: np.ndarray | None, rng: np.random.Generator, p: float = 0.5
) -> tuple[np.ndarray, np.ndarray | None]:
    """Mirror each spatial axis independently with probability p, identically on image and label."""
    axes = [axis for axis in range(1, x.ndim) if rng.random() < p]  # one draw per axis, always
    if not axes:
        return x, y
    # Copies, not views: torch.from_numpy rejects negative strides.
    x = np.ascontiguousarray(np.flip(x, axis=axes))
    if y is not None:
        y = np.ascontiguousarray(np.flip(y, axis=[a - 1 for a in axes]))
    return x, y


def intensity(
    x: np.ndarray, rng: np.random.Generator, scale: Range = (0.9, 1.1), shift: Range = (-0.1, 0.1)
) -> np.ndarray:
    """Per channel: x * s + t * std(x), s ~ U(scale), t ~ U(shift) (all C scales drawn first, then all C shifts)."""
    s = rng.uniform(*scale, size=x.shape[0])
    t = rng.uniform(*shift, size=x.shape[0])
    std = x.reshape(x.shape[0], -1).std(axis=1)
    out = x * _per_channel(s, x.ndim) + _per_channel(t * std, x.ndim)
    return out.astype(np.float32, copy=False)


def noise(x: np.ndarray, rng: np.random.Generator, std: Range = (0.0, 0.1)) -> np.ndarray:
    """Additive Gaussian noise, sigma ~ U(std) once per sample: absolute on [0, 1] channels, else times the
    channel's standard deviation."""
    sigma = rng.uniform(*std)
    scales = [sigma if _in_unit_range(v) else sigma * float(v.std()) for v in x]
    n = rng.standard_normal(x.shape, dtype=np.float32)
    return (x + n * _per_channel(scales, x.ndim)).astype(np.float32, copy=False)


# Config name -> (function, keyword arguments it takes besides p). Applied in this order after the flip: the seed
# recipe's steps first, then nnU-Net's (data/nnunet_augment.py).
_INTENSITY_STEPS = {
    "intensity": (intensity, ("scale", "shift")),
    "brightness": (brightness, ("alpha", "gamma")),
    "noise": (noise, ("std",)),
    **{name: (fn, (*ranges, *scalars)) for name, (fn, ranges, scalars) in NNUNET_INTENSITY_STEPS.items()},
}
# Config name -> (range keys, probability keys) besides p.
_KNOWN = {
    "spatial": SPATIAL_KEYS,
    "flip": ((), ()),
    "intensity": (("scale", "shift"), ()),
    "brightness": (("alpha", "gamma"), ()),
    "noise": (("std",), ()),
    **{name: (ranges, scalars) for name, (_, ranges, scalars) in NNUNET_INTENSITY_STEPS.items()},
}


class Augment:
    """Callable (x, y, rng) -> (x, y): the spatial step (rotation / zoom / elastic), flip (per-axis probability p),
    then the intensity steps in `_INTENSITY_STEPS` order, each applied with its probability p. Picklable, so
    DataLoader workers can use it under any start method.

    `intensity_channels`: only the first k channels are image intensities (a trailing brain-mask channel is only
    flipped and resampled); None means all. Label maps are resampled by nearest neighbour, so they keep their values.
    """

    def __init__(self, steps: Mapping[str, Mapping], intensity_channels: int | None = None) -> None:
        self.steps = {name: dict(step) for name, step in steps.items() if _active(name, step)}
        self.intensity_channels = intensity_channels

    @property
    def is_identity(self) -> bool:
        return not self.steps

    def draw_spatial(self, rng: np.random.Generator, ndim: int = 3) -> SpatialDraw | None:
        """The spatial step's parameters for one sample (None: no resampling); draws nothing without the step.
        A caller that cuts patches (PatchDataset) draws first to cut the larger region `input_size` asks for."""
        step = self.steps.get("spatial")
        if step is None or rng.random() >= step["p"]:
            return None
        return draw_spatial(rng, ndim=ndim, **step)

    def __call__(
        self, x: np.ndarray, y: np.ndarray | None, rng: np.random.Generator,
        spatial: SpatialDraw | None | bool = True, patch_size: tuple[int, ...] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """`spatial`: True draws the spatial step here (output the input's size); a SpatialDraw (or None) is one the
        caller drew with `draw_spatial`, `x` then being its `input_size` region around the `patch_size` patch."""
        if spatial is True:
            spatial = self.draw_spatial(rng, ndim=x.ndim - 1)
        patch = tuple(patch_size) if patch_size is not None else tuple(x.shape[1:])
        if spatial is not None:
            x, y = apply_spatial(x, y, spatial, patch, **self.steps["spatial"])
        if "flip" in self.steps:
            x, y = flip(x, y, rng, p=self.steps["flip"]["p"])
        k = x.shape[0] if self.intensity_channels is None else self.intensity_channels
        for name, (fn, keys) in _INTENSITY_STEPS.items():
            step = self.steps.get(name)
            if step is None or rng.random() >= step["p"]:
                continue
            changed = fn(x[:k], rng, **{key: step[key] for key in keys if key in step})
            x = changed if k == x.shape[0] else np.concatenate([changed, x[k:]])
        return x, y


def _active(name: str, step: Mapping) -> bool:
    """A step runs when its p is > 0 (the spatial step also needs one of its p_* > 0; absent ones keep their
    nnU-Net defaults, 0.2 for rotation and scaling)."""
    if step.get("p", 0.0) <= 0.0:
        return False
    return name != "spatial" or any(step.get(k, 1.0) > 0.0 for k in SPATIAL_KEYS[1])


def build_augment(cfg: Mapping, intensity_channels: int | None = None) -> Augment:
    """Augmentation from a mapping like conf/augment/none.yaml: {name: {p: ..., <range>: [lo, hi]}}."""
    steps = {}
    for name, step in cfg.items():
        if name not in _KNOWN:
            raise BratsError(f"augment.{name}: unknown augmentation; choose from {sorted(_KNOWN)}")
        if not isinstance(step, Mapping):
            raise BratsError(f"augment.{name}: expected a mapping like {{p: 0.5}}, got {step!r}")
        ranges, probabilities = _KNOWN[name]
        unknown = set(step) - {"p", *ranges, *probabilities}
        if unknown:
            raise BratsError(f"augment.{name}: unknown keys {sorted(unknown)}; allowed "
                             f"{', '.join(['p', *ranges, *probabilities])}")
        clean = {}
        for key in ("p", *(k for k in probabilities if k in step)):  # an absent p_* keeps the step's default
            p = step.get(key, 0.0)
            if not isinstance(p, int | float) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
                raise BratsError(f"augment.{name}.{key} must be a probability in [0, 1], got {p!r}")
            clean[key] = float(p)
        for key in ranges:
            if key in step:
                lo_hi = step[key]
                if (
                    isinstance(lo_hi, str)
                    or not isinstance(lo_hi, Sequence)
                    or len(lo_hi) != 2
                    or not all(isinstance(v, int | float) for v in lo_hi)
                    or not lo_hi[0] <= lo_hi[1]
                ):
                    raise BratsError(f"augment.{name}.{key} must be a range [low, high], low <= high; got {lo_hi!r}")
                clean[key] = (float(lo_hi[0]), float(lo_hi[1]))
        steps[name] = clean
    return Augment(steps, intensity_channels)
