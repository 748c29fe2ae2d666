"""brats-stats: class distribution of a BraTS dataset, as in the seed paper's Figure 3.

    brats-stats data=brats2021 data.root=/data/BraTS2021   -> table on stdout + <run dir>/stats.json
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from brats_unet.cli.common import user_errors
from brats_unet.config import CONFIG_PATH
from brats_unet.data.stats import dataset_stats, format_table
from brats_unet.utils import atomic_write_json


def stats(cfg: DictConfig) -> dict:
    """Compute the class distribution of cfg.data, print it and write <paths.output_dir>/stats.json."""
    result = dataset_stats(cfg.data.root, cfg.data.layout, progress=True, schema=cfg.data.get("schema"))
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
