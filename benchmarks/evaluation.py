"""Challenge-grade evaluation: CPU seconds per case for every metric (region-wise Dice, HD95 pooled and max, NSD;
lesion-wise as the official parsers report it), ours vs the official `brats-evaluation` package on the same synthetic
cases, and how far our numbers are from the official ones.

    python -m benchmarks.evaluation [--quick] [--challenges brats2024_gli,brats_met] [--cases 3] [--out DIR]

Cases are made-up 240x240x155 label maps (1 mm): a few tumours of typical size (~20-120 cm^3 whole tumour) plus small
satellites, and a prediction that shifts, erodes, drops and adds lesions. The official column is skipped when
`brats-evaluation` (the `eval` extra) is not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from benchmarks.common import median, parse_ints, parse_words, print_table, threads, write_result
from brats_unet.evaluation.challenges import CHALLENGES, Challenge
from brats_unet.evaluation.lesionwise import lesionwise_metrics
from brats_unet.evaluation.region import dice
from brats_unet.evaluation.surface import crop_pair, hd95_from_distances, nsd_from_distances, surface_distances

# Tissue roles of the generator, mapped to each challenge's labels by label name.
ROLES = {"ed": 1, "snfh": 1, "gtv": 1, "et": 2, "ncr": 3, "netc": 3, "cc": 4, "rc": 5}


def _blob(rng: np.random.Generator, radius: float) -> np.ndarray:
    """An irregular ellipsoid in its own box: distance to an ellipsoid, perturbed by smooth noise."""
    size = int(math.ceil(radius * 1.6)) + 2
    axes = radius * rng.uniform(0.7, 1.3, 3)
    grid = np.mgrid[-size:size + 1, -size:size + 1, -size:size + 1].astype(np.float32)
    r = np.sqrt(sum((g / a) ** 2 for g, a in zip(grid, axes, strict=True)))
    noise = ndimage.gaussian_filter(rng.standard_normal(r.shape).astype(np.float32), max(radius / 4, 1.0))
    return r + 0.25 * noise / (noise.std() + 1e-6)


def _place(volume: np.ndarray, blob: np.ndarray, centre: Sequence[int], values: list[tuple[float, int]]) -> None:
    """Paint `blob` <= threshold with each (threshold, role), outer first, into `volume` around `centre`."""
    half = blob.shape[0] // 2
    dst, src = [], []
    for c, n in zip(centre, volume.shape, strict=True):
        lo, hi = max(c - half, 0), min(c + half + 1, n)
        dst.append(slice(lo, hi))
        src.append(slice(lo - (c - half), hi - (c - half)))
    view, part = volume[tuple(dst)], blob[tuple(src)]
    for threshold, role in values:
        view[part <= threshold] = role


def synthetic_case(challenge: Challenge, shape: Sequence[int] = (240, 240, 155), seed: int = 0,
                   tumours: int = 2, satellites: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, truth) label maps (uint8) in the challenge's own labels."""
    rng = np.random.default_rng(seed)
    roles = np.zeros(shape, np.uint8)
    margin = np.array(shape) // 5
    for _ in range(tumours):
        centre = rng.integers(margin, np.array(shape) - margin)
        _place(roles, _blob(rng, rng.uniform(14, 24)), centre, [(1.0, 1), (0.55, 2), (0.4, 3), (0.2, 4)])
    for _ in range(satellites):  # small enhancing lesions: the metastases parser's "small" ones among them
        _place(roles, _blob(rng, rng.uniform(1.2, 4.0)), rng.integers(margin, np.array(shape) - margin),
               [(1.0, 2)])
    _place(roles, _blob(rng, 8.0), rng.integers(margin, np.array(shape) - margin), [(1.0, 5)])

    # Prediction: shifted, boundary noise, one lesion eroded away, false-positive specks.
    pred = np.roll(roles, tuple(rng.integers(-2, 3, 3)), axis=(0, 1, 2))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2.0)
    grown = ndimage.grey_dilation(pred, size=(3, 3, 3))
    pred = np.where((noise > 0.12) & (pred == 0), grown, pred)
    pred[(noise < -0.15) & (ndimage.grey_erosion(pred, size=(3, 3, 3)) == 0)] = 0
    for _ in range(2):
        _place(pred, _blob(rng, rng.uniform(1.5, 3.0)), rng.integers(margin, np.array(shape) - margin), [(1.0, 2)])
    return _to_labels(pred, challenge), _to_labels(roles, challenge)


