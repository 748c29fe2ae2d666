"""Time to quality: the validation Dice a model reaches after a fixed wall-clock training budget.

    python -m benchmarks.time_to_quality [--quick] [--budget 240] [--arms auto,fp32,monai] [--out DIR]

Arms: ours (the quickstart recipe) with `auto` precision and memory format, ours in fp32 contiguous, and MONAI's
DynUNet at its defaults (its own filters, instance norm, LeakyReLU; fp32) on the same data, sampler, loss, optimiser
and seed. Each arm trains until the budget runs out (Lightning `max_time`), then validates once on the same cases
(sliding window, as brats-train validates). The LR is constant after the quickstart's warm-up: a cosine schedule
would need a step count that a time budget does not know. Arms run one after the other; on a shared machine the
budget buys fewer steps when the neighbours are busy, so the table also shows the steps each arm reached and the load
average.
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

from benchmarks.common import parse_ints, parse_words, print_table, threads, write_result
from brats_unet.config import compose
from brats_unet.runtime import training_device
from brats_unet.synth.generator import write_dataset
from brats_unet.training.build import build_datamodule, build_module
from brats_unet.training.fit import resolve_auto
from brats_unet.training.module import BratsModule

ARMS = ("auto", "fp32", "monai")


def arm_config(arm: str, root: Path, work: Path, quick: bool) -> Any:
    overrides = ["experiment=quickstart", f"data.root={root}", f"paths.cache_dir={work / 'cache'}",
                 f"paths.output_dir={work / arm}", "scheduler=constant",
                 "scheduler.total_steps=1000000", "logger=none", "module.val_hd95=false"]
    if quick:
        overrides += ["model.filters=[4,8,16]", "data.patch_size=[32,32,32]", "data.num_workers=0",
                      "data.persistent_workers=false"]
    if arm != "auto":  # MONAI's default is fp32 contiguous, like our fp32 arm
        overrides += ["trainer.precision=32-true", "runtime.channels_last=false"]
    return compose(overrides)


def monai_module(cfg: Any, in_channels: int) -> BratsModule:
    """MONAI's DynUNet with its defaults (filters, norm, activation), inside our module: same loss, optimiser, data."""
    from monai.networks.nets import DynUNet

    loss = instantiate(cfg.loss)
    levels = len(cfg.model.filters)
    net = DynUNet(3, in_channels, loss.num_outputs, kernel_size=[3] * levels, strides=[1] + [2] * (levels - 1),
                  upsample_kernel_size=[2] * (levels - 1))
    return BratsModule(net=net, loss=loss, optimizer=instantiate(cfg.optimizer), scheduler=None,
                       patch_size=list(cfg.data.patch_size), **OmegaConf.to_container(cfg.module, resolve=True))


def run_arm(arm: str, root: Path, work: Path, budget: float, quick: bool) -> dict[str, Any]:
    cfg = arm_config(arm, root, work, quick)
    L.seed_everything(cfg.seed, workers=True)
    resolve_auto(cfg)  # auto -> this machine's precision and memory format (fp32 arms: explicit, unchanged)
    datamodule = build_datamodule(cfg, str(work / arm))
    channels = datamodule.num_channels
    module = monai_module(cfg, channels) if arm == "monai" else build_module(cfg, channels)
    trainer = L.Trainer(accelerator=cfg.trainer.accelerator, devices=1, precision=cfg.trainer.precision,
                        max_epochs=-1, max_time={"seconds": budget}, check_val_every_n_epoch=10**6,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, deterministic="warn")
    load = os.getloadavg()[0]
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    train_s = time.perf_counter() - start
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    return {"arm": arm, "impl": "monai DynUNet (defaults)" if arm == "monai" else "ours",
            "precision": str(cfg.trainer.precision), "channels_last": bool(cfg.runtime.channels_last),
            "params_m": round(sum(p.numel() for p in module.net.parameters()) / 1e6, 2), "budget_s": budget,
            "train_s": round(train_s, 1), "steps": trainer.global_step,
            "s_per_step": round(train_s / max(trainer.global_step, 1), 3),
            "val_dice_mean": float(metrics["val/dice_mean"]),
            **{f"val_dice_{r}": float(metrics[f"val/dice_{r}"]) for r in ("wt", "tc", "et")},
            "load_average_1m": round(load, 2)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.time_to_quality", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny widths, 32^3 patches, 4 small cases, 5 s budget")
    p.add_argument("--budget", type=float, help="training seconds per arm (default 240, quick 5)")
    p.add_argument("--arms", type=parse_words, default=list(ARMS), help="comma-separated subset of auto,fp32,monai")
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


COLUMNS = ["arm", "impl", "precision", "channels_last", "params_m", "budget_s", "steps", "s_per_step",
           "val_dice_mean", "val_dice_wt", "val_dice_tc", "val_dice_et", "load_average_1m", "status"]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rows = []
    with threads(args.threads), tempfile.TemporaryDirectory(prefix="brats-ttq-") as tmp:
        work = Path(tmp)
        write_dataset(work / "raw", cases=args.cases, seed=0, shape=args.shape)
        for arm in args.arms:
            print(f"[time_to_quality] {arm}: {args.budget:g} s of training", flush=True)
            try:
                rows.append({**run_arm(arm, work / "raw", work, args.budget, args.quick), "status": "ok"})
            except ImportError as e:  # monai is in the `bench` extra
                rows.append({"arm": arm, "status": f"skipped: {e} (pip install -e .[bench])"})
        device = torch.device(training_device("auto"))  # the quickstart's trainer.accelerator is auto
        result = {"device": str(device), "settings": {k: v for k, v in vars(args).items() if k != "out"},
                  "rows": rows}
        path = write_result("time_to_quality", result, device, args.out)
    print_table(rows, COLUMNS, title=f"validation Dice after {args.budget:g} s of training ({args.cases} cases)")
    print(f"wrote {path}", flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
