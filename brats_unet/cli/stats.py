"""brats-stats: class distribution of a BraTS dataset, as in the seed paper's Figure 3.

    brats-stats data=brats2021 data.root=/data/BraTS2021   -> table on stdout + <run dir>/stats.json

Shares are per-case percentages of voxels over the whole (uncropped) volume, averaged over cases.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from brats_unet.cli.common import CONFIG_PATH, user_errors
from brats_unet.data.io import find_cases, load_case, resolve_layout
from brats_unet.data.labels import CLASS_NAMES, brats_to_classes
from brats_unet.utils import BratsError, atomic_write_json


def dataset_stats(root: str | Path, layout: str, progress: bool = False) -> dict:
    """Per-case and mean class shares (%) of every labelled case under `root`."""
    layout_obj = resolve_layout(layout)
    per_case = []
    for files in tqdm(find_cases(root, layout_obj, require_seg=True), desc="stats", unit="case", disable=not progress):
        _, seg, _ = load_case(files, modalities=())  # seg only; raises on non-integer labels
        try:
            classes = brats_to_classes(seg, layout_obj.et_label)
        except ValueError as e:
            raise BratsError(f"{files.case}: {files.seg.name}: {e}") from e
        counts = np.bincount(classes.ravel(), minlength=len(CLASS_NAMES))
        per_case.append({"case": files.case, "voxels": int(classes.size),
                         **{name: 100.0 * int(n) / classes.size for name, n in zip(CLASS_NAMES, counts, strict=True)}})
    shares = np.array([[c[name] for name in CLASS_NAMES] for c in per_case])
    return {
        "root": str(root),
        "layout": layout_obj.name,
        "cases": len(per_case),
        "mean_percent": dict(zip(CLASS_NAMES, shares.mean(0).tolist(), strict=True)),
        "std_percent": dict(zip(CLASS_NAMES, shares.std(0).tolist(), strict=True)),
        "per_case": per_case,
    }


def format_table(stats: dict) -> str:
    lines = [f"{stats['cases']} cases in {stats['root']} ({stats['layout']})",
             f"{'class':<12}{'mean %':>10}{'std %':>10}"]
    for name in CLASS_NAMES:
        lines.append(f"{name:<12}{stats['mean_percent'][name]:>10.3f}{stats['std_percent'][name]:>10.3f}")
    return "\n".join(lines)


def stats(cfg: DictConfig) -> dict:
    """Compute the class distribution of cfg.data, print it and write <paths.output_dir>/stats.json."""
    result = dataset_stats(cfg.data.root, cfg.data.layout, progress=True)
    print(format_table(result))
    out = Path(cfg.paths.output_dir) / "stats.json"
    atomic_write_json(out, result)
    print(f"written: {out}")
    return result


@hydra.main(config_path=CONFIG_PATH, config_name="stats", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        stats(cfg)


if __name__ == "__main__":
    main()
