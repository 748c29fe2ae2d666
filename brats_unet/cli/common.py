"""What every entry point shares: turning user-input errors into one clear paragraph and a non-zero exit."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

from omegaconf import DictConfig, OmegaConf

from brats_unet.utils import BratsError

log = logging.getLogger("brats_unet")

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


def trust_targets(cfg: DictConfig) -> list[str]:
    """The `_target_`s the user trusts in stored configs (trust_targets=mypkg.MyNet or [a.B,c.*]; docs/trust.md)."""
    value = cfg.get("trust_targets") or []
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


def require(cfg: DictConfig, *keys: str, usage: str) -> None:
    """BratsError for mandatory keys left at `???` (OmegaConf would otherwise raise with a traceback)."""
    missing = [k for k in keys if OmegaConf.is_missing(cfg, k) or cfg.get(k) in (None, "")]
    if missing:
        raise BratsError(f"missing required key(s) {', '.join(missing)}; usage: {usage}")
