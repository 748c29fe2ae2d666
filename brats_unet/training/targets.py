"""Which `_target_`s a stored config may name: a checkpoint's `brats_config`, a run folder's `.hydra/config.yaml`.

Hydra's `instantiate` imports and calls whatever a `_target_` names, nested ones included, so a shared file whose
config says `{_target_: pathlib.Path.write_text, ...}` would run it on load. Before anything from a stored config is
built, `check_targets` walks it and accepts only what this project's own `conf/` uses (tests/test_trust.py composes
every conf file against this list) plus the names a user trusts explicitly (`trust_targets=[mypkg.MyNet]`, or
`mypkg.*` for a whole package). A config the user composes on their own command line is theirs and is not checked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from brats_unet.utils import BratsError

# Every `_target_` in conf/ (outside the `hydra` node, which is never stored), by its full dotted name.
PROJECT_TARGETS = frozenset({
    "brats_unet.data.datamodule.BratsDataModule",
    "brats_unet.models.resenc.ResEncUNet",
    "brats_unet.models.unet2d.UNet2D",
    "brats_unet.models.unet3d.UNet3D",
    "brats_unet.training.losses.CombinedLoss",
    "brats_unet.training.losses.CrossEntropyLoss",
    "brats_unet.training.losses.DiceLoss",
    "brats_unet.training.losses.RegionDiceBCELoss",
    "brats_unet.training.schedulers.constant",
    "brats_unet.training.schedulers.step_decay",
    "brats_unet.training.schedulers.warmup_cosine",
    "lightning.pytorch.Trainer",
    "lightning.pytorch.callbacks.LearningRateMonitor",
    "lightning.pytorch.callbacks.ModelCheckpoint",
    "lightning.pytorch.callbacks.RichModelSummary",
    "lightning.pytorch.callbacks.RichProgressBar",
    "lightning.pytorch.loggers.CSVLogger",
    "lightning.pytorch.loggers.MLFlowLogger",
    "lightning.pytorch.loggers.TensorBoardLogger",
})
# torch's own optimisers (optimizer._target_=torch.optim.SGD is a plain command-line choice): constructors that take
# parameters and numbers, nothing else.
TORCH_OPTIMIZERS = frozenset(f"torch.optim.{name}" for name, value in vars(torch.optim).items()
                             if isinstance(value, type) and issubclass(value, torch.optim.Optimizer))
ALLOWED_TARGETS = PROJECT_TARGETS | TORCH_OPTIMIZERS


class UntrustedTarget(BratsError):
    """A stored config names a `_target_` that is neither the project's own nor trusted by the user."""


def is_trusted(target: str, allow: Iterable[str] = ()) -> bool:
    """True for the project's own targets and those the user names: exactly, or `package.*` for all below it."""
    if target in ALLOWED_TARGETS:
        return True
    return any(target == name or (name.endswith(".*") and target.startswith(name[:-1])) for name in allow)


def _walk(node: Any, path: str) -> Iterable[tuple[str, Any]]:
    """(key path, value) of every key and list item at any depth: `loss`, `loss.weight`, `loss.weight._target_`."""
    items = (node.items() if isinstance(node, Mapping) else
             enumerate(node) if isinstance(node, Sequence) and not isinstance(node, str | bytes) else ())
    for key, value in items:
        child = f"{path}.{key}" if path else str(key)
        yield child, value
        yield from _walk(value, child)


def check_targets(config: Any, source: str | Path, allow: Iterable[str] = ()) -> Any:
    """The stored `config` as plain data, once every `_target_` in it (at any depth) is the project's own or named in
    `allow`; BratsError naming `source` (the file), the key path and the target otherwise.

    Build from the returned value: it is exactly what was checked. A DictConfig is resolved first; plain data must not
    hold `${...}` (an interpolation, resolved by instantiate, could build a node this walk never saw)."""
    allow = [str(a) for a in allow]
    if isinstance(config, DictConfig | ListConfig):
        try:
            config = OmegaConf.to_container(config, resolve=True)
        except OmegaConfBaseException as e:
            raise UntrustedTarget(f"{source}: its stored config cannot be resolved ({e})") from None
    hint = ("this project's configs never name it; if you trust the file's author and the code it names, pass "
            "trust_targets=[<target>] (or trust_targets=[<package>.*])")
    for path, value in _walk(config, ""):
        if isinstance(value, str) and "${" in value:
            raise UntrustedTarget(f"{source}: {path} holds an interpolation ({value[:80]!r}); a stored config is plain "
                             "values, so it was not loaded")
        target = path == "_target_" or path.endswith("._target_")
        if target and not (isinstance(value, str) and is_trusted(value, allow)):
            raise UntrustedTarget(f"{source}: {path} names {value!r}, which is not allowed to be built from a stored "
                                  f"config: {hint}. Nothing from the file was run")
    return config
