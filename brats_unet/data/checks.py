"""The data config's values, checked in one place with one message per key: brats-train's preflight calls this
before anything heavy exists, and the DataModule calls it for a notebook that builds one directly."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
from omegaconf import ListConfig

from brats_unet.data.sampling import FOREGROUND_SAMPLING
from brats_unet.data.split import check_folds
from brats_unet.utils import BratsError


def is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def as_list(v: Any) -> list | None:
    return list(v) if isinstance(v, Sequence | ListConfig | np.ndarray) and not isinstance(v, str) else None


def check_positive_ints(key: str, value: Any, length: int | None = None, min_length: int = 1) -> list[int]:
    """A list of positive integers (of `length` items, or at least `min_length`); BratsError naming `key`."""
    items = as_list(value)
    if items is None or not all(is_int(v) for v in items):
        raise BratsError(f"{key} must be a list of positive integers, got {value!r}")
    if (length is not None and len(items) != length) or len(items) < min_length:
        want = f"{length}" if length is not None else f"at least {min_length}"
        raise BratsError(f"{key} must hold {want} positive integers, got {len(items)}: {list(items)}")
    bad = [v for v in items if v <= 0]
    if bad:
        raise BratsError(f"{key} must be positive (sizes in voxels/channels), got {list(items)}: {bad} <= 0")
    return [int(v) for v in items]


def check_positive_int(key: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not is_int(value) or value <= 0:
        raise BratsError(f"{key} must be a positive integer{' or null' if allow_none else ''}, got {value!r}")


def check_unit_interval(key: str, value: Any) -> None:
    if not is_number(value) or not 0.0 <= float(value) <= 1.0:
        raise BratsError(f"{key} must be a number in [0, 1], got {value!r}")


def check_data_settings(patch_size: Any, batch_size: Any, num_workers: Any = 0, steps_per_epoch: Any = None,
                        foreground_fraction: Any = 0.33, num_folds: Any = 1, fold: Any = 0, pin_memory: Any = "auto",
                        foreground_sampling: Any = "voxel", stratify: Any = False) -> None:
    """BratsError naming the data.* key whose value no DataModule could use."""
    if not isinstance(stratify, bool):
        raise BratsError(f"data.stratify must be true or false, got {stratify!r}")
    if foreground_sampling not in FOREGROUND_SAMPLING:
        raise BratsError(f"data.foreground_sampling must be one of {', '.join(FOREGROUND_SAMPLING)}, got "
                         f"{foreground_sampling!r}")
    if pin_memory not in (True, False, "auto"):
        raise BratsError(f"data.pin_memory must be true, false or auto, got {pin_memory!r}")
    check_positive_ints("data.patch_size", patch_size, length=3)
    check_positive_int("data.batch_size", batch_size)
    check_positive_int("data.steps_per_epoch", steps_per_epoch, allow_none=True)
    if not is_int(num_workers) or num_workers < 0:
        raise BratsError(f"data.num_workers must be an integer >= 0, got {num_workers!r}")
    check_unit_interval("data.foreground_fraction", foreground_fraction)
    check_folds(num_folds, fold)
