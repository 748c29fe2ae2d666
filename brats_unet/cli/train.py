"""brats-train: fit a U-Net from a Hydra config; resume with `ckpt_path=last` in the same run dir."""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.plugins import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from brats_unet.cli.common import CONFIG_PATH, user_errors
from brats_unet.module import BratsModule
from brats_unet.perf import configure_runtime
from brats_unet.utils import BratsError, atomic_path, atomic_write_json
from brats_unet.validation import check_patch_fits, validate_train_config

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


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load with a clear message for truncated or foreign files."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError... for a damaged file
        raise BratsError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); is it truncated?") from e


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save, but into a temp file renamed over the target: a kill during a save (preemption)
    leaves the previous last.ckpt intact instead of a truncated one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote filesystems (s3://...) keep Lightning's own write
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def resume_candidates(output_dir: Path) -> list[Path]:
    """last.ckpt (end of each epoch) and the periodic step checkpoints of a run dir, newest first."""
    folder = output_dir / "checkpoints"
    periodic = [p for p in (folder / "periodic").glob("*.ckpt") if not p.name.startswith(".")]  # not temp files
    found = [p for p in (folder / "last.ckpt", *periodic) if p.is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> tuple[str | None, dict[str, Any] | None]:
    """(path, loaded checkpoint) to resume from, or (None, None) for a fresh run.

    `last` -> the newest readable checkpoint of the run dir (last.ckpt, or a newer periodic one from inside a long
    epoch); a damaged newest file (a kill during torch.save) falls back to the one before it. A path must exist.
    """
    if ckpt_path is None:
        return None, None
    if str(ckpt_path) != "last":
        if not Path(ckpt_path).is_file():
            raise BratsError(f"ckpt_path {ckpt_path} does not exist (pass ckpt_path=last to resume this run dir)")
        return str(ckpt_path), load_checkpoint(ckpt_path)
    candidates = resume_candidates(output_dir)
    if not candidates:
        log.info("ckpt_path=last but %s holds no checkpoint yet: starting a fresh run", output_dir / "checkpoints")
        return None, None
    first_error = None
    for path in candidates:
        try:
            return str(path), load_checkpoint(path)
        except BratsError as e:
            log.warning("skipping %s", e)
            first_error = first_error or e
    raise BratsError(f"ckpt_path=last: no checkpoint in {output_dir / 'checkpoints'} can be read: {first_error}")


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


def weight_mismatches(state: dict[str, Any], module: BratsModule) -> tuple[dict[str, Any], list[str]]:
    """(state with compiled-net `_orig_mod.` prefixes removed, list of keys/shapes that do not fit `module`)."""
    state = {k.replace("._orig_mod.", "."): v for k, v in state.items()}
    own = module.state_dict()
    problems = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems += [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    return state, problems


def check_weights_fit(checkpoint: dict[str, Any], module: BratsModule, path: str, changed: list[str]) -> None:
    """BratsError when a checkpoint's weights do not fit the module this config builds (a different model config)."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise BratsError(f"checkpoint {path} has no 'state_dict': it was not written by brats-train")
    _, problems = weight_mismatches(state, module)
    if problems:
        keys = [k for k in changed if k.startswith(("model.", "loss.", "preprocess.", "data."))]
        hint = f" (changed config keys: {', '.join(keys)})" if keys else ""
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise BratsError(f"checkpoint {path} was written by a different model config{hint}; its weights do not fit "
                         f"this model: {'; '.join(problems[:3])}{more}. Resume with the run's own config, or start a "
                         "new run dir")


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


def user_instantiate(key: str, build: Callable[[], Any]) -> Any:
    """Run `build` (Hydra instantiation); a bad config value becomes a BratsError naming the config group.

    Hydra wraps whatever the constructor raised in an InstantiationException; a BratsError inside is passed on as is.
    """
    try:
        return build()
    except InstantiationException as e:
        if isinstance(e.__cause__, BratsError):
            raise e.__cause__ from None
        cause = e.__cause__ or e
        raise BratsError(f"config {key}: {type(cause).__name__}: {cause}") from e
    except (ValueError, TypeError) as e:
        raise BratsError(f"config {key}: {type(e).__name__}: {e}") from e


def existing_metrics(output_dir: Path) -> dict[str, Any] | None:
    path = output_dir / "metrics.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and optionally test) as the config says; write metrics.json; return the final metrics."""
    validate_train_config(cfg)  # seconds, not minutes: before the cache, the model or a worker exists
    check_patch_fits(cfg)
    L.seed_everything(cfg.seed, workers=True)
    log.info("runtime: %s", configure_runtime(**(cfg.get("runtime") or {})))
    output_dir = Path(cfg.paths.output_dir)
    config = run_config(cfg)
    ckpt_path, checkpoint = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    changed: list[str] = []
    if checkpoint is not None:
        log.info("resuming from %s (epoch %s, step %s)", ckpt_path, checkpoint.get("epoch"),
                 checkpoint.get("global_step"))
        changed = warn_config_changes(checkpoint, config, ckpt_path)

    datamodule = user_instantiate("data", lambda: instantiate(cfg.data, output_dir=str(output_dir), seed=cfg.seed,
                                                              _recursive_=False))
    module = user_instantiate("model/loss/optimizer/scheduler",
                              lambda: build_module(cfg, datamodule.num_channels, config))
    if checkpoint is not None:
        check_weights_fit(checkpoint, module, ckpt_path, changed)
        del checkpoint  # Lightning loads it again; don't hold two copies of the weights and optimiser state
    try:  # only now, so a config or checkpoint problem leaves no empty run dir behind
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BratsError(f"cannot create the run dir {output_dir} (paths.output_dir): {e.strerror}") from e
    callbacks = user_instantiate("callbacks", lambda: instantiate_all(cfg.get("callbacks")))
    loggers = user_instantiate("logger", lambda: instantiate_all(cfg.get("logger")))
    if not loggers:  # logger=none: the LR monitor has nowhere to write and Lightning refuses it
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    plugins = {} if cfg.trainer.get("plugins") else {"plugins": [AtomicCheckpointIO()]}
    trainer: L.Trainer = user_instantiate("trainer", lambda: instantiate(cfg.trainer, callbacks=callbacks,
                                                                         logger=loggers or False, **plugins))

    log.info("run dir: %s", output_dir)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except FloatingPointError as e:  # module.nonfinite_loss=stop: a user-facing stop, not a crash
        raise BratsError(str(e)) from e
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    previous = existing_metrics(output_dir)
    if ckpt_path and not metrics and previous is not None:
        # Resuming a run that had already finished: fit did nothing, so keep its metrics.json rather than
        # overwriting it with empty metrics.
        log.info("%s: the run was already complete (epoch %d, step %d); kept its metrics.json", ckpt_path,
                 trainer.current_epoch, trainer.global_step)
        return dict(previous.get("final") or {})

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
            if "metrics" in inspect.signature(logger.log_hyperparams).parameters:  # CSVLogger takes no metrics
                logger.log_hyperparams(hparams, metrics={k: v for k, v in metrics.items() if k.startswith("val/")})
            else:
                logger.log_hyperparams(hparams)
    return metrics


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        metrics = train(cfg)
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
