"""Score predicted label maps against BraTS ground truth: per-case rows (metrics.csv) and a summary (summary.json).

Predictions use the dataset's own labels (ET 4 for BraTS 2021 names, 3 for 2023), as brats-predict writes them.
Cases are never dropped silently: truth cases without a prediction and predictions without truth are listed.
The label set and regions come from a challenge (evaluation.challenges), by default the one of each case's detected
file layout (brats2021 or brats2023); the numbers of a row come from brats_unet.evaluation.scoring.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from brats_unet.data.cases import et_hint, read_labels
from brats_unet.data.discovery import EXTENSIONS, find_file, layout_order, list_case_dirs, resolve_layout, subfolders
from brats_unet.data.labels import LAYOUTS, Layout
from brats_unet.data.split import read_split
from brats_unet.evaluation.challenges import CHALLENGES, Challenge, resolve_challenge
from brats_unet.evaluation.manifest import check_one_model
from brats_unet.evaluation.scoring import check_options, score_labels
from brats_unet.utils import BratsError, atomic_path

log = logging.getLogger("brats_unet.evaluate")

# Today's columns, always first and unchanged for brats2021/2023 data; extra columns follow (see evaluation.scoring).
CSV_COLUMNS = ("case", "dice_wt", "dice_tc", "dice_et", "hd95_wt", "hd95_tc", "hd95_et", "dice_ncr", "dice_ed",
               "vol_pred_wt", "vol_pred_tc", "vol_pred_et", "vol_true_wt", "vol_true_tc", "vol_true_et")
CSV_NAME, SUMMARY_NAME = "metrics.csv", "summary.json"
UNITS = {"dice_*, nsd_*, *_dsc_*, *_nsd_*, *_prec_*, *_rec_*, *_f1_*": "fraction 0..1", "hd95_*, *_hd95_*": "mm",
         "vol_pred_*, vol_true_*": "mL (voxel count x the header's voxel volume)", "*_tp_*, *_fp_*, *_fn_*": "lesions"}
AFFINE_ATOL = 1e-3
STATISTICS_NOTE = ("per metric over the cases with a finite value: NaN (undefined, e.g. the lesion-wise Dice of a "
                   "region empty in both maps) is skipped, as the official BraTS leaderboard does; n counts the values "
                   "used; std is the sample standard deviation (ddof=1, null below 2 values)")


# Files brats-predict writes beside <case>.nii.gz that are not label maps: probabilities and uncertainty.
SIDECARS = ("_prob", "_uncertainty")


def find_predictions(pred_dir: str | Path) -> dict[str, Path]:
    """`<case>.nii.gz` (or `.nii`) files in a folder; sidecars (`*_prob`, `*_uncertainty`) and temp files are not
    predictions."""
    root = Path(pred_dir).expanduser()
    if not root.is_dir():
        raise BratsError(f"pred {root} is not a folder of <case>.nii.gz predictions")
    found: dict[str, Path] = {}
    for ext in reversed(EXTENSIONS):  # .nii.gz last, so it wins over a .nii of the same case
        for path in root.glob(f"*{ext}"):
            case = path.name[: -len(ext)]
            if path.is_file() and not path.name.startswith(".") and not case.endswith(SIDECARS):
                found[case] = path
    return dict(sorted(found.items()))


def find_truth(root: str | Path, layout: str | None) -> dict[str, tuple[Path, Layout]]:
    """Case -> (seg file, layout) under a BraTS root; the layout is detected per case unless `layout` is given."""
    layouts = [resolve_layout(layout)] if layout else layout_order(None)
    truth: dict[str, tuple[Path, Layout]] = {}
    unlabelled = []
    root = Path(root).expanduser()
    msd = next((lay for lay in layouts if lay.channels), None)
    case_dirs = list_case_dirs(root, msd) if msd and (root / "labelsTr").is_dir() else subfolders(root, "truth")
    for case_dir in case_dirs:
        hit = next(((seg, lay) for lay in layouts if (seg := find_file(case_dir, lay, "seg"))), None)
        if hit:
            truth[case_dir.name] = hit
        else:
            unlabelled.append(case_dir.name)
    if unlabelled:
        log.warning("%d case folders in %s have no segmentation and are not scored (e.g. %s)", len(unlabelled), root,
                    ", ".join(unlabelled[:3]))
    if not truth:
        names = " or ".join(lay.filename("<case>", "seg") for lay in layouts)
        raise BratsError(f"truth {root} holds no case folders with a segmentation ({names})")
    return truth


def challenge_for(layout: Layout, challenge: str | None) -> Challenge:
    """The challenge a case is scored by: the one named, else the one of its file layout (brats2021/brats2023)."""
    if challenge:
        return resolve_challenge(challenge)
    return CHALLENGES[layout.schema]  # brats2021, brats2023 (GoAT), msd_brain


def default_lesionwise(challenges: Sequence[Challenge]) -> bool:
    """Lesion-wise metrics by default when any case's challenge has an official config (2023 and later)."""
    return any(c.official_config for c in challenges)


