"""Run every benchmark one after the other (never in parallel: they would time each other).

    python -m benchmarks.run_all [--quick] [--device auto|cpu|cuda] [--out DIR]
        [--only data_loading,training,inference,evaluation]

Each benchmark prints its table and writes benchmarks/results/<name>-<device>.json (machine, torch, threads, device).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from benchmarks import data_loading, evaluation, inference, training
from benchmarks.common import parse_words

BENCHMARKS = {"data_loading": data_loading.main, "training": training.main, "inference": inference.main,
              "evaluation": evaluation.main}


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the CPU-sized subset of every benchmark (a few minutes)")
    p.add_argument("--device", default="auto", help="training and inference device (data loading is CPU work)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--threads", type=int, help="intra-op CPU threads for every benchmark (default: torch's)")
    p.add_argument("--only", type=parse_words, default=list(BENCHMARKS), help="comma-separated subset")
    args = p.parse_args(argv)
    unknown = sorted(set(args.only) - set(BENCHMARKS))
    if unknown:
        p.error(f"--only: unknown benchmarks {unknown}; choose from {sorted(BENCHMARKS)}")
    seconds = {}
    for name in args.only:
        argv_one = (["--quick"] if args.quick else []) + (["--out", args.out] if args.out else [])
        argv_one += ["--threads", str(args.threads)] if args.threads else []
        if name not in ("data_loading", "evaluation"):  # CPU work
            argv_one += ["--device", args.device]
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        BENCHMARKS[name](argv_one)
        seconds[name] = time.perf_counter() - start
    print("\n" + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()), flush=True)
    return seconds


if __name__ == "__main__":
    main(sys.argv[1:])
