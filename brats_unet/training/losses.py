"""Segmentation losses on logits: the paper's Dice (eqs 1-2), categorical CE, their mix (eq 3), and NVIDIA's
BraTS region loss (sigmoid WT/TC/ET, soft Dice + BCE per region).

Every loss takes `logits (B, K, *S)` and `target (B, *S)` (long, internal classes 0..3) and returns a scalar. It also
says how its logits become probabilities and classes (`probabilities`, `to_classes`), so callers never branch on the
loss type. All math runs in float32 with autocast off: Dice sums over ~10^7 voxels overflow or lose precision in half.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from brats_unet.data.labels import SCHEMAS, LabelSchema, resolve_schema


def _fp32(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, enabled=False)


def _check(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.ndim < 3 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"loss: logits {tuple(logits.shape)} (B, K, *S) and target {tuple(target.shape)} (B, *S) "
                         "do not match")


# Why smooth must be positive: on soft probabilities a class absent from the truth has Dice 2*0 / (its predicted
# mass), which is 0 however confidently the network predicts it absent, and 0/0 once that mass underflows. The
# paper's eq. 1 adds smooth "to avoid division by zero"; nnU-Net and MONAI use 1e-5 for a nearly unsmoothed Dice.
SMOOTH_RULE = ("the Dice loss works on soft probabilities, so at smooth=0 a class absent from the truth scores Dice 0 "
               "(0 / its predicted mass) even when predicted absent with confidence, and 0/0 once that mass "
               "underflows; use e.g. 1e-5 (nnU-Net, MONAI) for a nearly unsmoothed Dice")


def _check_smooth(smooth: float) -> float:
    if not smooth > 0:
        raise ValueError(f"loss.smooth must be > 0 ({SMOOTH_RULE}), got {smooth}")
    return float(smooth)


def soft_dice(probs: torch.Tensor, onehot: torch.Tensor, smooth: float) -> torch.Tensor:
    """Eq. 1 per channel: sums over the batch and all voxels (the Keras way), `smooth` (> 0) on both sides -> (K,).

    A class absent from the truth scores smooth / (predicted mass + smooth): 1 when the prediction is empty too (the
    BraTS convention), falling towards 0 as probability mass leaks into it.
    """
    dims = (0, *range(2, probs.ndim))
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    return (2.0 * intersection + smooth) / (denominator + smooth)


class _SoftmaxHead(nn.Module):
    """Mutually exclusive classes of a label schema (background + its labels): softmax probabilities, argmax."""

    activation = "softmax"

    def __init__(self, schema: LabelSchema | str = "brats2021") -> None:
        super().__init__()
        self.schema = resolve_schema(schema)
        self.num_outputs = self.schema.num_classes

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        with _fp32(logits.device):
            return torch.softmax(logits.float(), dim=1)

    def to_classes(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=1)


class DiceLoss(_SoftmaxHead):
    """Eq. 2: mean over classes of 1 - DiceCoef (eq. 1) of softmax probabilities vs one-hot targets."""

    def __init__(self, smooth: float = 1.0, include_background: bool = True, schema: LabelSchema | str = "brats2021"
                 ) -> None:
        super().__init__(schema)
        self.smooth = _check_smooth(smooth)
        self.include_background = include_background

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check(logits, target)
        with _fp32(logits.device):
            probs = torch.softmax(logits.float(), dim=1)
            onehot = torch.zeros_like(probs).scatter_(1, target.long().unsqueeze(1), 1.0)
            dice = soft_dice(probs, onehot, self.smooth)
            if not self.include_background:
                dice = dice[1:]
            return (1.0 - dice).mean()


class CrossEntropyLoss(_SoftmaxHead):
    """Categorical cross-entropy on logits, mean over all voxels (Keras `categorical_crossentropy` on softmax)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check(logits, target)
        with _fp32(logits.device):
            return F.cross_entropy(logits.float(), target.long())


class CombinedLoss(_SoftmaxHead):
    """Eq. 3: alpha * Dice + (1 - alpha) * CE."""

    def __init__(self, alpha: float = 0.5, smooth: float = 1.0, schema: LabelSchema | str = "brats2021") -> None:
        super().__init__(schema)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"loss.alpha must be in [0, 1] (weight of Dice vs cross-entropy), got {alpha}")
        self.alpha = float(alpha)
        self.dice = DiceLoss(smooth=smooth, schema=self.schema)
        self.ce = CrossEntropyLoss(schema=self.schema)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.dice(logits, target) + (1.0 - self.alpha) * self.ce(logits, target)


def region_targets(target: torch.Tensor, schema: LabelSchema = SCHEMAS["brats2021"]) -> torch.Tensor:
    """Float masks (B, R, *S) for the schema's regions (brats2021/2023: wt, tc, et) from internal classes (B, *S)."""
    masks = [torch.isin(target, torch.tensor(schema.region_classes[name], device=target.device))
             for name in schema.region_names]
    return torch.stack(masks, dim=1).float()


def classes_from_region_logits(logits: torch.Tensor, schema: LabelSchema = SCHEMAS["brats2021"]) -> torch.Tensor:
    """Internal classes (B, *S) from region logits (B, R, *S), painted in the schema's decode order (the rule of
    labels.LabelSchema.classes_from_regions; for WT/TC/ET: ET over TC over WT, NVIDIA's BraTS rule).

    sigmoid(l) > 0.5 is tested as l > 0, which is exact (no rounding of the sigmoid near 0.5).
    """
    on = logits > 0
    out = torch.zeros((logits.shape[0], *logits.shape[2:]), dtype=torch.long, device=logits.device)
    for region, cls in schema.decode_order:
        out[on[:, region]] = cls
    return out


class RegionDiceBCELoss(nn.Module):
    """NVIDIA nnU-Net (BraTS21) loss: channel i is the schema's region i (wt, tc, et for BraTS glioma) with a sigmoid;
    per region soft Dice (batch-summed, as eq. 1) + BCE-with-logits, SUMMED over the regions like NVIDIA's
    `LossBraTS` (so its scale is about 3x a single-region loss; the paper's losses are means). NVIDIA's Dice smoothing
    is MONAI's 1e-5; conf/loss/region.yaml keeps the paper's 1 and says why."""

    activation = "sigmoid"

    def __init__(self, smooth: float = 1.0, schema: LabelSchema | str = "brats2021") -> None:
        super().__init__()
        self.schema = resolve_schema(schema)
        self.num_outputs = len(self.schema.region_names)
        self.schema.decode_order  # noqa: B018  (a schema whose regions cannot be decoded fails here, not at validation)
        self.smooth = _check_smooth(smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check(logits, target)
        if logits.shape[1] != self.num_outputs:
            raise ValueError(f"RegionDiceBCELoss: logits need {self.num_outputs} channels {self.schema.region_names}, "
                             f"got {logits.shape[1]}")
        with _fp32(logits.device):
            logits = logits.float()
            regions = region_targets(target, self.schema)
            dice = soft_dice(torch.sigmoid(logits), regions, self.smooth)  # (3,)
            dims = (0, *range(2, logits.ndim))
            bce = F.binary_cross_entropy_with_logits(logits, regions, reduction="none").mean(dims)  # (3,)
            return ((1.0 - dice) + bce).sum()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        with _fp32(logits.device):
            return torch.sigmoid(logits.float())

    def to_classes(self, logits: torch.Tensor) -> torch.Tensor:
        return classes_from_region_logits(logits, self.schema)
