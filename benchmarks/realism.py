"""How realistic is brats-synth? Generator speed, class shares vs the paper, anatomy and contrast vs the real MNI152
template, and what demo models trained on synthetic data do on real anatomy.

    python -m benchmarks.realism --model new=outputs/demo/train/checkpoints/best.ckpt [--model old=...]
                                 [--synthetic new=data/synthetic] [--full-cases 20] [--quick]

What is real here: the MNI152 2009 T1 template (nilearn; an average of 152 healthy adults' T1 scans, so smoother
than one scan). BraTS needs four sequences; only T1 exists, so the healthy "real" case uses the real T1 as T1 and as
T1ce (healthy tissue barely enhances) and derives T2 and FLAIR from the real T1 voxel by voxel (its CSF/GM/WM levels
mapped to DESIGN.md's table: real anatomy and partial volume, made-up contrast physics). The "hybrid" cases add a
synthetic glioma (this generator's lesion model, with mass effect on the real image) to that head, so a Dice exists;
it measures robustness to real healthy anatomy, not to real tumours. No real tumour MRI installs offline (see README).
Results: a table on stdout, JSON in benchmarks/results/realism-cpu.json, a figure in --figures.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage as ndi

from benchmarks.common import parse_ints, print_table, write_result
from brats_unet.data.labels import LAYOUTS, MODALITIES, SCHEMAS
from brats_unet.evaluation.region import dice
from brats_unet.synth import anatomy as A
from brats_unet.synth import generator as S
from brats_unet.synth import tumour as T
from brats_unet.synth.appearance import CONTRAST

DEMO_SHAPE = (120, 120, 78)
PAPER_SHARES = {"ncr": 0.16, "ed": 0.79, "et": 0.25}  # % of a 240x240x155 volume (the paper's Figure 3)
LAYOUT = LAYOUTS["brats2021"]
GLIOMA = SCHEMAS["brats2021"]


def _ratios(images: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Median intensity of GM and CSF relative to WM, per sequence."""
    out = {}
    for m, img in images.items():
        wm = float(np.median(img[masks["wm"]]))
        out[m] = {t: round(float(np.median(img[masks[t]])) / wm, 3) for t in ("gm", "csf")}
    return out


def generator_stats(n_full: int, n_demo: int, full_shape: tuple[int, ...] = A.FULL_SHAPE) -> dict:
    """Seconds per case (demo and full size, one process) and class/tissue shares over `n_full` full-size cases."""
    S.generate_case(S.case_rng(1, 0), DEMO_SHAPE)  # warm-up: atlas read and pre-blurred once per process
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(n_demo):
        S.generate_case(S.case_rng(0, i), DEMO_SHAPE)
    demo_s, demo_cpu = (time.perf_counter() - start) / n_demo, (time.process_time() - cpu) / n_demo
    shares, tissue, ratios, times, cpus = [], [], [], [], []
    for i in range(n_full):
        start, cpu = time.perf_counter(), time.process_time()
        case = S.generate_case(S.case_rng(0, i), full_shape)
        times.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
        shares.append(np.bincount(case.classes.ravel(), minlength=4) / case.classes.size * 100)
        brain = case.healthy > 0
        voxel_ml = float(np.prod(S.physical_spacing(full_shape))) / 1000
        tissue.append([(case.healthy == T.TISSUES.index(t)).sum() / brain.sum() for t in A.HEALTHY]
                      + [brain.sum() * voxel_ml])
        healthy = case.classes == 0
        masks = {t: ndi.binary_erosion((case.tissue == T.TISSUES.index(t)) & healthy) for t in A.HEALTHY}
        ratios.append(_ratios(case.images, masks))
    shares, tissue = np.array(shares), np.array(tissue)
    mean_ratio = {m: {t: round(float(np.mean([r[m][t] for r in ratios])), 3) for t in ("gm", "csf")}
                  for m in MODALITIES}
    # Wall time depends on what else the machine runs; CPU time (this process, all threads) is steadier.
    return {"demo_case_s": round(demo_s, 2), "demo_case_cpu_s": round(demo_cpu, 2),
            "full_case_s": round(float(np.median(times)), 2), "full_case_cpu_s": round(float(np.median(cpus)), 2),
            "full_cases": n_full,
            "class_share_pct": {k: round(float(shares[:, i].mean()), 3) for i, k in enumerate(
                ("background", "ncr", "ed", "et"))},
            "class_share_pct_range": {k: [round(float(shares[:, i].min()), 3), round(float(shares[:, i].max()), 3)]
                                      for i, k in enumerate(("background", "ncr", "ed", "et"))},
            "cases_with_all_classes": int(sum((s[1:] > 0).all() for s in shares)),
            "tissue_share_of_brain": {t: round(float(tissue[:, i].mean()), 3) for i, t in enumerate(A.HEALTHY)},
            "brain_ml": [round(float(tissue[:, 3].min())), round(float(tissue[:, 3].max()))],
            "synthetic_contrast_vs_wm": mean_ratio}


