"""Data loading: the seed's per-sample NIfTI decode + preprocess vs our memory-mapped cache, and whether the
DataLoader keeps up with a training step.

    python -m benchmarks.data_loading [--quick] [--root BRATS_ROOT] [--out DIR]

(a) raw: decode the .nii.gz modalities and the label map, MinMax each volume, fixed 128^3 crop (the seed's loader);
(b) cached: cache.load_cached (memory-mapped .npy) + a patch crop of the same size, once opening the case per sample
    and once with the handles kept open as the DataModule does. Both after one untimed pass (warm page cache).
(c) loader wait: a BratsDataModule (modern recipe, `--augment` none or modern = nnU-Net's augmentation) feeding
    training steps of the quickstart model; the time blocked on next(batch) as a share of the whole step, and the
    time one worker needs per sample (cut + augment), so `workers_needed_at(step time)` says how many workers keep
    a faster (GPU) step fed.
Without --root, synthetic 240x240x155 cases are generated into a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from benchmarks.common import median, parse_ints, print_table, threads, write_result
from benchmarks.training import MODELS, Combo, build_net
from brats_unet.config import compose
from brats_unet.data import cache
from brats_unet.data.cases import load_nifti, read_case_files
from brats_unet.data.datamodule import BratsDataModule
from brats_unet.data.discovery import CaseFiles, find_cases
from brats_unet.data.preprocess import preprocess_case
from brats_unet.data.sampling import choose_patch_start, crop_or_pad
from brats_unet.synth.generator import write_dataset


def recipe(name: str) -> dict[str, Any]:
    """A preprocess recipe as brats-train composes it for BraTS 2021 data (preprocess=<name>)."""
    return OmegaConf.to_container(compose([f"preprocess={name}", "data=brats2021"]).preprocess, resolve=True)


def fit_crop_box(box: list[list[int]], shape: Sequence[int]) -> list[list[int]]:
    """The seed box if it fits the volume, else a centred box of min(128, size) per axis (small synthetic cases)."""
    if all(0 <= a < b <= s for (a, b), s in zip(box, shape, strict=True)):
        return box
    out = []
    for (a, b), s in zip(box, shape, strict=True):
        n = min(b - a, s)
        out.append([(s - n) // 2, (s - n) // 2 + n])
    return out


def raw_sample(files: CaseFiles, seed: dict[str, Any]) -> np.ndarray:
    """The seed's way: decode every modality and the label map, normalise, crop."""
    images, seg, _ = read_case_files(files, seed["modalities"])
    x, _, _ = preprocess_case(images, seg, modalities=seed["modalities"], normalize=seed["normalize"], crop="fixed",
                              crop_box=seed["crop_box"], foreground_channel=False, schema="brats2021")
    return x


def cached_sample(x: np.ndarray, y: np.ndarray, coords: np.ndarray, patch: Sequence[int],
                  rng: np.random.Generator) -> np.ndarray:
    """What PatchDataset does per sample: pick a start (tumour-biased), cut the patch, convert to float32."""
    start = choose_patch_start(y.shape, patch, rng, coords, 0.33)
    xp, _ = crop_or_pad(x, y, start, patch)
    return xp.astype(np.float32, copy=False)


