"""Training patches: where to cut them (with tumour oversampling), how to cut them, and in which order.

Pure numpy except `PatchSampler`, which only produces (case_index, sample_seed) pairs. Every random choice for one
training sample comes from `np.random.default_rng(sample_seed)`, so a sample is the same whatever worker loads it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence

import numpy as np
import torch


def random_patch_start(
    shape: Sequence[int],
    patch_size: Sequence[int],
    rng: np.random.Generator,
    center: Sequence[int] | None = None,
) -> tuple[int, ...]:
    """Uniform random patch origin; with `center`, only origins whose patch contains that voxel.

    On an axis shorter than the patch the start is negative (in [size - patch, 0]): the whole extent lies inside the
    patch and `crop_or_pad` fills the rest with zeros.
    """
    if len(shape) != len(patch_size):
        raise ValueError(f"volume shape {tuple(shape)} and patch size {tuple(patch_size)} differ in dimensions")
    if center is not None and (
        len(center) != len(shape) or any(not 0 <= c < s for c, s in zip(center, shape, strict=True))
    ):
        raise ValueError(f"center {tuple(center)} lies outside the volume of shape {tuple(shape)}")
    start = []
    for axis, (s, p) in enumerate(zip(shape, patch_size, strict=True)):
        lo, hi = min(0, s - p), max(0, s - p)
        if center is not None and s >= p:
            c = int(center[axis])
            lo, hi = max(lo, c - p + 1), min(hi, c)
        start.append(int(rng.integers(lo, hi + 1)))
    return tuple(start)


FOREGROUND_SAMPLING = ("voxel", "region")


def region_groups(coord_classes: np.ndarray, region_classes: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """For each region (its internal classes), the indices of the coordinates inside it; regions absent from the
    case are left out."""
    groups = [np.flatnonzero(np.isin(coord_classes, classes)) for classes in region_classes]
    return [g for g in groups if len(g)]


def choose_patch_start(
    shape: Sequence[int],
    patch_size: Sequence[int],
    rng: np.random.Generator,
    foreground_coords: np.ndarray | None,
    foreground_fraction: float,
    groups: Sequence[np.ndarray] | None = None,
) -> tuple[int, ...]:
    """nnU-Net-style oversampling: with probability `foreground_fraction` the patch contains a tumour voxel.

    Without `groups` ("voxel") that voxel is a random one of `foreground_coords`, so a region's share of forced patches
    is its share of the tumour: a small enhancing rim is seldom the centre. With `groups` ("region", nnU-Net's rule
    for region-based training) a random group (region present in the case) is chosen first, then a random voxel of it.
    nnU-Net forces the last ceil(fraction * batch) samples of every batch; here each sample decides on its own from
    its seed, so a sample does not depend on its position in a batch (the expected share is the same, the per-batch
    count varies). Cases without tumour voxels always get a uniform patch.
    """
    # Always draw, so the rest of the sample's random stream does not depend on the fraction.
    forced = rng.random() < foreground_fraction
    if forced and foreground_coords is not None and len(foreground_coords) > 0:
        if groups:
            members = groups[int(rng.integers(len(groups)))]
            center = foreground_coords[members[int(rng.integers(len(members)))]]
        else:
            center = foreground_coords[int(rng.integers(len(foreground_coords)))]
        return random_patch_start(shape, patch_size, rng, center=[int(c) for c in center])
    return random_patch_start(shape, patch_size, rng)


def crop_or_pad(
    x: np.ndarray, y: np.ndarray | None, start: Sequence[int], patch_size: Sequence[int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Cut x[:, start:start+patch] (and y[start:start+patch]); parts outside the volume are zero (label 0).

    Only the overlapping region is read, so on a memory-mapped volume this touches one patch worth of disk. Returns
    new arrays of the inputs' dtypes; the inputs are never modified.
    """
    spatial = x.shape[1:]
    if len(spatial) != len(patch_size) or len(start) != len(patch_size):
        raise ValueError(f"x of shape {x.shape} needs a start and patch size with {len(spatial)} entries")
    if y is not None and y.shape != spatial:
        raise ValueError(f"label shape {y.shape} does not match image shape {spatial}")
    src, dst = [], []
    for s, p, size in zip(start, patch_size, spatial, strict=True):
        a, b = max(s, 0), min(s + p, size)
        if b <= a:  # patch entirely outside the volume on this axis: all padding
            src.append(slice(0, 0))
            dst.append(slice(0, 0))
        else:
            src.append(slice(a, b))
            dst.append(slice(a - s, b - s))
    x_patch = np.zeros((x.shape[0], *patch_size), dtype=x.dtype)
    x_patch[(slice(None), *dst)] = x[(slice(None), *src)]
    if y is None:
        return x_patch, None
    y_patch = np.zeros(tuple(patch_size), dtype=y.dtype)
    y_patch[tuple(dst)] = y[tuple(src)]
    return x_patch, y_patch


