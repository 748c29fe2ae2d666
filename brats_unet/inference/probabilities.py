"""The forward pass of prediction: a preprocessed (C, *S) volume -> (K, *S) probabilities by sliding window (logits
blended, as whole-volume validation does) or flip TTA (the 8 flips averaged as probabilities); an ensemble's mean with
one running sum, so memory does not grow with the number of models."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from brats_unet.models.sliding_window import flip_tta, sliding_window

Autocast = Callable[[], contextlib.AbstractContextManager]


Activation = Callable[[torch.Tensor], torch.Tensor]


def predict_probabilities(module: nn.Module, x: np.ndarray, patch_size: Sequence[int], *, overlap: float,
                          window_batch: int, tta: bool, device: torch.device, autocast: Autocast,
                          activation: Activation | None = None) -> np.ndarray:
    """(C, *S) preprocessed volume -> (K, *S) float32 probabilities (softmax classes or sigmoid regions).

    `activation` (default: the head's probabilities) maps each blended (1, K, *S) logit map - each flip's, with TTA -
    to what is averaged (inference/uncertainty.py adds per-sample statistics as channels)."""
    def predictor(batch: torch.Tensor) -> torch.Tensor:
        with autocast():
            return module(batch).float()

    to_probabilities = activation or module.loss.probabilities
    with torch.inference_mode():
        image = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None].to(device)
        if tta:
            probs = flip_tta(image, predictor, patch_size, overlap=overlap, window_batch=window_batch,
                             activation=to_probabilities)
        else:
            probs = to_probabilities(sliding_window(image, predictor, patch_size, overlap=overlap,
                                                    window_batch=window_batch))
    return probs[0].float().cpu().numpy()


def mean_probabilities(modules: Sequence[nn.Module], configs: Sequence[Mapping[str, Any]], x: np.ndarray, *,
                       overlap: float, window_batch: int, tta: bool, device: torch.device, autocast: Autocast,
                       activation_for: Callable[[nn.Module], Activation] | None = None) -> np.ndarray:
    """The members' mean (K, *S) probabilities, each model with its own patch size. `activation_for(module)`: what
    each sample's logits become instead (see predict_probabilities)."""
    total: np.ndarray | None = None
    for module, config in zip(modules, configs, strict=True):
        probs = predict_probabilities(module, x, config["data"]["patch_size"], overlap=overlap,
                                      window_batch=window_batch, tta=tta, device=device, autocast=autocast,
                                      activation=activation_for(module) if activation_for else None)
        if total is None:
            total = probs
        else:
            total += probs
    assert total is not None
    if len(modules) > 1:
        total /= len(modules)
    return total
