"""Preprocessing recipes as pure functions on arrays: normalise, crop, stack channels, map labels.

seed   (the paper, 3.3.1): MinMax to [0, 1] per modality over the whole volume, fixed crop [56:184, 56:184, 13:141]
       to 128^3, channels T1ce, T2, FLAIR. The paper does not say over what MinMaxScaler was fitted; the tutorial it
       cites (DigitalSreeni) fits it on `volume.reshape(-1, depth)`, i.e. each axial slice separately: that is
       `normalize: minmax_slice`.
modern (NVIDIA nnU-Net for BraTS): crop to the non-zero box (union over modalities), z-score over brain voxels
       (non-zero in any modality), 0 outside the brain, all 4 modalities, optional brain-mask channel.
Normalisation always sees the whole volume, before cropping, so a crop never changes the statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from brats_unet.data.labels import LabelSchema, resolve_schema
from brats_unet.utils import BratsError

NORMALIZE = ("minmax", "minmax_slice", "zscore", "none")
CROPS = ("fixed", "nonzero", "none")


def minmax(x: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] over the whole array, as sklearn's MinMaxScaler on the flattened volume; constant -> zeros."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = x.min(), x.max()
    if hi == lo:
        return np.zeros(x.shape, dtype=np.float32)
    return ((x - lo) / (hi - lo)).astype(np.float32)


def minmax_slice(x: np.ndarray) -> np.ndarray:
    """Scale each axial slice x[:, :, k] to [0, 1] on its own; a constant slice -> zeros.

    What sklearn's MinMaxScaler does to `x.reshape(-1, x.shape[-1])` (one column per slice, as the tutorial the paper
    cites does), including its zero-range rule: (v - min) / 1 = 0.
    """
    x = np.asarray(x, dtype=np.float64)
    lo, hi = x.min(axis=(0, 1), keepdims=True), x.max(axis=(0, 1), keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    return ((x - lo) / span).astype(np.float32)


def zscore(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(x - mean) / std with mean and std over `mask`; 0 outside the mask. Constant or empty mask -> zeros."""
    x, mask = np.asarray(x, dtype=np.float64), np.asarray(mask, dtype=bool)
    out = np.zeros(x.shape, dtype=np.float32)
    if not mask.any():
        return out
    values = x[mask]
    mean, std = values.mean(), values.std()
    if std > 0:
        out[mask] = (values - mean) / std
    return out


def nonzero_bbox(images: Sequence[np.ndarray]) -> list[list[int]]:
    """Half-open box [[x0, x1], [y0, y1], [z0, z1]] around voxels non-zero in any image; all-zero -> whole volume."""
    mask = np.zeros(np.shape(images[0]), dtype=bool)
    for img in images:
        mask |= np.asarray(img) != 0
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append([int(hits[0]), int(hits[-1]) + 1] if hits.size else [0, int(mask.shape[axis])])
    return box


def _check_box(box: Sequence[Sequence[int]], shape: Sequence[int]) -> list[list[int]]:
    box = [[int(a), int(b)] for a, b in box]
    if len(box) != len(shape) or any(not 0 <= a < b <= s for (a, b), s in zip(box, shape, strict=False)):
        raise BratsError(f"crop box {box} does not fit inside the volume of shape {tuple(shape)} "
                         f"(config key preprocess.crop_box)")
    return box


def _crop(x: np.ndarray, box: Sequence[Sequence[int]]) -> np.ndarray:
    """Crop the last 3 axes."""
    (x0, x1), (y0, y1), (z0, z1) = box
    return x[..., x0:x1, y0:y1, z0:z1]


def undo_crop(cropped: np.ndarray, crop_box: Sequence[Sequence[int]], original_shape: Sequence[int],
              fill: float = 0) -> np.ndarray:
    """Put a cropped array (last 3 axes) back into a volume of `original_shape` filled with `fill`."""
    box = _check_box(crop_box, original_shape)
    size = tuple(b - a for a, b in box)
    if tuple(cropped.shape[-3:]) != size:
        raise ValueError(f"cropped array of shape {cropped.shape} does not match crop box {box} (size {size})")
    out = np.full((*cropped.shape[:-3], *(int(s) for s in original_shape)), fill, dtype=cropped.dtype)
    (x0, x1), (y0, y1), (z0, z1) = box
    out[..., x0:x1, y0:y1, z0:z1] = cropped
    return out


