"""Benchmark suite: data loading, training steps, whole-case inference. `python -m benchmarks.run_all [--quick]`."""
