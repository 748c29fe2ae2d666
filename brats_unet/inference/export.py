"""brats-export: a checkpoint, a run dir, a list of checkpoints or a sweep dir -> one model package
(inference/package.py) with a generated MODEL_CARD.md (inference/card.py), optionally ONNX graphs and a zip. A sweep or
run dir's postprocessing.json (brats-postprocess) goes into model.json as `cv_postprocessing`, so the package predicts
what brats-predict ckpt_path=<that dir> predicts.

Every member is loaded exactly as brats-predict loads it (inference.loading.load_model: the checked config, strict
weights), and its network's state_dict is written as tensors only; predicting from the package is bit-identical to
predicting from the checkpoints (tests/test_export.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from brats_unet.data.discovery import list_case_dirs, resolve_layout
from brats_unet.data.split import load_split
from brats_unet.inference.card import model_card
from brats_unet.inference.ensemble import CheckpointSpec, is_run_dir, resolve_checkpoints
from brats_unet.inference.loading import load_model
from brats_unet.inference.onnx import export_onnx
from brats_unet.inference.package import (
    FORMAT,
    MODEL_JSON,
    architecture_of,
    check_plain,
    content_hash,
    schema_json,
)
from brats_unet.inference.rules_file import RULES_FILE, sweep_postprocessing
from brats_unet.inference.segmenter import Segmenter
from brats_unet.runs import read_metrics, read_overrides
from brats_unet.training.checkpoint import load_checkpoint
from brats_unet.utils import BratsError, atomic_write_json, atomic_write_text, file_sha256

log = logging.getLogger("brats_unet.export")
FORMATS = ("safetensors", "onnx")
# Keys of a model config that describe the run, not the network's shape.
NOT_NETWORK = ("_target_", "channels_last")
# Fields of a postprocessing.json that name folders on the machine it was chosen on: not carried into a package.
LOCAL_PATHS = ("sweep", "run", "predictions", "truth")


def project_version() -> str:
    try:
        return version("brats-unet")
    except PackageNotFoundError:
        return "unknown"


def run_dir_of(ckpt: Path) -> Path | None:
    """<run>/checkpoints/x.ckpt -> <run>; None for a checkpoint outside a run folder."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def network_spec(module: nn.Module, model: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The network as data: an architecture name and plain keyword arguments (no `_target_`)."""
    args = {k: v for k, v in model.items() if k not in NOT_NETWORK}
    check_plain(args, f"{where} (model config)")
    return {"architecture": architecture_of(str(model.get("_target_"))), "in_channels": int(module.net.in_channels),
            "out_channels": int(module.net.out_channels), **args}


def run_facts(ckpt: Path) -> dict[str, Any]:
    """What the run folder says about a member: fold, split sizes, overrides, validation metrics (None when absent)."""
    run = run_dir_of(ckpt)
    facts: dict[str, Any] = {"run": run.name if run else None}
    if run is None:
        return facts
    if (run / "split.json").is_file():
        split = load_split(run / "split.json", need_train=False)
        facts.update(fold=split.get("fold"), num_folds=split.get("num_folds"),
                     cases={k: len(split[k]) for k in ("train", "val", "test")})
    if (run / ".hydra" / "overrides.yaml").is_file():
        facts["overrides"] = read_overrides(run)
    metrics = read_metrics(run)
    if metrics:
        facts["best"] = {k: v for k, v in (metrics.get("best") or {}).items() if k.startswith("val/")}
        facts["final"] = {k: v for k, v in (metrics.get("final") or {}).items() if k.startswith("val/")}
    return facts


def training_spacing(config: Mapping[str, Any], ckpt: Path, limit: int = 50) -> dict[str, Any] | None:
    """The voxel spacing (mm) of the training cases: the checkpoint's `brats_spacing` (the median the predictor
    resamples inputs to, where recorded), else the stored config's, else read from the training cases' headers."""
    recorded = load_checkpoint(ckpt).get("brats_spacing")
    if recorded:
        return {"spacing": [float(s) for s in recorded], "source": "checkpoint (brats_spacing)"}
    for section in ("preprocess", "data"):
        stored = (config.get(section) or {}).get("spacing")
        if stored:
            return {"spacing": [float(s) for s in stored], "source": f"{section}.spacing"}
    run, root = run_dir_of(ckpt), Path(str(config["data"].get("root", "")))
    if run is None or not (run / "split.json").is_file() or not root.is_dir():
        return None
    layout = resolve_layout(config["data"]["layout"])
    dirs = {d.name: d for d in list_case_dirs(root, layout)} if layout.channels else {}
    first = config["preprocess"]["modalities"][0]
    zooms = []
    for case in load_split(run / "split.json", need_train=False)["train"][:limit]:
        files = sorted((dirs.get(case) or root / case).glob(f"*{layout.suffixes.get(first, first)}.nii*"))
        if files:
            zooms.append(tuple(round(float(z), 4) for z in nib.load(files[0]).header.get_zooms()[:3]))
    if not zooms:
        return None
    values, counts = np.unique(np.array(zooms), axis=0, return_counts=True)
    return {"spacing": [float(v) for v in values[counts.argmax()]], "source": f"NIfTI headers of {len(zooms)} "
            f"training cases", "all_equal": len(values) == 1}