def _to_labels(roles: np.ndarray, challenge: Challenge) -> np.ndarray:
    lut = np.zeros(6, np.uint8)
    by_role = {ROLES[name]: value for value, name in challenge.labels.items() if name in ROLES}
    for role in range(1, 6):  # a role the challenge lacks falls back to the next-outer tissue
        for candidate in (role, 3, 2, 1):
            if candidate in by_role:
                lut[role] = by_role[candidate]
                break
    return lut[roles]


# ---- ours and the official package ---------------------------------------------------------------------------------
def ours_all(pred: np.ndarray, truth: np.ndarray, challenge: Challenge, spacing=(1.0, 1.0, 1.0),
             tolerance_mm: float = 1.0) -> dict[str, float]:
    """Every metric brats-evaluate can report: region-wise Dice / HD95 (pooled, max) / NSD, then lesion-wise."""
    out: dict[str, float] = {}
    pred, truth = crop_pair(pred, truth)  # no metric changes; the box is a few percent of the volume
    for region, labels in challenge.regions.items():
        p, t = np.isin(pred, labels), np.isin(truth, labels)
        out[f"dice_{region}"] = dice(p, t)
        distances = surface_distances(p, t, spacing)
        if distances is not None:
            out[f"hd95_{region}"] = hd95_from_distances(*distances, mode="pooled")
            out[f"hd95max_{region}"] = hd95_from_distances(*distances, mode="max")
            out[f"nsd_{region}"] = nsd_from_distances(*distances, tolerance_mm=tolerance_mm)
    out.update(lesionwise_metrics(pred, truth, challenge, spacing, nsd_tolerance_mm=tolerance_mm))
    return out


def official_available() -> bool:
    try:
        import brats_evaluation  # noqa: F401
        import panoptica  # noqa: F401
    except ImportError:
        return False
    return True


def official_evaluator(challenge: Challenge):
    from brats_evaluation import config_path
    from panoptica import Panoptica_Evaluator

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return Panoptica_Evaluator.load_from_config(str(config_path(challenge.official_config)))


def official_metrics(pred: np.ndarray, truth: np.ndarray, challenge: Challenge, evaluator=None) -> dict[str, float]:
    """The official pipeline on arrays: panoptica's evaluate, then the challenge's parser on its JSON, one CSV row.

    The arrays go in with their axes reversed, as panoptica sees a NIfTI file it reads (through SimpleITK): that is
    the order in which it numbers lesions, which decides ties in the matching (1 mm data: nothing else changes)."""
    import pandas as pd
    from brats_evaluation import parse_mets_results, parse_seg_results

    evaluator = evaluator or official_evaluator(challenge)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        groups = evaluator.evaluate(np.ascontiguousarray(pred.T), np.ascontiguousarray(truth.T))
        record = {name: result.to_dict(True) for name, result in groups.items()}
        record["subject_name"] = "case"
        json_path, csv_path = Path(tmp) / "results.json", Path(tmp) / "parsed.csv"
        json_path.write_text(json.dumps({"metrics": [record], "missings": []}, default=_json_default))
        if challenge.parser == "mets":
            parse_mets_results(str(json_path), challenge.lesion_volume_threshold, challenge.detection_dice_threshold,
                               str(csv_path))
        else:
            parse_seg_results(str(json_path), str(csv_path))
        row = pd.read_csv(csv_path).iloc[0].to_dict()
    return {k: float(v) for k, v in row.items() if k != "subject_id"}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def compare(ours: dict[str, float], official: dict[str, float]) -> dict[str, float]:
    """Largest |ours - official| per official key (0 when both NaN or both inf, inf when only one is)."""
    diffs = {}
    for key, ref in official.items():
        mine = ours.get(key, float("nan"))
        if (math.isnan(ref) and math.isnan(mine)) or ref == mine:
            diffs[key] = 0.0
        elif math.isnan(ref) or math.isnan(mine) or math.isinf(ref) or math.isinf(mine):
            diffs[key] = float("inf")
        else:
            diffs[key] = abs(mine - ref)
    return diffs


