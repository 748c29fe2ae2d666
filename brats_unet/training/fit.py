"""Fit a U-Net from a composed config: the library side of brats-train (`brats_unet.train(cfg)`)."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from brats_unet.data.preprocess import Recipe
from brats_unet.runs import NEVER_VALIDATED, read_metrics, run_checkpoints, validated
from brats_unet.runtime import ProbeModel, configure_runtime, resolve_training, run_device
from brats_unet.training.build import (
    build_datamodule,
    build_module,
    build_trainer,
    user_instantiate,
)
from brats_unet.training.checkpoint import check_weights_fit, flatten, resolve_ckpt_path, warn_config_changes
from brats_unet.training.network import build_loss, probe_model
from brats_unet.training.preflight import check_values, preflight
from brats_unet.utils import BratsError, atomic_write_json, atomic_write_text

log = logging.getLogger("brats_unet.training")


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without Hydra's own node: what a checkpoint stores and a resume compares."""
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


def log_hparams(trainer: L.Trainer, config: dict[str, Any], metrics: dict[str, float]) -> None:
    """The TensorBoard hparams tab: every config value beside the final validation metrics."""
    hparams = {k: str(v) if isinstance(v, list | tuple) else v for k, v in flatten(config).items()}
    for logger in trainer.loggers:
        if "metrics" in inspect.signature(logger.log_hyperparams).parameters:  # CSVLogger takes no metrics
            logger.log_hyperparams(hparams, metrics={k: v for k, v in metrics.items() if k.startswith("val/")})
        else:
            logger.log_hyperparams(hparams)


def run_probe_model(cfg: DictConfig, device: Any) -> ProbeModel:
    """This run's network, input channels, patch and batch for the channels_last probe."""
    in_channels = Recipe.from_config(cfg.preprocess).num_channels
    loss = user_instantiate("loss", lambda: build_loss(cfg))
    return probe_model(cfg.model, in_channels, loss.num_outputs, cfg.data.patch_size, cfg.data.batch_size, device)


def resolve_auto(cfg: DictConfig) -> None:
    """trainer.precision / runtime.channels_last `auto` -> this machine's fastest setting, written into cfg."""
    precision, runtime = cfg.trainer.get("precision", "32-true"), cfg.get("runtime") or {}
    channels_last = runtime.get("channels_last", False)
    if precision != "auto" and channels_last != "auto":
        return
    try:
        device = run_device(cfg.trainer.get("accelerator", "auto"), cfg.trainer.get("devices", "auto"))
        probe = run_probe_model(cfg, device) if channels_last == "auto" else None
        precision, channels_last, line = resolve_training(cfg.trainer.get("accelerator", "auto"), precision,
                                                          channels_last, model=probe, device=device)
    except (RuntimeError, AssertionError) as e:  # accelerator=gpu without CUDA: Lightning words it for the user
        log.warning("could not detect the hardware for auto (%s); auto means 32-true, contiguous", e)
        precision = "32-true" if precision == "auto" else precision
        channels_last, line = channels_last is True, ""
    with open_dict(cfg):
        cfg.trainer.precision = precision
        if "runtime" in cfg:
            cfg.runtime.channels_last = channels_last
    if line:
        log.info(line)


def check_fresh_run_dir(output_dir: Path, ckpt_path: str | None, overwrite: bool, dir_key: str = "hydra.run.dir"
                        ) -> None:
    """BratsError when a fit that starts afresh would write over the checkpoints a run dir already holds."""
    found = run_checkpoints(output_dir)
    if not found:
        return
    if overwrite:
        log.warning("overwrite=true: a fresh run in %s replaces its checkpoints (%s)", output_dir,
                    ", ".join(p.name for p in found))
        return
    how = "ckpt_path=last found none it could resume" if ckpt_path else "no ckpt_path was given"
    raise BratsError(f"{output_dir} already holds checkpoints ({', '.join(str(p) for p in found[:3])}) and this run "
                     f"would start afresh ({how}): resume it with ckpt_path=last, start a new run dir (omit "
                     f"{dir_key}, or name a new one), or pass overwrite=true to replace them")


