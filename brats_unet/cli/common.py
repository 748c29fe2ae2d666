"""What every entry point shares: turning user-input errors into one clear paragraph and a non-zero exit."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from brats_unet.utils import BratsError

log = logging.getLogger("brats_unet")

# Hydra entry points read their YAML from the package, so installed scripts work from any directory.
CONFIG_PATH = "pkg://brats_unet.conf"
EXIT_USER_ERROR = 2


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print a BratsError (and friends) as `error: <message>` without a traceback, then exit 2.

    Set HYDRA_FULL_ERROR=1 or BRATS_DEBUG=1 to get the full traceback instead.
    """
    try:
        yield
    except (BratsError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("BRATS_DEBUG") == "1":
            raise
        message = str(e) if isinstance(e, BratsError) else f"{e.strerror or e}: {e.filename or ''}".strip(": ")
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


SPLIT_SUBSETS = ("train", "val", "test")


def require(cfg: DictConfig, *keys: str, usage: str) -> None:
    """BratsError for mandatory keys left at `???` (OmegaConf would otherwise raise with a traceback)."""
    missing = [k for k in keys if OmegaConf.is_missing(cfg, k) or cfg.get(k) in (None, "")]
    if missing:
        raise BratsError(f"missing required key(s) {', '.join(missing)}; usage: {usage}")


def read_split(path: str | Path, subset: str) -> list[str]:
    """Case names of one subset (train | val | test) of a run's split.json."""
    if subset not in SPLIT_SUBSETS:
        raise BratsError(f"split_subset must be one of {list(SPLIT_SUBSETS)}, got {subset!r}")
    path = Path(path).expanduser()
    try:
        split = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BratsError(f"split_file {path} cannot be read as a split.json: {e}") from e
    cases = split.get(subset) if isinstance(split, dict) else None
    if not isinstance(cases, list):
        raise BratsError(f"split_file {path} has no list of cases under {subset!r}")
    return [str(c) for c in cases]
