"""A tiny trained model's package: torch vs ONNX runtime (agreement, speed) and whether uncertainty finds the errors.

    python -m benchmarks.export_uncertainty [--work outputs/export_bench] [--cases 12] [--shape 64 64 48]
        [--steps 20] [--epochs 10] [--threads 1] [--out DIR]

Synthesises cases, trains the demo's recipe (experiment=quickstart, 32^3 patches) briefly (brats_unet.train),
exports it with format=onnx, then predicts every held-out case (the split's validation and test cases) with TTA
(8 samples) from the package with both runtimes. Reports, over the held-out cases:
- voxel AUROC of entropy and of mutual information for wrong vs right voxels (wrong: predicted class != truth), over
  the brain (voxels non-zero in any modality) and over the tumour neighbourhood (truth or predicted whole tumour,
  dilated by 3 voxels);
- the share of voxels whose labels agree between runtimes and the largest probability difference;
- calibration: expected calibration error (15 bins) of every output channel over the test cases' brain voxels,
  before and after a temperature fitted on the validation cases (measured only: prediction does not rescale);
- seconds per case of each runtime (after one warm-up), with the 1-minute load.
Writes benchmarks/results/export_uncertainty-cpu.json.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from benchmarks.common import print_table, threads, write_result
from brats_unet import train
from brats_unet.config import compose
from brats_unet.data.cases import load_nifti
from brats_unet.data.split import load_split
from brats_unet.inference.export import export_package
from brats_unet.inference.segmenter import Segmenter
from brats_unet.inference.uncertainty import (
    auroc,
    expected_calibration_error,
    fit_temperature,
    scale_temperature,
    segment_with_uncertainty,
)
from brats_unet.synth.generator import write_dataset


def tiny_run(root: Path, work: Path, steps: int, epochs: int) -> Path:
    """Train the demo's recipe (experiment=quickstart) on 32^3 patches and return its best checkpoint."""
    run = work / "run"
    if not (run / "checkpoints" / "best.ckpt").is_file():
        cfg = compose(["experiment=quickstart", f"data.root={root}", f"paths.cache_dir={work / 'cache'}",
                       f"paths.output_dir={run}", "data.patch_size=[32,32,32]", f"data.steps_per_epoch={steps}",
                       "data.num_workers=0", "data.persistent_workers=false", "trainer.accelerator=cpu",
                       "trainer.precision=32-true", "runtime.channels_last=false", f"trainer.max_epochs={epochs}",
                       "module.val_hd95=false", "logger=none", "~callbacks.progress_bar",
                       "data.stratify=false"])  # the published run's split (the quickstart stratifies since)
        train(cfg)
    return run / "checkpoints" / "best.ckpt"


