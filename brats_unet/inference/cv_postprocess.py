"""Post-processing chosen on cases held out from the model (brats-postprocess), and reading the choice back for
brats-predict. The rules and the choosing are pure (inference.postprocess); this is the IO around it.

    brats-postprocess run=<cv sweep dir>: the folds' out-of-fold predictions (every non-test case once)
        <sweep>/postprocessing.json      what was chosen, with the out-of-fold scores before and after
        <sweep>/postprocess/oof/         the out-of-fold predictions it was chosen on (made here unless given)
    brats-postprocess run=<run dir>: one run's validation cases, by its checkpoints/best.ckpt (nnU-Net chooses on
    whatever folds exist; one run's few validation cases give a weaker, noisier estimate than K folds)
        <run>/postprocessing.json        the same format; `chosen_on` and `cases` say what it was chosen on
        <run>/postprocess/val/           the validation predictions it was chosen on (made here unless given)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from brats_unet.data.split import load_split
from brats_unet.evaluation.folder import (
    challenge_for,
    default_lesionwise,
    find_predictions,
    find_truth,
    read_case_labels,
)
from brats_unet.evaluation.manifest import read_manifest
from brats_unet.inference.ensemble import (
    check_split_is_the_checkpoints,
    is_run_dir,
    out_of_fold_jobs,
    resolve_checkpoints,
    run_checkpoint,
)
from brats_unet.inference.folder import predict_folder, predict_out_of_fold
from brats_unet.inference.postprocess import (
    DEFAULT_ET_TOTALS,
    DEFAULT_SIZES,
    RECORD_VERSION,
    choose_rules,
)
from brats_unet.inference.rules_file import ONE_RUN, RULES_FILE, checkpoints_record
from brats_unet.inference.segmenter import Segmenter
from brats_unet.training.checkpoint import load_checkpoint
from brats_unet.utils import BratsError, atomic_write_json

log = logging.getLogger("brats_unet.postprocess")

OOF_DIR = Path("postprocess") / "oof"
VAL_DIR = Path("postprocess") / "val"
FEW_CASES = 5  # below this many cases a choice is logged as noisy (one case can decide it)


def out_of_fold(folds: int) -> str:
    return f"out-of-fold predictions of {folds} folds"


def chosen_on(record: Any) -> str:
    """What a postprocessing.json's rules were chosen on, in words (files written before `chosen_on`: out-of-fold)."""
    return str(record.get("chosen_on") or "out-of-fold predictions") if isinstance(record, dict) else "?"


def trained_root(job: Path, ckpt: Path) -> Path:
    """The data.root a job trained on: its checkpoint's config (resolved when it trained: `data/synthetic`), else
    its .hydra/config.yaml, which Hydra stores unresolved (`${paths.data_dir}/synthetic`, resolved here as now)."""
    data = (load_checkpoint(ckpt).get("brats_config") or {}).get("data") or {}
    if data.get("root"):
        return Path(str(data["root"])).expanduser()
    path = job / ".hydra" / "config.yaml"
    if not path.is_file():
        raise BratsError(f"{path} not found and {ckpt} names no data.root: is {job} a brats-train job folder? Pass "
                         "truth=<BraTS root>")
    try:
        root = OmegaConf.select(OmegaConf.load(path), "data.root", throw_on_resolution_failure=True)
    except Exception as e:  # OmegaConf's resolution and YAML errors
        raise BratsError(f"{path}: data.root cannot be resolved here ({e}); pass truth=<BraTS root>") from e
    if not root:
        raise BratsError(f"{path} names no data.root; pass truth=<BraTS root>")
    return Path(str(root)).expanduser()


def choose_postprocessing(run: str | Path, **options: Any) -> dict[str, Any]:
    """brats-postprocess run=<dir>: a single run dir (checkpoints/, split.json) -> choose_for_run, a sweep ->
    choose_for_sweep (same options)."""
    path = Path(run).expanduser()
    if not path.is_dir():
        raise BratsError(f"run={path} is not a folder: pass a brats-train run dir or a cross-validation sweep dir")
    return choose_for_run(path, **options) if is_run_dir(path) else choose_for_sweep(path, **options)


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
    out = sweep / RULES_FILE
    if out.exists() and not overwrite:
        raise BratsError(f"{out} already exists; pass overwrite=true to choose again")
    jobs = out_of_fold_jobs(sweep)  # refuses anything but the complete folds of one k-fold split
    cases = sorted(c for _, val in jobs for c in val)
    truth = Path(truth).expanduser() if truth is not None else trained_root(jobs[0][0].parent.parent, jobs[0][0])
    checkpoints = checkpoints_record(sweep, resolve_checkpoints(sweep))
    if predictions is None:
        predictions = sweep / OOF_DIR
        log.info("out-of-fold predictions of %d cases -> %s", len(cases), predictions)
        # overwrite=true after a retrain: the folds' new models replace the old ones' predictions (else: resume).
        predict_out_of_fold(sweep, truth, predictions, layout=layout, resume=True, replace=overwrite,
                            **predict_options)
    result = choose_on(cases, predictions, truth, what="out-of-fold",
                       raw=f"brats-predict ckpt_path={sweep} oof=true cv_postprocess=false", layout=layout,
                       challenge=challenge, lesionwise=lesionwise, sizes=sizes, et_totals=et_totals)
    record = {"version": RECORD_VERSION, "sweep": str(sweep), "chosen_on": out_of_fold(len(jobs)),
              "checkpoints": checkpoints,
              "predictions": str(Path(predictions)), "truth": str(truth), **result}
    atomic_write_json(out, record)
    return record


