"""Validation metrics for training: per-case region Dice / HD95 over an epoch (a torchmetrics Metric, DDP-aware) and
the seed paper's soft Dice. The numbers themselves come from `brats_unet.evaluation.region`, the same rows
brats-evaluate writes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from brats_unet.data.labels import SCHEMAS, LabelSchema
from brats_unet.evaluation.region import class_metrics


class BratsMetrics(Metric):
    """Per-case Dice (and HD95) of WT/TC/ET over a validation epoch; DDP gathers the cases, compute() averages.

    update() takes internal class maps (B, *S) on any device; they are moved to CPU numpy for the distance maps.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, hd95: bool = True, schema: LabelSchema = SCHEMAS["brats2021"], **kwargs) -> None:
        super().__init__(**kwargs)
        self.with_hd95, self.schema = hd95, schema
        self.regions = schema.region_names
        self.case_keys = [f"dice_{r}" for r in self.regions]
        if hd95:
            self.case_keys += [f"hd95_{r}" for r in self.regions]
        for key in self.case_keys:
            self.add_state(key, default=[], dist_reduce_fx="cat")

    def update(self, pred_classes: Tensor, true_classes: Tensor, spacing: Sequence[float] | Tensor = (1, 1, 1)) -> None:
        if pred_classes.shape != true_classes.shape or pred_classes.ndim < 2:
            raise ValueError(
                f"expected class maps (B, *S) of equal shape, got {tuple(pred_classes.shape)} and "
                f"{tuple(true_classes.shape)}"
            )
        batch, ndim = pred_classes.shape[0], pred_classes.ndim - 1
        spacings = torch.as_tensor(spacing, dtype=torch.float64).cpu().numpy()
        if spacings.shape == (ndim,):
            spacings = np.broadcast_to(spacings, (batch, ndim))
        if spacings.shape != (batch, ndim):
            raise ValueError(f"spacing must have {ndim} values or shape ({batch}, {ndim}), got {spacings.shape}")
        preds = pred_classes.detach().cpu().numpy()
        truths = true_classes.detach().cpu().numpy()
        rows = [
            class_metrics(p, t, tuple(s), with_hd95=self.with_hd95, schema=self.schema)
            for p, t, s in zip(preds, truths, spacings, strict=True)
        ]
        for key in self.case_keys:
            values = torch.tensor([row[key] for row in rows], dtype=torch.float32, device=self.device)
            getattr(self, key).append(values)

    def per_case(self) -> dict[str, Tensor]:
        """Per-case values seen so far on this process (before any DDP gather), each of shape (cases,)."""
        return {key: _cat(getattr(self, key), self.device) for key in self.case_keys}

    def compute(self) -> dict[str, Tensor]:
        cases = {key: _cat(getattr(self, key), self.device) for key in self.case_keys}
        out = {key: values.mean() if values.numel() else torch.tensor(float("nan"), device=self.device)
               for key, values in cases.items()}
        out["dice_mean"] = torch.stack([out[f"dice_{r}"] for r in self.regions]).mean()
        # Order for logging: dice_wt, dice_tc, dice_et, dice_mean, hd95_*.
        order = [f"dice_{r}" for r in self.regions] + ["dice_mean"] + [k for k in self.case_keys if k[:4] == "hd95"]
        return {key: out[key] for key in order}


def paper_dice(probs: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """The seed paper's Dice: mean over all classes (background included) of (2 sum(t*p) + s) / (sum t + sum p + s).

    Sums run over the batch and all voxels per class (Keras style), on soft probabilities, in float32.
    """
    if probs.ndim != target.ndim + 1 or probs.shape[0] != target.shape[0] or probs.shape[2:] != target.shape[1:]:
        raise ValueError(
            f"expected probs (B,K,*S) and target (B,*S), got {tuple(probs.shape)} and {tuple(target.shape)}"
        )
    p = probs.float()
    onehot = F.one_hot(target.long(), probs.shape[1]).movedim(-1, 1).to(p.dtype)
    dims = [0, *range(2, p.ndim)]
    intersection = (p * onehot).sum(dims)
    denominator = p.sum(dims) + onehot.sum(dims)
    return ((2.0 * intersection + smooth) / (denominator + smooth)).mean()


def _cat(values: list[Tensor] | Tensor, device: torch.device) -> Tensor:
    # After a DDP sync torchmetrics may already have concatenated the list into one tensor.
    if isinstance(values, Tensor):
        return values.reshape(-1)
    return torch.cat(values) if values else torch.zeros(0, device=device)