def template_head(shape: tuple[int, ...], lesions: list[T.Lesion] | None = None, seed: int = 0) -> dict:
    """The real template in BraTS space at `shape` (mean size, no warp), optionally with synthetic lesions."""
    spacing = tuple(S.physical_spacing(shape))
    axes = A.grid_axes(shape)
    pose = A.Pose.standard()
    pushes = [les.push for les in lesions or []]
    probs, coords = A.sample_tissue(pose, axes, spacing, pushes)
    t1_atlas = A.load_atlas().t1
    sigma = A.antialias_sigma(spacing)
    t1 = ndi.map_coordinates(ndi.gaussian_filter(t1_atlas, sigma) if max(sigma) > 0.2 else t1_atlas, coords,
                             order=1, output=np.float32)
    brain = probs.sum(0) > 0.5
    pure = {t: brain & (p > 0.9) for t, p in zip(A.HEALTHY, probs, strict=True)}
    level = {t: float(np.median(t1[pure[t]])) for t in A.HEALTHY}
    images = {"t1": t1 / level["wm"], "t1ce": t1 / level["wm"]}
    # T2 and FLAIR: the real T1's own levels (CSF < GM < WM) mapped piecewise-linearly onto the table's.
    xs = [0.0, level["csf"] / level["wm"], level["gm"] / level["wm"], 1.0, 1.5]
    for m, name in ((2, "t2"), (3, "flair")):
        ys = [CONTRAST[2, m] * 1.1, CONTRAST[2, m], CONTRAST[1, m], 1.0, 1.0]
        images[name] = np.interp(images["t1"], xs, ys).astype(np.float32)
    classes = np.zeros(shape, np.uint8)
    if lesions:
        rng = np.random.default_rng(seed)
        labels = T.paint_lesions(rng, lesions, axes, probs, spacing)
        lesion = labels > 0
        for m, name in enumerate(MODALITIES):
            value = CONTRAST[labels[lesion].astype(int) - 1, m]
            is_ed = labels[lesion] == T.ED
            value[is_ed] = 0.3 * images[name][lesion][is_ed] + 0.7 * value[is_ed]
            img = images[name].copy()
            img[lesion] = value
            soft = ndi.gaussian_filter(img, 0.6)  # partial volume at the lesion's borders only
            near = ndi.binary_dilation(lesion, iterations=1)
            images[name] = np.where(near, soft, img)
        classes = T.TISSUE_CLASS[labels]
        brain |= lesion
    out = {k: np.where(brain, np.clip(v, 0, None) * 800, 0).astype(np.int16) for k, v in images.items()}
    return {"images": out, "classes": classes, "probs": probs, "brain": brain,
            "affine": S.brats_affine(shape, spacing), "t1_levels": {k: round(v / level["wm"], 3)
                                                                    for k, v in level.items()}}


