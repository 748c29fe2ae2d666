"""brats-train: fit a U-Net from a Hydra config; resume with `ckpt_path=last` in the same run dir."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from brats_unet.cli.common import user_errors
from brats_unet.config import CONFIG_PATH
from brats_unet.runs import run_checkpoints
from brats_unet.training.checkpoint import resume_candidates
from brats_unet.training.fit import check_fresh_run_dir, train


class RunDirGuard(Callback):
    """Refuses a fresh run in a run dir that holds checkpoints before Hydra writes the job's `.hydra/` there, which
    would replace the config and overrides of the run those checkpoints belong to (train() refuses too, but only
    after that write). conf/train.yaml registers it as a Hydra callback."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        ckpt_path, run_dir = config.get("ckpt_path"), Path(config.hydra.run.dir)
        if ckpt_path is None or (str(ckpt_path) == "last" and not resume_candidates(run_dir)):
            with user_errors():
                check_fresh_run_dir(run_dir, ckpt_path, bool(config.get("overwrite")))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        if config.get("ckpt_path") is None and not config.get("overwrite") and sweep.is_dir():
            for job in sorted(p for p in sweep.iterdir() if p.is_dir() and run_checkpoints(p)):
                with user_errors():
                    check_fresh_run_dir(job, None, False, dir_key="hydra.sweep.dir")


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        metrics = train(cfg)
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