def time_raw_vs_cached(root: Path, layout: str, work: Path, samples: int, cached_samples: int) -> dict[str, Any]:
    cases = find_cases(root, layout)
    seed = recipe("seed")
    shape = load_nifti(cases[0].images[seed["modalities"][0]])[0].shape
    seed["crop_box"] = fit_crop_box(seed["crop_box"], shape)
    patch = [b - a for a, b in seed["crop_box"]]

    start = time.perf_counter()
    folder = cache.build_cache(root, layout, work / "cache", seed, num_workers=1, progress=False)
    build_s = time.perf_counter() - start
    names = cache.cached_cases(folder)

    for files in cases:  # untimed pass: both paths then read from the page cache
        raw_sample(files, seed)
    raw_times = []
    for i in range(samples):
        start = time.perf_counter()
        raw_sample(cases[i % len(cases)], seed)
        raw_times.append(time.perf_counter() - start)

    rng = np.random.default_rng(0)
    open_each, open_once = [], []
    handles = {}
    for name in names:
        x, y, meta = cache.load_cached(folder, name)
        handles[name] = (x, y, np.asarray(meta["foreground_coords_sample"], dtype=np.int16).reshape(-1, 3))
        cached_sample(*handles[name], patch, rng)
    for i in range(cached_samples):
        name = names[i % len(names)]
        start = time.perf_counter()
        x, y, meta = cache.load_cached(folder, name)
        coords = np.asarray(meta["foreground_coords_sample"], dtype=np.int16).reshape(-1, 3)
        cached_sample(x, y, coords, patch, rng)
        open_each.append(time.perf_counter() - start)
        start = time.perf_counter()
        cached_sample(*handles[name], patch, rng)
        open_once.append(time.perf_counter() - start)
    raw_s, each_s, once_s = median(raw_times), median(open_each), median(open_once)
    return {"volume_shape": list(shape), "crop_box": seed["crop_box"], "patch": patch, "cases": len(cases),
            "cache_build_s_per_case": build_s / max(len(names), 1), "raw_samples": samples,
            "cached_samples": cached_samples, "raw_s": raw_s, "cached_open_each_s": each_s,
            "cached_open_once_s": once_s, "ratio_raw_over_cached": raw_s / each_s,
            "ratio_raw_over_cached_open_once": raw_s / once_s, "target_ratio": 30.0}


def augment_config(name: str) -> dict[str, Any]:
    """conf/augment/<name>.yaml as brats-train composes it."""
    return OmegaConf.to_container(compose([f"augment={name}"]).augment, resolve=True)


def sample_cost(dm: BratsDataModule, samples: int) -> float:
    """Median seconds for one training sample in this process (patch cut + augmentation + tensors)."""
    dm.train_set[(0, 0)]  # first touch: open the memmap, import what the augmentation imports
    times = []
    for i in range(samples):
        start = time.perf_counter()
        dm.train_set[(i % len(dm.train_set), 1000 + i)]
        times.append(time.perf_counter() - start)
    return median(times)


