"""Where the Hydra configs live, and composing them from Python (a notebook's `brats-train key=value ...`)."""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

# Hydra entry points read their YAML from the package, so installed scripts work from any directory.
CONFIG_MODULE = "brats_unet.conf"
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"
CONFIG_NAMES = ("train", "predict", "evaluate", "preprocess", "stats", "report", "export", "postprocess")
# The prediction settings the Python API shares with brats-predict: conf/predict.yaml (+ runtime/default.yaml's
# channels_last) is their one home, so `Segmenter.from_checkpoint(ckpt).predict(case)` runs what the command runs.
PREDICT_OPTIONS = ("device", "precision", "tta", "postprocess", "overlap", "window_batch")


# What predict.yaml's null means for a checkpoint (a model package has its own defaults: inference/package.py).
CHECKPOINT_DEFAULTS = {"tta": False, "postprocess": False, "overlap": 0.5, "window_batch": 2}


def predict_defaults() -> dict[str, Any]:
    """brats-predict's defaults for PREDICT_OPTIONS and channels_last, read from the shipped YAML (null: a
    checkpoint's default, CHECKPOINT_DEFAULTS)."""
    root = importlib.resources.files(CONFIG_MODULE)
    predict = OmegaConf.create((root / "predict.yaml").read_text())
    runtime = OmegaConf.create((root / "runtime" / "default.yaml").read_text())
    values = {k: CHECKPOINT_DEFAULTS[k] if predict[k] is None else predict[k] for k in PREDICT_OPTIONS}
    return {**values, "channels_last": runtime.channels_last}


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """The config `brats-<config_name> <overrides...>` would run with, without Hydra's own node.

    `paths.output_dir` (the run dir, which Hydra creates for a command) becomes the run dir the command would use
    unless an override sets it, so `brats_unet.train(compose([...]))` writes where `brats-train ...` would.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if config_name not in CONFIG_NAMES:
        raise ValueError(f"config_name must be one of {list(CONFIG_NAMES)}, got {config_name!r}")
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    run_dir = str(cfg.hydra.run.dir)  # resolves ${now:...} once, as a command does
    with open_dict(cfg):
        del cfg["hydra"]
        for key in ("paths.output_dir", "output"):
            node, _, leaf = key.rpartition(".")
            parent = OmegaConf.select(cfg, node) if node else cfg
            if parent is not None and leaf in parent and "hydra:runtime.output_dir" in str(
                    OmegaConf.to_container(parent, resolve=False).get(leaf)):
                parent[leaf] = run_dir
    return cfg
