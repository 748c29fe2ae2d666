"""brats-report: figures and tables from a finished run or a sweep (brats_unet.reporting.writer).

    brats-report run=<run dir or sweep dir> [data_root=<BraTS root> [layout=brats2023] [schema=brats2024_gli]
                 [case=<name>]]
                 [predictions=<dir of <case>.nii.gz>] [output=<dir>] [overwrite=true]
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from brats_unet.cli.common import trust_targets, user_errors
from brats_unet.config import CONFIG_PATH
from brats_unet.reporting.writer import write_report
from brats_unet.utils import BratsError


def report(cfg: DictConfig) -> dict[str, Path]:
    """Write the report for cfg.run into cfg.output (default <run>/report); print and return the files written."""
    if not cfg.get("run"):
        raise BratsError("pass run=<run dir or sweep dir> (config key run)")
    written = write_report(cfg.run, cfg.get("output"), metric=cfg.metric, data_root=cfg.get("data_root"),
                           layout=cfg.get("layout"), schema=cfg.get("schema"), predictions=cfg.get("predictions"),
                           case=cfg.get("case"), max_cases=int(cfg.max_cases), overwrite=bool(cfg.get("overwrite")),
                           trust_targets=trust_targets(cfg))
    print(f"report for {cfg.run} written to {next(iter(written.values())).parent if written else cfg.run}:")
    for path in written.values():
        print(f"  {path}")
    return written


@hydra.main(config_path=CONFIG_PATH, config_name="report", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        report(cfg)


if __name__ == "__main__":
    main()
