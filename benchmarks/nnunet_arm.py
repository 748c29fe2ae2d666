"""nnU-Net v2 itself as an arm of the time-to-quality benchmark: its whole pipeline on the benchmark's cases.

The cases are converted to nnU-Net's raw format as its own BraTS 2021 conversion (Dataset137_BraTS21) does: channels
_0000.._0003 = T1, T1ce, T2, FLAIR; labels 1 NCR, 2 ED, 4 ET renumbered to nnU-Net's 1 ED, 2 NCR, 3 ET; region
training on whole tumour, tumour core and enhancing tumour. Only the train + val cases of the benchmark's split go to
imagesTr (splits_final.json holds that split as fold 0); the test cases go to imagesTs. Then nnU-Net plans and
preprocesses (3d_fullres, its default planner), trains with its own trainer, augmentation, loss and schedule on the
CPU until its training time reaches the budget (`nnunet_trainer.nnUNetTrainerBudget`), predicts the test cases with
its own predictor (sliding window, Gaussian weighting, mirroring test-time augmentation: its defaults), and the
predictions, renumbered back to BraTS labels, are scored by brats_unet's evaluation, as every other arm is.

The conversion needs only this package; the rest needs `nnunetv2` (`make nnunet`, docs/speed.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from brats_unet.data.cases import load_nifti, read_label_map, save_nifti
from brats_unet.data.discovery import find_cases
from brats_unet.data.labels import LAYOUTS, MODALITIES
from brats_unet.evaluation.folder import evaluate
from brats_unet.utils import BratsError, atomic_write_json

INSTALL = "make nnunet, or the two pip commands in docs/speed.md"
DATASET_ID = 501
DATASET = f"Dataset{DATASET_ID:03d}_BratsSynth"
CONFIGURATION = "3d_fullres"
LAYOUT = "brats2021"  # the benchmark's synthetic cases: BraTS 2021 file names and labels (ET = 4)
SCHEMA = LAYOUTS[LAYOUT].label_schema
# Dataset137_BraTS21's channel order and names, and its label numbers (by our class names).
CHANNELS = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "Flair"}
NNUNET_LABELS = {"ed": 1, "ncr": 2, "et": 3}
REGION_NAMES = {"wt": "whole tumor", "tc": "tumor core", "et": "enhancing tumor"}
# Internal class (0 background, then SCHEMA's classes) -> nnU-Net label, and back.
CLASS_TO_NNUNET = np.array([0, *(NNUNET_LABELS[name] for name in SCHEMA.class_names[1:])], dtype=np.uint8)
NNUNET_TO_CLASS = np.argsort(CLASS_TO_NNUNET).astype(np.uint8)  # a permutation's argsort is its inverse


def to_nnunet(classes: np.ndarray) -> np.ndarray:
    """Internal class map (brats_unet's, from read_label_map) -> nnU-Net's label numbers."""
    return CLASS_TO_NNUNET[np.asarray(classes, dtype=np.int64)]


def from_nnunet(labels: np.ndarray) -> np.ndarray:
    """nnU-Net's label map -> BraTS 2021 label values (0, 1 NCR, 2 ED, 4 ET); BratsError for another value."""
    labels = np.asarray(labels, dtype=np.int64)
    bad = sorted(set(np.unique(labels).tolist()) - set(range(len(NNUNET_TO_CLASS))))
    if bad:
        raise BratsError(f"nnU-Net prediction holds labels {bad}, expected 0..{len(NNUNET_TO_CLASS) - 1}")
    return SCHEMA.from_classes(NNUNET_TO_CLASS[labels])


def dataset_json(num_training: int) -> dict[str, Any]:
    """nnU-Net's dataset.json for region training: each region as its nnU-Net labels, and per region (in order) the
    label it paints when decoding (regions_class_order): the class no smaller region holds, as SCHEMA decodes."""
    labels: dict[str, Any] = {"background": 0}
    for region, classes in SCHEMA.regions:
        labels[REGION_NAMES[region]] = sorted(NNUNET_LABELS[c] for c in classes)
    paints = dict(SCHEMA.decode_order)  # region index -> internal class
    return {
        "channel_names": {str(i): CHANNELS[m] for i, m in enumerate(MODALITIES)},
        "labels": labels,
        "regions_class_order": [int(CLASS_TO_NNUNET[paints[i]]) for i in range(len(SCHEMA.regions))],
        "numTraining": num_training,
        "file_ending": ".nii.gz",
        "name": DATASET,
        "description": "brats-synth cases of the time-to-quality benchmark (brats_unet); labels as Dataset137_BraTS21",
    }


def convert(root: str | Path, split: dict[str, list[str]], raw: str | Path) -> Path:
    """Write <raw>/<DATASET>/: imagesTr + labelsTr (the split's train and val cases), imagesTs (its test cases) and
    dataset.json; return that folder. BratsError naming a split case that is not under `root`."""
    cases = {c.case: c for c in find_cases(root, LAYOUT)}
    missing = sorted(set().union(*(split[k] for k in ("train", "val", "test"))) - set(cases))
    if missing:
        raise BratsError(f"split names cases that are not under {root}: {', '.join(missing[:5])}")
    out = Path(raw) / DATASET
    training = [*split["train"], *split["val"]]
    for folder, names in (("imagesTr", training), ("imagesTs", split["test"])):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            for i, modality in enumerate(MODALITIES):
                shutil.copyfile(cases[name].images[modality], out / folder / f"{name}_{i:04d}.nii.gz")
    (out / "labelsTr").mkdir(exist_ok=True)
    for name in training:
        classes, affine, header = read_label_map(cases[name].seg, LAYOUT)
        save_nifti(out / "labelsTr" / f"{name}.nii.gz", to_nnunet(classes), affine, header)
    atomic_write_json(out / "dataset.json", dataset_json(len(training)))
    return out


def splits_final(split: dict[str, list[str]]) -> list[dict[str, list[str]]]:
    """nnU-Net's splits_final.json: one fold, the benchmark's train / val cases."""
    return [{"train": list(split["train"]), "val": list(split["val"])}]


@contextlib.contextmanager
def nnunet_env(work: Path, processes: int) -> Iterator[None]:
    """nnU-Net's folders inside `work`, one augmentation worker (as the quickstart's one loader worker), `processes`
    for its planning, preprocessing and prediction; the previous environment is restored afterwards."""
    values = {"nnUNet_raw": str(work / "nnUNet_raw"), "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
              "nnUNet_results": str(work / "nnUNet_results"), "nnUNet_n_proc_DA": "1",
              "nnUNet_def_n_proc": str(processes), "nnUNet_compile": "false"}
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def score_test_cases(pred_dir: Path, root: Path, split_file: Path, out: Path) -> dict[str, float]:
    """Test Dice per region and their mean from nnU-Net's predictions (nnU-Net labels), renumbered to BraTS labels
    into `out` and scored by brats_unet's evaluation (brats-evaluate's rows: the same Dice as the other arms' test
    step)."""
    test = json.loads(split_file.read_text())["test"]
    out.mkdir(parents=True, exist_ok=True)
    for name in test:
        labels, affine, header = load_nifti(pred_dir / f"{name}.nii.gz")
        save_nifti(out / f"{name}.nii.gz", from_nnunet(labels).astype(np.uint8), affine, header)
    _, summary = evaluate(out, root, split_file=split_file, split_subset="test", hd95=False)
    if summary["n_cases"] != len(test):
        raise BratsError(f"scored {summary['n_cases']} of {len(test)} test cases in {out}")
    dice = {r: summary["metrics"][f"dice_{r}"]["mean"] for r in SCHEMA.region_names}
    return {"test_dice_mean": float(np.mean(list(dice.values()))), **{f"test_dice_{r}": d for r, d in dice.items()}}


def run(root: Path, split: dict[str, list[str]], work: Path, budget: float, processes: int) -> dict[str, Any]:
    """The whole nnU-Net pipeline on `split`'s cases under `root`, trained for `budget` seconds on the CPU -> the
    benchmark row's numbers. ImportError when nnunetv2 is not installed (before anything is written)."""
    with nnunet_env(work, processes):
        from benchmarks import nnunet_trainer  # needs nnunetv2, imported after nnUNet_def_n_proc is set

        convert(root, split, work / "nnUNet_raw")
        atomic_write_json(work / "split.json", split)
        start = time.perf_counter()
        plans = nnunet_trainer.plan_and_preprocess(DATASET_ID, CONFIGURATION, processes)
        atomic_write_json(work / "nnUNet_preprocessed" / DATASET / "splits_final.json", splits_final(split))
        plan_s = time.perf_counter() - start
        load = os.getloadavg()[0]
        trainer = nnunet_trainer.train(plans, DATASET, CONFIGURATION, budget)
        start = time.perf_counter()
        nnunet_trainer.predict(trainer, work / "nnUNet_raw" / DATASET / "imagesTs", work / "predictions")
        predict_s = time.perf_counter() - start
        load_after = os.getloadavg()[0]
    config = plans["configurations"][CONFIGURATION]
    return {"impl": f"nnU-Net v2 {nnunet_trainer.version()} (whole pipeline)", "precision": "32-true",
            "channels_last": False, "params_m": round(sum(p.numel() for p in trainer.network.parameters()) / 1e6, 2),
            "budget_s": budget, "train_s": round(trainer.train_s, 1), "steps": trainer.iterations,
            "s_per_step": round(trainer.train_s / max(trainer.iterations, 1), 3),
            "val_dice_mean": None, **{f"val_dice_{r}": None for r in SCHEMA.region_names},
            **score_test_cases(work / "predictions", root, work / "split.json", work / "predictions_brats"),
            "test_cases": len(split["test"]),
            "val_curve": [], "load_average_1m": round(load, 2), "load_average_1m_after": round(load_after, 2),
            "patch_size": list(config["patch_size"]), "batch_size": config["batch_size"],
            "plan_and_preprocess_s": round(plan_s, 1), "predict_s": round(predict_s, 1), "tta": "mirroring"}
