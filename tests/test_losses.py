"""Losses against hand-computed values of the paper's eqs 1-3 and NVIDIA's region loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from brats_unet.data.labels import SCHEMAS
from brats_unet.training.losses import (
    CombinedLoss,
    CrossEntropyLoss,
    DiceLoss,
    RegionDiceBCELoss,
    classes_from_region_logits,
    region_targets,
)


def hand_example() -> tuple[torch.Tensor, torch.Tensor]:
    """2 classes x 4 voxels split over a batch of 2. Softmax p(class 0) = 0.75, 0.5, 0.25, 0.2; truth 0, 0, 1, 1."""
    l3, l4 = math.log(3), math.log(4)
    logits = torch.tensor([[[l3, 0.0], [0.0, 0.0]], [[0.0, 0.0], [l3, l4]]])  # (B=2, K=2, S=2): [b][k][voxel]
    target = torch.tensor([[0, 0], [1, 1]])
    return logits, target


def test_hand_example_probabilities() -> None:
    logits, _ = hand_example()
    p0 = DiceLoss().probabilities(logits)[:, 0].flatten()
    torch.testing.assert_close(p0, torch.tensor([0.75, 0.5, 0.25, 0.2]))


def test_dice_hand_example_eq_1_2() -> None:
    logits, target = hand_example()
    # Class 0: sum p*t = 0.75 + 0.5 = 1.25, sum p = 1.7, sum t = 2 -> (2.5 + 1) / (3.7 + 1).
    # Class 1: sum p*t = 0.75 + 0.8 = 1.55, sum p = 2.3, sum t = 2 -> (3.1 + 1) / (4.3 + 1).
    d0, d1 = 3.5 / 4.7, 4.1 / 5.3
    assert DiceLoss(smooth=1.0)(logits, target).item() == pytest.approx(1 - (d0 + d1) / 2, abs=1e-6)
    assert DiceLoss(include_background=False)(logits, target).item() == pytest.approx(1 - d1, abs=1e-6)
    # smooth 1e-5 (nnU-Net's): close to the unsmoothed class 0 -> 2.5 / 3.7, class 1 -> 3.1 / 4.3
    assert DiceLoss(smooth=1e-5)(logits, target).item() == pytest.approx(1 - (2.5 / 3.7 + 3.1 / 4.3) / 2, abs=1e-5)


def test_dice_perfect_and_disjoint() -> None:
    target = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    target[..., 2:] = 1  # 32 voxels of each class
    onehot = torch.stack([target == 0, target == 1], dim=1).float()
    assert DiceLoss()(100.0 * onehot, target).item() == pytest.approx(0.0, abs=1e-6)
    # Every voxel wrong: per class sum p*t = 0, sum p + sum t = 32 + 32 -> dice = 1 / 65.
    assert DiceLoss()(100.0 * (1 - onehot), target).item() == pytest.approx(1 - 1 / 65, abs=1e-6)


def test_cross_entropy_hand_example() -> None:
    logits, target = hand_example()
    expected = -np.mean(np.log([0.75, 0.5, 0.75, 0.8]))
    assert CrossEntropyLoss()(logits, target).item() == pytest.approx(expected, abs=1e-6)


def test_combined_weighting() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(2, 4, 4, 4, 4), torch.randint(0, 4, (2, 4, 4, 4))
    dice, ce = DiceLoss()(logits, target), CrossEntropyLoss()(logits, target)
    assert dice.item() != pytest.approx(ce.item(), abs=1e-3)  # otherwise the mix checks below prove nothing
    torch.testing.assert_close(CombinedLoss(alpha=0.0)(logits, target), ce)
    torch.testing.assert_close(CombinedLoss(alpha=1.0)(logits, target), dice)
    torch.testing.assert_close(CombinedLoss(alpha=0.25)(logits, target), 0.25 * dice + 0.75 * ce)
    with pytest.raises(ValueError, match=r"loss.alpha must be in \[0, 1\].*got 1.5"):
        CombinedLoss(alpha=1.5)


def test_shape_mismatch_and_smooth_errors() -> None:
    with pytest.raises(ValueError, match="do not match"):
        DiceLoss()(torch.zeros(1, 4, 4, 4, 4), torch.zeros(1, 4, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="loss.smooth must be > 0 .*got -1"):
        DiceLoss(smooth=-1)


@pytest.mark.parametrize("loss", [DiceLoss(), CrossEntropyLoss(), CombinedLoss(), RegionDiceBCELoss()])
def test_float32_under_bf16_autocast(loss: torch.nn.Module) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(2, loss.num_outputs, 1)
    x, target = torch.randn(2, 2, 8, 8, 8), torch.randint(0, 4, (2, 8, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(x)
        assert logits.dtype == torch.bfloat16
        value = loss(logits, target)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss(logits.float(), target))  # same numbers as fp32 on the same logits
    assert value.item() == pytest.approx(loss(conv(x), target).item(), rel=2e-2)  # and close to the fp32 model


def test_region_targets_from_classes() -> None:
    target = torch.tensor([[0, 1, 2, 3]])
    # wt = {1,2,3}, tc = {1,3}, et = {3}
    expected = torch.tensor([[[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]], dtype=torch.float32)
    torch.testing.assert_close(region_targets(target), expected)


def test_region_loss_hand_example() -> None:
    target = torch.tensor([[0, 1, 2, 3]])
    logits = torch.zeros(1, 3, 4)  # sigmoid 0.5 everywhere: BCE = ln 2 per region, sum p = 2
    # Dice (2 * 0.5 * n + 1) / (2 + n + 1) with n = 3, 2, 1 region voxels -> 4/6, 3/5, 2/4; summed over regions.
    expected = 3 * math.log(2) + (1 - 4 / 6) + (1 - 3 / 5) + (1 - 2 / 4)
    loss = RegionDiceBCELoss()
    assert loss(logits, target).item() == pytest.approx(expected, abs=1e-6)
    assert (loss.num_outputs, loss.activation) == (3, "sigmoid")
    with pytest.raises(ValueError, match="logits need 3 channels"):
        loss(torch.zeros(1, 4, 4), target)


def test_to_classes_softmax() -> None:
    logits, _ = hand_example()
    loss = CombinedLoss()
    assert (loss.num_outputs, loss.activation) == (4, "softmax")
    torch.testing.assert_close(loss.to_classes(logits), torch.tensor([[0, 0], [1, 1]]))
    torch.testing.assert_close(loss.probabilities(logits).sum(1), torch.ones(2, 2))


def test_to_classes_sigmoid_matches_labels() -> None:
    combos = np.array([[w, t, e] for w in (0, 1) for t in (0, 1) for e in (0, 1)], dtype=bool).T  # (3, 8)
    logits = torch.tensor(np.where(combos, 5.0, -5.0), dtype=torch.float32)[None]  # (1, 3, 8)
    classes = RegionDiceBCELoss().to_classes(logits)
    # (wt,tc,et): 000->0, 001->3, 010->1, 011->3, 100->2, 101->3, 110->1, 111->3
    assert classes.tolist() == [[0, 3, 1, 3, 2, 3, 1, 3]]
    assert classes.tolist()[0] == SCHEMAS["brats2021"].classes_from_regions(combos).tolist()
    assert classes_from_region_logits(torch.zeros(1, 3, 1)).tolist() == [[0]]  # exactly 0.5 is not "on"
    torch.testing.assert_close(RegionDiceBCELoss().probabilities(torch.zeros(1, 3, 1)), torch.full((1, 3, 1), 0.5))


def test_loss_configs_instantiate() -> None:
    with initialize_config_module(config_module="brats_unet.conf", version_base="1.3"):
        losses = {name: instantiate(compose(overrides=[f"+loss={name}"]).loss)
                  for name in ("dice", "ce", "combined", "region")}
    assert isinstance(losses["dice"], DiceLoss) and losses["dice"].smooth == 1.0
    assert isinstance(losses["ce"], CrossEntropyLoss)
    assert isinstance(losses["combined"], CombinedLoss) and losses["combined"].alpha == 0.5
    assert isinstance(losses["region"], RegionDiceBCELoss) and losses["region"].num_outputs == 3


def confident_background(logit: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """2 classes x 4 voxels, all background in truth, predicted background with logits +-logit (not underflowing)."""
    target = torch.zeros(1, 4, dtype=torch.long)
    logits = torch.tensor([[[logit] * 4, [-logit] * 4]])  # (B=1, K=2, S=4)
    return logits, target


def test_an_absent_class_predicted_absent_scores_near_1_with_a_small_smooth() -> None:
    logits, target = confident_background()
    e = 1 / (1 + math.exp(20))  # softmax p(class 1) per voxel: sigmoid(-20) ~ 2.06e-9, not 0 in float32
    assert DiceLoss().probabilities(logits)[0, 1, 0].item() == pytest.approx(e, rel=1e-5)
    s = 1e-5
    d0 = (2 * 4 * (1 - e) + s) / (4 * (1 - e) + 4 + s)  # background: ~1
    d1 = s / (4 * e + s)  # absent class: smooth / (predicted mass + smooth) = 0.99918
    assert d1 == pytest.approx(0.99918, abs=1e-5)
    assert DiceLoss(smooth=s)(logits, target).item() == pytest.approx(1 - (d0 + d1) / 2, abs=1e-6)
    # Without smoothing eq. 1 gives this class 2*0 / (4e) = 0: a correct, confident prediction would cost 0.5.
    # That is why smooth=0 is refused rather than given a special case.


@pytest.mark.parametrize("make", [DiceLoss, CombinedLoss, RegionDiceBCELoss])
def test_zero_smooth_is_refused_with_the_reason(make) -> None:
    with pytest.raises(ValueError, match=r"loss.smooth must be > 0 \(.*absent from the truth scores Dice 0.*1e-5"):
        make(smooth=0.0)
