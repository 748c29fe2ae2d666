"""The runtime: device, precision, memory format and process-wide knobs (threads, cuDNN, matmul precision).

`auto` for precision and the memory format: the fastest correct setting of the hardware at hand.

brats-train's `trainer.precision: auto`, brats-predict's `precision=auto` and `runtime.channels_last: auto` (both
commands) are resolved here, once, before anything is built; an explicit value always wins.

- Precision follows a rule, because the kernels follow the same CPUID bits: oneDNN runs bf16 natively only on CPUs
  with AVX512-BF16 or AMX (elsewhere it emulates bf16 and is slower than fp32: 1.2-1.4x on this project's 2-core
  Xeon, whose hypervisor hides those flags); CUDA GPUs with native bf16 (Ampere+) get bf16, older ones fp16.
- channels_last_3d has no reliable rule (it halves the CPU step here, on GPUs it depends on cuDNN and the norm
  layers), so a short probe measures it once per machine, precision and use (train / infer) and caches the result.

The decision itself (`decide`) is a pure function of the capabilities and the probe's timings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from brats_unet.utils import BratsError, atomic_write_json

PRECISIONS = ("fp32", "fp16", "bf16")
LIGHTNING_PRECISION = {"fp32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}
# Lightning's spellings -> ours, to probe the memory format at an explicit trainer.precision.
FROM_LIGHTNING = {"32-true": "fp32", "32": "fp32", "bf16-mixed": "bf16", "bf16": "bf16", "bf16-true": "bf16",
                  "16-mixed": "fp16", "16": "fp16", "16-true": "fp16"}
BF16_CPU_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}
# channels_last must win by this much: a probe on a shared machine is noisy, and a tie is not worth a change.
CHANNELS_LAST_MARGIN = 0.9
USES = ("train", "infer")


@dataclasses.dataclass(frozen=True)
class Hardware:
    device: str  # cpu | cuda | another torch device type (no auto speed-ups there)
    name: str  # CPU model or GPU name: with the torch version, the key of the probe cache
    cpu_flags: frozenset[str] = frozenset()  # /proc/cpuinfo flags (those torch's cpuinfo reports, elsewhere)
    cuda_bf16: bool = False  # native bf16 (compute capability 8.0+), not the emulation torch also accepts


@dataclasses.dataclass(frozen=True)
class Choice:
    precision: str  # fp32 | fp16 | bf16
    channels_last: bool
    why: dict[str, str]  # per setting: "explicit", or what decided it (for the run log)

    @property
    def lightning_precision(self) -> str:
        return LIGHTNING_PRECISION[self.precision]


# ---- the decision (pure) -------------------------------------------------------------------------------------------
def auto_precision(hw: Hardware) -> tuple[str, str]:
    """(precision, reason) by rule: bf16 where the hardware runs it natively, fp16 on older CUDA GPUs, else fp32."""
    if hw.device == "cuda":
        return ("bf16", f"{hw.name} has native bf16") if hw.cuda_bf16 else ("fp16", f"{hw.name} lacks native bf16")
    if hw.device == "cpu":
        found = [label for flag, label in BF16_CPU_FLAGS.items() if flag in hw.cpu_flags]
        if found:
            return "bf16", "+".join(found)
        return "fp32", "no AVX512-BF16 or AMX: bf16 would be emulated, slower than fp32"
    return "fp32", f"no auto speed-ups on {hw.device}"


def channels_last_wins(contiguous_s: float, channels_last_s: float, margin: float = CHANNELS_LAST_MARGIN) -> bool:
    """channels_last_3d only when the probe measured it clearly faster (median step times)."""
    return channels_last_s < margin * contiguous_s


def decide(hw: Hardware, precision: str = "auto", channels_last: bool | str = "auto",
           timings: Mapping[str, float] | None = None, source: str = "not measured") -> Choice:
    """The settings to run with. `precision`: auto or one of PRECISIONS; `channels_last`: auto or a bool; `timings`:
    the probe's median seconds {"contiguous": s, "channels_last": s} at the chosen precision (None: not measured);
    `source`: where the timings came from, or why there are none (for the log)."""
    why: dict[str, str] = {}
    if precision == "auto":
        precision, why["precision"] = auto_precision(hw)
    else:
        why["precision"] = "explicit"
    if isinstance(channels_last, bool):
        why["channels_last"] = "explicit"
    elif hw.device not in ("cpu", "cuda"):
        channels_last, why["channels_last"] = False, f"not probed on {hw.device}"
    elif not timings:
        channels_last, why["channels_last"] = False, source
    else:
        channels_last = channels_last_wins(timings["contiguous"], timings["channels_last"])
        why["channels_last"] = (f"probe: {timings['channels_last']:.3g} s per step vs {timings['contiguous']:.3g} s "
                                f"contiguous, {source}")
    return Choice(precision, bool(channels_last), why)


def check_channels_last(value: Any) -> None:
    if not isinstance(value, bool) and value != "auto":
        raise BratsError(f"runtime.channels_last must be auto, true or false, got {value!r}")


def training_device(accelerator: str) -> str:
    """The device type a Lightning `trainer.accelerator` trains on (auto: CUDA when present)."""
    accelerator = str(accelerator)
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu" if accelerator in ("auto", "cpu") else accelerator


# ---- what the machine has ------------------------------------------------------------------------------------------
def cpu_info(path: Path = Path("/proc/cpuinfo")) -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first CPU; torch's own CPUID checks where /proc/cpuinfo is absent (macOS...)."""
    name, flags = "cpu", frozenset()
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "cpu":
                name = value.strip()
            elif key.strip() == "flags":
                flags = frozenset(value.split())
                break
    if not flags:
        checks = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
        flags = frozenset(f for f, fn in checks.items() if getattr(torch.cpu, fn, lambda: False)())
    return name, flags


