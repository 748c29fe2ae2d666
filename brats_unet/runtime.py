"""The runtime: device, precision, memory format and process-wide knobs (threads, cuDNN, matmul precision).

`auto` for precision and the memory format: the fastest correct setting of the hardware at hand.

brats-train's `trainer.precision: auto`, brats-predict's `precision=auto` and `runtime.channels_last: auto` (both
commands) are resolved here, once per run (brats-train) or Segmenter (brats-predict and the Python API), before the
network that runs is built; an explicit value always wins. Device and precision -> autocast are this module's too
(`resolve_device`, `autocast`: the one rule training, prediction and the benchmarks use).

- Precision follows a rule, because the kernels follow the same CPUID bits: oneDNN runs bf16 natively only on CPUs
  with AVX512-BF16 or AMX (elsewhere it emulates bf16 and is slower than fp32: 1.2-1.4x on this project's 2-core
  Xeon, whose hypervisor hides those flags); CUDA GPUs with native bf16 (Ampere+) get bf16, older ones fp16.
- channels_last_3d has no reliable rule (it halves the CPU step here, on GPUs it depends on cuDNN and the norm
  layers), so a short probe times the run's own network (the caller hands it in as a `ProbeModel`: this layer
  imports no models) on the device the run uses, once per machine, precision, use (train / infer) and network, and
  caches the result. A rank of a multi-process run never times it (ranks could disagree): it reads the cache.

The decision itself (`decide`) is a pure function of the capabilities and the probe's timings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from brats_unet.utils import BratsError, atomic_write_json

PRECISIONS = ("fp32", "fp16", "bf16")  # what `auto` resolves to; every command and the API also accept "auto"
LIGHTNING_PRECISION = {"fp32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}
# Lightning's spellings -> ours, to probe the memory format at an explicit trainer.precision.
FROM_LIGHTNING = {"32-true": "fp32", "32": "fp32", "bf16-mixed": "bf16", "bf16": "bf16", "bf16-true": "bf16",
                  "16-mixed": "fp16", "16": "fp16", "16-true": "fp16"}
BF16_CPU_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}
# channels_last must win by this much: a probe on a shared machine is noisy, and a tie is not worth a change.
CHANNELS_LAST_MARGIN = 0.9
USES = ("train", "infer")
log = logging.getLogger("brats_unet.runtime")


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


def check_precision(value: Any) -> None:
    if value != "auto" and value not in PRECISIONS:
        raise BratsError(f"precision must be one of {['auto', *PRECISIONS]}, got {value!r}")


def autocast(device: torch.device | str, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """THE precision -> autocast rule: a factory of context managers (nullcontext for fp32). `auto` is resolved by
    `auto_precision` here only for callers that did not resolve it already (resolve() does it once per run)."""
    check_precision(precision)
    device = torch.device(device)
    if precision == "auto":
        precision = auto_precision(detect(device))[0]
    if precision == "fp32":
        return contextlib.nullcontext
    if precision == "fp16" and device.type != "cuda":
        raise BratsError("precision=fp16 needs a CUDA device; use precision=bf16 or fp32 on CPU")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return lambda: torch.autocast(device.type, dtype=dtype)


def resolve_device(name: str | torch.device) -> torch.device:
    """auto (CUDA when present, else CPU), cpu, cuda, cuda:1 ... -> a torch device; BratsError for one not here."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise BratsError(f"device {name!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BratsError(f"device={name} but CUDA is not available here; use device=cpu")
    return device


def training_device(accelerator: str) -> str:
    """The device type a Lightning `trainer.accelerator` trains on (auto: CUDA when present)."""
    accelerator = str(accelerator)
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu" if accelerator in ("auto", "cpu") else accelerator


def run_device(accelerator: str, devices: Any = "auto") -> torch.device:
    """The device this process trains on: the accelerator's type, and on CUDA the index Lightning gives this rank
    (its LOCAL_RANK / SLURM_LOCALID-th entry of `trainer.devices`; rank 0 alone: the first)."""
    kind = training_device(accelerator)
    if kind != "cuda":
        return torch.device(kind)
    local = int(os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or 0)
    if isinstance(devices, Sequence) and not isinstance(devices, str) and len(devices) > local:
        return torch.device("cuda", int(devices[local]))
    return torch.device("cuda", local)


# ---- what the machine has ------------------------------------------------------------------------------------------
# The CPU flags `auto` reads, space-separated, instead of the machine's own: CI runs the precision-sensitive tests with
# auto = bf16 on any CPU (BRATS_UNET_CPU_FLAGS=avx512_bf16; bf16 is emulated, slower, where the CPU lacks it), or
# simulates a CPU without bf16 (BRATS_UNET_CPU_FLAGS=avx2).
CPU_FLAGS_ENV = "BRATS_UNET_CPU_FLAGS"


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
    """What `auto` decides by: the CPU's flags ($BRATS_UNET_CPU_FLAGS when set) or the GPU's bf16 support."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return Hardware("cuda", torch.cuda.get_device_name(index),
                        cuda_bf16=torch.cuda.get_device_capability(index) >= (8, 0))
    if device.type == "cpu":
        name, flags = cpu_info()
        forced = os.environ.get(CPU_FLAGS_ENV)
        if forced is not None:
            flags = frozenset(forced.split())
        return Hardware("cpu", name, cpu_flags=flags)
    return Hardware(device.type, device.type)


# ---- the probe (cached) --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ProbeModel:
    """The run's own network for the channels_last probe, handed in by the caller (this layer builds no models):
    `build(channels_last)` -> a fresh network in that memory format, `input_shape` (batch, channels, *spatial), and a
    `name` that keys the cache (the network's config and the input shape)."""

    build: Callable[[bool], torch.nn.Module]
    input_shape: tuple[int, ...]
    name: str


def probe_input_shape(device: torch.device | str, batch: int, channels: int, patch: Sequence[int]
                      ) -> tuple[int, ...]:
    """The probe's input: the run's batch and patch on a GPU; on a CPU one sample, each side halved down towards 32
    while it stays a multiple of 16 (a 128^3 forward+backward takes many seconds on a small CPU; memory-format effects
    show at 32^3 already)."""
    if torch.device(device).type == "cuda":
        return (int(batch), int(channels), *(int(p) for p in patch))
    sides = []
    for p in (int(p) for p in patch):
        while p >= 64 and (p // 2) % 16 == 0:
            p //= 2
        sides.append(p)
    return (1, int(channels), *sides)


def cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "brats-unet" / "hardware-probe.json"


def _probe_step(model: ProbeModel, device: torch.device, precision: str, channels_last: bool, use: str
                ) -> Callable[[], None]:
    """One step of the run's network on a random input: forward+backward (train) or forward (infer)."""
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last_3d if len(model.input_shape) == 5 else torch.channels_last
    fmt = fmt if channels_last else torch.contiguous_format
    net = model.build(channels_last).to(device)
    x = torch.randn(*model.input_shape, generator=gen).to(device).contiguous(memory_format=fmt)
    cast = autocast(device, precision)

    def step() -> None:
        if use == "train":
            net.zero_grad(set_to_none=True)
            with cast():
                out = net(x)
                loss = sum(o.float().square().mean() for o in out) if isinstance(out, list | tuple) else \
                    out.float().square().mean()
            loss.backward()
        else:
            with torch.inference_mode(), cast():
                net(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def probe_channels_last(model: ProbeModel, device: torch.device, precision: str, use: str, reps: int = 5
                        ) -> dict[str, float]:
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
            return _time_formats(model, device, precision, use, reps)
        finally:
            torch.set_num_threads(saved)


def _time_formats(model: ProbeModel, device: torch.device, precision: str, use: str, reps: int
                  ) -> dict[str, float]:
    clock = time.thread_time if device.type == "cpu" else time.perf_counter
    formats = ("contiguous", "channels_last")
    steps = {fmt: _probe_step(model, device, precision, fmt == "channels_last", use) for fmt in formats}
    times: dict[str, list[float]] = {fmt: [] for fmt in steps}
    for step in steps.values():  # warm-up: allocator, oneDNN primitive cache, cuDNN autotuner
        step(), step()
    for _ in range(reps):
        for fmt, step in steps.items():
            start = clock()
            step()
            times[fmt].append(clock() - start)
    return {fmt: statistics.median(t) for fmt, t in times.items()}


def probe_key(hw: Hardware, precision: str, use: str, model: str = "") -> str:
    return f"{use}|{hw.device}|{hw.name}|{precision}|{model}|torch {torch.__version__}"


def _valid_timings(entry: Any) -> bool:
    return (isinstance(entry, dict) and set(entry) == {"contiguous", "channels_last"}
            and all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in entry.values()))


def read_probe_cache(path: Path) -> tuple[dict[str, Any], bool]:
    """(the usable entries, whether the file needs rewriting). A file that is not a JSON object of timings (a list,
    an entry missing a key, bad JSON) is not an error: it is ignored with a warning, so the caller measures again and
    rewrites it, keeping the entries that are still good."""
    try:
        raw = path.read_bytes()
    except OSError:
        return {}, False
    try:
        cache = json.loads(raw.decode())
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        log.warning("ignoring the probe cache %s: not valid JSON (%s); it will be rewritten", path, e)
        return {}, True
    if not isinstance(cache, dict):
        log.warning("ignoring the probe cache %s: it holds a %s, not an object of timings; it will be rewritten",
                    path, type(cache).__name__)
        return {}, True
    good = {k: v for k, v in cache.items() if _valid_timings(v)}
    if len(good) < len(cache):
        bad = sorted(set(cache) - set(good))
        log.warning("ignoring %d malformed entries of the probe cache %s (each needs positive 'contiguous' and "
                    "'channels_last' seconds), e.g. %r; they will be rewritten", len(bad), path, bad[0])
    return good, len(good) < len(cache)


def cached_probe(hw: Hardware, device: torch.device, precision: str, use: str, path: Path | None = None,
                 model: ProbeModel | None = None, measure: bool = True) -> tuple[dict[str, float] | None, str]:
    """(timings, where they came from): the cached measurement for this machine and network, or a new one (then
    cached). Without a network to probe, only the cache answers.

    The cache maps `probe_key`s ("use|device|name|precision|network|torch version") to {"contiguous": s,
    "channels_last": s}."""
    path = path or cache_file()
    key = probe_key(hw, precision, use, model.name if model else "")
    cache, damaged = read_probe_cache(path)
    # An entry with an empty network field answers for every network (a machine-wide setting, e.g. the tests').
    found = next((k for k in (key, probe_key(hw, precision, use)) if k in cache), None)
    if found is not None:
        if damaged:
            _write_cache(path, cache)
        return cache[found], f"cached in {path}"
    if model is None or not measure:
        if damaged:
            _write_cache(path, cache)
        return None, "no network to probe" if model is None else "not measured"
    try:
        timings = probe_channels_last(model, device, precision, use)
    except Exception as e:  # a missing kernel or out of memory: fall back to the standard format, say why
        return None, f"probe failed ({type(e).__name__}: {e})"
    _write_cache(path, {**cache, key: timings})
    return timings, f"measured now, cached in {path}"


def _write_cache(path: Path, cache: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):  # a read-only home still runs, it only probes again next time
        atomic_write_json(path, cache)


def multi_process() -> bool:
    """True in one rank of a multi-process run (SLURM tasks, torchrun, Lightning's DDP children): ranks must not
    each time the formats (they could decide differently, and DDP then fails on parameter strides)."""
    env = os.environ
    return int(env.get("WORLD_SIZE", "1")) > 1 or int(env.get("SLURM_NTASKS", "1")) > 1 or "LOCAL_RANK" in env


def resolve(device: torch.device | str, precision: str = "auto", channels_last: bool | str = "auto",
            use: str = "train", cache: Path | None = None, model: ProbeModel | None = None
            ) -> tuple[Choice, Hardware]:
    """The settings for this device (precision auto or one of PRECISIONS). Only channels_last=auto consults the
    probe: the cache, else a measurement with `model` (the run's own network) on `device` (the one the run uses). In
    one rank of a multi-process run nothing is measured: every rank reads the same cache (or keeps the standard
    format), so all ranks decide alike; a single-process run on the machine fills the cache."""
    check_channels_last(channels_last)
    check_precision(precision)
    device = torch.device(device)
    hw = detect(device)
    timings, source = None, "not measured"
    if channels_last == "auto" and hw.device in ("cpu", "cuda"):
        chosen = precision if precision != "auto" else auto_precision(hw)[0]
        ranks = multi_process()
        timings, source = cached_probe(hw, device, chosen, use, cache, model, measure=not ranks)
        if timings is None and model is not None and ranks:
            source = "not measured in a multi-process run (rank-consistent); a single-process run caches it"
    return decide(hw, precision, channels_last, timings, source), hw


def resolve_training(accelerator: str, precision: str, channels_last: bool | str, cache: Path | None = None,
                     model: ProbeModel | None = None, device: torch.device | str | None = None
                     ) -> tuple[str, bool, str]:
    """brats-train's `trainer.precision` (auto or a Lightning value) and `runtime.channels_last` (auto or a bool) ->
    (Lightning precision, channels_last, a line for the run log). `device`: the one this process trains on (default:
    the accelerator's type)."""
    ours = "auto" if precision == "auto" else FROM_LIGHTNING.get(str(precision), "fp32")
    choice, hw = resolve(device or training_device(accelerator), ours, channels_last, "train", cache, model)
    lightning = choice.lightning_precision if precision == "auto" else str(precision)
    return lightning, choice.channels_last, describe(choice, hw, lightning)


def describe(choice: Choice, hw: Hardware, precision_label: str | None = None) -> str:
    """'precision auto -> bf16-mixed (AVX512-BF16), channels_last auto -> True (probe: ...) on <name>'."""
    def part(key: str, value: Any) -> str:
        why = choice.why[key]
        return f"{key} {value} (explicit)" if why == "explicit" else f"{key} auto -> {value} ({why})"

    return (f"{part('precision', precision_label or choice.precision)}, "
            f"{part('channels_last', choice.channels_last)} on {hw.device} ({hw.name})")


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
    check_channels_last(channels_last)
    if not isinstance(compile, bool):
        raise BratsError(f"runtime.compile must be true or false, got {compile!r}")
    return {
        "threads": torch.get_num_threads(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "channels_last": channels_last,
        "compile": compile,
    }
