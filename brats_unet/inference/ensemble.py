"""Several checkpoints as one model: what a `ckpt_path` names, whether the models can be averaged, and the jobs of a
cross-validation sweep (each fold's best checkpoint and validation cases, for out-of-fold prediction).

    ckpt_path=a.ckpt                  one model
    ckpt_path=<run dir>               one model: the run's checkpoints/best.ckpt
    ckpt_path='[a.ckpt,b.ckpt]'       an ensemble of the listed checkpoints
    ckpt_path=<sweep dir>             an ensemble of every job's checkpoints/best.ckpt
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from brats_unet.data.preprocess import Recipe
from brats_unet.data.split import load_split
from brats_unet.runs import NEVER_VALIDATED, find_jobs, read_metrics, validated
from brats_unet.training.checkpoint import load_checkpoint
from brats_unet.training.network import data_schema
from brats_unet.utils import BratsError

BEST = Path("checkpoints") / "best.ckpt"
# Settings that do not change what a model is fed at prediction: the cache's storage precision.
PREPROCESS_IGNORED = ("dtype",)
CheckpointSpec = str | Path | Sequence[str | Path]


def is_run_dir(path: Path) -> bool:
    """A single brats-train run folder (checkpoints/ or split.json, no job folders): not a sweep."""
    marks = (path / "checkpoints").is_dir() or (path / "split.json").is_file()
    return marks and path.is_dir() and not find_jobs(path)


def run_checkpoint(run: Path) -> Path:
    """A run dir's checkpoints/best.ckpt; BratsError naming it when the run has none."""
    best = run / BEST
    if best.is_file():
        return best
    metrics = read_metrics(run)
    if metrics is not None and not validated(metrics):
        raise BratsError(f"{best} not found: the run {run} {NEVER_VALIDATED}")
    raise BratsError(f"{best} not found: the run {run} has no best checkpoint (still training, or failed?); finish it "
                     "first (rerun brats-train with the same hydra.run.dir and ckpt_path=last)")


def sweep_checkpoints(sweep: Path) -> list[Path]:
    """Each job's checkpoints/best.ckpt, in job order; BratsError naming the jobs that have none."""
    jobs = find_jobs(sweep)
    if not jobs:
        what = ("a single run's folder, not a sweep (job folders with .hydra/overrides.yaml): out-of-fold "
                "predictions need the sweep of fold jobs" if is_run_dir(sweep) else "a folder but neither a sweep "
                f"(job folders with .hydra/overrides.yaml) nor a run ({BEST})")
        raise BratsError(f"ckpt_path {sweep} is {what}")
    missing = [job.name for job in jobs if not (job / BEST).is_file()]
    unvalidated = [j for j in missing if (m := read_metrics(sweep / j)) is not None and not validated(m)]
    if unvalidated:
        raise BratsError(f"ckpt_path {sweep}: jobs {', '.join(unvalidated)} have no {BEST}: each {NEVER_VALIDATED}")
    if missing:
        raise BratsError(f"ckpt_path {sweep}: jobs {', '.join(missing)} have no {BEST} (still training, or failed?); "
                         "finish them (rerun the sweep with the same hydra.sweep.dir and ckpt_path=last), or list the "
                         "checkpoints to use: ckpt_path='[a.ckpt,b.ckpt]'")
    return [job / BEST for job in jobs]


def resolve_checkpoints(spec: CheckpointSpec) -> list[Path]:
    """ckpt_path as typed -> checkpoint files: a file, a run dir (its best.ckpt), a sweep dir, or a list of these
    (flattened, in order)."""
    if isinstance(spec, str | Path):
        path = Path(spec).expanduser()
        if not path.is_dir():
            return [path]  # load_checkpoint names a missing file
        return [run_checkpoint(path)] if is_run_dir(path) else sweep_checkpoints(path)
    items = list(spec)
    if not items:
        raise BratsError("ckpt_path is an empty list: name at least one checkpoint")
    return [path for item in items for path in resolve_checkpoints(str(item))]


def head_of(activation: str) -> str:
    """What a model's output channels mean, in words for error messages."""
    return "sigmoid regions (wt, tc, et)" if activation == "sigmoid" else "softmax classes (background, ncr, ed, et)"


def _recipe(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dict(config["preprocess"]).items() if k not in PREPROCESS_IGNORED}


