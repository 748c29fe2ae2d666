"""Post-processing chosen on a cross-validation sweep's out-of-fold predictions (brats-postprocess), and reading the
choice back for brats-predict. The rules and the choosing are pure (inference.postprocess); this is the IO around it.

    <sweep>/postprocessing.json      what was chosen, with the out-of-fold scores before and after
    <sweep>/postprocess/oof/         the out-of-fold predictions it was chosen on (made here unless given)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from brats_unet.evaluation.folder import (
    challenge_for,
    default_lesionwise,
    find_predictions,
    find_truth,
    read_case_labels,
)
from brats_unet.evaluation.manifest import read_manifest
from brats_unet.inference.ensemble import out_of_fold_jobs
from brats_unet.inference.folder import predict_out_of_fold
from brats_unet.inference.postprocess import (
    DEFAULT_ET_TOTALS,
    DEFAULT_SIZES,
    RECORD_VERSION,
    check_record,
    choose_rules,
)
from brats_unet.utils import BratsError, atomic_write_json

log = logging.getLogger("brats_unet.postprocess")

FILE = "postprocessing.json"
OOF_DIR = Path("postprocess") / "oof"
VERSION = RECORD_VERSION


def job_data(job: Path) -> dict[str, Any]:
    """The `data` group a job trained with (its .hydra/config.yaml): where its cases and truths live."""
    path = job / ".hydra" / "config.yaml"
    if not path.is_file():
        raise BratsError(f"{path} not found: is {job} a brats-train job folder?")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)["data"]


def choose_for_sweep(sweep: str | Path, *, predictions: str | Path | None = None, truth: str | Path | None = None,
                     layout: str | None = None, challenge: str | None = None, lesionwise: bool | None = None,
                     sizes: Sequence[int] = DEFAULT_SIZES, et_totals: Sequence[int] = DEFAULT_ET_TOTALS,
                     overwrite: bool = False, **predict_options: Any) -> dict[str, Any]:
    """Choose rules on the sweep's out-of-fold predictions and write <sweep>/postprocessing.json (atomically).

    `predictions`: a folder of out-of-fold `<case>.nii.gz` (brats-predict oof=true); None: <sweep>/postprocess/oof,
    predicted there first (resuming) with `predict_options` (device, tta, precision, ...). `truth`: the BraTS root
    with the segmentations; None: the data.root the folds trained on.
    """
    sweep = Path(sweep).expanduser()
    out = sweep / FILE
    if out.exists() and not overwrite:
        raise BratsError(f"{out} already exists; pass overwrite=true to choose again")
    jobs = out_of_fold_jobs(sweep)  # refuses anything but the complete folds of one k-fold split
    cases = sorted(c for _, val in jobs for c in val)
    data = job_data(jobs[0][0].parent.parent)
    truth = Path(truth if truth is not None else data["root"]).expanduser()
    if predictions is None:
        predictions = sweep / OOF_DIR
        log.info("out-of-fold predictions of %d cases -> %s", len(cases), predictions)
        predict_out_of_fold(sweep, truth, predictions, layout=layout, resume=True, **predict_options)
    manifest = read_manifest(predictions)
    if manifest is not None and manifest["model"].get("cv_postprocessing") is not None:
        raise BratsError(f"predictions {predictions} were written with post-processing already applied (its "
                         "prediction.json lists cv_postprocessing): choose on raw out-of-fold predictions, e.g. "
                         f"brats-predict ckpt_path={sweep} oof=true cv_postprocess=false, or leave predictions unset")
    preds = find_predictions(predictions)
    missing = [c for c in cases if c not in preds]
    if missing:
        raise BratsError(f"predictions {predictions} lack {len(missing)} of the {len(cases)} out-of-fold cases (e.g. "
                         f"{', '.join(missing[:3])}); predict them with brats-predict ckpt_path={sweep} oof=true, or "
                         "leave predictions unset to have them made")
    truths = find_truth(truth, layout)
    absent = [c for c in cases if c not in truths]
    if absent:
        raise BratsError(f"truth {truth} has no segmentation for {len(absent)} out-of-fold cases (e.g. "
                         f"{', '.join(absent[:3])})")
    pairs, spacings, challenges = [], [], set()
    for case in cases:
        seg, case_layout = truths[case]
        chall = challenge_for(case_layout, challenge)
        challenges.add(chall.name)
        truth_labels, _, header = read_case_labels(seg, chall)
        pred_labels, _, _ = read_case_labels(preds[case], chall)
        if pred_labels.shape != truth_labels.shape:
            raise BratsError(f"prediction {preds[case]} has shape {pred_labels.shape} but truth {seg} has "
                             f"{truth_labels.shape}")
        pairs.append((pred_labels, truth_labels))
        spacings.append(tuple(float(z) for z in header.get_zooms()[:3]))
    if len(challenges) > 1:
        raise BratsError(f"the out-of-fold cases mix label sets {sorted(challenges)}; pass challenge=<one of them>")
    chall = challenge_for(truths[cases[0]][1], challenge)
    if lesionwise is None:
        lesionwise = default_lesionwise([chall])
    result = choose_rules(pairs, chall, lesionwise=lesionwise, sizes=sizes, et_totals=et_totals, spacings=spacings)
    record = {"version": VERSION, "sweep": str(sweep), "predictions": str(Path(predictions)), "truth": str(truth),
              "challenge": chall.name, **result}
    atomic_write_json(out, record)
    return record


def read_postprocessing(path: str | Path) -> dict[str, Any]:
    """A postprocessing.json, checked: BratsError naming the file when it is not one brats-postprocess wrote."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BratsError(f"cannot read {path}: {e}") from e
    return check_record(record, str(path))


def sweep_postprocessing(ckpt_path: Any) -> tuple[Path, dict[str, Any]] | None:
    """(file, record) when ckpt_path is a sweep dir holding a postprocessing.json, else None."""
    if not isinstance(ckpt_path, str | Path):
        return None
    path = Path(ckpt_path).expanduser() / FILE
    return (path, read_postprocessing(path)) if path.is_file() else None
