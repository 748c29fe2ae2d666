"""Instantiate the parts of a run from a composed config: network + loss + optimiser (the module), the DataModule,
callbacks, loggers and the Trainer. A bad config value becomes a BratsError naming its config group."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import lightning.pytorch as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.plugins import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from brats_unet.training.module import BratsModule
from brats_unet.training.network import build_loss, build_network
from brats_unet.utils import BratsError, atomic_path


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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save, but into a temp file renamed over the target (a kill during a save leaves the previous
    last.ckpt intact), and Lightning's own resume loads with the safe unpickler."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote filesystems (s3://...) keep Lightning's own write
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        # Lightning passes no map_location: torch.load would then put every tensor on the device it was saved from
        # (rank 0's cuda:0 for every DDP rank). The CPU is always there; Lightning moves weights and optimiser
        # state to each rank's own device as it loads them.
        return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=True)


def build_module(cfg: DictConfig, in_channels: int, config: dict[str, Any] | None = None) -> BratsModule:
    """Instantiate loss, network and optimiser partials from the config groups and wrap them in the module."""
    loss = build_loss(cfg)
    runtime = cfg.get("runtime") or {}
    # `auto` is resolved for the device by train()/brats-predict before this; a bare build (a notebook, a test) that
    # still holds it keeps the standard memory format, which every device runs.
    net = build_network(cfg.model, in_channels, loss.num_outputs, channels_last=runtime.get("channels_last") is True)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    return BratsModule(
        net=net,
        loss=loss,
        optimizer=instantiate(cfg.optimizer),
        scheduler=scheduler,
        patch_size=[int(p) for p in cfg.data.patch_size],
        compile=bool(runtime.get("compile")),
        config=config,
        **OmegaConf.to_container(cfg.module, resolve=True),
    )


def build_datamodule(cfg: DictConfig, output_dir: str) -> L.LightningDataModule:
    return user_instantiate("data", lambda: instantiate(cfg.data, output_dir=output_dir, seed=cfg.seed,
                                                        _recursive_=False))


def instantiate_all(group: DictConfig | None) -> list[Any]:
    return [instantiate(c) for c in (group or {}).values() if isinstance(c, DictConfig) and "_target_" in c]


# Loggers whose package is an optional extra: (the target's class name, the module it needs, the extra).
OPTIONAL_LOGGERS = {"MLFlowLogger": ("mlflow", "mlflow")}


def check_logger_packages(group: DictConfig | None) -> None:
    """BratsError naming the extra to install for a logger whose package is missing (before any training starts)."""
    for name, node in (group or {}).items():
        target = str(node.get("_target_", "")) if isinstance(node, DictConfig) else ""
        needs = OPTIONAL_LOGGERS.get(target.rpartition(".")[2])
        if needs and importlib.util.find_spec(needs[0]) is None:
            raise BratsError(f"logger {name} ({target}) needs the `{needs[0]}` package, which is not installed: "
                             f"pip install -e '.[{needs[1]}]' (or choose logger=tensorboard)")


def build_trainer(cfg: DictConfig) -> L.Trainer:
    """Callbacks, loggers and the Trainer; checkpoints are written atomically and read back with the safe unpickler."""
    check_logger_packages(cfg.get("logger"))
    callbacks = user_instantiate("callbacks", lambda: instantiate_all(cfg.get("callbacks")))
    loggers = user_instantiate("logger", lambda: instantiate_all(cfg.get("logger")))
    if not loggers:  # logger=none: the LR monitor has nowhere to write and Lightning refuses it
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    plugins = {} if cfg.trainer.get("plugins") else {"plugins": [AtomicCheckpointIO()]}
    # runtime.cudnn_benchmark (applied by perf.configure_runtime) is the one home of the autotuner switch; Lightning
    # would otherwise turn it off because deterministic="warn".
    return user_instantiate("trainer", lambda: instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                                           benchmark=torch.backends.cudnn.benchmark, **plugins))
