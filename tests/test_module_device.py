"""What a GPU run does differently from a CPU test, shown on the CPU: inference-mode validation, where resume puts
tensors, which accelerator a debug config keeps, per-step host syncs."""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import torch
from helpers import compose_train, tiny_overrides

from brats_unet.data.labels import SCHEMAS
from brats_unet.models.unet3d import UNet3D
from brats_unet.training.build import AtomicCheckpointIO
from brats_unet.training.losses import RegionDiceBCELoss
from brats_unet.training.module import BratsModule, batch_region_dice


def _module() -> BratsModule:
    net = UNet3D(in_channels=4, out_channels=3, filters=(2, 4))
    return BratsModule(net, RegionDiceBCELoss(), functools.partial(torch.optim.Adam, lr=1e-3), patch_size=(8, 8, 8),
                       val_hd95=False)


def test_best_val_dice_is_updated_in_place_under_inference_mode(monkeypatch) -> None:
    """Lightning validates under torch.inference_mode on CUDA: a buffer replaced there becomes an inference tensor,
    which DDP's buffer broadcast refuses at the next training step. The buffer must stay the same, normal tensor."""
    module = _module()
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    module._trainer = SimpleNamespace(sanity_checking=False)
    buffer = module.best_val_dice
    truth = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    truth[0, :2] = 2  # oedema in half the volume; predicted exactly: every region Dice 1 (TC, ET empty in both)
    with torch.inference_mode():
        module.val_metrics.update(truth.clone(), truth)
        module.on_validation_epoch_end()
    assert module.best_val_dice is buffer
    assert not module.best_val_dice.is_inference()
    assert module.best_val_dice.item() == 1.0
    assert dict(module.named_buffers())["best_val_dice"] is buffer


def test_resume_loads_checkpoints_onto_the_cpu_not_the_saving_device(tmp_path: Path, monkeypatch) -> None:
    """Lightning's resume passes map_location=None: torch.load would then put every DDP rank's copy on cuda:0."""
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    seen = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("map_location")) or real_load(*a, **k))
    loaded = AtomicCheckpointIO().load_checkpoint(path)
    assert seen == ["cpu"] and loaded["state_dict"]["w"].device.type == "cpu"


def test_fast_dev_run_keeps_the_trainers_accelerator() -> None:
    cfg = compose_train(["trainer=gpu", "debug=fast_dev_run"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.fast_dev_run is True
    cfg = compose_train([*tiny_overrides(Path("r"), Path("c"), Path("o")), "debug=fast_dev_run"])
    assert cfg.trainer.accelerator == "cpu"  # what the command line says, and nothing else


def test_batch_region_dice_reads_nothing_back_from_the_device() -> None:
    """The training-time Dice must not read a device value back each step (`if denominator > 0` stalls a GPU's
    queue): on the meta device, which has no values, any such read raises. Values by hand: WT 2*2/(2+4), TC and ET
    0 (ET present once, predicted nowhere); a region absent from both scores 1."""
    schema = SCHEMAS["brats2021"]
    meta = torch.zeros(2, 4, dtype=torch.long, device="meta")
    assert batch_region_dice(meta, meta, schema).shape == ()
    pred = torch.tensor([0, 2, 2, 0, 0, 0])
    target = torch.tensor([0, 2, 2, 2, 3, 0])  # internal class 3 = ET
    assert abs(batch_region_dice(pred, target, schema).item() - (4 / 6 + 0.0 + 0.0) / 3) < 1e-6
    assert batch_region_dice(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), schema).item() == 1.0