def carried_postprocessing(spec: CheckpointSpec, carry: bool = True) -> dict[str, Any] | None:
    """What a package of `spec` carries as `cv_postprocessing`: the rules brats-predict ckpt_path=<spec> applies, i.e.
    a sweep or run dir's postprocessing.json (checked; without its local paths, with the file's SHA-256). None for a
    dir without one, with carry=False, and for a checkpoint or a list: brats-predict applies no rules to those (a note
    says so when the checkpoint's run or sweep has them; a sweep's were chosen for its ensemble)."""
    if not carry:  # not read, so not checked either: rules left by an earlier model must not stop this export
        log.info("cv_postprocess=false: no post-processing is carried into the package")
        return None
    chosen = sweep_postprocessing(spec)
    if chosen is None:
        for ckpt in [spec] if isinstance(spec, str | Path) else spec if isinstance(spec, Sequence) else []:
            run = run_dir_of(Path(ckpt).expanduser())
            if run is not None and (run / RULES_FILE).is_file():
                log.warning("%s is not carried: brats-predict applies a run's rules only with ckpt_path=<run dir>; "
                            "export ckpt_path=%s to carry them", run / RULES_FILE, run)
                break
            if run is not None and (run.parent / RULES_FILE).is_file():
                log.warning("%s is not carried: its rules were chosen for the sweep's ensemble and brats-predict "
                            "applies them only with ckpt_path=<sweep dir>; export ckpt_path=%s to carry them",
                            run.parent / RULES_FILE, run.parent)
                break
        return None
    path, record = chosen
    return {**{k: v for k, v in record.items() if k not in LOCAL_PATHS}, "source_sha256": file_sha256(path)}


def measure_case(config: Mapping[str, Any], ckpt: Path, given: str | None) -> Path | None:
    """A case to time prediction on: the one given, else the run's first test (or validation) case."""
    if given:
        return Path(given).expanduser()
    run, root = run_dir_of(ckpt), Path(str(config["data"].get("root", "")))
    if run is None or not (run / "split.json").is_file() or not root.is_dir():
        return None
    split = load_split(run / "split.json", need_train=False)
    for case in split["test"] + split["val"]:
        if (root / case).is_dir():
            return root / case
    return None


def time_prediction(segmenter: Segmenter, case: Path) -> dict[str, Any]:
    """Seconds to predict one case (after one warm-up), with the machine's load."""
    segmenter.segment(case)
    start = time.perf_counter()
    loaded, _, _ = segmenter.segment(case)
    seconds = time.perf_counter() - start
    load = _loadavg()
    return {"seconds": round(seconds, 3), "case": case.name, "shape": list(next(iter(loaded.images.values())).shape),
            "device": str(segmenter.device), "threads": torch.get_num_threads(), "tta": segmenter.tta,
            "load_1min": load, "cpu": _cpu_name()}