def choose_for_run(run: str | Path, *, predictions: str | Path | None = None, truth: str | Path | None = None,
                   layout: str | None = None, challenge: str | None = None, lesionwise: bool | None = None,
                   sizes: Sequence[int] = DEFAULT_SIZES, et_totals: Sequence[int] = DEFAULT_ET_TOTALS,
                   overwrite: bool = False, **predict_options: Any) -> dict[str, Any]:
    """Choose rules on one run's validation cases (its split.json) and write <run>/postprocessing.json (atomically).

    `predictions`: a folder of those cases' `<case>.nii.gz` by the run's best.ckpt; None: <run>/postprocess/val,
    predicted there first (resuming; with overwrite=true, replacing another model's) with `predict_options`.
    `truth`: None: the data.root the run trained on. Weaker than choosing on K folds: fewer cases, one model.
    """
    run = Path(run).expanduser()
    out = run / RULES_FILE
    if out.exists() and not overwrite:
        raise BratsError(f"{out} already exists; pass overwrite=true to choose again")
    ckpt = run_checkpoint(run)
    split_path = run / "split.json"
    if not split_path.is_file():
        raise BratsError(f"{split_path} not found: brats-postprocess run=<run dir> chooses on the validation cases "
                         "that run's split.json names")
    split = load_split(split_path, need_train=False)
    if not split["val"]:
        raise BratsError(f"{split_path} holds no validation cases: post-processing is chosen on cases held out from "
                         "the model (train with validation cases, e.g. data.val_fraction > 0, or choose on a "
                         "cross-validation sweep: brats-postprocess run=<sweep dir>)")
    check_split_is_the_checkpoints(split_path, split, ckpt)
    cases = sorted(split["val"])
    truth = Path(truth).expanduser() if truth is not None else trained_root(run, ckpt)
    if predictions is None:
        predictions = run / VAL_DIR
        log.info("validation predictions of %d cases by %s -> %s", len(cases), ckpt, predictions)
        predict_held_out(ckpt, cases, truth, predictions, layout=layout, replace=overwrite, **predict_options)
    raw = f"brats-predict ckpt_path={ckpt} input={truth} split_file={split_path} split_subset=val"
    result = choose_on(cases, predictions, truth, what="validation", raw=raw, layout=layout, challenge=challenge,
                       lesionwise=lesionwise, sizes=sizes, et_totals=et_totals)
    record = {"version": RECORD_VERSION, "run": str(run), "chosen_on": ONE_RUN,
              "checkpoints": checkpoints_record(run, [ckpt]), "predictions": str(Path(predictions)),
              "truth": str(truth), **result}
    atomic_write_json(out, record)
    return record


def predict_held_out(ckpt: Path, cases: Sequence[str], truth: Path, output: Path, *, layout: str | None,
                     replace: bool, **options: Any) -> None:
    """`cases` by `ckpt` into `output`, resuming; `replace`: predictions another model left there are replaced
    (brats-postprocess overwrite=true after a retrain), not refused."""
    segmenter = Segmenter.from_checkpoint(ckpt, **options)
    predict_folder(segmenter, truth, output, only=cases, layout=layout, resume=True, replace=replace)


def choose_on(cases: Sequence[str], predictions: str | Path, truth: Path, *, what: str, raw: str,
              layout: str | None, challenge: str | None, lesionwise: bool | None, sizes: Sequence[int],
              et_totals: Sequence[int]) -> dict[str, Any]:
    """choose_rules on the `what` (out-of-fold | validation) predictions of `cases` against their truths: the
    challenge and choose_rules' result. `raw`: the command that writes such predictions, for messages."""
    manifest = read_manifest(predictions)
    if manifest is not None and manifest["model"].get("cv_postprocessing") is not None:
        raise BratsError(f"predictions {predictions} were written with post-processing already applied (its "
                         f"prediction.json lists cv_postprocessing): choose on raw {what} predictions, e.g. "
                         f"{raw}, or leave predictions unset")
    preds = find_predictions(predictions)
    missing = [c for c in cases if c not in preds]
    if missing:
        raise BratsError(f"predictions {predictions} lack {len(missing)} of the {len(cases)} {what} cases (e.g. "
                         f"{', '.join(missing[:3])}); predict them with {raw}, or leave predictions unset to have "
                         "them made")
    truths = find_truth(truth, layout)
    absent = [c for c in cases if c not in truths]
    if absent:
        raise BratsError(f"truth {truth} has no segmentation for {len(absent)} {what} cases (e.g. "
                         f"{', '.join(absent[:3])})")
    if len(cases) < FEW_CASES:
        log.warning("choosing post-processing on %d %s cases only: with so few, one case can decide a rule, so the "
                    "choice is noisy (a cross-validation sweep gives every non-test case)", len(cases), what)
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
        raise BratsError(f"the {what} cases mix label sets {sorted(challenges)}; pass challenge=<one of them>")
    chall = challenge_for(truths[cases[0]][1], challenge)
    if lesionwise is None:
        lesionwise = default_lesionwise([chall])
    result = choose_rules(pairs, chall, lesionwise=lesionwise, sizes=sizes, et_totals=et_totals, spacings=spacings)
    return {"challenge": chall.name, **result}
