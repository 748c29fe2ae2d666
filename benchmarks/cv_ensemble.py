"""3-fold cross-validation + its 3-model ensemble vs each single fold model, on the same held-out test cases.

    python -m benchmarks.cv_ensemble [--work outputs/cv_ensemble] [--data data/synthetic] [--folds 3] [--tta]
        [--cases 20 --shape 120 120 78] [extra brats-train overrides ...]

Runs the commands a user types, one after the other (every step resumes: rerun after an interruption):
    brats-synth --out <data> --cases 20 --seed 0 --shape 120 120 78         (skipped when <data> exists)
    brats-preprocess data=synthetic data.root=<data> preprocess=modern
    brats-train -m experiment=quickstart data.root=<data> data.num_folds=3 data.fold=0,1,2 \
        hydra.sweep.dir=<work>/cv ckpt_path=last
    brats-predict ckpt_path=<work>/cv/<k>/checkpoints/best.ckpt ... split_subset=test   (each fold's model)
    brats-predict ckpt_path=<work>/cv ... split_subset=test                            (the ensemble)
    brats-predict ckpt_path=<work>/cv oof=true ...                                     (out-of-fold)
    brats-evaluate pred=... truth=<data> [split_file=<work>/cv/0/split.json split_subset=test]
    brats-report run=<work>/cv                                                          (cv.md, cv.csv)
Prints the table (also as Markdown, for the README) and writes benchmarks/results/cv_ensemble-cpu.json. The test
cases are the same for every fold. Extra arguments go to brats-train (e.g. a smaller smoke test:
`--data /tmp/tiny --cases 6 --shape 64 64 48 --work /tmp/cv data.patch_size=[32,32,32] trainer.max_epochs=1`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import print_table, write_result

SCRIPTS = Path(sys.executable).parent
REGIONS = ("wt", "tc", "et")
COLUMNS = ("model", "cases", "dice_wt", "dice_tc", "dice_et", "dice_mean", "hd95_wt", "hd95_tc", "hd95_et",
           "predict_s")


def run(name: str, *args: str) -> float:
    """Run an installed console script, stop on failure; return its wall-clock seconds."""
    start = time.perf_counter()
    print(f"$ {name} {' '.join(args)}", flush=True)
    result = subprocess.run([str(SCRIPTS / name), *args])
    if result.returncode:
        raise SystemExit(f"{name} failed with exit code {result.returncode}")
    return time.perf_counter() - start


def scores(summary_path: Path) -> dict[str, Any]:
    """Mean Dice and HD95 per region (and mean Dice) from a brats-evaluate summary.json."""
    summary = json.loads(summary_path.read_text())
    metrics = summary["metrics"]
    row: dict[str, Any] = {"cases": summary["n_cases"]}
    row |= {f"dice_{r}": metrics[f"dice_{r}"]["mean"] for r in REGIONS}
    row |= {f"hd95_{r}": metrics[f"hd95_{r}"]["mean"] for r in REGIONS}
    row["dice_mean"] = sum(row[f"dice_{r}"] for r in REGIONS) / len(REGIONS)
    return row


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The README's table: mean Dice and HD95 (mm) per region over the cases each model predicted."""
    head = "| model | cases | Dice WT | Dice TC | Dice ET | Dice mean | HD95 WT | HD95 TC | HD95 ET |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[c]:.3f}" if r[c] is not None else "-" for c in COLUMNS[2:6]]
        cells += [f"{r[c]:.1f}" if r[c] is not None else "-" for c in COLUMNS[6:9]]
        lines.append(f"| {r['model']} | {r['cases']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cv_ensemble", description=__doc__.split("\n")[0])
    p.add_argument("--work", default="outputs/cv_ensemble", help="sweep, predictions and evaluations go here")
    p.add_argument("--data", default="data/synthetic", help="synthetic BraTS root (generated when absent)")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--tta", action="store_true", help="predict with the 8-flip TTA (8x slower)")
    p.add_argument("--cases", type=int, default=20, help="synthetic cases to generate when --data is absent")
    p.add_argument("--shape", type=int, nargs=3, default=[120, 120, 78], help="synthetic volume shape")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("overrides", nargs="*", help="extra brats-train overrides")
    args = p.parse_args(argv)
    work, data, k = Path(args.work), Path(args.data), args.folds
    cv = work / "cv"
    tta = f"tta={str(args.tta).lower()}"

    if not data.is_dir():
        run("brats-synth", "--out", str(data), "--cases", str(args.cases), "--seed", "0", "--shape",
            *map(str, args.shape), "--quiet")
    run("brats-preprocess", "data=synthetic", f"data.root={data}", "preprocess=modern")
    train_s = run("brats-train", "-m", "experiment=quickstart", f"data.root={data}", f"data.num_folds={k}",
                  "data.fold=" + ",".join(map(str, range(k))), f"hydra.sweep.dir={cv}", "ckpt_path=last",
                  "data.stratify=false", *args.overrides)  # the published folds (the quickstart stratifies since)
    test = ["split_file=" + str(cv / "0" / "split.json"), "split_subset=test"]
    models = {f"fold {i}": [f"ckpt_path={cv / str(i) / 'checkpoints' / 'best.ckpt'}", *test] for i in range(k)}
    models[f"ensemble of {k}"] = [f"ckpt_path={cv}", *test]
    models["out-of-fold (CV estimate)"] = [f"ckpt_path={cv}", "oof=true"]
    rows = []
    for label, ckpt_args in models.items():
        slug = label.split(" (")[0].replace(" ", "_")
        pred, evaluation = work / "pred" / slug, work / "eval" / slug
        seconds = run("brats-predict", *ckpt_args, f"input={data}", f"output={pred}", tta, "overwrite=true")
        run("brats-evaluate", f"pred={pred}", f"truth={data}", f"output={evaluation}", "overwrite=true",
            *(a for a in ckpt_args if a.startswith("split_")))
        rows.append({"model": label, **scores(evaluation / "summary.json"), "predict_s": seconds})
    run("brats-report", f"run={cv}", f"output={work / 'report'}", "overwrite=true")

    test_cases = json.loads((cv / "0" / "split.json").read_text())["test"]
    print_table(rows, COLUMNS, title=f"{k}-fold CV on {data} ({len(test_cases)} test cases; TTA {args.tta})")
    print("\n" + markdown(rows))
    payload = {"rows": rows, "folds": k, "tta": args.tta, "data": str(data), "test_cases": test_cases,
               "train_overrides": args.overrides,
               "train_s_this_invocation": train_s, "cv_md": (work / "report" / "cv.md").read_text()}
    path = write_result("cv_ensemble", payload, torch.device("cpu"), args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
