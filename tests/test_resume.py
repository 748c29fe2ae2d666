"""Resume in the README's own setting: validation every epoch, DataLoader workers, `auto` precision and memory format.
An interrupted run resumed with `ckpt_path=last` must end with exactly the weights of an uninterrupted one."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from helpers import compose_train, tiny_overrides

from brats_unet.training import fit
from brats_unet.training.fit import train


class Interrupt(Exception):
    """Stands for a kill (pre-emption, Ctrl-C) at the start of the second epoch."""


class InterruptAtEpoch(L.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise Interrupt(f"killed at the start of epoch {self.epoch}")


def readme_setting(root: Path, cache: Path, out: Path) -> list[str]:
    fixed = ("data.num_workers", "data.persistent_workers", "trainer.precision", "runtime.channels_last")
    return [*(o for o in tiny_overrides(root, cache, out) if o.split("=")[0] not in fixed),
            "data.num_workers=2", "data.persistent_workers=true", "trainer.precision=auto",
            "runtime.channels_last=auto", "trainer.check_val_every_n_epoch=1", "data.steps_per_epoch=3",
            "trainer.max_epochs=2", "augment=modern",
            "model.dropout=0.2", "logger=none"]


def last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_a_run_interrupted_after_an_epoch_resumes_bit_identical_with_workers(
        synthetic_root: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2 epochs of 3 steps straight vs killed at the start of epoch 1 + `ckpt_path=last`: torch.equal weights.

    Before the fix the resumed epoch replayed epoch 0's patches (Lightning 2.6 creates a resumed run's first
    iterator before it sets the sampler's epoch, and worker processes prefetch at once), and persistent workers
    drew their seed from the global RNG at a different moment, shifting the dropout masks."""
    straight, legs = tmp_path / "straight", tmp_path / "legs"
    train(compose_train(readme_setting(synthetic_root, cache_dir, straight)))

    build_trainer = fit.build_trainer

    def interrupted(cfg):
        trainer = build_trainer(cfg)
        trainer.callbacks.append(InterruptAtEpoch(1))
        return trainer

    monkeypatch.setattr(fit, "build_trainer", interrupted)
    with pytest.raises(Interrupt):
        train(compose_train(readme_setting(synthetic_root, cache_dir, legs)))
    monkeypatch.undo()
    first = last(legs)
    # Lightning 2.6 runs the epoch-end validation before on_train_epoch_end, where last.ckpt is written: the file
    # holds the state after validation (its best Dice), which is what the straight run continues from.
    assert (first["epoch"], first["global_step"]) == (0, 3)
    assert math.isfinite(float(first["state_dict"]["best_val_dice"]))
    train(compose_train([*readme_setting(synthetic_root, cache_dir, legs), "ckpt_path=last"]))

    a, b = last(straight), last(legs)
    assert (a["global_step"], a["epoch"]) == (b["global_step"], b["epoch"]) == (6, 1)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    differ = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not differ, {k: (a["state_dict"][k].float() - b["state_dict"][k].float()).abs().max().item() for k in differ}
