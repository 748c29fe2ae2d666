"""Training-step throughput: our U-Net at the quickstart and paper widths, patch and batch sizes, precision,
channels_last_3d and torch.compile; peak memory; MONAI's DynUNet of equal widths as a reference.

    python -m benchmarks.training [--quick] [--device auto|cpu|cuda] [--out DIR]

Each combination runs `--warmup` steps, then `--steps` timed steps (median reported). Combinations whose estimated
time (from the cost per conv FLOP measured so far) exceeds `--max-combo-seconds` are skipped and say so;
`--memory-probe` runs single steps of big settings anyway, only to record their peak memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from benchmarks.common import (
    median,
    parse_ints,
    parse_words,
    peak_memory_mb,
    print_table,
    reset_peak_memory,
    resolve_device,
    synchronize,
    threads,
    write_result,
)
from brats_unet.models.resenc import ResEncUNet
from brats_unet.models.unet3d import UNet3D
from brats_unet.runtime import autocast
from brats_unet.training.losses import CombinedLoss, RegionDiceBCELoss

# in/out channels follow the recipes: quickstart = modern (4 modalities, WT/TC/ET regions), paper = seed (3, 4 classes).
MODELS: dict[str, dict[str, Any]] = {
    "tiny": {"filters": [4, 8, 16], "norm": "instance", "dropout": 0.0, "in": 4, "loss": "region"},
    "quickstart": {"filters": [8, 16, 32, 64, 128], "norm": "instance", "dropout": 0.0, "in": 4, "loss": "region"},
    "paper": {"filters": [32, 64, 128, 256, 512], "norm": "none", "dropout": [0.1, 0.1, 0.2, 0.2, 0.2], "in": 3,
              "loss": "combined"},
    # model=resenc (nnU-Net ResEnc M); timed without its deep-supervision heads (1x1 convs: a few % of a step).
    "resenc": {"filters": [32, 64, 128, 256, 320, 320], "norm": "instance", "dropout": 0.0, "in": 4, "loss": "region",
               "arch": "resenc"},
}
# NVIDIA nnU-Net for BraTS21 (DeepLearningExamples README): published training throughput at 128^3, batch 2, and the
# network it was measured with (DynUNet, --depth 6 --filters 64 96 128 192 256 384 512 --min_fmap 2, 5 input channels
# incl. the foreground channel, 3 region outputs). Used on CUDA to scale the published img/s by the FLOPs ratio.
NVIDIA_BRATS = {"patch": 128, "batch": 2, "img_per_s": {"A100 AMP": 27.48, "A100 TF32": 11.27, "V100 FP32": 2.51},
                "filters": [64, 96, 128, 192, 256, 384, 512], "in": 5, "out": 3}
SECTIONS = ("size", "option", "reference")
REFERENCE_NOTE = ("ours and MONAI DynUNet both with instance norm (DynUNet always normalises) and ReLU, no dropout, "
                  "same filters, kernel 3, 2 convs per level, transposed-conv upsampling; DynUNet downsamples with "
                  "strided convs, ours with max-pooling")


@dataclasses.dataclass(frozen=True)
class Combo:
    impl: str  # ours | monai
    model: str
    patch: int
    batch: int
    precision: str = "fp32"  # fp32 | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    norm: str = "none"
    dropout: bool = False  # the preset's dropout rates, or none (the MONAI comparison)
    threads: int | None = None  # intra-op CPU threads; None: the process setting (--threads)


def preset(impl: str, model: str, patch: int, batch: int) -> Combo:
    """A combination with the model preset's own norm and dropout, fp32, no options."""
    spec = MODELS[model]
    return Combo(impl, model, patch, batch, norm=spec["norm"], dropout=spec["dropout"] not in (0, 0.0))


def build_net(combo: Combo) -> tuple[nn.Module, nn.Module, int]:
    """(network, loss, in_channels) for a combination."""
    spec = MODELS[combo.model]
    loss = RegionDiceBCELoss() if spec["loss"] == "region" else CombinedLoss(alpha=0.5)
    norm = combo.norm
    if combo.impl == "monai":
        from monai.networks.nets import DynUNet

        levels = len(spec["filters"])
        net: nn.Module = DynUNet(3, spec["in"], loss.num_outputs, kernel_size=[3] * levels,
                                 strides=[1] + [2] * (levels - 1), upsample_kernel_size=[2] * (levels - 1),
                                 filters=spec["filters"], norm_name=(norm, {"affine": True}),
                                 act_name=("relu", {"inplace": True}), res_block=False)
    elif spec.get("arch") == "resenc":
        net = ResEncUNet(spec["in"], loss.num_outputs, spec["filters"], norm=norm, deep_supervision=False,
                         channels_last=combo.channels_last)
    else:
        net = UNet3D(spec["in"], loss.num_outputs, spec["filters"], dropout=spec["dropout"] if combo.dropout else 0.0,
                     norm=norm, channels_last=combo.channels_last)
    return net, loss, spec["in"]


