"""The GPU check (`make gpu-check`): what no CPU test reaches, in one run of under ten minutes on one modern GPU.

    python -m benchmarks.gpu_check [--compile] [--skip-tests] [--skip-demo] [--out DIR]
    python -m benchmarks.gpu_check --dry-run [--out DIR]   # every part at toy sizes on the CPU: checks the script


1. the gpu-marked tests (pytest -m gpu);
2. `make demo` on the GPU (wall time, held-out Dice);
3. training throughput at 128^3, batch 2: the paper's U-Net and model=resenc at `auto` precision with channels_last
   (and torch.compile with --compile), beside NVIDIA's published 27.48 img/s (A100, AMP, their nnU-Net for BraTS21)
   and that number scaled by the FLOPs of their network over ours;
4. trainer.deterministic=warn (deterministic algorithms, cuDNN autotuner off) against cudnn.benchmark=True, per model;
5. full-case inference (a 4 x 240 x 240 x 155 volume, 128^3 windows, overlap 0.5) at 1 and 4 windows per pass, and
   with flip TTA;
6. the loader: seconds per 128^3 sample (cut + augment=modern) in one worker, and the workers the measured resenc
   step needs to stay fed.
Writes benchmarks/results/gpu_check-<gpu>.json and prints a markdown table. Without CUDA it says so and exits 0.
GPU time is lent rarely and briefly, so `--dry-run` runs parts 3-6 on the CPU at toy sizes (64^3 patches, a 64^3
volume, 1 step, no warm-up; no tests, no demo) and writes its JSON only where --out says: a bug in the script shows
there, not on the GPU (tests/test_benchmarks.py runs it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import parse_ints, write_result
from benchmarks.data_loading import augment_config, recipe, sample_cost
from benchmarks.inference import time_case
from benchmarks.training import NVIDIA_BRATS, Combo, build_net, combo_gflops, nvidia_gflops, run_combo
from brats_unet.data.datamodule import BratsDataModule
from brats_unet.runtime import auto_precision, detect
from brats_unet.synth.generator import write_dataset

ROOT = Path(__file__).resolve().parents[1]
NVIDIA_AMP = NVIDIA_BRATS["img_per_s"]["A100 AMP"]  # 27.48 img/s, 128^3 batch 2
MODELS = ("paper", "resenc")


@dataclass(frozen=True)
class Sizes:
    patch: int = 128
    batch: int = 2
    volume: tuple[int, int, int] = (240, 240, 155)  # a BraTS case
    loader_cases: int = 2


DRY_RUN = Sizes(patch=64, batch=1, volume=(64, 64, 64), loader_cases=1)  # resenc: a 2^3 bottleneck at 64^3


def cuda_missing() -> str | None:
    """Why this machine cannot run the check, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch (torch.cuda.is_available() is False)"
    return None


