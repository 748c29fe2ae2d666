"""brats-train: fit a U-Net from a Hydra config; resume with `ckpt_path=last` in the same run dir."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from brats_unet.cli.common import CONFIG_PATH, user_errors
from brats_unet.module import BratsModule
from brats_unet.utils import BratsError, atomic_write_json

log = logging.getLogger("brats_unet.train")

# Keys that legitimately differ between an interrupted run and its resumption.
RESUME_IGNORED_KEYS = ("ckpt_path", "paths.output_dir", "hydra")


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without Hydra's own node: what a checkpoint stores and a resume compares."""
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """`last` -> <run dir>/checkpoints/last.ckpt when it exists (else start fresh); a path must exist."""
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "last":
        last = output_dir / "checkpoints" / "last.ckpt"
        if last.exists():
            return str(last)
        log.info("ckpt_path=last but %s does not exist yet: starting a fresh run", last)
        return None
    if not Path(ckpt_path).is_file():
        raise BratsError(f"ckpt_path {ckpt_path} does not exist (pass ckpt_path=last to resume this run dir)")
    return str(ckpt_path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load with a clear message for truncated or foreign files."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError... for a damaged file
        raise BratsError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); is it truncated?") from e


def warn_config_changes(checkpoint: dict[str, Any], current: dict[str, Any], path: str) -> list[str]:
    """Log which config keys differ between the checkpoint's run and this one; return them."""
    saved = checkpoint.get("brats_config")
    if not saved:
        return []
    old, new = flatten(saved), flatten(current)
    changed = sorted(
        k for k in set(old) | set(new) if old.get(k) != new.get(k) and not k.startswith(RESUME_IGNORED_KEYS)
    )
    for key in changed:
        log.warning("resuming %s with a changed config: %s: %r -> %r", path, key, old.get(key), new.get(key))
    return changed


def build_module(cfg: DictConfig, in_channels: int, config: dict[str, Any] | None = None) -> BratsModule:
    """Instantiate loss, network and optimiser partials from the config groups and wrap them in the module."""
    loss = instantiate(cfg.loss)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    compile_net = bool(model_cfg.pop("compile", False))
    net = instantiate(model_cfg, in_channels=in_channels, out_channels=loss.num_outputs)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    return BratsModule(
        net=net,
        loss=loss,
        optimizer=instantiate(cfg.optimizer),
        scheduler=scheduler,
        patch_size=[int(p) for p in cfg.data.patch_size],
        compile=compile_net,
        config=config,
        **OmegaConf.to_container(cfg.module, resolve=True),
    )


def instantiate_all(group: DictConfig | None) -> list[Any]:
    return [instantiate(c) for c in (group or {}).values() if isinstance(c, DictConfig) and "_target_" in c]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and optionally test) as the config says; write metrics.json; return the final metrics."""
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = run_config(cfg)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    if ckpt_path:
        warn_config_changes(load_checkpoint(ckpt_path), config, ckpt_path)

    datamodule = instantiate(cfg.data, output_dir=str(output_dir), seed=cfg.seed, _recursive_=False)
    module = build_module(cfg, datamodule.num_channels, config)
    callbacks, loggers = instantiate_all(cfg.get("callbacks")), instantiate_all(cfg.get("logger"))
    if not loggers:  # logger=none: the LR monitor has nowhere to write and Lightning refuses it
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    log.info("run dir: %s", output_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}

    checkpoint_cb = trainer.checkpoint_callback
    best_path = getattr(checkpoint_cb, "best_model_path", "") or None
    if cfg.get("test") and best_path:
        trainer.test(module, datamodule=datamodule, ckpt_path=best_path)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})

    best_score = getattr(checkpoint_cb, "best_model_score", None)
    summary = {
        "final": metrics,
        "best": {"val/dice_mean": float(best_score) if best_score is not None else None, "checkpoint": best_path},
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
    }
    if trainer.is_global_zero and not trainer.fast_dev_run:
        atomic_write_json(output_dir / "metrics.json", summary)
        for logger in trainer.loggers:  # the TensorBoard hparams tab: every config value beside the final metrics
            hparams = {k: str(v) if isinstance(v, list | tuple) else v for k, v in flatten(config).items()}
            logger.log_hyperparams(hparams, metrics={k: v for k, v in metrics.items() if k.startswith("val/")})
    return metrics


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        metrics = train(cfg)
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
