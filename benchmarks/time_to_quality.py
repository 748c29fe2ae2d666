"""Time to quality: the Dice a model reaches after a fixed budget of training time, and how soon it reaches 0.90.

    python -m benchmarks.time_to_quality [--quick] [--budget 240] [--arms auto,fp32,resenc,monai,segresnet,nnunet]
        [--out DIR]

Arms: ours (the quickstart recipe) with `auto` precision and memory format, ours in fp32 contiguous, `resenc`
(model=resenc: nnU-Net's residual encoder at the quickstart's widths 8..128, `auto`), MONAI's DynUNet at its defaults
(its own filters, instance norm, LeakyReLU; fp32) and MONAI's SegResNet at its defaults (the Auto3DSeg network that
won BraTS 2023 MET/MEN/SSA; fp32), on the same cases, sampler, loss, optimiser and seed. Each arm trains until its
training time (validation excluded) reaches the budget, validating every `--val-every` epochs to find the training
time at which validation Dice first reaches 0.90; then it is scored once on the validation cases and once on the
held-out test cases (sliding window, as brats-train validates). The LR is constant after the quickstart's warm-up: a
cosine schedule would need a step count that a time budget does not know. Arms run one after the other; on a shared
machine the budget buys fewer steps when the neighbours are busy, so each row records the steps reached and the load
average before and after it.

Arm `nnunet` is nnU-Net v2 itself, the whole pipeline on the same cases and split (benchmarks/nnunet_arm.py): its
own planning, preprocessing, augmentation and region training, stopped at the same budget of training time, then its
predictor on the same test cases, scored by the same evaluation; it has no validation curve (val Dice None). It needs
`make nnunet` (docs/speed.md); without nnunetv2 its row says how to install it and the other arms run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from benchmarks import nnunet_arm
from benchmarks.common import parse_ints, parse_words, print_table, threads, write_result
from brats_unet.config import compose
from brats_unet.data.datamodule import GROUPED_KEYS, group_keys
from brats_unet.data.discovery import find_cases
from brats_unet.runtime import training_device
from brats_unet.synth.generator import write_dataset
from brats_unet.training.build import build_datamodule, build_module
from brats_unet.training.fit import resolve_auto
from brats_unet.training.module import BratsModule

ARMS = ("auto", "fp32", "resenc", "monai", "segresnet", "nnunet")
MONAI_ARMS = {"monai": "monai DynUNet (defaults)", "segresnet": "monai SegResNet (defaults)"}
INSTALL = {"nnunet": nnunet_arm.INSTALL}  # arms whose packages are optional: how to install them (default: bench)
TARGET_DICE = 0.90


class TrainingClock(L.Callback):
    """Stops the fit when training time (wall time minus validation) reaches `budget`; records each validation's
    (step, training seconds, val/dice_mean) and the first training time at which the Dice reached `target`."""

    def __init__(self, budget: float, target: float = TARGET_DICE) -> None:
        self.budget, self.target = budget, target
        self.start = self.val_start = 0.0
        self.val_s = 0.0
        self.curve: list[tuple[int, float, float]] = []

    def train_s(self) -> float:
        return time.perf_counter() - self.start - self.val_s

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.start, self.val_s = time.perf_counter(), 0.0

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.train_s() >= self.budget:
            trainer.should_stop = True

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.val_s += time.perf_counter() - self.val_start
        dice = trainer.callback_metrics.get("val/dice_mean")
        if dice is not None and trainer.state.fn == "fit":
            self.curve.append((trainer.global_step, round(self.train_s(), 1), round(float(dice), 4)))

    def time_to_target(self) -> tuple[float | None, int | None]:
        hit = next(((t, step) for step, t, dice in self.curve if dice >= self.target), None)
        return hit if hit is not None else (None, None)


def arm_config(arm: str, root: Path, work: Path, quick: bool) -> Any:
    overrides = ["experiment=quickstart", f"data.root={root}", f"paths.cache_dir={work / 'cache'}",
                 f"paths.output_dir={work / arm}", "scheduler=constant",
                 "scheduler.total_steps=1000000", "logger=none", "module.val_hd95=false",
                 # 64^3 for every arm, as in the published table (the quickstart itself trains 48^3 since 2026-12-05)
                 "data.patch_size=[64,64,64]",
                 # the published table's split (the quickstart stratifies its split since issue 20, session 7)
                 "data.stratify=false"]
    if arm == "resenc":  # nnU-Net's blocks at the quickstart's widths: the architecture, not the size, differs
        overrides += ["model=resenc", "model.filters=[8,16,32,64,128]"]
    if quick:
        overrides += ["model.filters=[4,8,16]", "data.patch_size=[32,32,32]", "data.num_workers=0",
                      "data.persistent_workers=false"]
    if arm not in ("auto", "resenc"):  # MONAI's default is fp32 contiguous, like our fp32 arm
        overrides += ["trainer.precision=32-true", "runtime.channels_last=false"]
    return compose(overrides)


def monai_module(cfg: Any, in_channels: int, arm: str = "monai") -> BratsModule:
    """A MONAI network with its defaults (DynUNet: filters, norm, activation; SegResNet: 8 initial filters, blocks
    1-2-2-4, group norm), inside our module: same loss, optimiser, data."""
    from monai.networks.nets import DynUNet, SegResNet

    loss = instantiate(cfg.loss)
    levels = len(cfg.model.filters)
    if arm == "segresnet":
        net = SegResNet(spatial_dims=3, in_channels=in_channels, out_channels=loss.num_outputs)
    else:
        net = DynUNet(3, in_channels, loss.num_outputs, kernel_size=[3] * levels, strides=[1] + [2] * (levels - 1),
                      upsample_kernel_size=[2] * (levels - 1))
    return BratsModule(net=net, loss=loss, optimizer=instantiate(cfg.optimizer), scheduler=None,
                       patch_size=list(cfg.data.patch_size), **OmegaConf.to_container(cfg.module, resolve=True))


def benchmark_split(root: Path, work: Path) -> dict[str, Any]:
    """The split the quickstart DataModule makes of the cases under `root` (every synthetic case is valid, so the
    cases it caches are the cases on disk): what arm nnunet trains, validates and tests on."""
    data = OmegaConf.to_container(arm_config("auto", root, work, quick=False).data, resolve=True)
    spec, _ = group_keys({k: v for k, v in data.items() if k in GROUPED_KEYS}, None, None)
    return spec.make([c.case for c in find_cases(root, data["layout"])])


def run_arm(arm: str, root: Path, work: Path, budget: float, quick: bool, val_every: int) -> dict[str, Any]:
    if arm == "nnunet":
        row = nnunet_arm.run(root, benchmark_split(root, work), work / arm, budget, torch.get_num_threads())
        return {"arm": arm, **row, f"time_to_val_dice_{TARGET_DICE:.2f}_s": None,
                f"steps_to_val_dice_{TARGET_DICE:.2f}": None}
    cfg = arm_config(arm, root, work, quick)
    L.seed_everything(cfg.seed, workers=True)
    resolve_auto(cfg)  # auto -> this machine's precision and memory format (fp32 arms: explicit, unchanged)
    datamodule = build_datamodule(cfg, str(work / arm))
    channels = datamodule.num_channels
    module = monai_module(cfg, channels, arm) if arm in MONAI_ARMS else build_module(cfg, channels)
    clock = TrainingClock(budget)
    trainer = L.Trainer(accelerator=cfg.trainer.accelerator, devices=1, precision=cfg.trainer.precision,
                        max_epochs=-1, callbacks=[clock], check_val_every_n_epoch=val_every,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, deterministic="warn")
    load = os.getloadavg()[0]
    trainer.fit(module, datamodule=datamodule)
    train_s = clock.train_s()
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    test = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    reached_s, reached_step = clock.time_to_target()
    return {"arm": arm, "impl": MONAI_ARMS.get(arm, "ours (model=resenc)" if arm == "resenc" else "ours"),
            "precision": str(cfg.trainer.precision), "channels_last": bool(cfg.runtime.channels_last),
            "params_m": round(sum(p.numel() for p in module.net.parameters()) / 1e6, 2), "budget_s": budget,
            "train_s": round(train_s, 1), "steps": trainer.global_step,
            "s_per_step": round(train_s / max(trainer.global_step, 1), 3),
            "val_dice_mean": float(metrics["val/dice_mean"]),
            **{f"val_dice_{r}": float(metrics[f"val/dice_{r}"]) for r in ("wt", "tc", "et")},
            "test_dice_mean": float(test["test/dice_mean"]),
            **{f"test_dice_{r}": float(test[f"test/dice_{r}"]) for r in ("wt", "tc", "et")},
            "test_cases": len(datamodule.split["test"]),
            f"time_to_val_dice_{TARGET_DICE:.2f}_s": reached_s, f"steps_to_val_dice_{TARGET_DICE:.2f}": reached_step,
            "val_curve": clock.curve, "load_average_1m": round(load, 2),
            "load_average_1m_after": round(os.getloadavg()[0], 2)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.time_to_quality", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny widths, 32^3 patches (nnunet: its own plan), 4 small cases, 5 s budget")
    p.add_argument("--budget", type=float, help="training seconds per arm (default 240, quick 5)")
    p.add_argument("--arms", type=parse_words, default=list(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--val-every", type=int, default=2, help="validate every this many epochs (time to Dice 0.90)")
    p.add_argument("--cases", type=int, help="synthetic cases (default 10, quick 4)")
    p.add_argument("--shape", type=parse_ints, help="synthetic volume shape (default 120,120,78 as the demo)")
    p.add_argument("--threads", type=int, help="intra-op CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        p.error(f"--arms: unknown {unknown}; choose from {list(ARMS)}")
    for key, full, quick in (("budget", 240.0, 5.0), ("cases", 10, 4), ("shape", [120, 120, 78], [64, 64, 48])):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    return args


COLUMNS = ["arm", "impl", "precision", "params_m", "budget_s", "steps", "s_per_step", "val_dice_mean",
           "test_dice_mean", "test_dice_wt", "test_dice_tc", "test_dice_et", f"time_to_val_dice_{TARGET_DICE:.2f}_s",
           "load_average_1m", "status"]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rows = []
    with threads(args.threads), tempfile.TemporaryDirectory(prefix="brats-ttq-") as tmp:
        work = Path(tmp)
        write_dataset(work / "raw", cases=args.cases, seed=0, shape=args.shape)
        for arm in args.arms:
            print(f"[time_to_quality] {arm}: {args.budget:g} s of training", flush=True)
            try:
                rows.append({**run_arm(arm, work / "raw", work, args.budget, args.quick, args.val_every),
                             "status": "ok"})
            except ImportError as e:  # monai is in the `bench` extra, nnunetv2 installs apart (docs/speed.md)
                rows.append({"arm": arm, "status": f"skipped: {e} ({INSTALL.get(arm, 'pip install -e .[bench]')})"})
        device = torch.device(training_device("auto"))  # the quickstart's trainer.accelerator is auto
        result = {"device": str(device), "settings": {k: v for k, v in vars(args).items() if k != "out"},
                  "rows": rows}
        path = write_result("time_to_quality", result, device, args.out)
    print_table(rows, COLUMNS, title=f"Dice after {args.budget:g} s of training ({args.cases} cases)")
    print(f"wrote {path}", flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