def record_config(output_dir: Path, config: dict[str, Any]) -> None:
    """A run started from Python (not brats-train) gets the `.hydra/config.yaml` that Hydra writes for a command, so
    brats-report and the sweep tools read both alike (Figure 1 rebuilds the network from it)."""
    path = output_dir / ".hydra" / "config.yaml"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(config)))


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and optionally test) as the config says; write metrics.json; return the final metrics."""
    check_values(cfg)  # seconds, not minutes: before the cache, the model or a worker exists
    L.seed_everything(cfg.seed, workers=True)
    log.info("runtime: %s", configure_runtime(**(cfg.get("runtime") or {})))
    resolve_auto(cfg)  # before run_config: the checkpoint records what ran, not `auto`
    output_dir = Path(cfg.paths.output_dir)
    config = run_config(cfg)
    ckpt_path, checkpoint = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    changed: list[str] = []
    if checkpoint is not None:
        log.info("resuming from %s (epoch %s, step %s)", ckpt_path, checkpoint.get("epoch"),
                 checkpoint.get("global_step"))
        changed = warn_config_changes(checkpoint, config, ckpt_path)

    if checkpoint is None:
        check_fresh_run_dir(output_dir, cfg.get("ckpt_path"), bool(cfg.get("overwrite")))
    elif (cfg.get("scheduler") and cfg.scheduler.get("total_steps") is None
          and {"trainer.max_epochs", "trainer.max_steps"} & set(changed)):
        log.warning("the fit's length changed and scheduler.total_steps is not set: the LR schedule spans the whole "
                    "fit, so from here it follows a different curve than the run started with (set "
                    "scheduler.total_steps to plan a run in legs)")

    datamodule = build_datamodule(cfg, str(output_dir))
    datamodule.fresh_run = checkpoint is None
    module = user_instantiate("model/loss/optimizer/scheduler",
                              lambda: build_module(cfg, datamodule.num_channels, config))
    preflight(cfg, module.net)
    if checkpoint is not None:
        check_weights_fit(checkpoint, module, ckpt_path, changed)
        del checkpoint  # Lightning loads it again; don't hold two copies of the weights and optimiser state
    try:  # only now, so a config or checkpoint problem leaves no empty run dir behind
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BratsError(f"cannot create the run dir {output_dir} (paths.output_dir): {e.strerror}") from e
    record_config(output_dir, config)
    trainer = build_trainer(cfg)

    log.info("run dir: %s", output_dir)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except FloatingPointError as e:  # module.nonfinite_loss=stop: a user-facing stop, not a crash
        raise BratsError(str(e)) from e
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    previous = read_metrics(output_dir)
    if ckpt_path and not metrics and previous is not None:
        # Resuming a run that had already finished: fit did nothing, so keep its metrics.json rather than
        # overwriting it with empty metrics.
        log.info("%s: the run was already complete (epoch %d, step %d); kept its metrics.json", ckpt_path,
                 trainer.current_epoch, trainer.global_step)
        if not validated(previous):
            log.warning("%s: this run %s", output_dir, NEVER_VALIDATED)
        return dict(previous.get("final") or {})

    checkpoint_cb = trainer.checkpoint_callback
    best_path = getattr(checkpoint_cb, "best_model_path", "") or None
    if cfg.get("test") and best_path:
        trainer.test(module, datamodule=datamodule, ckpt_path=best_path, weights_only=True)
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
        log_hparams(trainer, config, metrics)
        log_best_checkpoint(trainer, best_path)
        if not validated(summary):
            log.warning("%s: this run %s", output_dir, NEVER_VALIDATED)
    return metrics


def log_best_checkpoint(trainer: L.Trainer, best_path: str | None) -> None:
    """MLflow: the best checkpoint as an artefact (checkpoints/best.ckpt). Lightning's own log_model uploads only the
    files of the checkpoint callback that saved last, which with our two callbacks is last.ckpt."""
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger) and best_path:
            logger.experiment.log_artifact(logger.run_id, best_path, artifact_path="checkpoints")