def read_case_labels(path: Path, challenge: Challenge) -> tuple[np.ndarray, np.ndarray, Any]:
    """(labels as in the file, affine, header) through the one label-map reader, with the challenge's label set."""
    others = ", ".join(c for c in CHALLENGES if c != challenge.name)
    hint = et_hint(LAYOUTS[challenge.name]) if challenge.name in LAYOUTS else ""
    return read_labels(path, challenge.schema.values, challenge.name,
                       f"{hint}; another label set? challenge= one of {others}")


def score_case(case: str, pred: Path | None, seg: Path, challenge: Challenge, **options: Any) -> dict[str, Any]:
    """One metrics.csv row; `pred` None scores an empty prediction (the BraTS convention for a missing case).
    `options` go to brats_unet.evaluation.scoring.score_labels (hd95, hd95_mode, nsd_tolerance, lesionwise)."""
    truth_labels, true_affine, header = read_case_labels(seg, challenge)
    spacing = tuple(float(z) for z in header.get_zooms()[:3])
    if pred is None:
        pred_labels = np.zeros_like(truth_labels)
    else:
        pred_labels, pred_affine, _ = read_case_labels(pred, challenge)
        if pred_labels.shape != truth_labels.shape:
            raise BratsError(f"prediction {pred} has shape {pred_labels.shape} but truth {seg} has "
                             f"{truth_labels.shape}: was it written in another geometry?")
        if not np.allclose(pred_affine, true_affine, atol=AFFINE_ATOL):
            raise BratsError(f"prediction {pred} and truth {seg} have different affines (max difference "
                             f"{np.abs(pred_affine - true_affine).max():.4g}): they are not in the same space")
    return {"case": case, **score_labels(pred_labels, truth_labels, challenge, spacing, **options)}


def case_metrics(pred_labels: np.ndarray, truth_labels: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                 layout: str | Layout = "brats2021", hd95: bool = True, *, challenge: str | None = None,
                 lesionwise: bool = False, hd95_mode: str = "pooled", nsd_tolerance: float | None = None
                 ) -> dict[str, float | None]:
    """One metrics.csv row (without `case`) for two label maps in the dataset's own labels; spacing in mm.

    `challenge` names the label set and regions (default: `layout`'s, i.e. brats2021 with ET 4 or brats2023 with
    ET 3); options as brats-evaluate's keys. BratsError for values that are not the challenge's labels."""
    return score_labels(pred_labels, truth_labels, challenge_for(resolve_layout(layout), challenge), spacing,
                        hd95=hd95, hd95_mode=hd95_mode, nsd_tolerance=nsd_tolerance, lesionwise=lesionwise)


def columns_of(rows: list[dict[str, Any]]) -> list[str]:
    """Every key in the order the rows first hold it (rows of brats2021/2023 start with CSV_COLUMNS)."""
    return list(dict.fromkeys(k for row in rows for k in row)) or list(CSV_COLUMNS)


def summarize(rows: list[dict[str, Any]], columns: Sequence[str] | None = None
              ) -> dict[str, dict[str, float | int | None]]:
    """Per metric: mean, std (sample std, ddof=1, as cv.md; None below 2 values), median, p25, p75 (linear
    interpolation) and n over finite values (see STATISTICS_NOTE)."""
    out: dict[str, dict[str, float | int | None]] = {}
    for name in (columns or columns_of(rows)):
        if name == "case":
            continue
        values = np.array([r[name] for r in rows if r.get(name) is not None and math.isfinite(r[name])], dtype=float)
        if values.size == 0:
            out[name] = {"mean": None, "std": None, "median": None, "p25": None, "p75": None, "n": 0}
            continue
        p25, median, p75 = np.percentile(values, [25, 50, 75])
        std = float(values.std(ddof=1)) if values.size > 1 else None
        out[name] = {"mean": float(values.mean()), "std": std, "median": float(median),
                     "p25": float(p25), "p75": float(p75), "n": int(values.size)}
    return out


