"""A model package: a trained model (or ensemble) as one folder that needs no run folder, no training config and
runs no code from disk. `brats-export` writes it (inference/export.py); this module reads and checks it.

    <dir>/model.json                       what the predictor needs, as plain data (see docs/export.md)
    <dir>/weights/member_<i>.safetensors   each member's network weights: tensors only
    <dir>/onnx/member_<i>.onnx             with format=onnx: the same networks as ONNX graphs
    <dir>/MODEL_CARD.md                    for people; never read here

Trust: model.json names no `_target_` (or any Hydra `_..._` key): a network is one of ARCHITECTURES by name, built
with keyword arguments that must be plain numbers, strings and lists. Its `files` map every weight / ONNX file to its
SHA-256, and `content_hash` is the SHA-256 of model.json's canonical JSON without that field (which includes those
file digests): a changed byte anywhere the predictor reads is refused before anything is built. That includes
`cv_postprocessing`, the rules chosen on a sweep's out-of-fold predictions (brats-postprocess) when the package was
exported from a sweep that has them; they are checked like a postprocessing.json before anything is predicted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from brats_unet.data.discovery import resolve_layout
from brats_unet.data.labels import LabelSchema, resolve_schema
from brats_unet.data.preprocess import Recipe
from brats_unet.inference.loading import TrainedModel
from brats_unet.inference.onnx import OnnxNetwork
from brats_unet.inference.postprocess import check_record
from brats_unet.models.resenc import ResEncUNet
from brats_unet.models.unet2d import UNet2D
from brats_unet.models.unet3d import UNet3D
from brats_unet.training.losses import CrossEntropyLoss, RegionDiceBCELoss
from brats_unet.training.targets import is_trusted
from brats_unet.utils import BratsError, file_sha256

FORMAT = 1
MODEL_JSON = "model.json"
# The networks a package may name; a new architecture is added here (by name, never as an import path in the file).
ARCHITECTURES: dict[str, type[nn.Module]] = {"unet3d": UNet3D, "unet2d": UNet2D, "resenc": ResEncUNet}
# Only the head's activation matters at prediction (probabilities and decoding), not the loss that trained it.
HEADS: dict[str, type[nn.Module]] = {"softmax": CrossEntropyLoss, "sigmoid": RegionDiceBCELoss}
RUNTIMES = ("torch", "onnx")


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def architecture_of(target: str) -> str:
    """The package name of a model config's `_target_` (BratsError for a network a package cannot carry)."""
    for name, cls in ARCHITECTURES.items():
        if class_path(cls) == target:
            return name
    raise BratsError(f"model._target_ {target} is not a network a model package can carry (known: "
                     f"{', '.join(class_path(c) for c in ARCHITECTURES.values())}); add it to "
                     "brats_unet.inference.package.ARCHITECTURES")