@dataclass(frozen=True)
class Recipe:
    """A preprocessing recipe (conf/preprocess/*.yaml), checked once where it is built: what the cache builder and
    brats-predict apply, and how many input channels the network gets."""

    name: str
    modalities: tuple[str, ...]
    normalize: str
    crop: str
    crop_box: tuple[tuple[int, int], ...] | None = None
    foreground_channel: bool = False
    dtype: str = "float32"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Recipe:
        missing = [k for k in ("name", "modalities", "normalize", "crop") if k not in config]
        if missing or not config.get("modalities"):
            raise BratsError(f"preprocess config needs 'name', 'modalities' (non-empty), 'normalize' and 'crop'; got "
                             f"{sorted(config)}")
        if config["normalize"] not in NORMALIZE:
            raise BratsError(f"unknown preprocess.normalize {config['normalize']!r}; choose one of {list(NORMALIZE)}")
        if config["crop"] not in CROPS:
            raise BratsError(f"unknown preprocess.crop {config['crop']!r}; choose one of {list(CROPS)}")
        box = config.get("crop_box")
        return cls(str(config["name"]), tuple(str(m) for m in config["modalities"]), str(config["normalize"]),
                   str(config["crop"]), tuple((int(a), int(b)) for a, b in box) if box is not None else None,
                   bool(config.get("foreground_channel", False)), str(config.get("dtype", "float32")))

    @property
    def num_channels(self) -> int:
        """Network input channels: the modalities, plus the optional brain-mask channel."""
        return len(self.modalities) + int(self.foreground_channel)

    def apply(self, images: dict[str, np.ndarray], seg: np.ndarray | None, schema: LabelSchema | str
              ) -> tuple[np.ndarray, np.ndarray | None, dict]:
        return preprocess_case(images, seg, modalities=self.modalities, normalize=self.normalize, crop=self.crop,
                               crop_box=self.crop_box, foreground_channel=self.foreground_channel, schema=schema)


def preprocess_case(images: dict[str, np.ndarray], seg: np.ndarray | None, *, modalities: Sequence[str],
                    normalize: str, crop: str, crop_box: Sequence[Sequence[int]] | None, foreground_channel: bool,
                    schema: LabelSchema | str) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """One case -> x (C, *cropped) float32, y (*cropped) uint8 internal classes (or None), meta to undo it."""
    if normalize not in NORMALIZE:
        raise BratsError(f"unknown preprocess.normalize {normalize!r}; choose one of {list(NORMALIZE)}")
    if crop not in CROPS:
        raise BratsError(f"unknown preprocess.crop {crop!r}; choose one of {list(CROPS)}")
    missing = [m for m in modalities if m not in images]
    if missing:
        raise BratsError(f"preprocess.modalities names {missing}, which the case does not have ({sorted(images)})")
    volumes = [np.asarray(images[m]) for m in modalities]
    shape = tuple(int(s) for s in volumes[0].shape)
    for m, v in zip(modalities, volumes, strict=True):
        if v.shape != shape:
            raise BratsError(f"modality {m} has shape {v.shape}, {modalities[0]} has {shape}")
    if seg is not None and tuple(seg.shape) != shape:
        raise BratsError(f"label map has shape {tuple(seg.shape)}, images have {shape}")

    brain = np.zeros(shape, dtype=bool)
    for v in volumes:
        brain |= v != 0

    stats: dict[str, dict[str, float]] = {}
    channels = []
    for m, v in zip(modalities, volumes, strict=True):
        if normalize == "minmax":
            stats[m] = {"min": float(v.min()), "max": float(v.max())}
            channels.append(minmax(v))
        elif normalize == "minmax_slice":
            stats[m] = {"min": float(v.min()), "max": float(v.max())}  # of the volume; each slice has its own
            channels.append(minmax_slice(v))
        elif normalize == "zscore":
            values = v[brain].astype(np.float64)
            stats[m] = {"mean": float(values.mean()), "std": float(values.std())} if values.size else {}
            channels.append(zscore(v, brain))
        else:
            channels.append(v.astype(np.float32))
    if foreground_channel:
        channels.append(brain.astype(np.float32))

    if crop == "fixed":
        if crop_box is None:
            raise BratsError("preprocess.crop is 'fixed' but preprocess.crop_box is not set")
        box = _check_box(crop_box, shape)
    elif crop == "nonzero":
        box = nonzero_bbox([brain])  # the same union of non-zero voxels the z-score used
    else:
        box = [[0, s] for s in shape]

    x = np.ascontiguousarray(_crop(np.stack(channels), box), dtype=np.float32)
    y = None
    if seg is not None:
        try:
            y = np.ascontiguousarray(_crop(resolve_schema(schema).to_classes(seg), box))
        except ValueError as e:
            raise BratsError(f"label map: {e}") from e
    meta = {
        "original_shape": list(shape),
        "crop": crop,
        "crop_box": box,
        "cropped_shape": [b - a for a, b in box],
        "modalities": list(modalities),
        "channels": list(modalities) + (["foreground"] if foreground_channel else []),
        "normalize": normalize,
        "norm_stats": stats,
        "foreground_channel": bool(foreground_channel),
        "schema": resolve_schema(schema).name,
    }
    return x, y, meta