def _differences(a: Any, b: Any) -> tuple[str, str]:
    """Only the keys that differ, for dicts; the values themselves otherwise."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        return (", ".join(f"{k}={a.get(k)!r}" for k in keys), ", ".join(f"{k}={b.get(k)!r}" for k in keys))
    return str(a), str(b)


def check_compatible(names: Sequence[str], configs: Sequence[Mapping[str, Any]], activations: Sequence[str]) -> None:
    """BratsError naming two checkpoints that cannot be averaged: a voxel's probabilities from different inputs,
    channels, outputs or label layouts mean different things. Patch sizes may differ (each model its own window)."""
    facts = {
        "the layout (data.layout)": [c["data"]["layout"] for c in configs],
        "the label schema (data.schema)": [data_schema(c["data"]) for c in configs],
        "the input channels": [Recipe.from_config(c["preprocess"]).num_channels for c in configs],
        "the output head": [head_of(a) for a in activations],
        "the preprocessing (preprocess)": [_recipe(c) for c in configs],
    }
    for what, values in facts.items():
        for name, value in zip(names[1:], values[1:], strict=True):
            if value != values[0]:
                first, other = _differences(values[0], value)
                raise BratsError(f"cannot ensemble {names[0]} and {name}: they disagree on {what}: {first} vs "
                                 f"{other}. An ensemble averages the models' probabilities per voxel, so every model "
                                 "must read the same input and predict the same outputs")


def check_split_is_the_checkpoints(path: Path, split: Mapping[str, Any], ckpt: Path) -> None:
    """BratsError when a job's split.json is not the split its checkpoint was trained on (data.fold, data.num_folds,
    data.split_seed, data.stratify of the checkpoint's own config): e.g. a fold-2 run started in a folder holding fold
    0's split. A value either side does not record (older files) is not compared."""
    data = (load_checkpoint(ckpt).get("brats_config") or {}).get("data") or {}
    pairs = (("data.fold", data.get("fold"), split["fold"]), ("data.num_folds", data.get("num_folds"),
                                                               split["num_folds"]),
             ("data.split_seed", data.get("split_seed"), split["seed"]),
             ("data.stratify", data.get("stratify"), split.get("stratify")))
    differ = [f"{key}: checkpoint {mine!r}, split.json {theirs!r}" for key, mine, theirs in pairs
              if mine is not None and theirs is not None and mine != theirs]
    if differ:
        raise BratsError(f"{path} is not the split {ckpt} was trained on ({'; '.join(differ)}): its validation cases "
                         "are not held out from that model, so out-of-fold predictions would score training cases")


def out_of_fold_jobs(sweep: str | Path) -> list[tuple[Path, list[str]]]:
    """(best checkpoint, validation cases) of each fold of a cross-validation sweep (`data.fold=0,1,...`).

    Refuses a sweep whose jobs are not the folds of one k-fold split, each fold once: the out-of-fold estimate
    predicts every non-test case exactly once, with the one model that did not train on it.
    """
    sweep = Path(sweep).expanduser()
    if not sweep.is_dir():
        raise BratsError(f"oof=true needs ckpt_path=<cross-validation sweep dir>; {sweep} is not a folder")
    checkpoints = sweep_checkpoints(sweep)
    jobs, by_fold = [], {}
    for ckpt in checkpoints:
        job = ckpt.parent.parent
        split = load_split(job / "split.json", need_train=False)
        check_split_is_the_checkpoints(job / "split.json", split, ckpt)
        if split["num_folds"] < 2:
            raise BratsError(f"{job / 'split.json'} is not a k-fold split (num_folds={split['num_folds']}): oof=true "
                             "needs a sweep such as brats-train -m data.num_folds=5 data.fold=0,1,2,3,4")
        key = (split["num_folds"], split["seed"], tuple(split["test"]))
        first = jobs[0][2] if jobs else key
        if key != first:
            raise BratsError(f"{job / 'split.json'} is not a fold of the same split as {jobs[0][0] / 'split.json'} "
                             "(different data.num_folds, data.split_seed or test cases)")
        if split["fold"] in by_fold:
            raise BratsError(f"jobs {by_fold[split['fold']].name} and {job.name} of {sweep} both validate fold "
                             f"{split['fold']}: each case must be predicted by one model")
        by_fold[split["fold"]] = job
        jobs.append((job, ckpt, key, split["val"]))
    absent = sorted(set(range(first[0])) - set(by_fold))
    if absent:
        raise BratsError(f"{sweep} has no job for folds {absent} of data.num_folds={first[0]}: train them first "
                         "(out-of-fold predictions must cover every fold)")
    return [(ckpt, val) for _, ckpt, _, val in jobs]
