"""A brats-train checkpoint -> its network in eval mode and the run config it was trained with (the recipe: data,
preprocessing, patch size, labels). Nothing here predicts; the Segmenter (segmenter.py) does. Nothing here imports
Lightning either: the network and its loss are rebuilt from the stored config (training.network), not the module."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from torch import nn

from brats_unet.data.preprocess import Recipe
from brats_unet.runtime import ProbeModel
from brats_unet.training.checkpoint import load_checkpoint, upgrade_config, weight_mismatches
from brats_unet.training.network import build_loss, build_network, probe_model
from brats_unet.training.targets import check_targets
from brats_unet.utils import BratsError


class TrainedModel(nn.Module):
    """A trained network and its loss, which decodes the network's outputs (activation, label schema, classes): what
    inference needs of the LightningModule (training.module), with the same `net.` / `loss.` state dict entries."""

    def __init__(self, net: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.net, self.loss = net, loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class StoredModel:
    """A checkpoint read and checked, before its network is built: the path, the weights and the upgraded config."""

    path: Path
    state_dict: dict[str, Any]
    config: DictConfig
    spacing: list[float] | None = None  # the training cases' median voxel size (mm); None: not recorded (older)

    @property
    def in_channels(self) -> int:
        return Recipe.from_config(self.config.preprocess).num_channels


def read_checkpoint(ckpt_path: str | Path, trust_targets: Sequence[str] = ()) -> StoredModel:
    """Load a brats-train checkpoint safely and upgrade its stored config to the current keys. Its `_target_`s must be
    the project's own or named in `trust_targets` (training.targets.check_targets)."""
    path = Path(ckpt_path).expanduser()
    checkpoint = load_checkpoint(path)
    config = checkpoint.get("brats_config")
    if not config or "state_dict" not in checkpoint:
        raise BratsError(f"{path} is not a brats-unet checkpoint: it lacks the 'brats_config' or 'state_dict' that "
                         "brats-train writes")
    absent = [k for k in ("data", "preprocess", "model", "loss", "optimizer") if k not in config]
    if absent:
        raise BratsError(f"checkpoint {path}: its stored config lacks {absent}; was it written by another version?")
    spacing = checkpoint.get("brats_spacing")
    if spacing is not None and (len(spacing) != 3 or not all(isinstance(v, int | float) and v > 0 for v in spacing)):
        raise BratsError(f"checkpoint {path}: brats_spacing must be 3 positive voxel sizes in mm, got {spacing!r}")
    return StoredModel(path, checkpoint["state_dict"],
                       OmegaConf.create(check_targets(upgrade_config(config), path, trust_targets)),
                       None if spacing is None else [float(v) for v in spacing])


# The LightningModule's own buffers besides the network and loss (training.module): training's, not inference's.
TRAINING_STATE = frozenset({"best_val_dice", "skipped_batches"})


def build_model(stored: StoredModel, channels_last: bool = False) -> tuple[TrainedModel, dict[str, Any]]:
    """Rebuild the network and loss from the checkpoint's own config, load their weights strictly (only the module's
    TRAINING_STATE is left out; any other entry is reported, not ignored): (model in eval mode, config)."""
    cfg, path = copy.deepcopy(stored.config), stored.path
    cfg.runtime.compile = False  # a one-off inference pass does not repay compilation
    cfg.runtime.channels_last = bool(channels_last)
    try:
        loss = build_loss(cfg)
        net = build_network(cfg.model, stored.in_channels, loss.num_outputs, channels_last=bool(channels_last))
    except (InstantiationException, ValueError, TypeError) as e:
        raise BratsError(f"checkpoint {path}: cannot rebuild the model from its stored config: {e}") from e
    module = TrainedModel(net, loss)
    weights = {k: v for k, v in stored.state_dict.items() if k not in TRAINING_STATE}
    state, problems = weight_mismatches(weights, module)
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise BratsError(f"checkpoint {path}: its weights do not fit the model its stored config describes (the model "
                         f"config differs from the one that wrote them): {'; '.join(problems[:5])}{more}")
    module.load_state_dict(state, strict=True)
    return module.eval(), OmegaConf.to_container(cfg, resolve=True)


def load_model(ckpt_path: str | Path, channels_last: bool = False, trust_targets: Sequence[str] = ()
               ) -> tuple[TrainedModel, dict[str, Any]]:
    """read_checkpoint + build_model: (module in eval mode, config)."""
    return build_model(read_checkpoint(ckpt_path, trust_targets), channels_last)


def inference_probe(stored: StoredModel, window_batch: int, device: torch.device) -> ProbeModel:
    """The checkpoint's own network, at its patch size and the window batch, for the channels_last probe."""
    loss = build_loss(stored.config)
    return probe_model(stored.config.model, stored.in_channels, loss.num_outputs, stored.config.data.patch_size,
                       window_batch, device)
