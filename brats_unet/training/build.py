"""Instantiate the parts of a run from a composed config: network + loss + optimiser (the module), the DataModule,
callbacks, loggers and the Trainer. A bad config value becomes a BratsError naming its config group."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf
from torch import nn

from brats_unet.data.cases import schema_of
from brats_unet.runtime import ProbeModel, probe_input_shape
from brats_unet.training.checkpoint import AtomicCheckpointIO
from brats_unet.training.module import BratsModule
from brats_unet.utils import BratsError


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


def data_schema(data: Mapping[str, Any]) -> str:
    """The name of the label schema a data config declares (data.schema), or of its layout's own (configs before
    schemas): data.cases.schema_of, the one rule. Unknown names fail naming the config key."""
    return schema_of(data["layout"], data.get("schema") or None).name


def build_network(model: Mapping[str, Any], in_channels: int, out_channels: int, channels_last: bool = False
                  ) -> nn.Module:
    """The network a model config describes, in the channels-last memory format if asked (runtime.channels_last)."""
    model = OmegaConf.to_container(model, resolve=True) if isinstance(model, DictConfig) else dict(model)
    return instantiate(model, in_channels=in_channels, out_channels=out_channels, channels_last=channels_last)


def probe_model(model: Mapping[str, Any], in_channels: int, out_channels: int, patch: Sequence[int], batch: int,
                device: torch.device | str) -> ProbeModel:
    """The run's own network as the channels_last probe times it (brats_unet.runtime), on `device`'s input size."""
    model = OmegaConf.to_container(model, resolve=True) if isinstance(model, DictConfig) else dict(model)
    shape = probe_input_shape(device, batch, in_channels, patch)
    spec = json.dumps({"model": model, "in": in_channels, "out": out_channels}, sort_keys=True, default=str)
    name = (f"{str(model.get('_target_', 'net')).rsplit('.', 1)[-1]} {hashlib.sha1(spec.encode()).hexdigest()[:10]} "
            f"{'x'.join(str(s) for s in shape)}")
    return ProbeModel(lambda cl: build_network(model, in_channels, out_channels, channels_last=cl), shape, name)


def build_module(cfg: DictConfig, in_channels: int, config: dict[str, Any] | None = None) -> BratsModule:
    """Instantiate loss, network and optimiser partials from the config groups and wrap them in the module."""
    loss = instantiate(cfg.loss, schema=data_schema(cfg.data))
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