def loader_wait(root: Path, layout: str, work: Path, model: str, patch: int, batch: int, workers: int,
                steps: int, augment: str = "none", samples: int = 20) -> dict[str, Any]:
    """Train `steps` steps from the DataModule's loader; measure the time blocked in next(batch)."""
    dm = BratsDataModule(root=root, layout=layout, cache_dir=work / "cache", preprocess=recipe("modern"),
                         augment=augment_config(augment), patch_size=[patch] * 3, batch_size=batch, num_workers=workers,
                         persistent_workers=workers > 0, val_fraction=0.0, steps_per_epoch=steps + 1,
                         output_dir=work / "run", seed=0)
    start = time.perf_counter()
    dm.prepare_data()
    cache_s = time.perf_counter() - start
    dm.setup("fit")
    per_sample = sample_cost(dm, samples)
    torch.manual_seed(0)
    spec = MODELS[model]
    net, loss_fn, _ = build_net(Combo("ours", model, patch, batch, norm=spec["norm"]))
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def train_step(b: dict[str, Any]) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(net(b["image"]), b["label"]).backward()
        opt.step()

    it = iter(dm.train_dataloader())
    train_step(next(it))  # worker start-up and first-step allocations: not what a long run sees
    waits, totals = [], []
    for _ in range(steps):
        start = time.perf_counter()
        b = next(it)
        waited = time.perf_counter() - start
        train_step(b)
        waits.append(waited)
        totals.append(time.perf_counter() - start)
    del it
    step_s = float(np.mean(totals))
    return {"model": model, "patch": patch, "batch": batch, "num_workers": workers, "steps": steps,
            "augment": augment, "modern_cache_build_s": cache_s, "sample_s": per_sample,
            "wait_s_mean": float(np.mean(waits)), "step_s_mean": step_s,
            "wait_pct": 100 * float(np.sum(waits) / np.sum(totals)), "target_wait_pct": 5.0,
            # One worker makes a batch in batch x sample_s; a step of t seconds needs that many workers to keep up.
            "workers_needed_at": {f"{t:g}s": math.ceil(batch * per_sample / t) for t in (step_s, 1.0, 0.5, 0.25)}}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_loading", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 cases, fewer samples and steps")
    p.add_argument("--root", type=Path, help="a BraTS root to read instead of generated synthetic cases")
    p.add_argument("--layout", default="brats2021")
    p.add_argument("--cases", type=int, help="synthetic cases to generate (default 4, quick 2)")
    p.add_argument("--shape", type=parse_ints, default=[240, 240, 155], help="synthetic volume shape x,y,z")
    p.add_argument("--samples", type=int, help="timed raw samples (default 8, quick 2)")
    p.add_argument("--cached-samples", type=int, default=50)
    p.add_argument("--model", default="quickstart", choices=sorted(MODELS))
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--num-workers", type=int, default=1, help="DataLoader workers (the quickstart uses 1)")
    p.add_argument("--augment", default="none", help="conf/augment name for the loader: none | modern (nnU-Net's) | "
                   "brightness")
    p.add_argument("--loader-samples", type=int, default=20, help="samples timed for the per-sample loader cost")
    p.add_argument("--steps", type=int, help="timed training steps for the loader wait (default 10, quick 4)")
    p.add_argument("--threads", type=int, help="intra-op CPU threads (default: torch's, one per core)")
    p.add_argument("--work-dir", type=Path, help="keep generated cases and caches here (default: a temp folder)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    for key, full, quick in (("cases", 4, 2), ("samples", 8, 2), ("steps", 10, 4)):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    return args


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    root = args.root
    synth_s = None
    if root is None:
        root = work / "raw"
        start = time.perf_counter()
        write_dataset(root, cases=args.cases, seed=0, layout=args.layout, shape=args.shape)
        synth_s = time.perf_counter() - start
    print(f"[data_loading] raw vs cached on {root}", flush=True)
    sample = time_raw_vs_cached(root, args.layout, work, args.samples, args.cached_samples)
    print("[data_loading] loader wait", flush=True)
    wait = loader_wait(root, args.layout, work, args.model, args.patch, args.batch, args.num_workers, args.steps,
                       args.augment, args.loader_samples)
    return {"device": "cpu", "source": "synthetic" if args.root is None else str(args.root), "synth_s": synth_s,
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
            "per_sample": sample, "loader": wait}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with threads(args.threads), contextlib.ExitStack() as stack:
        if args.work_dir:
            args.work_dir.mkdir(parents=True, exist_ok=True)
            work = args.work_dir
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="brats-bench-")))
        result = run(args, work)
        path = write_result("data_loading", result, torch.device("cpu"), args.out)
    s, w = result["per_sample"], result["loader"]
    print_table([{"path": "raw .nii.gz + MinMax + crop (seed)", "s_per_sample": s["raw_s"], "ratio": 1.0},
                 {"path": "cache, open per sample", "s_per_sample": s["cached_open_each_s"],
                  "ratio": s["ratio_raw_over_cached"]},
                 {"path": "cache, handles kept open (DataModule)", "s_per_sample": s["cached_open_once_s"],
                  "ratio": s["ratio_raw_over_cached_open_once"]}],
                ["path", "s_per_sample", "ratio"], title=f"per sample, {s['patch']} voxels from {s['volume_shape']}")
    print_table([w], ["model", "patch", "batch", "num_workers", "augment", "sample_s", "wait_s_mean", "step_s_mean",
                      "wait_pct"], title="DataLoader wait during training")
    print(f"workers needed to keep a step fed: {w['workers_needed_at']}", flush=True)
    print(f"wrote {path}", flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