def step(name: str, results: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> None:
    """Run one part; a failure is recorded with its message and the check goes on."""
    print(f"[gpu_check] {name}", flush=True)
    start = time.perf_counter()
    try:
        results[name] = {"status": "ok", **fn()}
    except Exception as e:  # noqa: BLE001  (every part reports; none stops the others)
        results[name] = {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    results[name]["seconds"] = round(time.perf_counter() - start, 1)


def run_command(cmd: Sequence[str], timeout: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run(list(cmd), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {' | '.join(tail[-3:])}")
    return {"returncode": proc.returncode, "tail": tail}


def gpu_tests(timeout: int) -> dict[str, Any]:
    out = run_command([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"], timeout)
    return {"summary": out["tail"][-1] if out["tail"] else ""}


def demo(run_dir: Path, timeout: int) -> dict[str, Any]:
    start = time.perf_counter()
    # -o install: use this environment as it is (a GPU node may have no package index to install from).
    run_command(["make", "-o", "install", "demo", f"RUN={run_dir}", f"VENV={sys.prefix}"], timeout)
    summary = json.loads((run_dir / "evaluation" / "summary.json").read_text())
    dice = {k: v.get("mean") for k, v in summary.get("metrics", {}).items() if k.startswith("dice_")}
    return {"wall_s": round(time.perf_counter() - start, 1), "test_dice": dice,
            "checkpoint": str(run_dir / "train" / "checkpoints" / "best.ckpt")}


@contextlib.contextmanager
def cudnn_mode(mode: str) -> Iterator[None]:
    """"deterministic": what trainer.deterministic=warn sets (deterministic algorithms with warnings, no autotuner);
    "benchmark": the cuDNN autotuner, nondeterministic algorithms allowed."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    deterministic = mode == "deterministic"
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # as Lightning sets it for deterministic runs
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2], before[3]


def throughput(device: torch.device, precision: str, compile: bool, steps: int, warmup: int, sizes: Sizes = Sizes()
               ) -> dict[str, Any]:
    theirs = nvidia_gflops()  # forward GFLOP per sample of NVIDIA's DynUNet (needs monai)
    rows = []
    for model in MODELS:
        for mode in ("benchmark", "deterministic"):
            for compiled in (False, True) if compile else (False,):
                combo = Combo("ours", model, sizes.patch, sizes.batch, precision=precision, channels_last=True,
                              compile=compiled, norm="instance" if model == "resenc" else "none")
                row: dict[str, Any] = {"model": model, "patch": sizes.patch, "batch": sizes.batch, "cudnn": mode,
                                       "compile": compiled, "precision": precision}
                try:
                    with cudnn_mode(mode):
                        row.update(run_combo(combo, device, steps, warmup))
                except Exception as e:  # noqa: BLE001  (OOM, compile failure: record and go on)
                    row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    torch.cuda.empty_cache()  # a no-op while CUDA is uninitialised (--dry-run)
                    rows.append(row)
                    continue
                per_sample = combo_gflops(combo) / combo.batch
                row["gflop_fwd_per_sample"] = round(per_sample, 1)
                row["vs_nvidia_published"] = row["samples_per_s"] / NVIDIA_AMP
                if theirs:  # their img/s converted to our network's cost per image
                    row["nvidia_flops_scaled_img_s"] = NVIDIA_AMP * theirs / per_sample
                rows.append({k: v for k, v in row.items() if k not in ("warmup_s", "steps_s")})
                torch.cuda.empty_cache()
    return {"rows": rows, "nvidia_published_img_s": NVIDIA_AMP, "nvidia_gflop_fwd_per_sample": theirs}


def inference(device: torch.device, precision: str, window_batches: Sequence[int], sizes: Sizes = Sizes()
              ) -> dict[str, Any]:
    """Seconds per case without TTA at each window batch (module.val_window_batch is 1, nnU-Net's predictor's too),
    and with flip TTA at the largest."""
    torch.manual_seed(0)
    image = torch.randn(1, 4, *sizes.volume, device=device)
    patch = sizes.patch
    rows = []
    for model in MODELS:
        net, _, in_ch = build_net(Combo("ours", model, patch, 1, norm="instance" if model == "resenc" else "none"))
        net = net.to(device).eval().to(memory_format=torch.channels_last_3d)
        x = image[:, :in_ch]
        time_case(net, x, patch, 0.5, False, precision, max(window_batches))  # warm-up: kernels, allocator
        runs = [(False, b) for b in window_batches] + [(True, max(window_batches))]
        for tta, window_batch in runs:
            rows.append({"model": model, "tta": tta, "precision": precision, "window_batch": window_batch,
                         "case_s": time_case(net, x, patch, 0.5, tta, precision, window_batch)})
        del net
        torch.cuda.empty_cache()
    return {"rows": rows, "volume": [4, *sizes.volume], "patch": patch, "overlap": 0.5}


def loader(work: Path, step_s: float | None, samples: int = 10, sizes: Sizes = Sizes()) -> dict[str, Any]:
    """One worker's seconds per training sample (128^3) with nnU-Net's augmentation on synthetic full-size cases."""
    write_dataset(work / "raw", cases=sizes.loader_cases, seed=0, shape=list(sizes.volume))
    dm = BratsDataModule(root=work / "raw", layout="brats2021", cache_dir=work / "cache", preprocess=recipe("modern"),
                         augment=augment_config("modern"), patch_size=[sizes.patch] * 3, batch_size=sizes.batch,
                         num_workers=0,
                         val_fraction=0.0, steps_per_epoch=samples, output_dir=work / "run", seed=0)
    dm.prepare_data()
    dm.setup("fit")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        per_sample = sample_cost(dm, samples)
    finally:
        torch.set_num_threads(before)
    out: dict[str, Any] = {"sample_s": per_sample, "patch": sizes.patch, "resenc_step_s": step_s}
    if step_s:
        out["workers_needed"] = int(-(-sizes.batch * per_sample // step_s))
    return out


def resenc_step_s(results: dict[str, Any]) -> float | None:
    rows = [r for r in results.get("throughput", {}).get("rows", [])
            if r.get("model") == "resenc" and r.get("cudnn") == "benchmark" and not r.get("compile") and "step_s" in r]
    return rows[0]["step_s"] if rows else None


def markdown(results: dict[str, Any]) -> str:
    """The README table: one line per measured setting."""
    lines = [f"GPU check on {results.get('gpu', '?')} (torch {torch.__version__})", "",
             "| part | setting | result |", "|---|---|---|"]
    for name in ("gpu_tests", "demo"):
        part = results.get(name)
        if part:
            detail = part.get("summary") or part.get("test_dice") or ""
            lines.append(f"| {name} | | {part['status']} {detail} ({part['seconds']} s) |")
    for row in results.get("throughput", {}).get("rows", []):
        setting = (f"{row['model']} {row.get('patch', 128)}^3 b{row.get('batch', 2)} {row['precision']} channels_last, "
                   f"cudnn {row['cudnn']}") + (
            ", compiled" if row["compile"] else "")
        value = (f"{row['samples_per_s']:.2f} img/s ({row['vs_nvidia_published']:.2f} x NVIDIA's 27.48; FLOP-scaled "
                 f"target {row.get('nvidia_flops_scaled_img_s', float('nan')):.1f})" if "samples_per_s" in row
                 else row.get("status", ""))
        lines.append(f"| training | {setting} | {value} |")
    volume = "x".join(map(str, results.get("inference", {}).get("volume", [4, 240, 240, 155])[1:]))
    for row in results.get("inference", {}).get("rows", []):
        lines.append(f"| inference | {row['model']} {volume}, {'TTA x8' if row['tta'] else 'no TTA'}, "
                     f"{row.get('window_batch', 4)} windows per pass | "
                     f"{row['case_s']:.2f} s/case |")
    load = results.get("loader", {})
    if "sample_s" in load:
        lines.append(f"| loader | {load.get('patch', 128)}^3 sample, augment=modern, 1 worker | "
                     f"{load['sample_s']:.2f} s; {load.get('workers_needed', '?')} workers keep a resenc step fed |")
    for name in ("throughput", "inference", "loader"):
        if results.get(name, {}).get("status", "ok") != "ok":
            lines.append(f"| {name} | | {results[name]['status']} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd training steps")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-demo", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--window-batch", default="1,4", help="windows per forward pass at inference, comma-separated")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results; --dry-run: none)")
    p.add_argument("--dry-run", action="store_true",
                   help="parts 3-6 on the CPU at toy sizes, to check the script before GPU time is spent on it")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    missing = cuda_missing()
    if missing:
        print(f"gpu-check: {missing}; nothing to check on this machine (run it where a CUDA GPU is visible)",
              flush=True)
        return None
    device = torch.device("cuda")
    precision = auto_precision(detect(device))[0]
    results: dict[str, Any] = {"gpu": torch.cuda.get_device_name(device), "precision_auto": precision}
    with tempfile.TemporaryDirectory(prefix="brats-gpu-check-") as work:
        if not args.skip_tests:
            step("gpu_tests", results, lambda: gpu_tests(timeout=150))
        if not args.skip_demo:
            step("demo", results, lambda: demo(Path(work) / "demo", timeout=300))
        measure(results, device, precision, args, Path(work), Sizes())
    path = write_result("gpu_check", {"settings": vars(args), **results}, device, args.out)
    print(markdown(results), flush=True)
    print(f"wrote {path}", flush=True)
    return results


def measure(results: dict[str, Any], device: torch.device, precision: str, args: argparse.Namespace, work: Path,
            sizes: Sizes) -> None:
    """Parts 3-6: training throughput, full-case inference, the loader."""
    step("throughput", results, lambda: throughput(device, precision, args.compile, args.steps, args.warmup, sizes))
    step("inference", results, lambda: inference(device, precision, parse_ints(args.window_batch), sizes))
    step("loader", results, lambda: loader(work / "loader", resenc_step_s(results), sizes=sizes))


def dry_run(args: argparse.Namespace) -> dict[str, Any]:
    """Parts 3-6 on the CPU at toy sizes: every code path of the check but the tests and the demo, in seconds."""
    device = torch.device("cpu")
    results: dict[str, Any] = {"gpu": "none (--dry-run on the CPU, toy sizes)", "precision_auto": "fp32",
                               "dry_run": True}
    toy = argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 0})
    with tempfile.TemporaryDirectory(prefix="brats-gpu-check-dry-") as work:
        measure(results, device, "fp32", toy, Path(work), DRY_RUN)
    print(markdown(results), flush=True)
    if args.out:
        # The settings it ran with (1 step, no warm-up), not the ones it was given.
        print(f"wrote {write_result('gpu_check', {'settings': vars(toy), **results}, device, args.out)}", flush=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)