# ---- the benchmark ---------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    have_official = official_available() and not args.no_official
    rows, agreement = [], {}
    for name in args.challenges:
        challenge = CHALLENGES[name]
        evaluator = official_evaluator(challenge) if have_official and challenge.official_config else None
        ours_s, official_s, worst = [], [], {}
        for seed in range(args.cases):
            pred, truth = synthetic_case(challenge, args.shape, seed=seed)
            start = time.process_time()
            ours = ours_all(pred, truth, challenge)
            ours_s.append(time.process_time() - start)
            if evaluator is not None:
                start = time.process_time()
                official = official_metrics(pred, truth, challenge, evaluator)
                official_s.append(time.process_time() - start)
                # the official global NSD counts coinciding surface voxels only (0.5 voxel): compare like with like
                ours_global = lesionwise_metrics(pred, truth, challenge, global_nsd_tolerance_mm=0.5)
                ours.update({k: v for k, v in ours_global.items() if k.startswith("global_nsd")})
                for key, diff in compare(ours, official).items():
                    worst[key] = max(worst.get(key, 0.0), diff)
        regions = len(challenge.regions)
        row = {"challenge": name, "cases": args.cases, "regions": regions, "ours_cpu_s": median(ours_s),
               "ours_cpu_s_per_region": median(ours_s) / regions,
               "official_cpu_s": median(official_s) if official_s else None,
               "speedup": median(official_s) / median(ours_s) if official_s else None,
               "max_abs_diff": max(worst.values()) if worst else None,
               "status": "ok" if evaluator is not None else "official not installed" if not have_official
               else "no official config"}
        rows.append(row)
        if worst:
            agreement[name] = worst
        print(f"[evaluation] {name}: ours {row['ours_cpu_s']:.2f} s/case", flush=True)
    return {"case_shape": list(args.shape), "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "official_installed": have_official, "rows": rows, "max_abs_diff_per_key": agreement}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.evaluation", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one case of the 2024 glioma challenge")
    p.add_argument("--challenges", type=parse_words, help="comma-separated names from brats_unet.evaluation.challenges")
    p.add_argument("--cases", type=int, help="synthetic cases per challenge (default 3, quick 1)")
    p.add_argument("--shape", type=parse_ints, default=[240, 240, 155])
    p.add_argument("--no-official", action="store_true", help="skip the official package even when installed")
    p.add_argument("--threads", type=int, help="intra-op torch threads (the metrics themselves are numpy/scipy)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.challenges is None:
        args.challenges = ["brats2024_gli"] if args.quick else ["brats2024_gli", "brats_met", "brats_ped", "brats_men"]
    unknown = sorted(set(args.challenges) - set(CHALLENGES))
    if unknown:
        p.error(f"--challenges: unknown {unknown}; choose from {sorted(CHALLENGES)}")
    if args.cases is None:
        args.cases = 1 if args.quick else 3
    return args


COLUMNS = ["challenge", "cases", "regions", "ours_cpu_s", "ours_cpu_s_per_region", "official_cpu_s", "speedup",
           "max_abs_diff", "status"]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with threads(args.threads):
        result = run(args)
        path = write_result("evaluation", result, torch.device("cpu"), args.out)
    print_table(result["rows"], COLUMNS, title=f"all metrics per {result['case_shape']} case (CPU seconds, median)")
    print(f"wrote {path}", flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