def hybrid_lesions(shape: tuple[int, ...], seed: int) -> list[T.Lesion]:
    rng = np.random.default_rng(seed)
    coarse = A.grid_axes([int(np.ceil(f / S.COARSE_MM)) for f in A.FULL_MM])
    probs, coords = A.sample_tissue(A.Pose.standard(), coarse, tuple(S.physical_spacing(shape)))
    atlas = A.load_atlas()
    return T.draw_lesions(rng, coarse, probs, coords[2] > atlas.centre[2] + atlas.brain_z_mm)


def write_case(root: Path, name: str, head: dict, with_seg: bool) -> None:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for m in MODALITIES:
        nib.save(nib.Nifti1Image(head["images"][m], head["affine"]), folder / LAYOUT.filename(name, m))
    if with_seg:
        seg = LAYOUT.label_schema.from_classes(head["classes"])
        nib.save(nib.Nifti1Image(seg, head["affine"]), folder / LAYOUT.filename(name, "seg"))


def predict(ckpt: Path, root: Path, out: Path) -> None:
    exe = Path(sys.executable).with_name("brats-predict")
    subprocess.run([str(exe), f"ckpt_path={ckpt}", f"input={root}", f"output={out}", "overwrite=true",
                    "runtime.threads=1"], check=True, capture_output=True, text=True)


