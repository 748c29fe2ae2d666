"""The `runtime` config group, applied once at the start of brats-train / brats-predict: CPU threads, the cuDNN
autotuner, float32 matmul precision (process-wide), and the network's memory format and compilation (per model).

No knob changes a result beyond floating-point rounding; a None keeps torch's current setting (cudnn_benchmark None:
on with CUDA, where the fixed patch and window sizes repay the autotuner's search once).
"""

from __future__ import annotations

from typing import Any

import torch

from brats_unet.utils import BratsError

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
    channels_last (true | false | auto, resolved per device by brats_unet.hardware), compile: checked here, applied
        where the network is built (brats_unet.build).
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
