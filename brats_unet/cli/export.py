"""brats-export: a checkpoint, a list of them or a sweep dir -> one model package (brats_unet.inference.export).

    brats-export ckpt_path=<run>/checkpoints/best.ckpt output=<dir> [format=onnx] [zip=true] [tta=true]
    brats-predict model=<dir> input=<cases> output=<predictions> [runtime=onnx]
A sweep dir's postprocessing.json (brats-postprocess) is carried into the package and applied by brats-predict
model=<dir> (cv_postprocess=false, here or there, leaves it out / off).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig

from brats_unet.cli.common import require, user_errors
from brats_unet.config import CONFIG_PATH
from brats_unet.inference.export import export_package
from brats_unet.inference.package import MODEL_JSON


def export(cfg: DictConfig) -> Path:
    require(cfg, "ckpt_path", "output", usage="brats-export ckpt_path=<ckpt | '[a,b]' | sweep dir> output=<dir>")
    ckpt: Any = [str(p) for p in cfg.ckpt_path] if isinstance(cfg.ckpt_path, ListConfig) else str(cfg.ckpt_path)
    formats = ["safetensors"] + ([] if str(cfg.format) == "safetensors" else [str(cfg.format)])
    out = export_package(ckpt, cfg.output, formats=formats, tta=bool(cfg.tta), postprocess=bool(cfg.postprocess),
                         overlap=float(cfg.overlap), window_batch=int(cfg.window_batch), license=str(cfg.license),
                         measure=bool(cfg.measure), measure_input=cfg.get("measure_input"), archive=bool(cfg.zip),
                         overwrite=bool(cfg.overwrite), cv_postprocess=bool(cfg.get("cv_postprocess", True)))
    print(f"model package written to {out}" + (f" (and {out}.zip)" if cfg.zip else ""))
    if "cv_postprocessing" in (meta := json.loads((out / MODEL_JSON).read_text())):
        post = meta["cv_postprocessing"]
        print(f"carries the sweep's post-processing: {len(post['rules'])} rules, {post['metric']} "
              f"{post['score_before']:.4f} -> {post['score_after']:.4f} on out-of-fold cases")
    return out


@hydra.main(config_path=CONFIG_PATH, config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        export(cfg)


if __name__ == "__main__":
    main()
