"""The network and the loss (the output head) a run config describes: what training wraps in the LightningModule and
what inference rebuilds from a checkpoint. Nothing here imports Lightning, so the inference commands start without
it (about 1.7 s of every brats-predict / -postprocess / -report start on a 2-core CPU)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from brats_unet.data.cases import schema_of
from brats_unet.runtime import ProbeModel, probe_input_shape


def data_schema(data: Mapping[str, Any]) -> str:
    """The name of the label schema a data config declares (data.schema), or of its layout's own (configs before
    schemas): data.cases.schema_of, the one rule. Unknown names fail naming the config key."""
    return schema_of(data["layout"], data.get("schema") or None).name


def build_loss(cfg: Mapping[str, Any]) -> nn.Module:
    """The loss config's loss on the data config's label schema: it also decodes (activation, classes, regions)."""
    return instantiate(cfg["loss"], schema=data_schema(cfg["data"]))


def plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config group as a plain dict (a DictConfig resolved), for instantiation and hashing alike."""
    return OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)


def build_network(model: Mapping[str, Any], in_channels: int, out_channels: int, channels_last: bool = False
                  ) -> nn.Module:
    """The network a model config describes, in the channels-last memory format if asked (runtime.channels_last)."""
    model = plain(model)
    return instantiate(model, in_channels=in_channels, out_channels=out_channels, channels_last=channels_last)


def probe_model(model: Mapping[str, Any], in_channels: int, out_channels: int, patch: Sequence[int], batch: int,
                device: torch.device | str) -> ProbeModel:
    """The run's own network as the channels_last probe times it (brats_unet.runtime), on `device`'s input size."""
    model = plain(model)
    shape = probe_input_shape(device, batch, in_channels, patch)
    spec = json.dumps({"model": model, "in": in_channels, "out": out_channels}, sort_keys=True, default=str)
    name = (f"{str(model.get('_target_', 'net')).rsplit('.', 1)[-1]} {hashlib.sha1(spec.encode()).hexdigest()[:10]} "
            f"{'x'.join(str(s) for s in shape)}")
    return ProbeModel(lambda cl: build_network(model, in_channels, out_channels, channels_last=cl), shape, name)