def csv_text(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """metrics.csv's content: one row per case; an empty cell is a metric not computed (hd95=false), `nan` one that is
    undefined."""
    columns = list(columns or columns_of(rows))
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([row["case"], *("" if row.get(k) is None else repr(float(row[k])) for k in columns[1:])])
    return out.getvalue()


def with_csv_record(rows: list[dict[str, Any]], summary: dict[str, Any], columns: Sequence[str] | None = None
                    ) -> tuple[bytes, dict[str, Any]]:
    """(metrics.csv's bytes, the summary with their record `metrics_csv`: SHA-256 and row count)."""
    data = csv_text(rows, columns).encode()
    return data, {**summary, "metrics_csv": {"sha256": hashlib.sha256(data).hexdigest(), "rows": len(rows)}}


def write_results(output: str | Path, rows: list[dict[str, Any]], summary: dict[str, Any],
                  columns: Sequence[str] | None = None) -> dict[str, Any]:
    """metrics.csv and summary.json as one pair: summary.json records metrics.csv's SHA-256 and row count
    (`metrics_csv`), both are written to temp files first, and summary.json is renamed into place last. A crash
    between the two renames leaves a new metrics.csv beside an old (or no) summary.json, which `read_results`
    refuses instead of pairing them. Returns the summary as written."""
    folder = Path(output).expanduser()
    data, summary = with_csv_record(rows, summary, columns)
    # Nested atomic paths rename innermost first: metrics.csv, then summary.json, the file that vouches for it.
    with atomic_path(folder / SUMMARY_NAME) as json_tmp, atomic_path(folder / CSV_NAME) as csv_tmp:
        csv_tmp.write_bytes(data)
        json_tmp.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    return summary


def read_results(output: str | Path) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """(metrics.csv rows as text, summary.json) of a brats-evaluate output folder, checked to be one pair: BratsError
    when summary.json's recorded hash or row count does not match metrics.csv (a write interrupted between the two
    renames, or a file edited or copied from elsewhere). Folders written before the record existed are read as
    they are."""
    folder = Path(output).expanduser()
    paths = [folder / CSV_NAME, folder / SUMMARY_NAME]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise BratsError(f"{folder} holds no {' or '.join(missing)}: not a finished brats-evaluate output")
    data = paths[0].read_bytes()
    summary = json.loads(paths[1].read_text())
    rows = list(csv.DictReader(io.StringIO(data.decode(), newline="")))
    record = summary.get("metrics_csv")
    if record is not None and (record.get("sha256") != hashlib.sha256(data).hexdigest()
                               or record.get("rows") != len(rows)):
        raise BratsError(f"{paths[0]} ({len(rows)} rows) is not the metrics.csv that {paths[1]} summarises "
                         f"({record.get('rows')} rows, sha256 {str(record.get('sha256'))[:12]}...): the two were "
                         "written by different runs (an interrupted write?); rerun brats-evaluate with overwrite=true")
    return rows, summary


def evaluate(pred: str | Path, truth: str | Path, *, output: str | Path | None = None, layout: str | None = None,
             split_file: str | Path | None = None, split_subset: str = "test", hd95: bool = True,
             missing_as_empty: bool = False, overwrite: bool = False, progress: bool = False,
             challenge: str | None = None, lesionwise: bool | None = None, hd95_mode: str = "pooled",
             nsd_tolerance: float | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score every prediction in `pred` that has a truth case in scope -> (rows as in metrics.csv, summary as in
    summary.json); with `output`, also write `<output>/metrics.csv` and `<output>/summary.json` (atomically).

    challenge: label set and regions (None: each case's layout's, brats2021 or brats2023); lesionwise: the official
    lesion-wise columns (None: on when a challenge has an official config, i.e. not for brats2021); hd95_mode:
    "pooled" (medpy, official) or "max" (MONAI); nsd_tolerance: mm, adds nsd_<region> (None: none, and 1 mm for
    the lesion-wise NSD)."""
    check_options(hd95_mode, nsd_tolerance)
    if challenge:
        resolve_challenge(challenge)  # an unknown name fails before any file is read
    targets = [Path(output).expanduser() / name for name in (CSV_NAME, SUMMARY_NAME)] if output else []
    if targets and not overwrite and any(p.exists() for p in targets):
        raise BratsError(f"{targets[0].parent} already holds metrics.csv/summary.json; pass overwrite=true to replace "
                         "them or choose another output=")
    preds = find_predictions(pred)
    truths = find_truth(truth, layout)
    scope = sorted(truths)
    if split_file:
        wanted = read_split(split_file, split_subset)
        if not wanted:
            raise BratsError(f"split_file {split_file} holds no {split_subset} cases: nothing to evaluate (a run "
                             "with data.test_fraction=0 holds out no test set)")
        unknown = sorted(set(wanted) - set(truths))
        if unknown:
            raise BratsError(f"split_file {split_file} names {len(unknown)} {split_subset} cases that have no truth "
                             f"in {truth}: {', '.join(unknown[:5])}")
        scope = sorted(wanted)
    missing = [c for c in scope if c not in preds]
    extra = [c for c in preds if c not in truths]
    outside = [c for c in preds if c in truths and c not in scope]
    scored = [c for c in scope if c in preds or missing_as_empty]
    model = check_one_model(pred, [c for c in scored if c in preds])  # prediction.json: one model wrote them all
    if not any(c in preds for c in scope):
        raise BratsError(f"none of the {len(preds)} predictions in {pred} matches one of the {len(scope)} truth "
                         f"cases in scope under {truth} (e.g. prediction {next(iter(preds), '-')}, truth "
                         f"{scope[0] if scope else '-'})")
    if missing:
        # Not a blanket hint to score them as empty: out-of-fold predictions leave the held-out test cases out on
        # purpose, and scoring those as empty would count a model's unseen test set as all missed.
        oof = bool((model or {}).get("oof"))
        how = "scored as empty (missing_as_empty=true)" if missing_as_empty else (
            "not scored: this is an out-of-fold folder (prediction.json), which predicts every fold's validation cases "
            "and, on purpose, none of the held-out test cases; score those with the models' own test predictions "
            "(e.g. the sweep as an ensemble), never as empty") if oof else (
            "not scored. Cases left out on purpose (out-of-fold predictions hold no held-out test case) are rightly "
            "left out; restrict the truth to a split with split_file=<run>/split.json split_subset=... If they "
            "should have been predicted (brats-predict stopped early?), rerun it with resume=true, or score them "
            "as empty predictions with missing_as_empty=true (the BraTS convention)")
        if oof and missing_as_empty:
            how += ": an out-of-fold folder holds no held-out test case on purpose, so those count as all missed"
        log.warning("%d truth cases have no prediction (%s), %s", len(missing), ", ".join(missing[:5]), how)
    if extra:
        log.warning("%d predictions have no truth case: %s", len(extra), ", ".join(extra[:5]))

    challenges = {c: challenge_for(truths[c][1], challenge) for c in scored}
    if lesionwise is None:
        lesionwise = default_lesionwise(list(challenges.values()))
    if lesionwise and nsd_tolerance is None:
        nsd_tolerance = 1.0  # lesion-wise runs report NSD everywhere, at the official tolerance on 1 mm data
    options = dict(hd95=hd95, hd95_mode=hd95_mode, nsd_tolerance=nsd_tolerance, lesionwise=bool(lesionwise))
    rows = [score_case(c, preds.get(c), truths[c][0], challenges[c], **options)
            for c in tqdm(scored, desc="evaluate", disable=not progress)]
    columns = columns_of(rows)
    summary = {
        "metrics": summarize(rows, columns),
        "statistics": STATISTICS_NOTE,
        "units": UNITS,
        "n_cases": len(rows),
        "challenges": sorted({c.name for c in challenges.values()}),
        "lesionwise": bool(lesionwise),
        "hd95": bool(hd95),
        "hd95_mode": hd95_mode,
        "nsd_tolerance": nsd_tolerance,
        "missing_predictions": missing,
        "extra_predictions": extra,
        "outside_split_predictions": outside,
        "missing_as_empty": bool(missing_as_empty),
        "model": model,  # what prediction.json says wrote the predictions (None: a folder without one)
        "pred": str(Path(pred).expanduser().resolve()),
        "truth": str(Path(truth).expanduser().resolve()),
        "split_file": str(split_file) if split_file else None,
        "split_subset": str(split_subset) if split_file else None,
    }
    if targets:
        summary = write_results(targets[0].parent, rows, summary, columns)
        log.info("wrote %s and %s", *targets)
    else:  # the same summary as the written one: what its metrics.csv would hold
        summary = with_csv_record(rows, summary, columns)[1]
    return rows, summary