def tumour_type(class_voxels: Mapping[str, int]) -> tuple[str, ...]:
    """A case's tumour type: the tumour classes its label map holds (the cache meta's `class_voxels`), background
    left out. ("ed", "ncr") is a non-enhancing tumour (no ET), ("ed", "et") a solid one, () a head without tumour."""
    return tuple(sorted(name for name, n in class_voxels.items() if name != "background" and int(n) > 0))


def case_weights(types: Sequence[Hashable], balance: float) -> np.ndarray:
    """Sampling probability per case: proportional to (number of cases of its type) ** -balance, summing to 1.

    balance 0: every case equally often (the default); 1: every tumour type equally often, however few its cases;
    in between, rare types are oversampled less than fully (0.5: a type of 1 case among 12 gets 1/(1 + sqrt(11)),
    23 % of the patches, instead of 8 %).
    """
    if not 0.0 <= balance <= 1.0:
        raise ValueError(f"case balance must be in [0, 1], got {balance}")
    if len(types) == 0:
        raise ValueError("no cases to weight")
    counts: dict[Hashable, int] = {}
    for t in types:
        counts[t] = counts.get(t, 0) + 1
    w = np.array([counts[t] ** -float(balance) for t in types], dtype=np.float64)
    return w / w.sum()


class PatchSampler(torch.utils.data.Sampler):
    """Yields `samples_per_epoch` pairs (case_index, sample_seed), a pure function of (seed, epoch).

    Cases come in a seeded permutation, repeated (each repeat freshly permuted) when there are more samples than
    cases, so every case is seen equally often. Lightning calls `set_epoch` at each epoch start (also through its
    DDP `DistributedSamplerWrapper`, which then shards this sequence), so a resumed run sees the same data.
    With `weights` (one probability per case, `case_weights`) cases are drawn with those probabilities instead.
    """

    def __init__(self, num_cases: int, samples_per_epoch: int, seed: int = 0,
                 weights: Sequence[float] | np.ndarray | None = None) -> None:
        if num_cases <= 0:
            raise ValueError(f"num_cases must be positive, got {num_cases}")
        if samples_per_epoch <= 0:
            raise ValueError(f"samples_per_epoch must be positive, got {samples_per_epoch}")
        self.num_cases = int(num_cases)
        self.samples_per_epoch = int(samples_per_epoch)
        self.seed = int(seed)
        self.epoch = 0
        self.weights = None
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (self.num_cases,) or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"weights must be {self.num_cases} non-negative numbers with a positive sum, got "
                                 f"{np.atleast_1d(w).tolist()}")
            self.weights = w / w.sum()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> list[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.weights is None:
            repeats = -(-self.samples_per_epoch // self.num_cases)
            order = np.concatenate([rng.permutation(self.num_cases) for _ in range(repeats)])[: self.samples_per_epoch]
        else:
            order = rng.choice(self.num_cases, size=self.samples_per_epoch, p=self.weights)
        seeds = rng.integers(0, 2**63 - 1, size=self.samples_per_epoch, dtype=np.int64)
        return [(int(c), int(s)) for c, s in zip(order, seeds, strict=True)]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.indices())

    def __len__(self) -> int:
        return self.samples_per_epoch
