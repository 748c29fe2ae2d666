"""Numerical safety: a NaN batch stops training with a clear message or is skipped without touching the weights;
Dice never divides by zero on empty classes; reduced-precision logits never overflow the Dice sums."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from helpers import compose_train, tiny_overrides
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from brats_unet.data import cache
from brats_unet.data.labels import SCHEMAS
from brats_unet.evaluation.metrics import paper_dice
from brats_unet.evaluation.region import dice
from brats_unet.training.build import build_module
from brats_unet.training.fit import train
from brats_unet.training.losses import CombinedLoss, DiceLoss, RegionDiceBCELoss
from brats_unet.training.module import batch_region_dice
from brats_unet.utils import BratsError


@pytest.fixture(scope="module")
def real_batch(synthetic_root: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One training batch from the real datamodule on the tiny synthetic cases."""
    cfg = compose_train(tiny_overrides(synthetic_root, cache_dir, tmp_path_factory.mktemp("run")))
    dm = instantiate(cfg.data, output_dir=cfg.paths.output_dir, seed=0, _recursive_=False)
    dm.prepare_data()
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def tiny_module(synthetic_root: Path, cache_dir: Path, *extra: str):
    cfg = compose_train([*tiny_overrides(synthetic_root, cache_dir, Path("unused")), "model.norm=batch", *extra])
    torch.manual_seed(0)
    return build_module(cfg, in_channels=4)


def poisoned(batch: dict) -> dict:
    bad = {**batch, "image": batch["image"].clone()}
    bad["image"][0, 0, 0, 0, 0] = float("nan")
    return bad


def fit_one_step(module, batch: dict) -> None:
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.net.state_dict().items()}


def test_nan_batch_with_stop_policy_raises_a_clear_floating_point_error(real_batch, synthetic_root, cache_dir) -> None:
    module = tiny_module(synthetic_root, cache_dir)
    assert torch.isfinite(module.training_step(real_batch, 0))  # the clean batch is fine
    with pytest.raises(FloatingPointError, match=r"non-finite training loss \(nan\) at step 0 on cases \[.+\]; "
                                                 r"training stopped .*module.nonfinite_loss=skip"):
        module.training_step(poisoned(real_batch), 0)


@pytest.mark.slow  # two short Trainer fits
def test_nan_batch_with_skip_policy_leaves_weights_and_norm_statistics_untouched(real_batch, synthetic_root,
                                                                                 cache_dir) -> None:
    module = tiny_module(synthetic_root, cache_dir, "module.nonfinite_loss=skip")
    before = state(module)
    fit_one_step(module, poisoned(real_batch))
    after = state(module)
    assert int(module.skipped_batches) == 1
    for key in before:  # weights and BatchNorm running stats: bit-identical and finite
        assert torch.equal(before[key], after[key]), key
        assert torch.isfinite(after[key].float()).all(), key
    fit_one_step(module, real_batch)  # a clean batch does move the weights (so the check above can fail)
    assert any(not torch.equal(before[k], v) for k, v in state(module).items())
    assert int(module.skipped_batches) == 1


def test_unknown_nonfinite_policy_is_named(synthetic_root, cache_dir) -> None:
    with pytest.raises(ValueError, match="module.nonfinite_loss must be one of"):
        tiny_module(synthetic_root, cache_dir, "module.nonfinite_loss=ignore")


