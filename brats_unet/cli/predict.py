"""brats-predict: segment BraTS cases with a trained checkpoint; one uint8 label map per case in the input's geometry.

    brats-predict ckpt_path=<run>/checkpoints/best.ckpt input=<BraTS root or one case folder> output=<dir> [tta=true]
    brats-predict ckpt_path='[a.ckpt,b.ckpt]' ...          an ensemble (also ckpt_path=<sweep dir>: every job's best)
    brats-predict ckpt_path=<cv sweep dir> oof=true ...    each fold's validation cases with that fold's model
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig

from brats_unet.cli.common import require, trust_targets, user_errors
from brats_unet.config import CONFIG_PATH
from brats_unet.data.split import read_split
from brats_unet.inference.folder import predict_folder, predict_out_of_fold
from brats_unet.inference.segmenter import Segmenter, autocast_for, resolve_device
from brats_unet.runtime import configure_runtime, describe, resolve
from brats_unet.utils import BratsError

log = logging.getLogger("brats_unet.predict")


def predict(cfg: DictConfig) -> list[Path]:
    """Predict every case in scope; return the prediction files (including those a resume skipped)."""
    require(cfg, "ckpt_path", "input", "output", usage="brats-predict ckpt_path=<ckpt> input=<root|case> output=<dir>")
    log.info("runtime: %s", configure_runtime(**(cfg.get("runtime") or {})))
    device = resolve_device(str(cfg.device))
    autocast_for(device, str(cfg.precision))  # a bad precision fails before the probe runs
    choice, hw = resolve(device, str(cfg.precision), cfg.runtime.channels_last, use="infer")
    log.info(describe(choice, hw))
    # A list (an ensemble) arrives as a ListConfig; a file or sweep dir as a string.
    ckpt: Any = [str(p) for p in cfg.ckpt_path] if isinstance(cfg.ckpt_path, ListConfig) else str(cfg.ckpt_path)
    options = {"device": device, "tta": bool(cfg.tta), "postprocess": bool(cfg.postprocess),
               "precision": choice.precision, "overlap": float(cfg.overlap), "window_batch": int(cfg.window_batch),
               "channels_last": choice.channels_last, "trust_targets": trust_targets(cfg)}
    if cfg.get("oof"):
        if cfg.get("split_file") or not isinstance(ckpt, str):
            raise BratsError("oof=true predicts each fold's own split.json validation cases: pass ckpt_path=<cross-"
                             "validation sweep dir> and no split_file")
        return predict_out_of_fold(ckpt, cfg.input, cfg.output, layout=cfg.get("layout"),
                                   probabilities=bool(cfg.save_probabilities), overwrite=bool(cfg.overwrite),
                                   resume=bool(cfg.resume), **options)
    segmenter = Segmenter.from_checkpoint(ckpt, **options)
    if len(segmenter.modules) > 1:
        log.info("ensemble of %d checkpoints: %s", len(segmenter.modules), ", ".join(segmenter.names))
    only = read_split(cfg.split_file, cfg.split_subset) if cfg.get("split_file") else None
    if only == []:
        raise BratsError(f"split_file {cfg.split_file} holds no {cfg.split_subset} cases: nothing to predict (a run "
                         "with data.test_fraction=0 holds out no test set; pick split_subset=val, or another split)")
    return predict_folder(segmenter, cfg.input, cfg.output, only=only, layout=cfg.get("layout"),
                          probabilities=bool(cfg.save_probabilities), overwrite=bool(cfg.overwrite),
                          resume=bool(cfg.resume))


@hydra.main(config_path=CONFIG_PATH, config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        predict(cfg)


if __name__ == "__main__":
    main()
