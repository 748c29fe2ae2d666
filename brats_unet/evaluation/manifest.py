"""One predictions folder, one model: `<output>/prediction.json` says which model wrote the folder's `<case>.nii.gz`.

brats-predict (inference.folder) writes it before the first case's file and refuses to resume a folder another model
(or other settings) wrote; brats-evaluate refuses a folder whose scored files the manifest does not list. The model is
named by what changes its labels: the checkpoints' SHA-256 (each ensemble member, each out-of-fold model), TTA,
post-processing, precision, memory format, overlap and the written label layout. Paths are kept for people to read;
a moved checkpoint is the same model.

    {"format": 1, "written_by": "brats-unet 0.1.0",
     "model": {"members": [{"checkpoint": "run/checkpoints/best.ckpt", "sha256": "..."}], "oof": false,
               "tta": false, "postprocess": false, "precision": "fp32", "channels_last": false, "overlap": 0.5,
               "layout": "brats2021"},
     "cases": ["BraTS2021_00000", ...]}
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from brats_unet import __version__
from brats_unet.utils import BratsError, atomic_write_json

MANIFEST = "prediction.json"


def model_key(model: Mapping[str, Any]) -> dict[str, Any]:
    """What makes two models the same: every setting, and the members' hashes in order (not their paths)."""
    return {**{k: v for k, v in model.items() if k != "members"},
            "sha256": [m.get("sha256") for m in model.get("members", [])]}


def describe(model: Mapping[str, Any]) -> str:
    """`best.ckpt (sha256 1a2b3c4d5e6f) [+ more], tta=False, ...` for messages."""
    members = " + ".join(f"{m.get('checkpoint')} (sha256 {str(m.get('sha256'))[:12]})"
                         for m in model.get("members", []))
    settings = ", ".join(f"{k}={v}" for k, v in model.items() if k != "members")
    return f"{members or 'no checkpoint'}, {settings}"


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    a, b = model_key(old), model_key(new)
    return ", ".join(f"{k}: {a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The folder's prediction.json, or None when it has none; BratsError naming the file when it is malformed."""
    path = Path(folder).expanduser() / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BratsError(f"{path}: cannot read the predictions manifest ({e})") from e
    cases = manifest.get("cases") if isinstance(manifest, dict) else None
    if (not isinstance(manifest, dict) or not isinstance(manifest.get("model"), dict) or not isinstance(cases, list)
            or not all(isinstance(c, str) and c and "/" not in c and "\\" not in c and c not in (".", "..")
                       for c in cases)):
        raise BratsError(f"{path}: not a brats-predict manifest (a 'model' object and a 'cases' list of case names)")
    return manifest


def write_manifest(folder: str | Path, model: Mapping[str, Any], cases: Iterable[str]) -> None:
    atomic_write_json(Path(folder) / MANIFEST, {"format": 1, "written_by": f"brats-unet {__version__}",
                                                "model": dict(model), "cases": sorted(set(cases))})


def check_one_model(folder: str | Path, cases: Iterable[str]) -> dict[str, Any] | None:
    """The manifest's model, once every case to score is one it wrote; BratsError naming the others (a folder
    predictions were copied into, or one written partly by another model) - their scores would mix models.
    A folder without a manifest (another tool's predictions) is not checked: None."""
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    foreign = sorted(set(cases) - set(manifest["cases"]))
    if foreign:
        raise BratsError(f"{Path(folder) / MANIFEST} says {describe(manifest['model'])} wrote this folder, but not "
                         f"{len(foreign)} of the predictions to score: {', '.join(foreign[:5])}"
                         f"{' ...' if len(foreign) > 5 else ''}. Scores of a mixture of models mean nothing: move "
                         "those files out, or predict the folder again with one model (overwrite=true)")
    return manifest["model"]
