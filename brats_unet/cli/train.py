"""brats-train: fit a U-Net from a Hydra config; resume with `ckpt_path=last` in the same run dir."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from brats_unet.cli.common import user_errors
from brats_unet.config import CONFIG_PATH
from brats_unet.training.fit import train


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        metrics = train(cfg)
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
