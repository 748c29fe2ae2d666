"""brats-postprocess: choose post-processing rules on cases held out from the model: a cross-validation sweep's
out-of-fold predictions, or one run's validation cases (a weaker estimate: fewer cases, one model).

    brats-postprocess run=<cv sweep dir> [predictions=<oof dir>] [truth=<BraTS root>] [lesionwise=true|false]
    brats-postprocess run=<run dir> [predictions=<dir of its validation cases>] ...

Writes <run>/postprocessing.json (the rules kept, the held-out score before and after); brats-predict
ckpt_path=<sweep or run dir> then applies it (cv_postprocess=false turns that off).
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from brats_unet.cli.common import require, user_errors
from brats_unet.config import CONFIG_PATH
from brats_unet.inference.cv_postprocess import choose_postprocessing, chosen_on
from brats_unet.inference.segmenter import resolve_device
from brats_unet.utils import BratsError


def _ints(cfg: DictConfig, key: str) -> list[int]:
    values = list(cfg.get(key) or [])
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise BratsError(f"{key} must be a non-empty list of positive voxel counts, got {values}")
    return values


def postprocess(cfg: DictConfig) -> dict[str, Any]:
    require(cfg, "run", usage="brats-postprocess run=<cross-validation sweep dir or brats-train run dir>")
    lesionwise = cfg.get("lesionwise")
    if lesionwise is not None and not isinstance(lesionwise, bool):
        raise BratsError(f"lesionwise must be true, false or null, got {lesionwise!r}")
    record = choose_postprocessing(
        str(cfg.run), predictions=cfg.get("predictions"), truth=cfg.get("truth"), layout=cfg.get("layout"),
        challenge=cfg.get("challenge"), lesionwise=lesionwise, sizes=_ints(cfg, "sizes"),
        et_totals=_ints(cfg, "et_totals"), overwrite=bool(cfg.overwrite),
        device=resolve_device(str(cfg.device)), tta=bool(cfg.tta), precision=str(cfg.precision))
    print(f"{record['metric']} on {record['cases']} cases ({chosen_on(record)}): {record['score_before']:.4f} -> "
          f"{record['score_after']:.4f}")
    for rule in record["rules"]:
        what = ", ".join(f"{k}={v}" for k, v in rule.items() if k not in ("score_before", "score_after"))
        print(f"  kept {what}: {rule['score_before']:.4f} -> {rule['score_after']:.4f}")
    if not record["rules"]:
        print("  no rule raised the score: nothing will be applied")
    print(f"wrote {cfg.run}/postprocessing.json")
    return record


@hydra.main(config_path=CONFIG_PATH, config_name="postprocess", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        postprocess(cfg)


if __name__ == "__main__":
    main()
