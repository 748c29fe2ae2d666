"""Predict a folder of cases to `<output>/<case>.nii.gz` (brats-predict): case discovery, resume, atomic writes; and
a cross-validation sweep's out-of-fold predictions (each fold's validation cases by that fold's model)."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from brats_unet.data.cases import Case
from brats_unet.data.discovery import expected_pattern, list_case_dirs, resolve_layout, subfolders
from brats_unet.data.labels import LAYOUTS
from brats_unet.evaluation.folder import find_predictions
from brats_unet.evaluation.manifest import MANIFEST, describe, differences, model_key, read_manifest, write_manifest
from brats_unet.inference.decoding import label_image, output_header
from brats_unet.inference.ensemble import out_of_fold_jobs
from brats_unet.inference.inputs import is_case_folder
from brats_unet.inference.segmenter import Segmenter
from brats_unet.inference.uncertainty import qc_row, read_qc, save_uncertainty, segment_with_uncertainty, write_qc
from brats_unet.utils import BratsError, atomic_path, check_writable_output, file_sha256

log = logging.getLogger("brats_unet.predict")
QC_FILE = "qc.csv"


def find_input_cases(input_path: str | Path, preferred: str, only: Sequence[str] | None = None) -> list[Path]:
    """Case folders under a BraTS root (or the one case folder given), optionally only those named in `only`."""
    root = Path(input_path).expanduser()
    layout = resolve_layout(preferred)
    dirs = list_case_dirs(root, layout) if layout.channels else subfolders(root, "input")  # MSD: imagesTr/<case>
    if is_case_folder(root):
        dirs = [root]
    elif not dirs:
        raise BratsError(f"input {root} holds no case folders and is not a case folder itself (expected "
                         f"{expected_pattern(LAYOUTS[preferred])})")
    if only is not None:
        if not only:
            raise BratsError("the split_file names no cases in this subset: there is nothing to predict")
        by_name = {d.name: d for d in dirs}
        absent = [c for c in only if c not in by_name]
        if absent:
            raise BratsError(f"input {root} lacks {len(absent)} cases named by split_file: "
                             f"{', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}")
        dirs = [by_name[c] for c in sorted(only)]
    return dirs


def save_probabilities(path: Path, probs: np.ndarray, case: Case) -> None:
    """(K, *S) -> one 4D NIfTI (x, y, z, K), stored as uint8 scaled to [0, 1] (steps of ~0.004; NIfTI has no fp16)."""
    img = nib.Nifti1Image(np.moveaxis(probs, 0, -1).astype(np.float32), case.affine,
                          output_header(case.header, np.float32))
    img.set_data_dtype(np.uint8)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def weights_sha256(module: Any) -> str:
    """A model built in memory (no checkpoint file): the hash of its weights."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_record(segmenter: Segmenter, layout: str, checkpoints: Sequence[str | Path] | None = None,
                 oof: bool = False) -> dict[str, Any]:
    """What wrote a predictions folder (evaluation.manifest): each member's checkpoint and SHA-256 (`checkpoints`:
    the out-of-fold models), and every setting that changes the labels."""
    if checkpoints is None and all(Path(n).is_file() for n in segmenter.names):
        checkpoints = segmenter.names
    members = ([{"checkpoint": str(c), "sha256": file_sha256(c)} for c in checkpoints] if checkpoints is not None
               else [{"checkpoint": f, "sha256": h} for f, h in segmenter.package_files] if segmenter.package_files
               else [{"checkpoint": n, "sha256": weights_sha256(m)} for n, m in zip(segmenter.names, segmenter.modules,
                                                                                     strict=True)])
    record = {"members": members, "oof": oof, "tta": segmenter.tta, "postprocess": segmenter.postprocess,
              "precision": segmenter.precision,
              "channels_last": bool((segmenter.config.get("runtime") or {}).get("channels_last")),
              "overlap": segmenter.overlap, "layout": layout}
    if segmenter.cv_postprocessing is not None:  # the rules are part of the model: a resume without them is refused
        record["cv_postprocessing"] = list(segmenter.cv_postprocessing["rules"])
    return record


