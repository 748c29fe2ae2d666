"""Class distribution of a BraTS dataset, as in the seed paper's Figure 3.

Shares are per-case percentages of voxels over the whole (uncropped) volume, averaged over cases.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from brats_unet.data.cases import read_label_map, schema_of
from brats_unet.data.discovery import find_cases, resolve_layout


def dataset_stats(root: str | Path, layout: str, progress: bool = False, schema: str | None = None) -> dict:
    """Per-case and mean class shares (%) of every labelled case under `root` (classes of `schema`, default: the
    layout's)."""
    layout_obj = resolve_layout(layout)
    labels = schema_of(layout_obj, schema)
    names = labels.class_names
    per_case = []
    cases = find_cases(root, layout_obj, require_seg=True, modalities=())  # the label maps are all it reads
    for files in tqdm(cases, desc="stats", unit="case", disable=not progress):
        classes, _, _ = read_label_map(files.seg, layout_obj, labels)
        counts = np.bincount(classes.ravel(), minlength=len(names))
        per_case.append({"case": files.case, "voxels": int(classes.size),
                         **{name: 100.0 * int(n) / classes.size for name, n in zip(names, counts, strict=True)}})
    shares = np.array([[c[name] for name in names] for c in per_case])
    return {
        "root": str(root),
        "layout": layout_obj.name,
        "schema": labels.name,
        "cases": len(per_case),
        "mean_percent": dict(zip(names, shares.mean(0).tolist(), strict=True)),
        "std_percent": dict(zip(names, shares.std(0).tolist(), strict=True)),
        "per_case": per_case,
    }


def format_table(stats: dict) -> str:
    lines = [f"{stats['cases']} cases in {stats['root']} ({stats['layout']})",
             f"{'class':<12}{'mean %':>10}{'std %':>10}"]
    for name in stats["mean_percent"]:
        lines.append(f"{name:<12}{stats['mean_percent'][name]:>10.3f}{stats['std_percent'][name]:>10.3f}")
    return "\n".join(lines)