def detect(device: torch.device | str) -> Hardware:
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return Hardware("cuda", torch.cuda.get_device_name(index),
                        cuda_bf16=torch.cuda.get_device_capability(index) >= (8, 0))
    if device.type == "cpu":
        name, flags = cpu_info()
        return Hardware("cpu", name, cpu_flags=flags)
    return Hardware(device.type, device.type)


# ---- the probe (cached) --------------------------------------------------------------------------------------------
def cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "brats-unet" / "hardware-probe.json"


def _probe_step(device: torch.device, precision: str, channels_last: bool, use: str) -> Callable[[], None]:
    """One step of a quickstart-width U-Net, batch 2 of 32^3: forward+backward (train) or forward (infer)."""
    from brats_unet.models.unet3d import UNet3D  # here: hardware.py stays importable without building models

    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    net = UNet3D(4, 3, [8, 16, 32, 64, 128], norm="instance", channels_last=channels_last).to(device)
    x = torch.randn(2, 4, 32, 32, 32, generator=gen).to(device).contiguous(memory_format=fmt)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext

    def step() -> None:
        if use == "train":
            net.zero_grad(set_to_none=True)
            with autocast():
                loss = net(x).float().square().mean()
            loss.backward()
        else:
            with torch.inference_mode(), autocast():
                net(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def probe_channels_last(device: torch.device, precision: str, use: str, reps: int = 5) -> dict[str, float]:
    """Median step seconds, contiguous vs channels_last_3d, interleaved so a neighbour's load hits both alike.

    On CPU the probe runs one thread and counts that thread's CPU time, not wall time: on a shared machine the wall
    clock mostly measures the neighbours (under a load of 10 on 2 cores it varied 3x between identical steps)."""
    cpu = device.type == "cpu"
    saved = torch.get_num_threads()
    if cpu:
        torch.set_num_threads(1)
    # fork_rng: building the probe's nets draws weights; the run's seeded RNG must not notice whether it probed
    # (a run that probes and one that reads the cache initialise the same model).
    with torch.random.fork_rng(devices=[] if cpu else [device]):
        try:
            return _time_formats(device, precision, use, reps)
        finally:
            torch.set_num_threads(saved)


def _time_formats(device: torch.device, precision: str, use: str, reps: int) -> dict[str, float]:
    clock = time.thread_time if device.type == "cpu" else time.perf_counter
    formats = ("contiguous", "channels_last")
    steps = {fmt: _probe_step(device, precision, fmt == "channels_last", use) for fmt in formats}
    times: dict[str, list[float]] = {fmt: [] for fmt in steps}
    for step in steps.values():  # warm-up: allocator, oneDNN primitive cache, cuDNN autotuner
        step(), step()
    for _ in range(reps):
        for fmt, step in steps.items():
            start = clock()
            step()
            times[fmt].append(clock() - start)
    return {fmt: statistics.median(t) for fmt, t in times.items()}


def probe_key(hw: Hardware, precision: str, use: str) -> str:
    return f"{use}|{hw.device}|{hw.name}|{precision}|torch {torch.__version__}"


def cached_probe(hw: Hardware, device: torch.device, precision: str, use: str, path: Path | None = None
                 ) -> tuple[dict[str, float] | None, str]:
    """(timings, where they came from): the cached measurement for this machine, or a new one (then cached)."""
    path = path or cache_file()
    key = probe_key(hw, precision, use)
    try:
        cache = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    if isinstance(cache.get(key), dict):
        return cache[key], f"cached in {path}"
    try:
        timings = probe_channels_last(device, precision, use)
    except Exception as e:  # a missing kernel or out of memory: fall back to the standard format, say why
        return None, f"probe failed ({type(e).__name__}: {e})"
    with contextlib.suppress(OSError):  # a read-only home still runs, it only probes again next time
        atomic_write_json(path, {**cache, key: timings})
    return timings, f"measured now, cached in {path}"


def resolve(device: torch.device | str, precision: str = "auto", channels_last: bool | str = "auto",
            use: str = "train", cache: Path | None = None) -> tuple[Choice, Hardware]:
    """The settings for this device (precision auto or one of PRECISIONS); probes only when channels_last is auto."""
    check_channels_last(channels_last)
    device = torch.device(device)
    hw = detect(device)
    timings, source = None, "not measured"
    if channels_last == "auto" and hw.device in ("cpu", "cuda"):
        chosen = precision if precision != "auto" else auto_precision(hw)[0]
        timings, source = cached_probe(hw, device, chosen, use, cache)
    return decide(hw, precision, channels_last, timings, source), hw


def resolve_training(accelerator: str, precision: str, channels_last: bool | str, cache: Path | None = None
                     ) -> tuple[str, bool, str]:
    """brats-train's `trainer.precision` (auto or a Lightning value) and `runtime.channels_last` (auto or a bool) ->
    (Lightning precision, channels_last, a line for the run log)."""
    ours = "auto" if precision == "auto" else FROM_LIGHTNING.get(str(precision), "fp32")
    choice, hw = resolve(training_device(accelerator), ours, channels_last, "train", cache)
    lightning = choice.lightning_precision if precision == "auto" else str(precision)
    return lightning, choice.channels_last, describe(choice, hw, lightning)


def describe(choice: Choice, hw: Hardware, precision_label: str | None = None) -> str:
    """'precision auto -> bf16-mixed (AVX512-BF16), channels_last auto -> True (probe: ...) on <name>'."""
    def part(key: str, value: Any) -> str:
        why = choice.why[key]
        return f"{key} {value} (explicit)" if why == "explicit" else f"{key} auto -> {value} ({why})"

    return (f"{part('precision', precision_label or choice.precision)}, "
            f"{part('channels_last', choice.channels_last)} on {hw.device} ({hw.name})")


# The `runtime` config group, applied once at the start of brats-train / brats-predict.
# The `runtime` config group, applied once at the start of brats-train / brats-predict: CPU threads, the cuDNN
# autotuner, float32 matmul precision (process-wide), and the network's memory format and compilation (per model).
#
# No knob changes a result beyond floating-point rounding; a None keeps torch's current setting (cudnn_benchmark None:
# on with CUDA, where the fixed patch and window sizes repay the autotuner's search once).
MATMUL_PRECISIONS = ("highest", "high", "medium")


def configure_runtime(
    threads: int | None = None, cudnn_benchmark: bool | None = None, matmul_precision: str | None = None,
    channels_last: bool | str = False, compile: bool = False,
) -> dict[str, Any]:
    """Apply the process-wide settings; return every setting now in effect (for the run log).

    threads: torch.set_num_threads (intra-op threads). DataLoader workers already run single-threaded, so on a small
        CPU the main process can keep every core.
    cudnn_benchmark: torch.backends.cudnn.benchmark; pays off with a fixed patch size (one autotune per shape).
    matmul_precision: torch.set_float32_matmul_precision; "high" lets Ampere+ GPUs use TF32 for float32 matmuls.
    channels_last (true | false | auto, resolved per device by brats_unet.runtime), compile: checked here, applied
        where the network is built (brats_unet.training.build).
    """
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise BratsError(f"runtime.threads must be a positive integer or null, got {threads!r}")
        torch.set_num_threads(threads)
    if cudnn_benchmark is None and torch.cuda.is_available():
        cudnn_benchmark = True
    if cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    if matmul_precision is not None:
        if matmul_precision not in MATMUL_PRECISIONS:
            raise BratsError(
                f"runtime.matmul_precision must be one of {list(MATMUL_PRECISIONS)} or null, got {matmul_precision!r}"
            )
        torch.set_float32_matmul_precision(matmul_precision)
    if not isinstance(channels_last, bool) and channels_last != "auto":
        raise BratsError(f"runtime.channels_last must be auto, true or false, got {channels_last!r}")
    if not isinstance(compile, bool):
        raise BratsError(f"runtime.compile must be true or false, got {compile!r}")
    return {
        "threads": torch.get_num_threads(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "channels_last": channels_last,
        "compile": compile,
    }
