"""How long `make demo` takes, step by step, and what it scores: the Makefile's own demo commands, run cold in a
scratch folder (fresh data, cache and run; the venv and the package as installed), each timed, with the load average.

    python -m benchmarks.demo [--keep DIR] [--out RESULTS_DIR]

Run it alone on an idle machine: a table taken while something else trains times that, not the demo.
Writes benchmarks/results/demo-cpu.json (per step: seconds, load average before and after; the test cases' Dice).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import print_table, write_result

ROOT = Path(__file__).resolve().parent.parent
RUN = "outputs/demo"
REGIONS = ("dice_wt", "dice_tc", "dice_et")


def demo_commands(venv_bin: Path) -> list[str]:
    """The demo target's shell commands as make would run them (install not remade), venv paths made absolute."""
    text = subprocess.run(["make", "-n", "-o", "install", "--no-print-directory", "-C", str(ROOT), "demo",
                           f"RUN={RUN}"], check=True, capture_output=True, text=True).stdout
    commands = [c.strip() for c in text.replace("\\\n", " ").splitlines() if c.strip()]
    commands = [c for c in commands if not c.startswith("echo ")]
    return [c.replace(".venv/bin/", f"{venv_bin}/") for c in commands]


def step_name(command: str) -> str:
    return Path(shlex.split(command)[0]).name


def run_demo(workdir: Path, venv_bin: Path) -> list[dict]:
    """Run every demo command in `workdir`; one row per step. A failing step ends the benchmark with its output."""
    rows = []
    for command in demo_commands(venv_bin):
        load = os.getloadavg()[0]
        start = time.perf_counter()
        done = subprocess.run(command, shell=True, cwd=workdir, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode:
            sys.exit(f"{step_name(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        rows.append({"step": step_name(command), "seconds": round(seconds, 1), "load_before": round(load, 2),
                     "load_after": round(os.getloadavg()[0], 2)})
        print(f"{rows[-1]['step']:<18} {seconds:6.1f} s  (load {load:.2f})", flush=True)
    return rows


def test_scores(workdir: Path) -> dict[str, float]:
    """Mean Dice per region over the demo's test cases, from brats-evaluate's summary."""
    summary = json.loads((workdir / RUN / "evaluation" / "summary.json").read_text())
    return {k: round(float(v["mean"]), 4) for k, v in summary["metrics"].items() if k in REGIONS}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__.split("\n")[0])
    p.add_argument("--keep", help="run in this (new or empty) folder and keep it (default: a temporary one)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    venv_bin = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix="brats-demo-") as tmp:
        workdir = Path(args.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if any(workdir.iterdir()):
            sys.exit(f"--keep {workdir}: not empty; the demo is timed from nothing")
        start = time.perf_counter()
        rows = run_demo(workdir, venv_bin)
        total = round(time.perf_counter() - start, 1)
        scores = test_scores(workdir)
    rows.append({"step": "total", "seconds": total, "load_before": rows[0]["load_before"],
                 "load_after": rows[-1]["load_after"]})
    print_table(rows, ["step", "seconds", "load_before", "load_after"], "make demo, cold (fresh data and run)")
    print("test Dice: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    payload = {"steps": rows, "total_s": total, "test_dice": scores}
    path = write_result("demo", payload, torch.device("cpu"), args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