def figure(path: Path, rows: list[tuple[str, dict, np.ndarray, dict[str, np.ndarray]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap([(0, 0, 0, 0), (0.9, 0.2, 0.2, 0.8), (0.2, 0.8, 0.2, 0.6), (1.0, 0.9, 0.1, 0.8)])
    ncol = 4 + 1 + max(len(r[3]) for r in rows)
    fig, axs = plt.subplots(len(rows), ncol, figsize=(2.2 * ncol, 2.4 * len(rows)), squeeze=False)
    for r, (title, images, truth, preds) in enumerate(rows):
        tumour = truth > 0 if truth.any() else np.zeros_like(truth, bool)
        for p in preds.values():
            tumour |= p > 0
        z = int(np.argmax(tumour.sum((0, 1)))) if tumour.any() else truth.shape[2] // 2 + 8
        panels = [(m, images[m], None) for m in MODALITIES] + [("truth", images["flair"], truth)]
        panels += [(f"{k} model", images["flair"], p) for k, p in preds.items()]
        for c, (name, img, lab) in enumerate(panels):
            ax = axs[r, c]
            sl = img[:, :, z].T
            inside = sl[sl > 0]
            ax.imshow(sl, cmap="gray", vmin=np.percentile(inside, 0.5) * 0.8 if inside.size else 0,
                      vmax=np.percentile(inside, 99.5) if inside.size else 1)
            if lab is not None:
                ax.imshow(lab[:, :, z].T, cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
            ax.set_title(f"{title}: {name}" if c == 0 else name, fontsize=7)
        for ax in axs[r]:
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", default=[], help="NAME=CKPT of a demo model (repeatable)")
    p.add_argument("--synthetic", action="append", default=[],
                   help="NAME=ROOT of a brats-synth folder (repeatable): its last case goes in the figure")
    p.add_argument("--full-cases", type=int, default=20, help="full-size cases for class shares (default 20)")
    p.add_argument("--hybrid-cases", type=int, default=3)
    p.add_argument("--full-shape", type=parse_ints, default=list(A.FULL_SHAPE),
                   help="grid of the 'full-size' cases and template (default 240,240,155; tests use less)")
    p.add_argument("--quick", action="store_true", help="1 full-size case, 1 hybrid (a smoke run)")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    p.add_argument("--figures", type=Path, default=Path("outputs/realism"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    n_full, n_hybrid = (1, 1) if args.quick else (args.full_cases, args.hybrid_cases)
    models = dict(m.split("=", 1) for m in args.model)

    full_shape = tuple(args.full_shape)
    gen = generator_stats(n_full, 1 if args.quick else 5, full_shape)
    real = template_head(DEMO_SHAPE)
    voxel_ml = float(np.prod(S.physical_spacing(DEMO_SHAPE))) / 1000
    full = template_head(full_shape)
    fb = full["brain"]
    hard = np.argmax(full["probs"], 0)
    template = {"tissue_share_of_brain": {t: round(float(((hard == i) & fb).sum() / fb.sum()), 3)
                                          for i, t in enumerate(A.HEALTHY)},
                "brain_ml": round(float(fb.sum()) * float(np.prod(S.physical_spacing(full_shape))) / 1000),
                "real_t1_vs_wm": real["t1_levels"]}
    del full, hard, fb

    heads = {"MNI152-healthy": real}
    for i in range(n_hybrid):
        heads[f"MNI152-hybrid-{i}"] = template_head(DEMO_SHAPE, hybrid_lesions(DEMO_SHAPE, 100 + i), seed=i)
    rows, preds, results = [], {name: {} for name in heads}, {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "real"
        for name, head in heads.items():
            write_case(root, name, head, with_seg=False)
        for model, ckpt in models.items():
            predict(Path(ckpt), root, Path(tmp) / model)
            for name, head in heads.items():
                labels = np.asarray(nib.load(Path(tmp) / model / f"{name}.nii.gz").dataobj)
                pred = LAYOUT.label_schema.to_classes(labels)
                preds[name][model] = pred
                row = {"model": model, "case": name}
                if head["classes"].any():
                    for region, cls in GLIOMA.region_classes.items():
                        row[f"dice_{region}"] = round(dice(np.isin(pred, cls), np.isin(head["classes"], cls)), 3)
                healthy = head["brain"] & (head["classes"] == 0)
                fp = (pred > 0) & healthy
                row["fp_ml"] = round(float(fp.sum()) * voxel_ml, 2)
                for i, t in enumerate(A.HEALTHY):  # where the false positives sit (majority tissue)
                    row[f"fp_{t}_ml"] = round(float((fp & (np.argmax(head["probs"], 0) == i)).sum()) * voxel_ml, 2)
                rows.append(row)
    results = rows
    print_table([{"setting": k, "value": v} for k, v in gen.items()] + [{"setting": f"template {k}", "value": v}
                for k, v in template.items()], ["setting", "value"], "generator vs paper and template")
    print(f"paper class shares (%): {PAPER_SHARES}")
    cols = ["model", "case", "dice_wt", "dice_tc", "dice_et", "fp_ml", "fp_wm_ml", "fp_gm_ml", "fp_csf_ml"]
    print_table(results, cols, "demo models on real anatomy (MNI152 T1; hybrid = + synthetic glioma)")
    fig_rows = []
    for name, root in (item.split("=", 1) for item in args.synthetic):
        case_dir = sorted(d for d in Path(root).iterdir() if d.is_dir())[-1]
        imgs = {m: np.asarray(nib.load(case_dir / LAYOUT.filename(case_dir.name, m)).dataobj) for m in MODALITIES}
        seg = GLIOMA.to_classes(np.asarray(nib.load(case_dir / LAYOUT.filename(case_dir.name, "seg")).dataobj))
        fig_rows.append((f"{name} synthetic", imgs, seg, {}))
    for name, head in heads.items():
        fig_rows.append((name, head["images"], head["classes"], preds[name]))
    figure(args.figures / "realism.png", fig_rows)
    payload = {"generator": gen, "paper_class_share_pct": PAPER_SHARES, "template": template,
               "models": models, "real_anatomy": results, "figure": str(args.figures / "realism.png")}
    path = write_result("realism", payload, torch.device("cpu"), args.out)
    print(f"wrote {path} and {args.figures / 'realism.png'}")
    return payload


if __name__ == "__main__":
    main()
