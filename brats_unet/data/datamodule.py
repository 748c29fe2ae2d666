"""LightningDataModule: cache → split → patch datasets (train) and whole-volume datasets (val/test).

`prepare_data` fills the preprocessing cache (rank 0 only); `setup` splits the cached cases with a seed, writes
`<output_dir>/split.json` and re-uses it on resume. Training samples come from `PatchSampler` as
(case_index, sample_seed): every random choice of a sample derives from its seed, so batches do not depend on
`num_workers` or on which worker loads them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
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
from brats_unet.data.checks import check_data_settings
from brats_unet.data.preprocess import Recipe
from brats_unet.data.sampling import (
    PatchSampler,
    case_weights,
    choose_patch_start,
    crop_or_pad,
    region_groups,
    tumour_type,
)
from brats_unet.data.split import SUBSETS, SplitSpec, load_split, stratum
from brats_unet.data.transforms import Augment, build_augment
from brats_unet.runs import run_checkpoints
from brats_unet.utils import BratsError, atomic_write_json

log = logging.getLogger(__name__)


def steps_per_epoch(num_train_cases: int, batch_size: int, steps: int | None = None, world_size: int = 1) -> int:
    """Optimiser steps in one training epoch (per device under DDP).

    `steps` (data.steps_per_epoch) wins when set; null means the paper's rule (3.3.7), training scans / batch size
    rounded down like Keras (100 / 2 = 50, 50 / 2 = 25), at least 1. Under DDP the sampler's patches are shared out
    between the ranks (the last rank padded), and each rank drops its incomplete batch.
    """
    return max(1, -(-samples_per_epoch(num_train_cases, batch_size, steps) // world_size) // batch_size)


def samples_per_epoch(num_train_cases: int, batch_size: int, steps: int | None = None) -> int:
    """Training patches drawn per epoch (over all devices): data.steps_per_epoch batches when set, else one patch per
    training case (at least one batch)."""
    return steps * batch_size if steps else max(num_train_cases, batch_size)


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
    """Training item (case_index, sample_seed) → {"image": (C,*patch) float32, "label": (*patch) uint8, "case"}.

    Labels stay uint8 (internal classes) until the module: an eighth of int64's bytes to copy out of the worker and
    onto a GPU (128^3 batch 2: 4 MiB instead of 32 MiB); the module widens them on the device."""

    def __init__(
        self, cases: _CachedCases, patch_size: Sequence[int], foreground_fraction: float, augment: Augment,
        region_classes: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self.cases, self.patch_size = cases, tuple(patch_size)
        self.foreground_fraction, self.augment = foreground_fraction, augment
        self.region_classes = region_classes  # None: a forced patch centres on any tumour voxel ("voxel")
        self._groups: dict[str, list[np.ndarray]] = {}

    def groups(self, case: str, y: np.ndarray, coords: np.ndarray) -> list[np.ndarray] | None:
        """The case's foreground coordinates grouped by region (data.foreground_sampling=region), made once per case."""
        if self.region_classes is None:
            return None
        if case not in self._groups:
            self._groups[case] = region_groups(y[tuple(coords.T)], self.region_classes)
        return self._groups[case]

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, sample_seed = key
        case, x, y, coords, _ = self.cases.get(index)
        rng = np.random.default_rng(sample_seed)  # one stream: patch position, then augmentation
        start = choose_patch_start(y.shape, self.patch_size, rng, coords, self.foreground_fraction,
                                   self.groups(case, y, coords))
        # A rotated / zoomed patch is resampled from a larger region around it (nnU-Net's initial patch size).
        spatial = self.augment.draw_spatial(rng)
        size = spatial.input_size(self.patch_size) if spatial is not None else self.patch_size
        start = [s - (n - p) // 2 for s, n, p in zip(start, size, self.patch_size, strict=True)]
        xp, yp = crop_or_pad(x, y, start, size)
        xp, yp = self.augment(xp.astype(np.float32, copy=False), yp, rng, spatial=spatial, patch_size=self.patch_size)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(xp, dtype=np.float32)),
            "label": torch.from_numpy(np.ascontiguousarray(yp, dtype=np.uint8)),
            "case": case,
        }


class VolumeDataset(Dataset):
    """Whole cached volumes: {"image": (C,*S) float32, "label": (*S) uint8, "spacing": (3,) float64, "case"}."""

    def __init__(self, cases: _CachedCases) -> None:
        self.cases = cases

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case, x, y, _, spacing = self.cases.get(index)
        return {
            "image": torch.from_numpy(np.array(x, dtype=np.float32)),
            "label": torch.from_numpy(np.array(y, dtype=np.uint8)),
            "spacing": torch.tensor(spacing, dtype=torch.float64),
            "case": case,
        }


