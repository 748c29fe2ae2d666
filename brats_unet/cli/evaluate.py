"""brats-evaluate: score predicted label maps against BraTS ground truth -> metrics.csv + summary.json.

    brats-evaluate pred=<dir of <case>.nii.gz> truth=<BraTS root> [output=<dir>] [split_file=<run>/split.json]
                   [challenge=brats2024_gli] [lesionwise=true|false] [hd95_mode=pooled|max] [nsd_tolerance=1.0]
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from brats_unet.cli.common import require, user_errors
from brats_unet.config import CONFIG_PATH
from brats_unet.evaluation.folder import evaluate as evaluate_folder
from brats_unet.utils import BratsError


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    shown = {name: stats for name, stats in summary["metrics"].items() if _headline(name)}
    names = max(map(len, shown), default=6)
    table = Table(title=f"brats-evaluate: {summary['n_cases']} cases")
    for column in ("metric", "mean", "std", "median", "p25", "p75", "n"):
        # Metric names are never cut (all_instance_f1_snfh, lesionwise_hd95_mean_netc): the console widens instead.
        table.add_column(column, justify="left" if column == "metric" else "right", no_wrap=True,
                         min_width=names if column == "metric" else None)
    for name, stats in shown.items():
        cells = ["-" if stats[k] is None else f"{stats[k]:.4f}" for k in ("mean", "std", "median", "p25", "p75")]
        table.add_row(name, *cells, str(stats["n"]))
    console = Console()
    console.width = max(console.width, names + 6 * 11 + 8)
    console.print(table)
    if len(shown) < len(summary["metrics"]):
        console.print(f"{len(summary['metrics']) - len(shown)} more metrics (counts, std) in summary.json; "
                      "means over finite values (NaN skipped, as the BraTS leaderboard does)")
    console.print("units: Dice, NSD, F1 0..1; hd95 mm; vol_pred_*, vol_true_* mL; std: sample std (ddof=1)")
    for key in ("missing_predictions", "extra_predictions", "outside_split_predictions"):
        cases = summary[key]
        if cases:
            console.print(f"{key}: {len(cases)} ({', '.join(cases[:5])}{' ...' if len(cases) > 5 else ''})")


def _headline(name: str) -> bool:
    """Every region-wise column, and of the lesion-wise ones the means, global metrics and detection F1."""
    if name.startswith(("lesionwise_", "global_")):
        return "_std_" not in name
    return not name.startswith(("all_instance_", "large_instance_", "small_instance_")) or "_f1_" in name


def _optional(cfg: DictConfig, key: str, kind: type, what: str) -> Any:
    """cfg[key] as `kind`, or None; a BratsError naming the key for anything else (e.g. lesionwise=yes)."""
    value = cfg.get(key)
    if value is None:
        return None
    ok = isinstance(value, bool) if kind is bool else isinstance(value, int | float) and not isinstance(value, bool)
    if not ok:
        raise BratsError(f"{key} must be {what}, got {value!r}")
    return kind(value)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score, write metrics.csv and summary.json into cfg.output, print the summary table; return the summary."""
    require(cfg, "pred", "truth", "output", usage="brats-evaluate pred=<dir of <case>.nii.gz> truth=<BraTS root>")
    _, summary = evaluate_folder(
        cfg.pred, cfg.truth, output=cfg.output, layout=cfg.get("layout"), split_file=cfg.get("split_file"),
        split_subset=cfg.split_subset, hd95=bool(cfg.hd95), missing_as_empty=bool(cfg.missing_as_empty),
        overwrite=bool(cfg.overwrite), progress=True, challenge=cfg.get("challenge"),
        lesionwise=_optional(cfg, "lesionwise", bool, "true, false or null"),
        hd95_mode=str(cfg.get("hd95_mode") or "pooled"),
        nsd_tolerance=_optional(cfg, "nsd_tolerance", float, "a distance in mm or null"),
    )
    print_summary(summary)
    return summary


@hydra.main(config_path=CONFIG_PATH, config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        evaluate(cfg)


if __name__ == "__main__":
    main()