def claim_folder(out_dir: Path, model: dict[str, Any], outputs: Sequence[Path], *, overwrite: bool, resume: bool
                 ) -> tuple[list[str], list[Path]]:
    """Check that this model may write into `out_dir`: (cases it already holds from this model, files to remove).

    resume: only into a folder this very model wrote (its prediction.json), else refused naming both models.
    overwrite: the predictions the manifest's model wrote are to be removed, all of them (not only the cases in
    scope); files brats-predict did not write stay."""
    previous = read_manifest(out_dir)
    if previous is not None and model_key(previous["model"]) != model_key(model) and not overwrite:
        raise BratsError(f"output folder {out_dir} holds predictions by another model: {describe(previous['model'])}"
                         f"; this run is {describe(model)} (differs in {differences(previous['model'], model)}). "
                         "One folder holds one model's predictions: pass overwrite=true to replace them, or choose "
                         "another output folder")
    held = find_predictions(out_dir) if out_dir.is_dir() else {}
    ours = set(previous["cases"]) if previous else set()
    if resume:
        foreign = sorted(p.name for p in outputs if p.is_file() and p.name[: -len(".nii.gz")] not in ours)
        if foreign:
            more = " ..." if len(foreign) > 3 else ""
            raise BratsError(f"resume=true: {out_dir} holds {', '.join(foreign[:3])}{more} which {MANIFEST} does not "
                             f"list as written by this model ({describe(model)}): "
                             "predict into a new folder, or pass overwrite=true to replace them")
        return sorted(ours), []
    left = sorted(set(held) - ours - {p.name[: -len(".nii.gz")] for p in outputs})
    if left:
        log.warning("%s keeps %d predictions brats-predict did not record writing (e.g. %s); they are not replaced",
                    out_dir, len(left), ", ".join(left[:3]))
    if not (overwrite and previous is not None):
        return [], []
    log.info("overwrite=true: replacing the %d predictions of %s in %s", len(ours), describe(previous["model"]),
             out_dir)
    return [], [out_dir / f"{case}{suffix}" for case in sorted(ours)
                for suffix in (".nii.gz", "_prob.nii.gz", "_uncertainty.nii.gz")] + [out_dir / QC_FILE]


def held_by_another_model(output: str | Path, model: Mapping[str, Any]) -> bool:
    """Whether `output` holds predictions (its manifest) written by a model other than `model` (model_key)."""
    previous = read_manifest(output)
    return previous is not None and model_key(previous["model"]) != model_key(model)


