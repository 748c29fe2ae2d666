"""Shared benchmark plumbing: machine description, timing, peak memory, JSON results and a plain-text table."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import resource
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from brats_unet import runtime
from brats_unet.runtime import configure_runtime
from brats_unet.utils import BratsError, atomic_write_json

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu (brats_unet.runtime's rule); a device not here ends the benchmark."""
    try:
        return runtime.resolve_device(name)
    except BratsError as e:
        raise SystemExit(f"--device {name}: {e}") from None


def _cpu_model() -> tuple[str, list[str]]:
    """(model name, the CPU_FLAGS present), from brats_unet.runtime's /proc/cpuinfo reader."""
    name, flags = runtime.cpu_info()
    if name == "cpu":
        name = platform.processor() or platform.machine()
    return name, [f for f in CPU_FLAGS if f in flags]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model()[0]


def device_slug(device: torch.device) -> str:
    """File-name tag: "cpu", or the GPU's name ("nvidia-h100-80gb-hbm3")."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def machine_info(device: torch.device) -> dict[str, Any]:
    """What a number depends on: CPU, cores, torch build, threads, device, and how busy the machine was."""
    model, flags = _cpu_model()
    info: dict[str, Any] = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": model,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "device_name": device_name(device),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        info["monai"] = None
    return info


def write_result(name: str, payload: dict[str, Any], device: torch.device, out_dir: str | Path | None = None) -> Path:
    """Write {"benchmark", "machine", **payload} atomically to <out_dir>/<name>-<device>.json; return the path."""
    path = Path(out_dir or RESULTS_DIR) / f"{name}-{device_slug(device)}.json"
    atomic_write_json(path, {"benchmark": name, "machine": machine_info(device), **payload})
    return path


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[int]:
    """Run with `n` intra-op threads (None: unchanged), restoring the previous count afterwards."""
    before = torch.get_num_threads()
    try:
        yield configure_runtime(threads=n)["threads"]
    finally:
        torch.set_num_threads(before)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 0
) -> tuple[list[float], list[float]]:
    """(warm-up times, measured times) in seconds for `fn`, synchronising CUDA around each call."""
    warm, measured = [], []
    for i in range(warmup + repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        (warm if i < warmup else measured).append(time.perf_counter() - start)
    return warm, measured


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# ---- peak memory ----------------------------------------------------------------------------------------------------
def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator stats, or Linux's VmHWM (writing 5 to clear_refs resets it)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Not Linux (or not allowed): peak_memory_mb then reports the whole-process peak instead.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(MiB, what was measured) since the last reset_peak_memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    try:
        status = Path("/proc/self/status").read_text()
        hwm = re.search(r"^VmHWM:\s*(\d+)\s*kB", status, re.M)
        if hwm:
            return int(hwm.group(1)) / 1024, "cpu_rss_peak"
    except OSError:
        pass
    # ru_maxrss is KiB on Linux, bytes on macOS; it never resets, so it is the process-lifetime peak.
    scale = 1 if platform.system() == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, "cpu_rss_process_peak"


# ---- table --------------------------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str = "") -> str:
    """Fixed-width text table of `columns` (missing values print as "-")."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str = "") -> None:
    print(format_table(rows, columns, title), flush=True)


def parse_ints(text: str) -> list[int]:
    """"64,128" -> [64, 128] (argparse type for lists)."""
    return [int(v) for v in str(text).split(",") if v.strip()]


def parse_words(text: str) -> list[str]:
    return [v.strip() for v in str(text).split(",") if v.strip()]
