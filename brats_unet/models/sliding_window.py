"""Whole-volume inference: Gaussian-weighted sliding window, flip test-time augmentation (post-processing rules are in
inference/postprocess.py)."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Predictor = Callable[[Tensor], Tensor]


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = 0.125) -> Tensor:
    """nnU-Net's window weights: a Gaussian with sigma = patch * sigma_scale per axis, max 1, no zeros.

    Centred at (p - 1) / 2 (nnU-Net uses p // 2) so the map is mirror-symmetric and flip TTA sees the same weights.
    Zeros (underflow far from the centre) become the smallest non-zero value so every voxel keeps some weight.
    """
    patch = _patch(patch_size, len(patch_size))
    if not sigma_scale > 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    weights = torch.ones((), dtype=torch.float64)
    for axis, p in enumerate(patch):
        i = torch.arange(p, dtype=torch.float64)
        profile = torch.exp(-0.5 * ((i - (p - 1) / 2) / (p * sigma_scale)) ** 2)
        shape = [1] * len(patch)
        shape[axis] = p
        weights = weights * profile.reshape(shape)
    weights = (weights / weights.max()).float()
    zero = weights == 0
    if zero.any():
        weights[zero] = weights[~zero].min()
    return weights


@functools.lru_cache(maxsize=4)
def device_importance(patch: tuple[int, ...], device: torch.device) -> Tensor:
    """gaussian_importance(patch) as float32 on `device`, made once per patch and device rather than per case (at 128^3
    it is 8 MiB built in float64 and copied to the GPU). Shared: read it, never write to it."""
    return gaussian_importance(patch).to(device)


def sliding_window(
    image: Tensor,
    predictor: Predictor,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    window_batch: int = 1,
    gaussian: bool = True,
) -> Tensor:
    """Predict a whole (B, C, *S) volume from (n, C, *patch) -> (n, K, *patch) windows; returns (B, K, *S) float32.

    Windows are nnU-Net's: per axis ceil((size - patch) / (patch * (1 - overlap))) + 1 starts, evenly spaced so the
    first starts at 0 and the last ends at the border. Axes shorter than the patch are zero-padded (centred) and
    cropped back. Overlaps are averaged with the Gaussian (or uniform) weights, accumulated in float32 on the image's
    device. Gradients are not disabled here: wrap the call in torch.no_grad() / inference_mode().
    """
    if image.ndim < 3:
        raise ValueError(f"expected an image (B, C, *S), got shape {tuple(image.shape)}")
    spatial = tuple(image.shape[2:])
    patch = _patch(patch_size, len(spatial))
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if window_batch < 1:
        raise ValueError(f"window_batch must be >= 1, got {window_batch}")

    pads = [max(p - s, 0) for p, s in zip(patch, spatial, strict=True)]
    if any(pads):
        # F.pad lists (before, after) pairs from the LAST axis backwards.
        pad_arg = [n for pad in reversed(pads) for n in (pad // 2, pad - pad // 2)]
        image = F.pad(image, pad_arg)
    padded = tuple(image.shape[2:])
    device = image.device

    starts = [_window_starts(s, p, overlap) for s, p in zip(padded, patch, strict=True)]
    windows = [
        tuple(slice(a, a + p) for a, p in zip(corner, patch, strict=True)) for corner in itertools.product(*starts)
    ]
    weight = device_importance(patch, device) if gaussian else torch.ones(patch, device=device)
    weight_sum = torch.zeros(padded, dtype=torch.float32, device=device)
    for window in windows:  # identical for every case in the batch
        weight_sum[window] += weight

    output: Tensor | None = None
    jobs = [(b, window) for b in range(image.shape[0]) for window in windows]
    for first in range(0, len(jobs), window_batch):
        chunk = jobs[first : first + window_batch]
        pred = predictor(torch.stack([image[(b, slice(None), *window)] for b, window in chunk]))
        if not isinstance(pred, Tensor) or pred.ndim != len(patch) + 2 or pred.shape[0] != len(chunk):
            got = tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__
            raise ValueError(f"predictor must return ({len(chunk)}, K, *{patch}) for that input, got {got}")
        if tuple(pred.shape[2:]) != patch:
            raise ValueError(f"predictor changed the spatial shape: patch {patch} -> output {tuple(pred.shape[2:])}")
        if output is None:
            output = torch.zeros((image.shape[0], pred.shape[1], *padded), dtype=torch.float32, device=device)
        elif pred.shape[1] != output.shape[1]:
            raise ValueError(f"predictor returned {pred.shape[1]} channels, earlier windows {output.shape[1]}")
        pred = pred.to(device=device, dtype=torch.float32) * weight
        for (b, window), one in zip(chunk, pred, strict=True):
            output[(b, slice(None), *window)] += one
    assert output is not None  # at least one window always exists
    output /= weight_sum
    if any(pads):
        crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pads, spatial, strict=True))
        output = output[(slice(None), slice(None), *crop)]
    return output


def flip_tta(
    image: Tensor,
    predictor: Predictor,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    window_batch: int = 1,
    gaussian: bool = True,
    activation: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Mean of sliding-window predictions over all 2**D flip combinations of the D spatial axes (8 for 3D).

    `activation` (e.g. softmax) is applied to each flip's blended map before the mean: windows are then blended as
    logits, exactly as whole-volume validation does, and flips are averaged as probabilities.
    """
    spatial_dims = tuple(range(2, image.ndim))
    combos = [dims for r in range(len(spatial_dims) + 1) for dims in itertools.combinations(spatial_dims, r)]
    total: Tensor | None = None
    for dims in combos:
        flipped = image.flip(dims) if dims else image
        pred = sliding_window(flipped, predictor, patch_size, overlap, window_batch, gaussian)
        pred = activation(pred) if activation is not None else pred
        pred = pred.flip(dims) if dims else pred
        total = pred if total is None else total + pred
    assert total is not None
    return total / len(combos)


def _window_starts(size: int, patch: int, overlap: float) -> list[int]:
    if size <= patch:
        return [0]
    num = math.ceil((size - patch) / (patch * (1 - overlap))) + 1
    num = min(num, size - patch + 1)  # never two windows at the same start
    step = (size - patch) / (num - 1)
    return [int(round(step * i)) for i in range(num)]


def _patch(patch_size: Sequence[int], ndim: int) -> tuple[int, ...]:
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != ndim or any(p < 1 for p in patch):
        raise ValueError(f"patch_size must be {ndim} positive ints, got {tuple(patch_size)}")
    return patch
