"""Checks that run before anything heavy, so a bad value stops brats-train in a second with a message naming the
config key, instead of minutes later (or never) inside a worker process or a Lightning hook.

Two steps: `check_values` reads the config's values (types, ranges: what each constructor would refuse, said with the
key the user typed); after the DataModule and the module are built (cheap: no data is read), `preflight` checks what
only the objects together know: the patch against the network's divisor and the volumes, the warm-up against the
fit's length."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
from omegaconf import DictConfig

from brats_unet.data import cache
from brats_unet.data.checks import check_data_settings, check_positive_ints, check_unit_interval, is_number
from brats_unet.data.discovery import case_files, list_case_dirs, resolve_layout
from brats_unet.training.losses import SMOOTH_RULE
from brats_unet.utils import BratsError

log = logging.getLogger(__name__)


def check_values(cfg: DictConfig) -> None:
    """Sizes, weights and rates of a brats-train config, each named by its key; no file access."""
    data, model, loss = cfg.data, cfg.model, cfg.get("loss") or {}
    check_data_settings(data.get("patch_size"), data.get("batch_size"), data.get("num_workers", 0),
                        data.get("steps_per_epoch"), data.get("foreground_fraction", 0.33), data.get("num_folds", 1),
                        data.get("fold", 0), data.get("pin_memory", "auto"), data.get("foreground_sampling", "voxel"),
                        data.get("stratify", False))
    check_positive_ints("model.filters", model.get("filters"), min_length=2)
    if "alpha" in loss:
        check_unit_interval("loss.alpha", loss.alpha)
    smooth = loss.get("smooth")
    if smooth is not None and (not is_number(smooth) or smooth <= 0):
        raise BratsError(f"loss.smooth must be > 0 ({SMOOTH_RULE}), got {smooth!r}")
    lr = (cfg.get("optimizer") or {}).get("lr")
    if lr is not None and (not is_number(lr) or lr <= 0):
        raise BratsError(f"optimizer.lr must be a positive number, got {lr!r}")


def _volume_shapes(cfg: DictConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(case, spatial shape the network sees) from the cache if it holds cases, else from the NIfTI headers."""
    data, pre = cfg.data, cfg.preprocess
    if pre.get("crop") == "fixed" and pre.get("crop_box") is not None:
        box = [list(b) for b in pre.crop_box]
        yield "every case (preprocess.crop_box)", tuple(int(b) - int(a) for a, b in box)
        return
    folder = cache.cache_path(data.cache_dir, data.layout, data.root, pre, data.get("schema"))
    cases = cache.cached_cases(folder)
    for case in cases:
        x, _, _ = cache.load_cached(folder, case, mmap=True)  # memory-mapped: reads the headers only
        yield case, tuple(int(s) for s in x.shape[1:])
    if cases:
        return
    try:
        dirs = list_case_dirs(data.root, data.layout)
    except BratsError:
        return  # the datamodule reports a missing or empty root with its own message
    layout = resolve_layout(data.layout)
    for case_dir in dirs:
        try:
            path = case_files(case_dir, layout, False, pre.modalities[:1]).images[pre.modalities[0]]
            yield case_dir.name, tuple(int(s) for s in nib.load(path).shape[:3])  # header only
        except (BratsError, OSError, ValueError, nib.filebasedimages.ImageFileError):
            continue  # preprocessing names the broken case


def check_patch_fits(cfg: DictConfig) -> None:
    """BratsError when data.patch_size is larger than every (preprocessed) volume: training would see only padding.

    Stops at the first volume the patch fits in, so it usually reads one header.
    """
    patch = tuple(int(p) for p in cfg.data.patch_size)
    first = None
    for case, shape in _volume_shapes(cfg):
        if all(p <= s for p, s in zip(patch, shape, strict=False)):
            return
        first = first or (case, shape)
    if first is not None:
        case, shape = first
        raise BratsError(f"data.patch_size {list(patch)} is larger than every volume it would be cut from: e.g. "
                         f"{case} is {list(shape)} after preprocess={cfg.preprocess.name} (data.root "
                         f"{Path(str(cfg.data.root))}); use a data.patch_size no larger than the volumes")


def check_divisible(patch: Sequence[int], net: Any) -> None:
    """BratsError unless the patch is a multiple of the network's divisor on the axes it pools (UNet2D: not z)."""
    divisor, axes = net.divisor, 2 if getattr(net, "dim", 3) == 2 else 3
    patch = [int(p) for p in patch]
    if any(p % divisor for p in patch[:axes]):
        levels = len(net.filters)
        raise BratsError(f"data.patch_size {patch} must be a multiple of {divisor} on the pooled axes: "
                         f"model.filters has {levels} levels, so the U-Net halves the patch {levels - 1} "
                         "times (use e.g. data.patch_size=[" + ",".join(str(max(divisor, p // divisor * divisor))
                                                                       for p in patch) + "])")


def check_warmup(cfg: DictConfig) -> None:
    """BratsError when the warm-up is not shorter than the whole fit, where the fit's length is known from the config
    (trainer.max_steps, or trainer.max_epochs x data.steps_per_epoch); otherwise the module checks it at fit start."""
    scheduler, trainer = cfg.get("scheduler") or {}, cfg.trainer
    warmup = scheduler.get("warmup_steps") or 0
    total = scheduler.get("total_steps")
    if total is None and (trainer.get("max_steps") or -1) > 0:
        total = trainer.max_steps
    if total is None and cfg.data.get("steps_per_epoch") and trainer.get("max_epochs"):
        total = int(trainer.max_epochs) * int(cfg.data.steps_per_epoch)
    if total is not None and warmup >= total:
        raise BratsError(f"scheduler.warmup_steps={warmup} must be shorter than the fit's {total} optimizer steps "
                         "(trainer.max_epochs x data.steps_per_epoch, or scheduler.total_steps)")


def preflight(cfg: DictConfig, net: Any) -> None:
    """The cross-object checks, after the parts are built and before any data is cached or read."""
    check_divisible(cfg.data.patch_size, net)
    check_warmup(cfg)
    check_patch_fits(cfg)
