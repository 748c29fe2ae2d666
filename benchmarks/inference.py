"""Whole-case inference: seconds per 240x240x155 volume for Gaussian sliding-window prediction, with and without flip
TTA (8 flips), for the quickstart model at patch 64^3 and 128^3.

    python -m benchmarks.inference [--quick] [--device auto|cpu|cuda] [--out DIR]

Precision `auto` is what brats-predict runs by default (brats_unet.runtime: bf16 on AVX512-BF16/AMX CPUs and
native-bf16 GPUs, fp16 on older GPUs, else fp32; channels_last_3d where the cached probe measured it faster); fp32
contiguous for comparison. A setting whose estimated time (TTA = 8 x the plain pass) exceeds --max-case-seconds is
skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.common import (
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
from benchmarks.training import MODELS, build_net, preset
from brats_unet.models.sliding_window import _window_starts, flip_tta, sliding_window  # the same window grid as predict
from brats_unet.runtime import ProbeModel, autocast, probe_input_shape
from brats_unet.runtime import resolve as resolve_auto


def window_count(shape: Sequence[int], patch: int, overlap: float) -> int:
    n = 1
    for s in shape:
        n *= len(_window_starts(max(s, patch), patch, overlap))
    return n


def time_case(net: torch.nn.Module, image: torch.Tensor, patch: int, overlap: float, tta: bool, precision: str,
              window_batch: int) -> float:
    device = image.device
    cast = autocast(device, precision)

    def predictor(x: torch.Tensor) -> torch.Tensor:
        with cast():
            return torch.sigmoid(net(x).float())

    run = flip_tta if tta else sliding_window
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        run(image, predictor, (patch,) * 3, overlap=overlap, window_batch=window_batch)
    synchronize(device)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    spec = MODELS[args.model]
    precisions = args.precisions or (["auto", "fp16", "fp32"] if device.type == "cuda" else ["auto", "fp32"])
    if "auto" in precisions:  # what brats-predict picks here by default, the probe timing this benchmark's network
        largest = max(args.patches)
        base = preset("ours", args.model, largest, 1)
        probe = ProbeModel(lambda cl: build_net(dataclasses.replace(base, channels_last=cl))[0],
                           probe_input_shape(device, args.window_batch, spec["in"], (largest,) * 3),
                           f"benchmark {args.model} patch {largest}")
        auto, _ = resolve_auto(device, "auto", "auto", use="infer", model=probe)
    torch.manual_seed(0)
    image = torch.randn(1, spec["in"], *args.shape, device=device)
    rows = []
    for patch in args.patches:
        for name in precisions:
            precision, channels_last = (auto.precision, auto.channels_last) if name == "auto" else (name, False)
            if precision == "fp16" and device.type != "cuda":
                continue
            combo = dataclasses.replace(preset("ours", args.model, patch, 1), channels_last=channels_last)
            net = build_net(combo)[0].to(device).eval()
            with torch.inference_mode():  # warm-up: allocator, oneDNN/cuDNN kernel choice for this patch size
                for _ in range(2):
                    net(torch.zeros(1, spec["in"], patch, patch, patch, device=device))
            plain_s = None
            for tta in args.tta:
                row: dict[str, Any] = {"model": args.model, "patch": patch, "overlap": args.overlap, "tta": tta,
                                       "setting": name, "precision": precision, "channels_last": channels_last,
                                       "window_batch": args.window_batch,
                                       "windows": window_count(args.shape, patch, args.overlap) * (8 if tta else 1)}
                if tta and plain_s is not None and 8 * plain_s > args.max_case_seconds:
                    row["status"] = f"skipped: ~{8 * plain_s:.0f} s (8 x plain) > --max-case-seconds " \
                                    f"{args.max_case_seconds:g}"
                    rows.append(row)
                    continue
                print(f"[inference] patch {patch} tta {tta} {precision}", flush=True)
                reset_peak_memory(device)
                try:
                    seconds = time_case(net, image, patch, args.overlap, tta, precision, args.window_batch)
                except Exception as e:  # e.g. no fp16/bf16 kernels: record and go on
                    rows.append({**row, "status": f"error: {type(e).__name__}: {str(e)[:200]}"})
                    continue
                mem, kind = peak_memory_mb(device)
                if not tta:
                    plain_s = seconds
                rows.append({**row, "status": "ok", "s_per_case": seconds, "peak_mem_mb": round(mem, 1),
                             "mem_kind": kind})
    return {"device": str(device), "case_shape": list(args.shape),
            "settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.inference", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="patch 128^3 only, TTA skipped on CPU")
    p.add_argument("--model", default="quickstart", choices=sorted(MODELS))
    p.add_argument("--shape", type=parse_ints, default=[240, 240, 155])
    p.add_argument("--patches", type=parse_ints)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--tta", type=lambda s: [w.lower() in ("1", "on", "true", "yes") for w in parse_words(s)],
                   default=[False, True], help="off,on")
    p.add_argument("--precisions", type=parse_words,
                   help="auto,fp32,bf16,fp16 (default auto,fp32 on CPU, auto,fp16,fp32 on CUDA)")
    p.add_argument("--window-batch", type=int, help="sliding windows per forward pass (default 1 CPU, 4 CUDA)")
    p.add_argument("--threads", type=int, help="intra-op CPU threads (default: torch's, one per core)")
    p.add_argument("--max-case-seconds", type=float, help="skip TTA when 8 x the plain pass exceeds this")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    cuda = resolve_device(args.device).type == "cuda"
    if args.patches is None:
        args.patches = [128] if args.quick else [64, 128]
    if args.window_batch is None:
        args.window_batch = 4 if cuda else 1
    if args.max_case_seconds is None:
        args.max_case_seconds = 600.0 if cuda else 0.0 if args.quick else 300.0
    return args


COLUMNS = ["model", "patch", "overlap", "tta", "setting", "precision", "channels_last", "window_batch", "windows",
           "s_per_case", "peak_mem_mb", "status"]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with threads(args.threads):
        result = run(args)
        device = torch.device(result["device"])
        path = write_result("inference", result, device, args.out)
    print_table(result["rows"], COLUMNS, title=f"sliding-window inference per {result['case_shape']} case on {device}")
    print(f"wrote {path}", flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