def predict_folder(segmenter: Segmenter, input_path: str | Path, output: str | Path, *,
                   only: Sequence[str] | None = None, layout: str | None = None,
                   probabilities: bool = False, overwrite: bool = False, resume: bool = False, replace: bool = False,
                   model: dict[str, Any] | None = None, uncertainty: bool = False) -> list[Path]:
    """Predict every case in scope into `output`; return the prediction files (including those a resume skipped).

    `<case>.nii.gz` is written last (atomically), so it marks a finished case for `resume`. `<output>/prediction.json`
    names the model (`model`, default: model_record of `segmenter`) and the cases it wrote; see claim_folder.
    `replace` (with `resume`): predictions another model left in `output` (brats-postprocess overwrite=true after a
    retrain) are replaced, as with `overwrite`, instead of refused; this model's own are resumed.
    `uncertainty`: also `<case>_uncertainty.nii.gz` and one qc.csv row per case (inference/uncertainty.py).
    Rules chosen on cross-validation (`segmenter.cv_postprocessing`: a sweep's postprocessing.json, or a package's
    copy) are applied by the segmenter and named in the manifest (model_record).
    """
    if overwrite and resume:
        raise BratsError("overwrite=true and resume=true contradict each other: pick one")
    preferred = resolve_layout(layout or segmenter.layout).name
    dirs = find_input_cases(input_path, preferred, only)
    out_dir = Path(output).expanduser()
    model = model or model_record(segmenter, preferred)
    if replace and resume and held_by_another_model(out_dir, model):
        log.info("%s holds another model's predictions; predicting again", out_dir)
        overwrite, resume = True, False
    if not resume and out_dir.is_dir() and not overwrite:
        held = [p for p in out_dir.iterdir() if not p.name.startswith(".")]
        if held:
            raise BratsError(f"output folder {out_dir} already holds {len(held)} files; pass overwrite=true to "
                             "replace them, or resume=true to predict only the cases not written yet")
    outputs = [out_dir / f"{d.name}.nii.gz" for d in dirs]
    kept, stale = claim_folder(out_dir, model, outputs, overwrite=overwrite, resume=resume)
    check_writable_output(out_dir, overwrite=True)

    todo = [(d, out) for d, out in zip(dirs, outputs, strict=True) if not (resume and out.is_file())]
    if len(todo) < len(dirs):
        log.info("resume: %d of %d cases already predicted in %s", len(dirs) - len(todo), len(dirs), out_dir)
    start = time.perf_counter()
    qc = read_qc(out_dir / QC_FILE) if uncertainty and resume else {}
    for i, (case_dir, out) in enumerate(tqdm(todo, desc="predict", unit="case")):
        if uncertainty:
            case, labels, probs, unc = segment_with_uncertainty(segmenter, case_dir, preferred, probabilities)
        else:
            case, labels, probs = segmenter.segment(case_dir, preferred, probabilities=probabilities)
        if i == 0:  # the folder changes once the first case is predicted (a bad input leaves it as it was), and its
            # manifest first: a kill mid-way leaves one that names every file this run may have written.
            for path in stale:
                path.unlink(missing_ok=True)
            write_manifest(out_dir, model, [*kept, *(d.name for d in dirs)])
        if uncertainty:
            save_uncertainty(out_dir / f"{case.name}_uncertainty.nii.gz", unc, case)
            qc[case.name] = qc_row(case, labels, segmenter, unc)
        if probs is not None:
            save_probabilities(out_dir / f"{case.name}_prob.nii.gz", probs, case)
        with atomic_path(out) as tmp:
            nib.save(label_image(labels, case), tmp)
        if uncertainty:  # rewritten after each case: an interrupted run keeps the rows of the cases it wrote
            write_qc(out_dir / QC_FILE, list(qc.values()))
    seconds = time.perf_counter() - start
    per_case = f" ({seconds / len(todo):.1f} s/case)" if todo else ""
    log.info("predicted %d cases in %.1f s%s on %s -> %s", len(todo), seconds, per_case, segmenter.device, out_dir)
    return outputs


def predict_out_of_fold(sweep: str | Path, input_path: str | Path, output: str | Path, *, layout: str | None = None,
                        probabilities: bool = False, overwrite: bool = False, resume: bool = False,
                        replace: bool = False, postprocessing: Mapping[str, Any] | None = None,
                        **options: Any) -> list[Path]:
    """Each fold's validation cases (its split.json) predicted by that fold's checkpoints/best.ckpt, all into one
    `output`: every non-test case once, by the model that did not train on it. `options` go to
    Segmenter.from_checkpoint (device, tta, postprocess, precision, overlap, window_batch); `postprocessing`: the
    sweep's chosen rules (postprocessing.json), applied by every fold's segmenter. `replace` (with `resume`):
    predictions another model left in `output` (the folds before a retrain) are replaced, not refused."""
    jobs = out_of_fold_jobs(sweep)
    outputs: list[Path] = []
    model = None
    for i, (ckpt, cases) in enumerate(jobs):
        log.info("out-of-fold %d/%d: %d validation cases with %s", i + 1, len(jobs), len(cases), ckpt)
        segmenter = Segmenter.from_checkpoint(ckpt, cv_postprocessing=postprocessing, **options)
        # One model in the manifest: the set of fold models. The first fold claims the output folder; later folds
        # add their own (disjoint) cases to it, as a resume of that model does.
        model = model or model_record(segmenter, resolve_layout(layout or segmenter.layout).name,
                                      checkpoints=[c for c, _ in jobs], oof=True)
        outputs += predict_folder(segmenter, input_path, output, only=cases, layout=layout,
                                  probabilities=probabilities, overwrite=overwrite and i == 0,
                                  resume=resume or i > 0, replace=replace, model=model)
    return sorted(outputs)