# ---- trust ---------------------------------------------------------------------------------------------------------
def check_plain(node: Any, where: str, path: str = "") -> None:
    """BratsError unless `node` is JSON data with no Hydra special key (`_target_`, `_partial_`, `_args_`, ...)."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            key_path = f"{path}.{key}" if path else str(key)
            if str(key).startswith("_") and str(key).endswith("_"):
                raise BratsError(f"{where}: key {key_path} = {value!r} is refused: a model package holds data only, "
                                 "never a `_target_` or other instantiation key (it would let a shared file run code)")
            check_plain(value, where, key_path)
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            check_plain(value, where, f"{path}[{i}]")
    elif isinstance(node, str) and "${" in node:
        raise BratsError(f"{where}: {path} holds an interpolation ({node[:80]!r}); a model package holds plain values")
    elif not (node is None or isinstance(node, bool | int | float | str)):
        raise BratsError(f"{where}: {path} holds a {type(node).__name__}; a model package holds JSON data only")


def content_hash(meta: Mapping[str, Any]) -> str:
    """SHA-256 of model.json's canonical JSON (sorted keys, no spaces) without `content_hash` itself."""
    body = {k: v for k, v in meta.items() if k != "content_hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _inside(package: Path, relative: str) -> Path:
    path = (package / relative).resolve()
    if package.resolve() not in path.parents:
        raise BratsError(f"{package / MODEL_JSON}: file {relative!r} points outside the package")
    return path


def read_package(package: str | Path) -> dict[str, Any]:
    """model.json, checked: format, data only, every listed file's SHA-256 and the content hash."""
    package = Path(package).expanduser()
    path = package / MODEL_JSON
    if not path.is_file():
        hint = (" (a zip: unzip it and pass the folder)" if package.suffix == ".zip" else
                " (a checkpoint? use ckpt_path=)" if package.is_file() else "")
        raise BratsError(f"model={package} is not a model package: it has no {MODEL_JSON}{hint}; write one with "
                         "brats-export ckpt_path=<checkpoint> output=<dir>")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BratsError(f"{path} is not readable JSON ({e}): the package is damaged") from e
    if not isinstance(meta, dict):
        raise BratsError(f"{path}: expected a JSON object")
    check_plain(meta, str(path))
    if meta.get("format") != FORMAT:
        raise BratsError(f"{path}: package format {meta.get('format')!r}, this version reads format {FORMAT}")
    stored = meta.get("content_hash")
    if stored != content_hash(meta):
        raise BratsError(f"{path}: content hash mismatch (stored {stored}, computed {content_hash(meta)}): model.json "
                         "was changed after export; refusing the package")
    for relative, digest in (meta.get("files") or {}).items():
        file = _inside(package, relative)
        if not file.is_file():
            raise BratsError(f"model package {package} lacks {relative}, listed in its {MODEL_JSON}")
        if file_sha256(file) != digest:
            raise BratsError(f"model package {package}: {relative} does not match the SHA-256 in {MODEL_JSON} (the "
                             "file was changed or damaged after export); refusing the package")
    if "cv_postprocessing" in meta:  # absent: exported from no sweep, or from one without postprocessing.json
        check_record(meta["cv_postprocessing"], f"{path}: cv_postprocessing")
    return meta


# ---- building the members ------------------------------------------------------------------------------------------
def check_schema(meta: Mapping[str, Any], where: str) -> LabelSchema:
    """The package's label schema by name, and the labels/regions it lists must be that schema's (no silent drift)."""
    stored = meta["label_schema"]
    try:
        schema = resolve_schema(stored["name"])
    except ValueError as e:
        raise BratsError(f"{where}: {e}") from e
    if schema_json(schema) != stored:
        raise BratsError(f"{where}: label schema {schema.name} here is {schema_json(schema)}, the package was made "
                         f"with {stored}")
    return schema


def schema_json(schema: LabelSchema) -> dict[str, Any]:
    return {"name": schema.name, "labels": {str(v): n for v, n in schema.labels},
            "regions": {r: list(cs) for r, cs in schema.regions}}


def member_config(meta: Mapping[str, Any], member: Mapping[str, Any]) -> dict[str, Any]:
    """What Segmenter reads of a run config, rebuilt from model.json: layout, schema, patch size, preprocessing."""
    return {"data": {"layout": meta["layout"], "schema": meta["label_schema"]["name"],
                     "patch_size": list(member["patch_size"])},
            "preprocess": dict(meta["preprocessing"])}


def build_network(spec: Mapping[str, Any], where: str, channels_last: bool = False) -> nn.Module:
    """One of ARCHITECTURES from its name and plain keyword arguments."""
    spec = dict(spec)
    name = spec.pop("architecture", None)
    if name not in ARCHITECTURES or not is_trusted(class_path(ARCHITECTURES[name])):  # the allowlist, as for configs
        raise BratsError(f"{where}: network architecture {name!r} is not one of {sorted(ARCHITECTURES)}")
    try:
        return ARCHITECTURES[name](**spec, channels_last=channels_last)
    except (TypeError, ValueError) as e:
        raise BratsError(f"{where}: cannot build network {name} from {spec}: {e}") from e


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise BratsError(f"{path}: not a readable safetensors file ({e})") from e


def load_members(package: str | Path, runtime: str = "torch", channels_last: bool = False
                 ) -> tuple[dict[str, Any], list[TrainedModel], list[dict[str, Any]], list[str]]:
    """(model.json, modules in eval mode, their configs, their names) of a checked package.

    runtime=onnx wraps each member's ONNX graph (onnxruntime) in the same module, so preprocessing, sliding window,
    TTA, ensembling and decoding are the torch path's own.
    """
    package = Path(package).expanduser()
    if runtime not in RUNTIMES:
        raise BratsError(f"runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
    meta = read_package(package)
    where = str(package / MODEL_JSON)
    schema = check_schema(meta, where)
    resolve_layout(meta["layout"])
    head_cls = HEADS.get(meta["activation"])
    if head_cls is None:
        raise BratsError(f"{where}: activation {meta['activation']!r} is not one of {sorted(HEADS)}")
    in_channels = Recipe.from_config(meta["preprocessing"]).num_channels
    modules, configs, names = [], [], []
    for i, member in enumerate(meta["members"]):
        head = head_cls(schema=schema)
        if runtime == "onnx":
            if "onnx" not in member:
                raise BratsError(f"{where}: member {i} has no ONNX graph; export with format=onnx for runtime=onnx")
            net: nn.Module = OnnxNetwork(_inside(package, member["onnx"]))
        else:
            net = build_network(member["network"], f"{where} members[{i}]", channels_last=channels_last)
            if getattr(net, "in_channels", in_channels) != in_channels:
                raise BratsError(f"{where}: member {i} takes {net.in_channels} channels but the preprocessing makes "
                                 f"{in_channels}")
            try:
                net.load_state_dict(load_weights(_inside(package, member["weights"])), strict=True)
            except RuntimeError as e:
                raise BratsError(f"{where}: member {i}'s weights do not fit its network: {e}") from e
        module = TrainedModel(net, head)
        modules.append(module.eval())
        configs.append(member_config(meta, member))
        names.append(f"{package.name}:{member['name']}")
    return meta, modules, configs, names


def package_options(meta: Mapping[str, Any], **given: Any) -> dict[str, Any]:
    """The package's TTA / post-processing / window defaults, with the values the user gave (not None) on top."""
    defaults = dict(meta.get("defaults") or {})
    return {k: v if v is not None else defaults.get(k) for k, v in given.items()}


def names_of(members: Sequence[Mapping[str, Any]]) -> list[str]:
    return [str(m["name"]) for m in members]