def _loadavg() -> float | None:
    try:
        return round(float(Path("/proc/loadavg").read_text().split()[0]), 2)
    except (OSError, ValueError, IndexError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def export_package(spec: CheckpointSpec, output: str | Path, *, formats: Sequence[str] = ("safetensors",),
                   tta: bool = False, postprocess: bool = False, overlap: float = 0.5, window_batch: int = 2,
                   license: str = "unspecified", measure: bool = True, measure_input: str | None = None,
                   archive: bool = False, overwrite: bool = False, cv_postprocess: bool = True) -> Path:
    """Write the package of `spec` (a checkpoint, a run dir, a list, or a sweep dir) to `output`; return the folder.
    `archive`: also `<output>.zip` (config key zip). `cv_postprocess`: carry a sweep or run dir's postprocessing.json
    (carried_postprocessing); the package's predictions then apply it unless turned off there."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise BratsError(f"format {unknown} is not one of {list(FORMATS)} (safetensors weights are always written)")
    out = Path(output).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise BratsError(f"output {out} already exists and is not empty; pass overwrite=true to replace the package")
    zip_path = out.with_name(f"{out.name}.zip")
    if archive and zip_path.exists() and not overwrite:
        raise BratsError(f"{zip_path} already exists; pass overwrite=true to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = resolve_checkpoints(spec)
    carried = carried_postprocessing(spec, cv_postprocess)  # a damaged postprocessing.json stops here, as in predict
    loaded = [load_model(p) for p in paths]
    config = loaded[0][1]
    spacing = training_spacing(config, paths[0])
    resample_to = spacing["spacing"] if spacing and spacing["source"].startswith("checkpoint") else None
    # refuses members that cannot be averaged; predicts as the package will (timing for the card)
    segmenter = Segmenter([m for m, _ in loaded], [c for _, c in loaded], device="cpu", precision="fp32", tta=tta,
                          postprocess=postprocess, overlap=overlap, window_batch=window_batch,
                          names=[str(p) for p in paths], spacing=resample_to, cv_postprocessing=carried)
    recipe = dict(config["preprocess"])
    check_plain(recipe, f"{paths[0]} (preprocess config)")
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out.parent) as tmp:
        stage = Path(tmp)
        members, files = [], {}
        for i, (path, (module, cfg)) in enumerate(zip(paths, loaded, strict=True)):
            name = f"member_{i}"
            member = {"name": name, "source": _source(path, spec),
                      "patch_size": [int(p) for p in cfg["data"]["patch_size"]],
                      "network": network_spec(module, cfg["model"], str(path)),
                      "weights": f"weights/{name}.safetensors"}
            state = {k: v.detach().cpu().contiguous() for k, v in module.net.state_dict().items()}
            (stage / "weights").mkdir(exist_ok=True)
            save_file(state, str(stage / member["weights"]))
            if "onnx" in formats:
                member["onnx"] = f"onnx/{name}.onnx"
                (stage / "onnx").mkdir(exist_ok=True)
                export_onnx(module.net, stage / member["onnx"], int(module.net.in_channels), member["patch_size"])
            member["run"] = run_facts(path)
            members.append(member)
            files.update({member[k]: file_sha256(stage / member[k]) for k in ("weights", "onnx") if k in member})
        schema = segmenter.schema
        meta: dict[str, Any] = {
            "format": FORMAT,
            "name": out.name,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "versions": {"brats_unet": project_version(), "torch": torch.__version__},
            "modalities": list(recipe["modalities"]),
            "layout": config["data"]["layout"],
            "label_schema": schema_json(schema),
            "preprocessing": recipe,
            "training_spacing": spacing,
            "training_data": {"root_name": Path(str(config["data"].get("root", ""))).name or None,
                              "cases": (members[0]["run"] or {}).get("cases")},
            "activation": segmenter.module.loss.activation,
            "outputs": list(schema.class_names if segmenter.module.loss.activation == "softmax"
                            else schema.region_names),
            "ensemble": "mean of the members' probabilities (of every flip with TTA) per voxel, then decoded",
            "defaults": {"tta": bool(tta), "postprocess": bool(postprocess), "overlap": float(overlap),
                         "window_batch": int(window_batch)},
            "license": str(license),
            **({"cv_postprocessing": carried} if carried is not None else {}),  # absent: as packages without it
            "members": members,
            "files": files,
        }
        if measure and (case := measure_case(config, paths[0], measure_input)) is not None:
            meta["inference_time"] = time_prediction(segmenter, case)
        check_plain(meta, MODEL_JSON)
        meta["content_hash"] = content_hash(meta)
        atomic_write_json(stage / MODEL_JSON, meta)
        atomic_write_text(stage / "MODEL_CARD.md", model_card(meta, spec))
        _install(stage, out)
    if archive:
        with tempfile.TemporaryDirectory(prefix=".export-", dir=out.parent) as tmp:
            made = shutil.make_archive(str(Path(tmp) / out.name), "zip", root_dir=out.parent, base_dir=out.name)
            os.replace(made, zip_path)
    log.info("model package (%d member%s) -> %s", len(members), "s" if len(members) > 1 else "", out)
    return out


def _source(path: Path, spec: CheckpointSpec) -> str:
    """The member's checkpoint relative to the sweep dir it came from, or to its run's parent (absolute paths say
    nothing on another disk)."""
    if isinstance(spec, str | Path) and Path(spec).is_dir() and not is_run_dir(Path(spec).expanduser()):
        return str(path.relative_to(Path(spec).expanduser()))
    run = run_dir_of(path)
    return str(path.relative_to(run.parent)) if run else path.name


def _install(stage: Path, out: Path) -> None:
    """Move the staged files into `out`, each by an atomic rename, model.json last (it marks a complete package)."""
    out.mkdir(parents=True, exist_ok=True)
    for file in sorted(stage.rglob("*"), key=lambda p: p.name == MODEL_JSON):
        if file.is_file():
            target = out / file.relative_to(stage)
            target.parent.mkdir(parents=True, exist_ok=True)
            file.chmod(0o644)  # a shared model: readable by others (staging files may be private)
            file.replace(target)
