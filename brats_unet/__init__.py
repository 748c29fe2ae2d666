"""brats-unet: 3D U-Net brain-tumour segmentation on BraTS (PyTorch Lightning + Hydra).

The public Python API (each name is imported on first use, so `import brats_unet` stays fast):

    Segmenter      a trained checkpoint: .predict(case) -> NIfTI label map, .predict_proba(case) -> probabilities
    evaluate       score a folder of predictions against a BraTS root -> (per-case rows, summary)
    case_metrics   Dice / HD95 / volumes of one pair of label arrays (the dataset's own labels)
    compose        the config a command would run with: compose(["experiment=quickstart"], config_name="train")
    train          fit from a composed config -> final metrics
    load_case      one case folder -> images, label map and geometry, validated
    synthesize     write synthetic BraTS-like cases
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "Segmenter": ("brats_unet.inference.segmenter", "Segmenter"),
    "evaluate": ("brats_unet.evaluation.folder", "evaluate"),
    "case_metrics": ("brats_unet.evaluation.folder", "case_metrics"),
    "compose": ("brats_unet.config", "compose"),
    "train": ("brats_unet.training.fit", "train"),
    "load_case": ("brats_unet.data.cases", "load_case"),
    "synthesize": ("brats_unet.synth.generator", "write_dataset"),
    "BratsError": ("brats_unet.utils", "BratsError"),
}
__all__ = list(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attr = _API[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'brats_unet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
