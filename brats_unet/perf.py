"""Process-wide runtime knobs for speed: CPU threads, the cuDNN autotuner, float32 matmul precision.

Called once at the start of brats-train / brats-predict from the `runtime` config node. Every argument left at None
keeps torch's current setting, so the defaults change nothing.
"""

from __future__ import annotations

import torch

MATMUL_PRECISIONS = ("highest", "high", "medium")


def configure_runtime(
    threads: int | None = None, cudnn_benchmark: bool | None = None, matmul_precision: str | None = None
) -> dict[str, object]:
    """Apply the given settings; return the ones now in effect (for the run log).

    threads: torch.set_num_threads (intra-op threads). DataLoader workers already run single-threaded, so on a small
        CPU the main process can keep every core.
    cudnn_benchmark: torch.backends.cudnn.benchmark; pays off with a fixed patch size (one autotune per shape).
    matmul_precision: torch.set_float32_matmul_precision; "high" lets Ampere+ GPUs use TF32 for float32 matmuls.
    """
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"runtime.threads must be a positive integer or null, got {threads!r}")
        torch.set_num_threads(threads)
    if cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    if matmul_precision is not None:
        if matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(
                f"runtime.matmul_precision must be one of {list(MATMUL_PRECISIONS)} or null, got {matmul_precision!r}"
            )
        torch.set_float32_matmul_precision(matmul_precision)
    return {
        "threads": torch.get_num_threads(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "matmul_precision": torch.get_float32_matmul_precision(),
    }