@dataclass(frozen=True)
class LoaderSettings:
    """How batches are loaded: data.batch_size, data.num_workers, data.pin_memory, data.persistent_workers."""

    batch_size: int = 2
    num_workers: int = 2
    pin_memory: bool | str = "auto"  # auto: pinned where the trainer runs on CUDA (BratsDataModule.pin_memory)
    persistent_workers: bool = True


# conf/data/*.yaml keys (what users type) -> the group and field they fill.
GROUPED_KEYS = {
    **{f.name: ("loader", f.name) for f in fields(LoaderSettings)},
    **{("split_seed" if f.name == "seed" else f.name): ("split", f.name) for f in fields(SplitSpec)},
}


def group_keys(keys: Mapping[str, Any], split: SplitSpec | None, loader: LoaderSettings | None
               ) -> tuple[SplitSpec, LoaderSettings]:
    """The flat data.* keys of a config, folded into the split and loader groups (or the groups as given)."""
    unknown = sorted(k for k in keys if k not in GROUPED_KEYS)
    if unknown:
        raise BratsError(f"unknown data config keys: {', '.join('data.' + k for k in unknown)}")
    groups: dict[str, dict[str, Any]] = {"split": {}, "loader": {}}
    for key, value in keys.items():
        group, name = GROUPED_KEYS[key]
        groups[group][name] = value
    for name, given in (("split", split), ("loader", loader)):
        if given is not None and groups[name]:
            raise BratsError(f"pass either {name}= or its data.* keys ({', '.join(groups[name])}), not both")
    return split or SplitSpec(**groups["split"]), loader or LoaderSettings(**groups["loader"])


