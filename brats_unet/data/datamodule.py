"""LightningDataModule: cache → split → patch datasets (train) and whole-volume datasets (val/test).

`prepare_data` fills the preprocessing cache (rank 0 only); `setup` splits the cached cases with a seed, writes
`<output_dir>/split.json` and re-uses it on resume. Training samples come from `PatchSampler` as
(case_index, sample_seed): every random choice of a sample derives from its seed, so batches do not depend on
`num_workers` or on which worker loads them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from brats_unet.data import cache
from brats_unet.data.cases import schema_of
from brats_unet.data.discovery import list_case_dirs
from brats_unet.data.preprocess import Recipe
from brats_unet.data.sampling import PatchSampler, case_weights, choose_patch_start, crop_or_pad, tumour_type
from brats_unet.data.split import load_split, make_split
from brats_unet.data.transforms import Augment, build_augment
from brats_unet.utils import BratsError, atomic_write_json

log = logging.getLogger(__name__)


def steps_per_epoch(num_train_cases: int, batch_size: int, steps: int | None = None, world_size: int = 1) -> int:
    """Optimiser steps in one training epoch (per device under DDP).

    `steps` (data.steps_per_epoch) wins when set; null means the paper's rule (3.3.7), training scans / batch size
    rounded down like Keras (100 / 2 = 50, 50 / 2 = 25), at least 1. Under DDP the sampler's patches are shared out
    between the ranks (the last rank padded), and each rank drops its incomplete batch.
    """
    samples = steps * batch_size if steps else max(num_train_cases, batch_size)
    return max(1, -(-samples // world_size) // batch_size)


class _CachedCases:
    """Per-process memory-mapped handles to cached cases, opened lazily (each DataLoader worker opens its own)."""

    def __init__(self, cache_dir: Path, cases: Sequence[str]) -> None:
        self.cache_dir = cache_dir
        self.cases = list(cases)
        self._open: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, list[float]]] = {}

    def __len__(self) -> int:
        return len(self.cases)

    def __getstate__(self) -> dict:  # workers start with no handles instead of pickling memmaps
        return {**self.__dict__, "_open": {}}

    def get(self, index: int) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, list[float]]:
        case = self.cases[index]
        if case not in self._open:
            x, y, meta = cache.load_cached(self.cache_dir, case, mmap=True)
            # int16 array instead of the json list: ~60 KB per case instead of MBs of Python ints per worker.
            coords = np.asarray(meta.get("foreground_coords_sample", []), dtype=np.int16).reshape(-1, 3)
            spacing = [float(s) for s in meta.get("spacing", (1.0, 1.0, 1.0))]
            self._open[case] = (x, y, coords, spacing)
        return (case, *self._open[case])


class PatchDataset(Dataset):
    """Training item (case_index, sample_seed) → {"image": (C,*patch) float32, "label": (*patch) int64, "case"}."""

    def __init__(
        self, cases: _CachedCases, patch_size: Sequence[int], foreground_fraction: float, augment: Augment
    ) -> None:
        self.cases, self.patch_size = cases, tuple(patch_size)
        self.foreground_fraction, self.augment = foreground_fraction, augment

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, sample_seed = key
        case, x, y, coords, _ = self.cases.get(index)
        rng = np.random.default_rng(sample_seed)  # one stream: patch position, then augmentation
        start = choose_patch_start(y.shape, self.patch_size, rng, coords, self.foreground_fraction)
        xp, yp = crop_or_pad(x, y, start, self.patch_size)
        xp, yp = self.augment(xp.astype(np.float32, copy=False), yp, rng)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(xp, dtype=np.float32)),
            "label": torch.from_numpy(np.ascontiguousarray(yp, dtype=np.int64)),
            "case": case,
        }


class VolumeDataset(Dataset):
    """Whole cached volumes: {"image": (C,*S) float32, "label": (*S) int64, "spacing": (3,) float64, "case"}."""

    def __init__(self, cases: _CachedCases) -> None:
        self.cases = cases

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case, x, y, _, spacing = self.cases.get(index)
        return {
            "image": torch.from_numpy(np.array(x, dtype=np.float32)),
            "label": torch.from_numpy(np.array(y, dtype=np.int64)),
            "spacing": torch.tensor(spacing, dtype=torch.float64),
            "case": case,
        }


class BratsDataModule(L.LightningDataModule):
    """BraTS cases from a preprocessing cache. Arguments are the keys of conf/data/brats2021.yaml, plus the run
    directory (`output_dir`, where split.json goes) and the run `seed` (patch order and augmentation)."""

    def __init__(
        self,
        root: str | Path,
        layout: str,
        cache_dir: str | Path,
        preprocess: Mapping | DictConfig,
        schema: str | None = None,
        modalities: Sequence[str] | None = None,
        augment: Mapping | DictConfig | None = None,
        patch_size: Sequence[int] = (128, 128, 128),
        batch_size: int = 2,
        num_workers: int = 2,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        train_cases: int | None = None,
        val_cases: int | None = None,
        num_folds: int = 1,
        fold: int = 0,
        split_seed: int = 0,
        split_file: str | Path | None = None,
        foreground_fraction: float = 0.33,
        steps_per_epoch: int | None = None,
        case_balance: float = 0.0,
        skip_bad_cases: bool = False,
        output_dir: str | Path | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        patch = list(patch_size) if isinstance(patch_size, Sequence | np.ndarray) else []
        if len(patch) != 3 or not all(
            isinstance(p, int | np.integer) and not isinstance(p, bool) and p > 0 for p in patch
        ):
            raise BratsError(f"data.patch_size must be 3 positive integers (x, y, z), got {patch_size!r}")
        if batch_size <= 0:
            raise BratsError(f"data.batch_size must be positive, got {batch_size}")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise BratsError(f"data.foreground_fraction must be in [0, 1], got {foreground_fraction}")
        if steps_per_epoch is not None and steps_per_epoch <= 0:
            raise BratsError(f"data.steps_per_epoch must be positive or null, got {steps_per_epoch}")
        if isinstance(case_balance, bool) or not isinstance(case_balance, int | float) or not 0 <= case_balance <= 1:
            raise BratsError(f"data.case_balance must be a number in [0, 1], got {case_balance!r}")
        self.root, self.layout, self.cache_dir = Path(root), layout, Path(cache_dir)
        self.preprocess, self.augment_cfg = cache.to_plain(preprocess), cache.to_plain(augment or {})
        self.recipe = Recipe.from_config(self.preprocess)
        self.schema = schema_of(layout, schema)
        absent = [m for m in self.recipe.modalities if modalities is not None and m not in modalities]
        if absent:
            raise BratsError(f"preprocess.modalities {list(self.recipe.modalities)} asks for {absent}, which this "
                             f"dataset does not have (data.modalities {list(modalities)}): set preprocess.modalities")
        self.patch_size = tuple(int(p) for p in patch)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.split_args = {
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "train_cases": train_cases,
            "val_cases": val_cases,
            "num_folds": num_folds,
            "fold": fold,
            "seed": split_seed,
        }
        self.split_file = Path(split_file) if split_file else None
        self.foreground_fraction, self.steps_per_epoch = foreground_fraction, steps_per_epoch
        self.case_balance = float(case_balance)
        self.skip_bad_cases = skip_bad_cases
        self.output_dir = Path(output_dir) if output_dir else None
        self.seed = int(seed)
        self.augment = build_augment(self.augment_cfg, intensity_channels=len(self.preprocess["modalities"]))
        self.split: dict[str, Any] | None = None

    @property
    def num_channels(self) -> int:
        return self.recipe.num_channels

    @property
    def cache_path(self) -> Path:
        return cache.cache_path(self.cache_dir, self.layout, self.root, self.preprocess, self.schema.name)

    def prepare_data(self) -> None:
        path = self.cache_path
        done = set(cache.cached_cases(path))
        if not self.root.is_dir() and done:  # e.g. only the cache was copied to a compute node
            log.warning("data root %s not found; using the %d cases already in %s", self.root, len(done), path)
            return
        bad_file = path / "bad_cases.json"
        if self.skip_bad_cases and bad_file.is_file():  # known-bad cases are not "missing": don't re-check each run
            done |= {b["case"] for b in json.loads(bad_file.read_text())}
        if {d.name for d in list_case_dirs(self.root, self.layout)} - done:
            cache.build_cache(
                self.root,
                self.layout,
                self.cache_dir,
                self.preprocess,
                num_workers=max(1, self.num_workers),
                skip_bad_cases=self.skip_bad_cases,
                schema=self.schema.name,
            )

    def _make_or_load_split(self) -> dict[str, Any]:
        cached = cache.cached_cases(self.cache_path)
        if not cached:
            raise BratsError(
                f"the cache {self.cache_path} holds no cases; check data.root ({self.root}) or run "
                "brats-preprocess first"
            )
        own = self.output_dir / "split.json" if self.output_dir else None
        if own is not None and own.is_file():  # resume: the run's own split wins
            split = load_split(own, cached=cached, cache_path=self.cache_path)
            if self.split_file and load_split(self.split_file, cached=cached)["train"] != split["train"]:
                raise BratsError(f"data.split_file {self.split_file} differs from this run's {own}")
            return split
        if self.split_file:
            split = load_split(self.split_file, cached=cached, cache_path=self.cache_path)
        else:
            split = make_split(cached, **self.split_args)
        if own is not None:
            atomic_write_json(own, split)
        return split

    def setup(self, stage: str | None = None) -> None:
        if self.split is None:
            self.split = self._make_or_load_split()
            log.info("split: %d train, %d val, %d test cases", *(len(self.split[k]) for k in ("train", "val", "test")))
        path = self.cache_path
        self.train_set = PatchDataset(
            _CachedCases(path, self.split["train"]), self.patch_size, self.foreground_fraction, self.augment
        )
        self.val_set = VolumeDataset(_CachedCases(path, self.split["val"]))
        self.test_set = VolumeDataset(_CachedCases(path, self.split["test"]))

    def training_spacing(self) -> list[float] | None:
        """The training cases' median voxel size (mm, per array axis) from the cache's meta: the sizes the model
        learns at, recorded in its checkpoints so prediction can resample other spacings to it."""
        if self.split is None or not self.split["train"]:
            return None
        train = tuple(self.split["train"])
        if getattr(self, "_spacing", (None, None))[0] != train:  # once per split: every checkpoint asks
            spacings = [cache.load_cached(self.cache_path, case, mmap=True)[2].get("spacing") for case in train]
            spacings = [s for s in spacings if s is not None]
            median = np.median(np.asarray(spacings, dtype=np.float64), axis=0) if spacings else None
            self._spacing = (train, None if median is None else [float(v) for v in median])
        return self._spacing[1]

    def case_weights(self) -> np.ndarray | None:
        """Per training case, the probability of drawing it (data.case_balance > 0: rare tumour types, e.g. those
        without enhancing tumour, oversampled; types from the cache meta's class counts); None: uniform."""
        if self.case_balance == 0 or self.split is None:
            return None
        types = [tumour_type(cache.load_cached(self.cache_path, case, mmap=True)[2].get("class_voxels", {}))
                 for case in self.split["train"]]
        weights = case_weights(types, self.case_balance)
        log.info("case sampling (data.case_balance=%g): %s", self.case_balance,
                 ", ".join(f"{'+'.join(t) or 'none'} {weights[[u == t for u in types]].sum():.0%}"
                           for t in sorted(set(types))))
        return weights

    @property
    def samples_per_epoch(self) -> int:
        if self.steps_per_epoch:
            return self.steps_per_epoch * self.batch_size
        return max(len(self.train_set), self.batch_size)

    def _loader(self, dataset: Dataset, batch_size: int, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        world = self.trainer.world_size if self.trainer is not None else 1
        steps = steps_per_epoch(len(self.train_set), self.batch_size, self.steps_per_epoch, world)
        rule = (f"data.steps_per_epoch={self.steps_per_epoch}" if self.steps_per_epoch else
                f"data.steps_per_epoch=null: {len(self.train_set)} training cases / batch size {self.batch_size}")
        log.info("steps per epoch: %d (%s%s)", steps, rule, f", per device of {world}" if world > 1 else "")
        sampler = PatchSampler(len(self.train_set), self.samples_per_epoch, seed=self.seed,
                               weights=self.case_weights())
        return self._loader(self.train_set, self.batch_size, sampler=sampler, drop_last=True)

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        """Whole volumes, one per batch. Under DDP each case goes to exactly one rank: Lightning's default sampler
        pads the last ranks with repeated cases, which would count them twice in the per-case metrics."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if len(dataset) >= torch.distributed.get_world_size():
                return self._loader(dataset, 1, sampler=UnrepeatedDistributedSampler(dataset, shuffle=False))
            log.warning("%d evaluation cases for %d ranks: some ranks repeat a case, so it counts twice in the "
                        "metrics", len(dataset), torch.distributed.get_world_size())
        return self._loader(dataset, 1, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        if len(self.test_set) == 0:
            raise BratsError("the split has no test cases; set data.test_fraction > 0 (or a split_file with 'test')")
        return self._eval_loader(self.test_set)
