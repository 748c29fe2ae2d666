"""Predict a folder of cases to `<output>/<case>.nii.gz` (brats-predict): case discovery, resume, atomic writes; and
a cross-validation sweep's out-of-fold predictions (each fold's validation cases by that fold's model)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm import tqdm

from brats_unet.data.cases import Case
from brats_unet.data.discovery import expected_pattern, list_case_dirs, resolve_layout, subfolders
from brats_unet.data.labels import LAYOUTS
from brats_unet.inference.decoding import label_image, output_header
from brats_unet.inference.ensemble import out_of_fold_jobs
from brats_unet.inference.inputs import is_case_folder
from brats_unet.inference.segmenter import Segmenter
from brats_unet.utils import BratsError, atomic_path, check_writable_output

log = logging.getLogger("brats_unet.predict")


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


def predict_folder(segmenter: Segmenter, input_path: str | Path, output: str | Path, *,
                   only: Sequence[str] | None = None, layout: str | None = None,
                   probabilities: bool = False, overwrite: bool = False, resume: bool = False) -> list[Path]:
    """Predict every case in scope into `output`; return the prediction files (including those a resume skipped).

    `<case>.nii.gz` is written last (atomically), so it marks a finished case for `resume`.
    """
    if overwrite and resume:
        raise BratsError("overwrite=true and resume=true contradict each other: pick one")
    preferred = resolve_layout(layout or segmenter.layout).name
    dirs = find_input_cases(input_path, preferred, only)
    out_dir = Path(output).expanduser()
    if not resume and out_dir.is_dir() and not overwrite:
        held = [p for p in out_dir.iterdir() if not p.name.startswith(".")]
        if held:
            raise BratsError(f"output folder {out_dir} already holds {len(held)} files; pass overwrite=true to "
                             "replace them, or resume=true to predict only the cases not written yet")
    check_writable_output(out_dir, overwrite=True)

    outputs = [out_dir / f"{d.name}.nii.gz" for d in dirs]
    todo = [(d, out) for d, out in zip(dirs, outputs, strict=True) if not (resume and out.is_file())]
    if len(todo) < len(dirs):
        log.info("resume: %d of %d cases already predicted in %s", len(dirs) - len(todo), len(dirs), out_dir)
    start = time.perf_counter()
    for case_dir, out in tqdm(todo, desc="predict", unit="case"):
        case, labels, probs = segmenter.segment(case_dir, preferred, probabilities=probabilities)
        if probs is not None:
            save_probabilities(out_dir / f"{case.name}_prob.nii.gz", probs, case)
        with atomic_path(out) as tmp:
            nib.save(label_image(labels, case), tmp)
    seconds = time.perf_counter() - start
    per_case = f" ({seconds / len(todo):.1f} s/case)" if todo else ""
    log.info("predicted %d cases in %.1f s%s on %s -> %s", len(todo), seconds, per_case, segmenter.device, out_dir)
    return outputs


def predict_out_of_fold(sweep: str | Path, input_path: str | Path, output: str | Path, *, layout: str | None = None,
                        probabilities: bool = False, overwrite: bool = False, resume: bool = False,
                        **options: Any) -> list[Path]:
    """Each fold's validation cases (its split.json) predicted by that fold's checkpoints/best.ckpt, all into one
    `output`: every non-test case once, by the model that did not train on it. `options` go to
    Segmenter.from_checkpoint (device, tta, postprocess, precision, overlap, window_batch)."""
    jobs = out_of_fold_jobs(sweep)
    outputs: list[Path] = []
    for i, (ckpt, cases) in enumerate(jobs):
        log.info("out-of-fold %d/%d: %d validation cases with %s", i + 1, len(jobs), len(cases), ckpt)
        segmenter = Segmenter.from_checkpoint(ckpt, **options)
        # The first fold checks the output folder; later folds add their own (disjoint) cases to it.
        outputs += predict_folder(segmenter, input_path, output, only=cases, layout=layout,
                                  probabilities=probabilities, overwrite=overwrite if i == 0 else not resume,
                                  resume=resume)
    return sorted(outputs)
