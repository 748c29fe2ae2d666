"""nnU-Net v2's own steps for the time-to-quality arm (benchmarks/nnunet_arm.py): plan + preprocess, a trainer that
stops at a training-time budget, and its predictor. Needs `nnunetv2` (ImportError otherwise) and nnU-Net's folder
variables set (nnunet_arm.nnunet_env).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from importlib.metadata import version as _version
from pathlib import Path
from typing import Any

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def version() -> str:
    return _version("nnunetv2")


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


class nnUNetTrainerBudget(nnUNetTrainer):  # noqa: N801 (nnU-Net's trainer naming)
    """nnU-Net's trainer, unchanged (network, augmentation, loss, SGD with its poly LR per 250-iteration epoch), that
    stops when its training time reaches `budget_s`: the time of fetching each batch and taking the step, as the
    benchmark's other arms count it. Set-up before the first step is not counted; nnU-Net's per-epoch pseudo-Dice
    validation is skipped (the arm is scored on the test cases only). Leaves `iterations` and `train_s`."""

    budget_s = 240.0

    def run_training(self) -> None:
        self.on_train_start()
        self.iterations, self.train_s = 0, 0.0
        while self.train_s < self.budget_s and self.current_epoch < self.num_epochs:
            self.on_train_epoch_start()  # the epoch's learning rate
            outputs = []
            while len(outputs) < self.num_iterations_per_epoch and self.train_s < self.budget_s:
                start = time.perf_counter()
                outputs.append(self.train_step(next(self.dataloader_train)))
                self.train_s += time.perf_counter() - start
            self.iterations += len(outputs)
            self.on_train_epoch_end(outputs)
            self.current_epoch += 1
        self.print_to_log_file(f"budget {self.budget_s:g} s: {self.iterations} iterations in {self.train_s:.1f} s "
                               "of training")
        self.on_train_end()


def plan_and_preprocess(dataset_id: int, configuration: str, processes: int) -> dict[str, Any]:
    """nnUNetv2_plan_and_preprocess (its default planner) for one configuration -> the plans it wrote."""
    command = Path(sys.executable).with_name("nnUNetv2_plan_and_preprocess")
    subprocess.run([str(command), "-d", str(dataset_id), "-c", configuration, "-npfp", str(processes),
                    "-np", str(processes), "--verify_dataset_integrity"], check=True)
    return _load_json(next(Path(nnUNet_preprocessed).glob(f"Dataset{dataset_id:03d}_*/nnUNetPlans.json")))


def train(plans: dict[str, Any], dataset: str, configuration: str, budget: float) -> nnUNetTrainerBudget:
    """Fold 0 (splits_final.json) on the CPU for `budget` seconds of training; returns the trained trainer."""
    dataset_json = _load_json(Path(nnUNet_preprocessed) / dataset / "dataset.json")
    trainer = nnUNetTrainerBudget({**plans, "continue_training": False}, configuration, 0, dataset_json,
                                  device=torch.device("cpu"))
    trainer.budget_s = budget
    trainer.run_training()
    return trainer


def predict(trainer: nnUNetTrainerBudget, images: Path, output: Path) -> None:
    """nnU-Net's predictor at its defaults (sliding window, step 0.5, Gaussian, mirroring) with the trained weights,
    one case after the other (no worker processes), as nnU-Net's own final validation sets it up."""
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager,
                                    [trainer.network.state_dict()], trainer.dataset_json, type(trainer).__name__,
                                    trainer.inference_allowed_mirroring_axes)
    output.mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files_sequential(str(images), str(output), save_probabilities=False, overwrite=True)
