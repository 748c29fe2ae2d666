"""Small shared helpers: the user-facing error type and atomic file writes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# Write failures a user fixes outside the program: disk full, quota exceeded, read-only file system.
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
_UMASK = os.umask(0)
os.umask(_UMASK)


class BratsError(Exception):
    """A problem with the user's input or environment that they can fix.

    Entry points print its message as one paragraph (no traceback) and exit non-zero; the message names the file or
    config key and says what is wrong.
    """


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on failure remove it.

    A reader never sees a half-written file: a kill leaves at most a stray `.tmp-*` file, never a truncated target.
    The temp name keeps the target's suffix (e.g. `.nii.gz`) so libraries that infer the format from it still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.stem}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the result the usual permissions
        os.replace(tmp_path, path)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in _DISK_ERRORS:  # the user's to fix (free space): no traceback
            raise BratsError(f"cannot write {path}: {e.strerror or e} (the file was left unchanged)") from e
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def check_writable_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse to clobber existing results unless asked; create the folder and check it is writable."""
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise BratsError(f"output folder {path} already holds files; pass overwrite=true to replace them")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BratsError(f"cannot create output folder {path}: {e.strerror}") from e
    if not os.access(path, os.W_OK):
        raise BratsError(f"output folder {path} is not writable")
    return path


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (checkpoints and weights run to hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
