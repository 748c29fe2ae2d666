"""brats-predict: segment BraTS cases with a trained checkpoint; one uint8 label map per case in the input's geometry.

    brats-predict ckpt_path=<run>/checkpoints/best.ckpt input=<BraTS root or one case folder> output=<dir> [tta=true]
    brats-predict ckpt_path=<run dir> ...                  the run's best.ckpt (with its postprocessing.json, if any)
    brats-predict ckpt_path='[a.ckpt,b.ckpt]' ...          an ensemble (also ckpt_path=<sweep dir>: every job's best)
    brats-predict ckpt_path=<cv sweep dir> oof=true ...    each fold's validation cases with that fold's model
    brats-predict model=<brats-export package> ... [runtime=onnx] [save_uncertainty=true]     (docs/export.md)
A sweep or run dir holding a postprocessing.json (brats-postprocess), or a package exported from one, has its rules
applied; cv_postprocess=false skips them. A checkpoint file never has.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from brats_unet.cli.common import require, trust_targets, user_errors
from brats_unet.config import CONFIG_PATH, PREDICT_OPTIONS
from brats_unet.data.split import read_split
from brats_unet.inference.cv_postprocess import chosen_on
from brats_unet.inference.folder import predict_folder, predict_out_of_fold
from brats_unet.inference.rules_file import sweep_postprocessing
from brats_unet.inference.segmenter import Segmenter
from brats_unet.runtime import configure_runtime, resolve_device
from brats_unet.utils import BratsError

log = logging.getLogger("brats_unet.predict")


# `model` and `runtime` are config groups of the shared config folder (brats-train's network, the speed knobs), so
# Hydra cannot take `model=<dir>` / `runtime=onnx` as values: the command line names them, the config holds them as
# `package` and `engine`.
ALIASES = {"model=": "package=", "runtime=": "engine="}


def predict(cfg: DictConfig) -> list[Path]:
    """Predict every case in scope; return the prediction files (including those a resume skipped)."""
    if cfg.get("package"):
        return predict_package(cfg)
    if str(cfg.get("engine") or "torch") != "torch":
        raise BratsError(f"runtime={cfg.engine} runs a model package's ONNX graphs: pass model=<brats-export folder "
                         "written with format=onnx> instead of ckpt_path")
    require(cfg, "ckpt_path", "input", "output", usage="brats-predict ckpt_path=<ckpt> input=<root|case> output=<dir> "
            "(or model=<brats-export package>)")
    log.info("runtime: %s", configure_runtime(**(cfg.get("runtime") or {})))
    # A list (an ensemble) arrives as a ListConfig; a file, run or sweep dir as a string.
    ckpt: Any = [str(p) for p in cfg.ckpt_path] if isinstance(cfg.ckpt_path, ListConfig) else str(cfg.ckpt_path)
    # The API's own option names (config.PREDICT_OPTIONS): Segmenter.from_checkpoint resolves `auto` once.
    options = {k: cfg[k] for k in PREDICT_OPTIONS} | {"channels_last": cfg.runtime.channels_last}
    options["device"] = resolve_device(str(cfg.device))  # a bad device fails before any checkpoint is read
    options["trust_targets"] = trust_targets(cfg)
    chosen = sweep_postprocessing(ckpt) if cfg.get("cv_postprocess", True) else None
    post = None
    if chosen is not None:
        path, post = chosen
        log.info("post-processing chosen on %s (%s, %s cases): %d rules, %s %.4f -> %.4f (cv_postprocess=false to "
                 "skip)", chosen_on(post), path, post.get("cases"), len(post["rules"]), post["metric"],
                 post["score_before"], post["score_after"])
    if cfg.get("oof"):
        if cfg.get("save_uncertainty"):
            raise BratsError("save_uncertainty=true is not available with oof=true (one qc.csv per model run)")
        if cfg.get("split_file") or not isinstance(ckpt, str):
            raise BratsError("oof=true predicts each fold's own split.json validation cases: pass ckpt_path=<cross-"
                             "validation sweep dir> and no split_file")
        return predict_out_of_fold(ckpt, cfg.input, cfg.output, layout=cfg.get("layout"),
                                   probabilities=bool(cfg.save_probabilities), overwrite=bool(cfg.overwrite),
                                   resume=bool(cfg.resume), postprocessing=post, **options)
    segmenter = Segmenter.from_checkpoint(ckpt, cv_postprocessing=post, cv_postprocess=post is not None, **options)
    if len(segmenter.modules) > 1:
        log.info("ensemble of %d checkpoints: %s", len(segmenter.modules), ", ".join(segmenter.names))
    return predict_cases(cfg, segmenter)


def predict_package(cfg: DictConfig) -> list[Path]:
    """brats-predict model=<package>: the package's defaults (tta, postprocess, overlap, window_batch) unless given."""
    require(cfg, "input", "output", usage="brats-predict model=<package dir> input=<root|case> output=<dir>")
    if cfg.get("oof") or (not OmegaConf.is_missing(cfg, "ckpt_path") and cfg.get("ckpt_path")):
        raise BratsError("model=<package> predicts with the package alone: drop ckpt_path / oof")
    log.info("runtime: %s", configure_runtime(**(cfg.get("runtime") or {})))
    engine = str(cfg.get("engine") or "torch")
    options = {k: cfg[k] for k in PREDICT_OPTIONS}
    options["device"] = resolve_device(str(cfg.device))
    channels_last = cfg.runtime.channels_last is True
    if engine == "onnx":  # onnxruntime's CPU session: float32 in, float32 out
        options |= {"device": resolve_device("cpu"), "precision": "fp32"}
        channels_last = False
    segmenter = Segmenter.from_package(cfg.package, runtime=engine, channels_last=channels_last,
                                       cv_postprocess=bool(cfg.get("cv_postprocess", True)), **options)
    log.info("model package %s: %d member(s), tta=%s, postprocess=%s, runtime=%s", cfg.package,
             len(segmenter.modules), segmenter.tta, segmenter.postprocess, engine)
    if (post := segmenter.cv_postprocessing) is not None:
        log.info("post-processing chosen on cross-validation, carried by the package: %d rules, %s %.4f -> %.4f "
                 "(cv_postprocess=false to skip)", len(post["rules"]), post["metric"], post["score_before"],
                 post["score_after"])
    return predict_cases(cfg, segmenter)


def predict_cases(cfg: DictConfig, segmenter: Segmenter) -> list[Path]:
    only = read_split(cfg.split_file, cfg.split_subset) if cfg.get("split_file") else None
    if only == []:
        raise BratsError(f"split_file {cfg.split_file} holds no {cfg.split_subset} cases: nothing to predict (a run "
                         "with data.test_fraction=0 holds out no test set; pick split_subset=val, or another split)")
    return predict_folder(segmenter, cfg.input, cfg.output, only=only, layout=cfg.get("layout"),
                          probabilities=bool(cfg.save_probabilities), overwrite=bool(cfg.overwrite),
                          resume=bool(cfg.resume), uncertainty=bool(cfg.get("save_uncertainty")))


def command_line(argv: list[str]) -> list[str]:
    """`model=<dir>` -> `package=<dir>`, `runtime=onnx` -> `engine=onnx` (see ALIASES)."""
    out = []
    for arg in argv:
        alias = next((a for a in ALIASES if arg.startswith(a)), None)
        out.append(ALIASES[alias] + arg[len(alias):] if alias else arg)
    return out


@hydra.main(config_path=CONFIG_PATH, config_name="predict", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    with user_errors():
        predict(cfg)


def main() -> None:
    sys.argv[1:] = command_line(sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