class BratsDataModule(L.LightningDataModule):
    """BraTS cases from a preprocessing cache, plus the run directory (`output_dir`, where split.json goes) and the
    run `seed` (patch order and augmentation).

    The split and the loader are one argument each (`split=SplitSpec(...)`, `loader=LoaderSettings(...)`); a config
    (conf/data/*.yaml, instantiated by Hydra) gives their keys flat instead, as users type them (data.batch_size,
    data.val_fraction, data.split_seed, ...: GROUPED_KEYS), and they are grouped here.
    """

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
        foreground_fraction: float = 0.33,
        foreground_sampling: str = "voxel",
        steps_per_epoch: int | None = None,
        case_balance: float = 0.0,
        skip_bad_cases: bool = False,
        split: SplitSpec | None = None,
        split_file: str | Path | None = None,
        loader: LoaderSettings | None = None,
        output_dir: str | Path | None = None,
        seed: int = 0,
        **keys: Any,
    ) -> None:
        super().__init__()
        self.split_spec, self.loader = group_keys(keys, split, loader)
        check_data_settings(patch_size, self.loader.batch_size, self.loader.num_workers, steps_per_epoch,
                            foreground_fraction, self.split_spec.num_folds, self.split_spec.fold,
                            self.loader.pin_memory, foreground_sampling, self.split_spec.stratify)
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
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size, self.num_workers = int(self.loader.batch_size), int(self.loader.num_workers)
        # True for a fit that starts afresh (brats-train without ckpt_path, where overwrite=true allowed replacing
        # the folder's checkpoints): a split.json that disagrees with the config is then written anew.
        self.fresh_run = False
        self.split_file = Path(split_file) if split_file else None
        self.foreground_fraction, self.steps_per_epoch = foreground_fraction, steps_per_epoch
        self.foreground_sampling = foreground_sampling
        self.case_balance = float(case_balance)
        self.skip_bad_cases = skip_bad_cases
        self.output_dir = Path(output_dir) if output_dir else None
        self.seed = int(seed)
        self.augment = build_augment(self.augment_cfg, intensity_channels=len(self.preprocess["modalities"]))
        self.split: dict[str, Any] | None = None
        self._resume_epoch = 0

    @property
    def num_channels(self) -> int:
        return self.recipe.num_channels

    @property
    def cache_path(self) -> Path:
        return cache.cache_path(self.cache_dir, self.layout, self.root, self.preprocess, self.schema.name)

    def prepare_data(self) -> None:
        """Bring the cache up to date with the raw files (new, changed and deleted cases; cheap when nothing
        changed), so the split below holds exactly the cases that exist now."""
        path = self.cache_path
        if not self.root.is_dir() and cache.cached_cases(path):  # e.g. only the cache was copied to a compute node
            log.warning("data root %s not found; using the %d cases already in %s without checking them against "
                        "their raw files", self.root, len(cache.cached_cases(path)), path)
            return
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
            if self.split_file:
                other = load_split(self.split_file, cached=cached)
                differ = [k for k in SUBSETS if other[k] != split[k]]
                if differ:
                    raise BratsError(f"data.split_file {self.split_file} differs from this run's {own} "
                                     f"({', '.join(differ)} cases)")
                return split
            problems = self.split_spec.mismatches(split)
            if not problems:
                return split
            checkpoints = run_checkpoints(self.output_dir)
            if checkpoints and not self.fresh_run:
                raise BratsError(f"{own} is not the split this config asks for ({'; '.join(problems)}), and "
                                 f"{checkpoints[0]} was trained on it. Resume with the run's own data settings, or "
                                 "train this split in a new run dir (omit hydra.run.dir, or name a new one)")
            log.warning("%s is not the split this config asks for (%s); no checkpoint depends on it, so it is "
                        "written anew", own, "; ".join(problems))
        if self.split_file:
            split = load_split(self.split_file, cached=cached, cache_path=self.cache_path)
        else:
            split = self.split_spec.make(cached, self._strata(cached) if self.split_spec.stratify else None)
        if own is not None:
            atomic_write_json(own, split)
        return split

    def _strata(self, cases: list[str]) -> dict[str, str]:
        """Each case's stratum for data.stratify: the regions its cached label map holds (`stratum`)."""
        strata = {}
        for case in cases:
            counts = cache.load_cached(self.cache_path, case, mmap=True)[2].get("class_voxels")
            if counts is None:
                raise BratsError(f"{self.cache_path / (case + '.json')}: no class_voxels to stratify the split by "
                                 f"(the cache predates it: remove {self.cache_path} and run brats-preprocess)")
            strata[case] = stratum(counts, self.schema.regions)
        sizes = Counter(strata.values())
        log.info("split strata (data.stratify): %s", ", ".join(f"{s} {sizes[s]}" for s in sorted(sizes)))
        return strata

    def setup(self, stage: str | None = None) -> None:
        if self.split is None:
            self.split = self._make_or_load_split()
            log.info("split: %d train, %d val, %d test cases", *(len(self.split[k]) for k in ("train", "val", "test")))
        path = self.cache_path
        self.train_set = PatchDataset(
            _CachedCases(path, self.split["train"]), self.patch_size, self.foreground_fraction, self.augment,
            [self.schema.region_classes[r] for r in self.schema.region_names]
            if self.foreground_sampling == "region" else None,
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
        return samples_per_epoch(len(self.train_set), self.batch_size, self.steps_per_epoch)

    @property
    def pin_memory(self) -> bool:
        """data.pin_memory, with auto resolved: page-locked batches (faster copies that overlap the GPU's work) when
        the trainer runs on CUDA; on the CPU there is nothing to copy to, and pinning only costs."""
        if self.loader.pin_memory == "auto":
            return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return bool(self.loader.pin_memory)

    def _loader(self, dataset: Dataset, batch_size: int, **kwargs: Any) -> DataLoader:
        # Its own generator: creating an iterator draws the workers' base seed from it, not from the global torch
        # RNG that dropout uses. Otherwise persistent workers (one draw in epoch 0 of a straight run, one in the
        # first epoch of a resumed one) shift dropout masks and a resumed run no longer ends bit-identical.
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.loader.persistent_workers and self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
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
        # Lightning 2.6 may build a resumed run's training iterator before it restores the loops and calls
        # set_epoch (the scheduler's trainer.estimated_stepping_batches does), and worker processes draw their
        # first indices as soon as the iterator exists: start at the epoch the fit continues from, or a run resumed
        # with num_workers > 0 would replay epoch 0's patches.
        sampler.set_epoch(self._fit_epoch())
        return self._loader(self.train_set, self.batch_size, sampler=sampler, drop_last=True)

    def _fit_epoch(self) -> int:
        """The epoch the fit is in: the loop's count, or, before Lightning restores the loops of a resumed run, the
        one its checkpoint recorded (load_state_dict)."""
        epoch = self.trainer.fit_loop.epoch_progress.current.processed if self.trainer is not None else 0
        return max(epoch, self._resume_epoch)

    def state_dict(self) -> dict[str, Any]:
        # Lightning counts an epoch processed before on_train_epoch_end, where last.ckpt is written: this is the
        # epoch a resumed fit continues with.
        return {"sampler_epoch": self._fit_epoch()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_epoch = int(state_dict.get("sampler_epoch", 0))

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