@pytest.mark.slow
def test_nan_during_training_stops_cleanly_and_keeps_the_last_good_checkpoint(synthetic_root, cache_dir,
                                                                             tmp_path) -> None:
    """A cache file corrupted to NaN mid-run: brats-train stops with a BratsError; last.ckpt and metrics stay."""
    overrides = tiny_overrides(synthetic_root, cache_dir, tmp_path / "run")
    train(compose_train([*overrides, "logger=none"]))  # fills the shared cache and one good epoch
    private = tmp_path / "cache"
    shutil.copytree(cache_dir, private)  # same data root -> same cache key: poison a copy, not the shared cache
    overrides = tiny_overrides(synthetic_root, private, tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    good, metrics = last.read_bytes(), (tmp_path / "run" / "metrics.json").read_text()
    for folder in private.iterdir():
        for case in cache.cached_cases(folder):
            x = np.load(folder / f"{case}_x.npy")
            np.save(folder / f"{case}_x.npy", np.full_like(x, np.nan))
    with pytest.raises(BratsError, match=r"non-finite training loss \(nan\) at step 2 .*checkpoints/last\.ckpt\) is "
                                         r"untouched"):
        train(compose_train([*overrides, "logger=none", "ckpt_path=last", "trainer.max_epochs=2"]))
    assert last.read_bytes() == good
    assert (tmp_path / "run" / "metrics.json").read_text() == metrics
    assert json.loads(metrics)["global_step"] == 2


# ---- Dice on empty classes and in reduced precision ---------------------------------------------------------------
def saturated_background(shape=(1, 8, 8, 8), k: int = 4) -> torch.Tensor:
    """Logits whose softmax/sigmoid is exactly 0 in float32 for every foreground channel."""
    logits = torch.full((shape[0], k, *shape[1:]), -200.0)
    logits[:, 0] = 200.0
    return logits


@pytest.mark.parametrize("loss", [DiceLoss(), CombinedLoss(alpha=1.0), RegionDiceBCELoss()],
                         ids=["dice", "combined", "region"])
def test_dice_losses_with_empty_classes_are_finite_and_perfect(loss) -> None:
    target = torch.zeros(1, 8, 8, 8, dtype=torch.long)  # classes 1-3 absent from truth and prediction
    logits = saturated_background(k=loss.num_outputs) if loss.activation == "softmax" else torch.full(
        (1, 3, 8, 8, 8), -200.0)
    value = loss(logits, target)
    assert torch.isfinite(value)
    # empty vs empty is a perfect match: Dice term (smooth / smooth) = 1, so the loss is 0 (BCE of -200 is ~0)
    assert value.item() == pytest.approx(0.0, abs=1e-6)


def test_zero_smooth_is_refused_by_the_config_check(synthetic_root, cache_dir, tmp_path) -> None:
    # With smooth=0 an absent class scores Dice 0 (0/0 once it underflows); the config check stops it before training.
    cfg = compose_train([*tiny_overrides(synthetic_root, cache_dir, tmp_path / "run"), "loss=dice", "loss.smooth=0"])
    with pytest.raises(BratsError, match=r"loss.smooth must be > 0 \(.*absent from the truth scores Dice 0.*got 0"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_metric_dice_on_empty_masks_never_divides_by_zero() -> None:
    empty = np.zeros((4, 4, 4), dtype=bool)
    full = np.ones((4, 4, 4), dtype=bool)
    assert dice(empty, empty) == 1.0 and dice(full, empty) == 0.0 and dice(empty, full) == 0.0
    classes = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    assert batch_region_dice(classes, classes, SCHEMAS["brats2021"]).item() == 1.0
    assert paper_dice(torch.softmax(saturated_background((1, 4, 4, 4)), 1), classes).item() == 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("loss", [CombinedLoss(), RegionDiceBCELoss()], ids=["combined", "region"])
def test_reduced_precision_logits_do_not_overflow_the_dice_sums(loss, dtype) -> None:
    # 96^3 voxels of ones: every per-class sum (884,736) is far above fp16's max (65,504); in bf16 the sum would
    # lose all precision past 256. The loss must equal the float32 one.
    logits32 = torch.ones(1, loss.num_outputs, 96, 96, 96)
    target = torch.zeros(1, 96, 96, 96, dtype=torch.long)
    target[:, :48] = 2
    assert torch.isinf(logits32.to(torch.float16).sum())  # the hazard is real
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(logits32.to(dtype), target)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == pytest.approx(loss(logits32, target).item(), rel=1e-5)
