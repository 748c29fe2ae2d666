"""postprocessing.json, the rules brats-postprocess chose for a sweep or run dir: reading it, and refusing it once the
dir no longer holds the checkpoints the rules were chosen for. The rules themselves: inference/postprocess.py."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from brats_unet.inference.ensemble import resolve_checkpoints
from brats_unet.inference.postprocess import check_record
from brats_unet.utils import BratsError, file_sha256

log = logging.getLogger("brats_unet.postprocess")

RULES_FILE = "postprocessing.json"  # written by brats-postprocess into a sweep or run dir
# A record's `chosen_on` when chosen on one run's validation cases; a sweep's says "out-of-fold predictions of K folds"
# (records written before `chosen_on` existed were all out-of-fold).
ONE_RUN = "validation cases of one run"


def read_postprocessing(path: str | Path) -> dict[str, Any]:
    """A postprocessing.json, checked: BratsError naming the file when it is not one brats-postprocess wrote."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BratsError(f"cannot read {path}: {e}") from e
    return check_record(record, str(path))


def checkpoints_record(folder: Path, checkpoints: Sequence[Path]) -> list[dict[str, str]]:
    """A rules record's `checkpoints`: each model the rules were chosen for, its path relative to the sweep or run
    dir and its SHA-256, so rules left behind by a retrain are refused rather than applied to another model."""
    return [{"checkpoint": Path(c).relative_to(folder).as_posix(), "sha256": file_sha256(c)} for c in checkpoints]


def check_chosen_for(path: Path, record: Mapping[str, Any]) -> None:
    """BratsError naming the rules file when its sweep or run dir no longer holds the checkpoints its rules were
    chosen for (retrained, or folds added or removed since brats-postprocess). Records written before `checkpoints`
    existed cannot be checked: a warning says so."""
    folder = path.parent
    recorded = record.get("checkpoints")
    if recorded is None:
        log.warning("%s does not name the checkpoints its rules were chosen for (written by an older brats-"
                    "postprocess): if %s was retrained since, choose again with brats-postprocess run=%s "
                    "overwrite=true", path, folder, folder)
        return
    now = checkpoints_record(folder, resolve_checkpoints(folder))
    if [c["checkpoint"] for c in now] != [c.get("checkpoint") for c in recorded]:
        raise BratsError(f"{path}: its rules were chosen for {[c.get('checkpoint') for c in recorded]} but {folder} "
                         f"now holds {[c['checkpoint'] for c in now]}: choose again with brats-postprocess "
                         f"run={folder} overwrite=true, or predict without them (cv_postprocess=false)")
    changed = [c["checkpoint"] for c, r in zip(now, recorded, strict=True) if c["sha256"] != r.get("sha256")]
    if changed:
        raise BratsError(f"{path}: its rules were chosen for other weights than {', '.join(changed)} now holds "
                         f"(retrained since brats-postprocess?): choose again with brats-postprocess run={folder} "
                         "overwrite=true, or predict without them (cv_postprocess=false)")


def sweep_postprocessing(ckpt_path: Any) -> tuple[Path, dict[str, Any]] | None:
    """(file, record) when ckpt_path is a sweep or run dir holding a postprocessing.json whose rules were chosen for
    the checkpoints it holds now (check_chosen_for), else None (a checkpoint file, a list, a folder without one)."""
    if not isinstance(ckpt_path, str | Path):
        return None
    path = Path(ckpt_path).expanduser() / RULES_FILE
    if not path.is_file():
        return None
    record = read_postprocessing(path)
    check_chosen_for(path, record)
    return path, record
