"""brats-evaluate: score predicted label maps against BraTS ground truth -> metrics.csv + summary.json.

    brats-evaluate pred=<dir of <case>.nii.gz> truth=<BraTS root> [output=<dir>] [split_file=<run>/split.json]
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from brats_unet.cli.common import require, user_errors
from brats_unet.config import CONFIG_PATH
from brats_unet.evaluation import evaluate as evaluate_folder


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"brats-evaluate: {summary['n_cases']} cases")
    for column in ("metric", "mean", "std", "median", "p25", "p75", "n"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name, stats in summary["metrics"].items():
        cells = ["-" if stats[k] is None else f"{stats[k]:.4f}" for k in ("mean", "std", "median", "p25", "p75")]
        table.add_row(name, *cells, str(stats["n"]))
    console = Console()
    console.print(table)
    for key in ("missing_predictions", "extra_predictions", "outside_split_predictions"):
        cases = summary[key]
        if cases:
            console.print(f"{key}: {len(cases)} ({', '.join(cases[:5])}{' ...' if len(cases) > 5 else ''})")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score, write metrics.csv and summary.json into cfg.output, print the summary table; return the summary."""
    require(cfg, "pred", "truth", "output", usage="brats-evaluate pred=<dir of <case>.nii.gz> truth=<BraTS root>")
    _, summary = evaluate_folder(cfg.pred, cfg.truth, output=cfg.output, layout=cfg.get("layout"),
                                 split_file=cfg.get("split_file"), split_subset=cfg.split_subset, hd95=bool(cfg.hd95),
                                 missing_as_empty=bool(cfg.missing_as_empty), overwrite=bool(cfg.overwrite),
                                 progress=True)
    print_summary(summary)
    return summary


@hydra.main(config_path=CONFIG_PATH, config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        evaluate(cfg)


if __name__ == "__main__":
    main()