def seconds_per_case(segmenter: Segmenter, cases: Sequence[Path]) -> float:
    segmenter.segment(cases[0])  # warm-up
    start = time.perf_counter()
    for case in cases:
        segmenter.segment(case)
    return (time.perf_counter() - start) / len(cases)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.export_uncertainty", description=__doc__.split("\n")[0])
    p.add_argument("--work", default="outputs/export_bench")
    p.add_argument("--cases", type=int, default=12)
    p.add_argument("--shape", type=int, nargs=3, default=[64, 64, 48])
    p.add_argument("--steps", type=int, default=20, help="training steps per epoch")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    work = Path(args.work)
    root = work / "data"
    if not root.is_dir():
        write_dataset(root, cases=args.cases, seed=0, shape=tuple(args.shape))
    with threads(args.threads):
        ckpt = tiny_run(root, work, args.steps, args.epochs)
        package = export_package(ckpt, work / "package", formats=("safetensors", "onnx"), tta=True, overwrite=True,
                                 measure=False)
        split = load_split(ckpt.parent.parent / "split.json", need_train=False)
        cases = [root / c for c in split["val"] + split["test"]]
        torch_seg = Segmenter.from_package(package, device="cpu", precision="fp32")
        onnx_seg = Segmenter.from_package(package, device="cpu", precision="fp32", runtime="onnx")
        scores: dict[str, list[np.ndarray]] = {k: [] for k in ("entropy", "mi", "wrong", "near")}
        calibration: dict[str, list[np.ndarray]] = {k: [] for k in ("val_p", "val_y", "test_p", "test_y")}
        agree, voxels, max_diff = 0, 0, 0.0
        schema = torch_seg.schema
        for case in cases:
            loaded, labels, probs, unc = segment_with_uncertainty(torch_seg, case, probabilities=True)
            _, onnx_labels, onnx_probs = onnx_seg.segment(case, probabilities=True)
            agree += int((labels == onnx_labels).sum())
            voxels += labels.size
            max_diff = max(max_diff, float(np.abs(probs - onnx_probs).max()))
            truth = schema.to_classes(load_nifti(next(case.glob("*_seg.nii.gz")))[0].astype(np.int64))
            predicted = schema.to_classes(labels)
            inside = np.any([image != 0 for image in loaded.images.values()], axis=0)  # brain voxels
            near = ndimage.binary_dilation((truth > 0) | (predicted > 0), iterations=3) & inside
            scores["entropy"].append(unc.entropy[inside])
            scores["mi"].append(unc.mutual_information[inside])
            scores["wrong"].append((predicted != truth)[inside])
            scores["near"].append(near[inside])
            # per output channel: sigmoid regions vs the truth's regions, softmax classes vs one-hot classes
            target = (schema.region_masks(truth) if torch_seg.module.loss.activation == "sigmoid"
                      else np.stack([truth == c for c in range(probs.shape[0])]))
            subset = "val" if case.name in split["val"] else "test"
            calibration[f"{subset}_p"].append(probs[:, inside].ravel())
            calibration[f"{subset}_y"].append(target[:, inside].ravel())
        joined = {k: np.concatenate(v) for k, v in scores.items()}
        near = joined["near"]
        cal = {k: np.concatenate(v) for k, v in calibration.items()}
        temperature = fit_temperature(cal["val_p"], cal["val_y"])  # fitted on the validation cases only
        result = {
            "cases": [c.name for c in cases], "samples": 8, "train_steps": args.steps * args.epochs,
            "error_rate_brain": float(joined["wrong"].mean()),
            "auroc_entropy_brain": auroc(joined["entropy"], joined["wrong"]),
            "auroc_mi_brain": auroc(joined["mi"], joined["wrong"]),
            "auroc_entropy_tumour": auroc(joined["entropy"][near], joined["wrong"][near]),
            "auroc_mi_tumour": auroc(joined["mi"][near], joined["wrong"][near]),
            "mean_entropy_wrong": float(joined["entropy"][joined["wrong"]].mean()),
            "mean_entropy_right": float(joined["entropy"][~joined["wrong"]].mean()),
            "onnx_label_agreement": agree / voxels, "onnx_max_prob_diff": max_diff,
            "ece_test": expected_calibration_error(cal["test_p"], cal["test_y"]), "temperature": temperature,
            "ece_test_scaled": expected_calibration_error(scale_temperature(cal["test_p"], temperature),
                                                          cal["test_y"]),
        }
        for tta in (False, True):
            torch_seg.tta = onnx_seg.tta = tta
            result[f"torch_s_per_case_tta_{tta}".lower()] = seconds_per_case(torch_seg, cases)
            result[f"onnx_s_per_case_tta_{tta}".lower()] = seconds_per_case(onnx_seg, cases)
        result["load_1min"] = os.getloadavg()[0]
        result["threads"] = torch.get_num_threads()
    print_table([result], list(result)[2:], "export + uncertainty (tiny model, held-out synthetic cases)")
    device = torch.device("cpu")
    write_result("export_uncertainty", result, device, args.out)
    return result


if __name__ == "__main__":
    main()