def conv_gflops(net_factory: Callable[[], nn.Module], input_shape: Sequence[int]) -> float:
    """Forward conv GFLOP (2 x multiply-adds) for one input, counted with hooks on the meta device (no compute)."""
    macs = [0]

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        k = 1
        for s in module.kernel_size:
            k *= s
        if isinstance(module, nn.ConvTranspose3d):  # every input voxel scatters into out_channels x k^3 outputs
            macs[0] += inputs[0].numel() * module.out_channels * k
        else:
            macs[0] += output.numel() * (module.in_channels // module.groups) * k

    with torch.device("meta"):
        net = net_factory()
        convs = [m for m in net.modules() if isinstance(m, nn.Conv3d | nn.ConvTranspose3d)]
        handles = [m.register_forward_hook(hook) for m in convs]
        net(torch.empty(*input_shape))
    for h in handles:
        h.remove()
    return 2 * macs[0] / 1e9


def combo_gflops(combo: Combo) -> float:
    spec = MODELS[combo.model]
    return conv_gflops(lambda: build_net(combo)[0], (combo.batch, spec["in"], *(combo.patch,) * 3))


def nvidia_gflops(patch: int = NVIDIA_BRATS["patch"]) -> float | None:
    try:
        from monai.networks.nets import DynUNet
    except ImportError:
        return None
    n, c_in = len(NVIDIA_BRATS["filters"]), NVIDIA_BRATS["in"]
    return conv_gflops(lambda: DynUNet(3, c_in, NVIDIA_BRATS["out"], [3] * n, [1] + [2] * (n - 1), [2] * (n - 1),
                                       filters=NVIDIA_BRATS["filters"]), (1, c_in, *(patch,) * 3))


def run_combo(combo: Combo, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """Time `steps` optimiser steps after `warmup`; peak memory over all of them."""
    with threads(combo.threads):
        return _run_combo(combo, device, steps, warmup)


def _run_combo(combo: Combo, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    torch.manual_seed(0)
    net, loss_fn, in_ch = build_net(combo)
    net = net.to(device).train()
    fmt = torch.channels_last_3d if combo.channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    x = torch.randn(combo.batch, in_ch, *(combo.patch,) * 3, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 4, (combo.batch, *(combo.patch,) * 3), device=device)
    forward = torch.compile(net) if combo.compile else net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type) if combo.precision == "fp16" else None

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device, combo.precision)():
            loss = loss_fn(forward(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    reset_peak_memory(device)
    times = []
    for _ in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    mem, kind = peak_memory_mb(device)
    measured = times[warmup:]
    step_s = median(measured)
    return {"status": "ok", "warmup_s": [round(t, 4) for t in times[:warmup]],
            "steps_s": [round(t, 4) for t in measured], "step_s": step_s, "steps_per_s": 1 / step_s,
            "samples_per_s": combo.batch / step_s, "peak_mem_mb": round(mem, 1), "mem_kind": kind,
            "threads_used": torch.get_num_threads() if device.type == "cpu" else None}


def _at(text: str) -> tuple[str, int, int]:
    """"paper:128:2" -> ("paper", 128, 2)."""
    model, patch, batch = text.split(":")
    if model not in MODELS:
        raise argparse.ArgumentTypeError(f"unknown model {model!r}; choose from {sorted(MODELS)}")
    return model, int(patch), int(batch)


def plan(args: argparse.Namespace) -> list[tuple[str, Combo]]:
    """(section, combination) pairs: sizes grid, speed options at chosen settings, the MONAI reference."""
    items: list[tuple[str, Combo]] = []
    for model in args.models:
        for patch in args.patches:
            items += [("size", preset("ours", model, patch, batch)) for batch in args.batches]
    for model, patch, batch in args.option_at:
        base = preset("ours", model, patch, batch)
        items.append(("option", base))
        items += [("option", dataclasses.replace(base, precision=p)) for p in args.precisions if p != "fp32"]
        if args.channels_last:
            items.append(("option", dataclasses.replace(base, channels_last=True)))
            items += [("option", dataclasses.replace(base, channels_last=True, precision=p))
                      for p in args.precisions if p != "fp32"]
        if args.compile:
            items.append(("option", dataclasses.replace(base, compile=True)))
        items += [("option", dataclasses.replace(base, threads=n)) for n in args.thread_options]
    for model, patch, batch in args.reference_at:
        ref = Combo("ours", model, patch, batch, norm="instance", dropout=False)
        items += [("reference", dataclasses.replace(ref, norm="none")), ("reference", ref),
                  ("reference", dataclasses.replace(ref, impl="monai"))]
    seen: set[Combo] = set()
    return [(s, c) for s, c in items if not (c in seen or seen.add(c))]


def monai_missing() -> str | None:
    try:
        import monai  # noqa: F401
    except ImportError:
        return "monai not installed (pip install -e .[bench])"
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    precisions = [p for p in args.precisions if not (p == "fp16" and device.type != "cuda")]
    args.precisions = precisions
    rows: list[dict[str, Any]] = []
    sec_per_gflop: float | None = None  # measured fp32 eager cost, for skipping hopeless combinations
    missing = monai_missing()

    def order(item: tuple[str, Combo]) -> tuple[int, float]:  # cheapest first within a section: the cost model
        section, combo = item  # then has a measurement before it meets a big one
        return SECTIONS.index(section), 0.0 if combo.impl == "monai" and missing else combo_gflops(combo)

    for section, combo in sorted(plan(args), key=order):
        row: dict[str, Any] = {"section": section, **dataclasses.asdict(combo)}
        row["filters"] = MODELS[combo.model]["filters"]
        if combo.impl == "monai" and missing:
            rows.append({**row, "status": missing})
            continue
        gflops = combo_gflops(combo)
        row["gflop_fwd"] = float(f"{gflops:.4g}")
        estimate = sec_per_gflop * gflops if sec_per_gflop else None
        row["est_step_s"] = round(estimate, 2) if estimate else None
        if estimate and estimate * (args.warmup + args.steps) > args.max_combo_seconds:
            rows.append({**row, "status": f"skipped: ~{estimate:.0f} s/step x {args.warmup + args.steps} steps > "
                                          f"--max-combo-seconds {args.max_combo_seconds:g}"})
            print(f"[training] skip {combo}", flush=True)
            continue
        print(f"[training] {section}: {combo}", flush=True)
        try:
            row.update(run_combo(combo, device, args.steps, args.warmup))
        except Exception as e:  # compile without a compiler, bf16 without kernels, OOM...: record it and go on
            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
        plain = combo.precision == "fp32" and not combo.compile and combo.threads is None and combo.impl == "ours"
        if row["status"] == "ok" and plain:
            sec_per_gflop = row["step_s"] / gflops  # the largest so far (sorted): closest to what comes next
        rows.append(row)

    probes = []
    for model, patch, batch in args.memory_probe:
        combo = preset("ours", model, patch, batch)
        print(f"[training] memory probe: {combo}", flush=True)
        probe = {**dataclasses.asdict(combo), "gflop_fwd": float(f"{combo_gflops(combo):.4g}")}
        try:
            probe.update(run_combo(combo, device, steps=1, warmup=0))
        except Exception as e:
            probe["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        probes.append(probe)
    return {"device": str(device), "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "rows": rows, "reference": reference_ratios(rows), "reference_note": REFERENCE_NOTE,
            "memory_probe": probes, "nvidia": nvidia_comparison(rows, device)}


def reference_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ours/MONAI step-time ratio per (model, patch, batch) of the reference section (<= 1.0: ours is faster)."""
    out = []
    plain = {"precision": "fp32", "channels_last": False, "compile": False, "dropout": False, "threads": None}
    for monai_row in (r for r in rows if r["impl"] == "monai"):
        key = (monai_row["model"], monai_row["patch"], monai_row["batch"])
        ours = {r["norm"]: r for r in rows if r["impl"] == "ours" and (r["model"], r["patch"], r["batch"]) == key
                and all(r[k] == v for k, v in plain.items())}
        entry: dict[str, Any] = {"model": key[0], "patch": key[1], "batch": key[2], "monai_status": monai_row["status"]}
        for norm, r in ours.items():
            entry[f"ours_{norm}_step_s"] = r.get("step_s")
        if monai_row["status"] == "ok":
            entry["monai_step_s"] = monai_row["step_s"]
            if ours.get("instance", {}).get("step_s"):
                entry["ratio_ours_over_monai"] = ours["instance"]["step_s"] / monai_row["step_s"]
        out.append(entry)
    return out


def nvidia_comparison(rows: list[dict[str, Any]], device: torch.device) -> dict[str, Any] | None:
    """On CUDA: the published img/s scaled by FLOPs (NVIDIA's net / ours) vs what we measured at 128^3 batch 2."""
    if device.type != "cuda":
        return None
    theirs = nvidia_gflops()
    if theirs is None:
        return {"status": "monai not installed (needed to count NVIDIA's DynUNet FLOPs)"}
    out: dict[str, Any] = {"nvidia_gflop_fwd_per_sample": round(theirs, 1), "published": NVIDIA_BRATS["img_per_s"],
                           "ours": []}
    for r in rows:
        if r["impl"] == "ours" and r["patch"] == 128 and r["batch"] == 2 and r.get("status") == "ok":
            per_sample = r["gflop_fwd"] / r["batch"]
            scaled = {k: v * theirs / per_sample for k, v in NVIDIA_BRATS["img_per_s"].items()}
            out["ours"].append({"model": r["model"], "precision": r["precision"], "compile": r["compile"],
                                "channels_last": r["channels_last"], "samples_per_s": r["samples_per_s"],
                                "flops_scaled_published": scaled})
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="a CPU-sized subset (quickstart widths, 64^3, 2 steps)")
    p.add_argument("--models", type=parse_words)
    p.add_argument("--patches", type=parse_ints)
    p.add_argument("--batches", type=parse_ints)
    p.add_argument("--precisions", type=parse_words)
    p.add_argument("--option-at", type=lambda s: [_at(v) for v in parse_words(s)],
                   help="model:patch:batch settings for the precision/channels_last/compile variants")
    p.add_argument("--reference-at", type=lambda s: [_at(v) for v in parse_words(s)])
    p.add_argument("--memory-probe", type=lambda s: [_at(v) for v in parse_words(s)])
    p.add_argument("--channels-last", type=lambda s: s.lower() in ("1", "on", "true", "yes"))
    p.add_argument("--compile", type=lambda s: s.lower() in ("1", "on", "true", "yes"))
    p.add_argument("--threads", type=int, help="intra-op CPU threads for the whole run (default: torch's)")
    p.add_argument("--thread-options", type=parse_ints,
                   help="extra option rows with these thread counts (CPU default 1: does a second thread pay?)")
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--max-combo-seconds", type=float)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    cuda = resolve_device(args.device).type == "cuda"
    if cuda:
        defaults = dict(models=["quickstart", "paper"], patches=[64, 128], batches=[1, 2],
                        precisions=["fp32", "bf16", "fp16"], option_at=[("quickstart", 128, 2), ("paper", 128, 2)],
                        reference_at=[("quickstart", 128, 2), ("paper", 128, 2)], memory_probe=[],
                        channels_last=True, compile=True, thread_options=[], steps=20, warmup=5,
                        max_combo_seconds=300.0)
    elif args.quick:
        defaults = dict(models=["quickstart", "paper"], patches=[64], batches=[1, 2], precisions=["fp32", "bf16"],
                        option_at=[("quickstart", 64, 2)], reference_at=[("quickstart", 64, 2)], memory_probe=[],
                        channels_last=True, compile=False, thread_options=[1], steps=2, warmup=1,
                        max_combo_seconds=30.0)
    else:
        defaults = dict(models=["quickstart", "paper"], patches=[64, 128], batches=[1, 2],
                        precisions=["fp32", "bf16"], option_at=[("quickstart", 64, 2)],
                        reference_at=[("quickstart", 64, 2), ("paper", 64, 1)], memory_probe=[("paper", 128, 2)],
                        channels_last=True, compile=True, thread_options=[1], steps=3, warmup=1,
                        max_combo_seconds=60.0)
    if not cuda:  # the other thread count as an option row: on a small (shared) CPU one thread can win
        current = args.threads or torch.get_num_threads()
        defaults["thread_options"] = sorted({1, os.cpu_count() or 1} - {current})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


COLUMNS = ["section", "impl", "model", "norm", "patch", "batch", "precision", "channels_last", "compile",
           "threads_used", "step_s", "samples_per_s", "peak_mem_mb", "gflop_fwd", "status"]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with threads(args.threads) as n:
        result = run(args)
        device = torch.device(result["device"])
        path = write_result("training", result, device, args.out)  # inside: the machine info shows the run's threads
    print_table(result["rows"], COLUMNS, title=f"training steps on {device} ({n} threads unless the row says)")
    if result["reference"]:
        print_table(result["reference"], list(result["reference"][0]), title="ours vs MONAI DynUNet (same widths)")
    if result["memory_probe"]:
        print_table(result["memory_probe"], ["model", "patch", "batch", "step_s", "peak_mem_mb", "status"],
                    title="memory probe (one step)")
    print(f"wrote {path}", flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
