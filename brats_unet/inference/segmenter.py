"""A trained checkpoint as a segmenter you can call from Python: `Segmenter.from_checkpoint(path).predict(case)`.

The checkpoint carries its training config (`brats_config`): it rebuilds the network and says how to preprocess, so a
prediction always matches what the model was trained on. Windows are blended as logits (as whole-volume validation
does), so without TTA the labels equal what validation scored; with TTA the 8 flips are averaged as probabilities.
Several checkpoints (a list or a sweep dir) make an ensemble: their probabilities (every flip of every model) are
averaged before decoding, with one running sum per case.

The stages live beside this facade: loading.py (checkpoint -> network + recipe), inputs.py (what a user passes ->
checked Case), probabilities.py (sliding window, TTA, ensemble mean), decoding.py (probabilities -> labels -> NIfTI);
device and precision are brats_unet.runtime's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from brats_unet.config import PREDICT_OPTIONS, predict_defaults
from brats_unet.data.cases import Case
from brats_unet.data.discovery import resolve_layout
from brats_unet.data.labels import LabelSchema, Layout
from brats_unet.data.preprocess import Recipe, undo_crop
from brats_unet.inference.decoding import decode, label_image, output_schema, postprocess, uncrop_probabilities
from brats_unet.inference.ensemble import CheckpointSpec, check_compatible, resolve_checkpoints
from brats_unet.inference.inputs import CaseInput, load_input
from brats_unet.inference.loading import StoredModel, build_model, inference_probe, read_checkpoint
from brats_unet.inference.package import load_members, package_options
from brats_unet.inference.postprocess import apply_record, check_record
from brats_unet.inference.probabilities import mean_probabilities
from brats_unet.inference.resampling import resample, resampled_shape
from brats_unet.inference.rules_file import sweep_postprocessing
from brats_unet.runtime import (
    auto_precision,
    autocast,
    check_channels_last,
    check_precision,
    describe,
    detect,
    resolve,
    resolve_device,
)
from brats_unet.utils import BratsError

log = logging.getLogger("brats_unet.predict")


_warned_no_spacing: list[bool] = []


def _mm(spacing: Sequence[float] | None) -> str:
    return "x".join(f"{v:g}" for v in spacing or ())


def training_spacing(stored: Sequence[StoredModel]) -> list[float] | None:
    """The voxel size the members were trained at (the first's; a warning where members differ by more than the
    tolerance). None, said once, for checkpoints that do not record it: inputs are then not resampled."""
    spacing = stored[0].spacing
    if spacing is None:
        if _warned_no_spacing:  # once per process: out-of-fold prediction loads a checkpoint per fold
            return None
        _warned_no_spacing.append(True)
        log.warning("%s records no training voxel size (written before brats-unet recorded it): every input is "
                    "predicted at its own voxel size, without resampling; retrain, or check inputs match the "
                    "training data's spacing", stored[0].path)
        return None
    for other in stored[1:]:
        if other.spacing is None or resampled_shape((100, 100, 100), other.spacing, spacing) is not None:
            log.warning("ensemble members were trained at different voxel sizes (%s: %s mm, %s: %s mm); inputs are "
                        "resampled to the first's", stored[0].path, _mm(spacing), other.path, _mm(other.spacing))
    return spacing


def _options(**given: Any) -> dict[str, Any]:
    """The options given, the rest brats-predict's defaults (the one home: conf/predict.yaml)."""
    unknown = sorted(set(given) - {*PREDICT_OPTIONS, "channels_last"})
    if unknown:
        raise BratsError(f"unknown prediction options {unknown}: use {[*PREDICT_OPTIONS, 'channels_last']}")
    defaults = predict_defaults()
    keys = [*PREDICT_OPTIONS, "channels_last"] if "channels_last" in given else PREDICT_OPTIONS
    return {k: defaults[k] if given.get(k) is None else given[k] for k in keys}


class Segmenter:
    """Predict BraTS label maps and probabilities with a trained checkpoint, in each input's own geometry.

    >>> seg = Segmenter.from_checkpoint("outputs/demo/train/checkpoints/best.ckpt", tta=True)
    >>> img = seg.predict("data/synthetic/BraTS2021_00000")      # nibabel image, uint8, the dataset's labels
    >>> ensemble = Segmenter.from_checkpoint(["fold0/best.ckpt", "fold1/best.ckpt"])  # or a sweep dir
    """

    def __init__(self, module: nn.Module | Sequence[nn.Module], config: Mapping[str, Any] | Sequence[Mapping],
                 *, device: str | torch.device | None = None, tta: bool | None = None,
                 postprocess: bool | None = None, precision: str | None = None, overlap: float | None = None,
                 window_batch: int | None = None, names: Sequence[str] | None = None,
                 spacing: Sequence[float] | None = None, cv_postprocessing: Mapping[str, Any] | None = None) -> None:
        """One model and its run config, or equal-length lists of them (an ensemble; `names` for its errors). A model
        is a trained BratsModule or an inference.loading.TrainedModel: a module whose `loss` decodes its outputs.
        An option left None takes brats-predict's default (conf/predict.yaml). `spacing`: the training voxel size
        (mm) to resample inputs to (None: predict every input at its own voxel size). `cv_postprocessing`: rules
        chosen on cross-validation (a postprocessing.json's record, rules_file.read_postprocessing), applied to
        every label map after decoding (and after `postprocess`)."""
        opts = _options(device=device, tta=tta, postprocess=postprocess, precision=precision, overlap=overlap,
                        window_batch=window_batch)
        modules = [module] if isinstance(module, nn.Module) else list(module)
        configs = [dict(config)] if isinstance(config, Mapping) else [dict(c) for c in config]
        if not modules or len(modules) != len(configs):
            raise BratsError(f"a Segmenter needs one config per model, got {len(modules)} models, {len(configs)} "
                             "configs")
        names = list(names) if names is not None else [f"model {i}" for i in range(len(modules))]
        check_compatible(names, configs, [m.loss.activation for m in modules])
        self.device = resolve_device(opts["device"])
        check_precision(opts["precision"])
        # `auto` arrives resolved from from_checkpoint; a Segmenter built by hand resolves it here, by the same rule
        self.precision = auto_precision(detect(self.device))[0] if opts["precision"] == "auto" else opts["precision"]
        self._autocast = autocast(self.device, self.precision)
        self.modules = [m.to(self.device).eval() for m in modules]
        self.module = self.modules[0]  # the decoding head, shared by every member
        self.configs, self.names = configs, names
        self._config = configs[0]
        self.tta, self.postprocess = bool(opts["tta"]), bool(opts["postprocess"])
        self.overlap, self.window_batch = float(opts["overlap"]), int(opts["window_batch"])
        self.spacing = None if spacing is None else tuple(float(v) for v in spacing)
        self.cv_postprocessing = None if cv_postprocessing is None else check_record(cv_postprocessing,
                                                                                     "cv_postprocessing")
        self.channels_last: bool | None = None  # the memory format from_checkpoint chose (None: as the modules are)
        self.package: dict[str, Any] | None = None  # model.json, for a Segmenter.from_package
        self.package_files: list[tuple[str, str]] = []  # (file, SHA-256) of each member, for a package

    @classmethod
    def from_checkpoint(cls, path: CheckpointSpec, device: str | torch.device | None = None, tta: bool | None = None,
                        postprocess: bool | None = None, precision: str | None = None,
                        channels_last: bool | str | None = None, trust_targets: Sequence[str] = (),
                        cv_postprocessing: Mapping[str, Any] | None = None, cv_postprocess: bool = True,
                        **window: Any) -> Segmenter:
        """Rebuild the model of a brats-train checkpoint (best.ckpt / last.ckpt), or an ensemble of several: a list
        of checkpoints or a sweep dir (each job's checkpoints/best.ckpt); `window`: overlap, window_batch.

        Every option left None is brats-predict's default (conf/predict.yaml, runtime/default.yaml): device auto,
        precision auto, channels_last auto, ... so the API predicts what the command predicts. `auto` is resolved
        here once (brats_unet.runtime.resolve), the memory format probed with the checkpoint's own network.
        `trust_targets`: your own `_target_`s a checkpoint may name (docs/trust.md). A sweep or run dir's
        postprocessing.json (brats-postprocess) is applied as brats-predict ckpt_path=<dir> applies it, unless
        `cv_postprocess=False`; `cv_postprocessing`: a rules record to apply instead (a checkpoint file or list has
        none of its own)."""
        if not cv_postprocess:
            cv_postprocessing = None
        elif cv_postprocessing is None and (found := sweep_postprocessing(path)) is not None:
            cv_postprocessing = found[1]
        opts = _options(device=device, tta=tta, postprocess=postprocess, precision=precision,
                        channels_last=channels_last, **window)
        check_precision(opts["precision"])
        check_channels_last(opts["channels_last"])
        device = resolve_device(opts["device"])  # before loading: a bad device is a quick error
        paths = resolve_checkpoints(path)
        stored = [read_checkpoint(p, trust_targets) for p in paths]
        probe = inference_probe(stored[0], int(opts["window_batch"]), device) \
            if opts["channels_last"] == "auto" else None
        choice, hw = resolve(device, opts["precision"], opts["channels_last"], use="infer", model=probe)
        log.info(describe(choice, hw))
        models = [build_model(s, channels_last=choice.channels_last) for s in stored]
        spacing = training_spacing(stored)
        del stored
        opts.update(device=device, precision=choice.precision)
        del opts["channels_last"]
        segmenter = cls([m for m, _ in models], [c for _, c in models], names=[str(p) for p in paths],
                        spacing=spacing, cv_postprocessing=cv_postprocessing, **opts)
        segmenter.channels_last = choice.channels_last
        return segmenter

    @classmethod
    def from_package(cls, path: str | Path, device: str | torch.device | None = None, tta: bool | None = None,
                     postprocess: bool | None = None, precision: str | None = None, channels_last: bool = False,
                     runtime: str = "torch", overlap: float | None = None, window_batch: int | None = None,
                     cv_postprocess: bool = True) -> Segmenter:
        """A brats-export model package (its hash and contents checked first); tta, postprocess, overlap and
        window_batch default to the package's. runtime=onnx runs its ONNX graphs with onnxruntime. Inputs are
        resampled to the training spacing the checkpoint recorded, as from_checkpoint does. A package exported
        from a sweep with a postprocessing.json carries its rules: applied unless cv_postprocess=False."""
        meta, modules, configs, names = load_members(path, runtime=runtime, channels_last=bool(channels_last))
        options = package_options(meta, tta=tta, postprocess=postprocess, overlap=overlap, window_batch=window_batch)
        recorded = meta.get("training_spacing") or {}
        spacing = recorded.get("spacing") if str(recorded.get("source", "")).startswith("checkpoint") else None
        carried = meta.get("cv_postprocessing") if cv_postprocess else None
        segmenter = cls(modules, configs, device=device, precision=precision, names=names, spacing=spacing,
                        cv_postprocessing=carried, **options)
        segmenter.package = meta
        key = "onnx" if runtime == "onnx" else "weights"  # the files this runtime reads, for prediction.json
        segmenter.package_files = [(str(Path(path).expanduser() / m[key]), meta["files"][m[key]])
                                   for m in meta["members"]]
        return segmenter

    @property
    def config(self) -> dict[str, Any]:
        """The run config the checkpoint was trained with (resolved, plain dicts)."""
        return self._config

    @property
    def layout(self) -> Layout:
        """The file naming and label values of the training data (predictions use the input's own)."""
        return resolve_layout(self._config["data"]["layout"])

    @property
    def schema(self) -> LabelSchema:
        """The label schema the model was trained on: its classes, regions and label values."""
        return self.module.loss.schema

    @property
    def modalities(self) -> list[str]:
        """The input modalities the model needs, in canonical names (t1, t1ce, t2, flair)."""
        return list(self._config["preprocess"]["modalities"])

    def segment(self, case: CaseInput, layout: str | Layout | None = None, probabilities: bool = False
                ) -> tuple[Case, np.ndarray, np.ndarray | None]:
        """(the loaded case, labels in its geometry and labels, probabilities (K, *S) or None)."""
        loaded, x, meta = self.prepare(case, layout)
        probs = mean_probabilities(self.modules, self.configs, x, overlap=self.overlap,
                                   window_batch=self.window_batch, tta=self.tta, device=self.device,
                                   autocast=self._autocast)
        return self.finish(loaded, probs, meta, probabilities)

    def prepare(self, case: CaseInput, layout: str | Layout | None = None) -> tuple[Case, np.ndarray, dict[str, Any]]:
        """(the loaded case, its preprocessed (C, *S) volume, meta: the recipe's crop box and shape, the case's own
        shape and the grid it was resampled to (None: read as it is))."""
        loaded = load_input(case, self.modalities, resolve_layout(layout) if layout else self.layout)
        own = next(iter(loaded.images.values())).shape
        grid = resampled_shape(own, loaded.spacing, self.spacing)  # None: the model reads the case as it is
        images = loaded.images if grid is None else {m: resample(v, grid) for m, v in loaded.images.items()}
        if grid is not None:
            log.info("%s: resampled from %s mm %s to the training spacing %s mm %s", loaded.name,
                     _mm(loaded.spacing), own, _mm(self.spacing), grid)
        x, _, meta = Recipe.from_config(self._config["preprocess"]).apply(images, None, self.schema)
        return loaded, x, {**meta, "input_shape": own, "grid": grid}

    def finish(self, loaded: Case, probs: np.ndarray, meta: dict[str, Any], probabilities: bool = False
               ) -> tuple[Case, np.ndarray, np.ndarray | None]:
        """Mean probabilities on the model's crop -> labels (and probabilities) in the case's own geometry."""
        schema, activation = self.schema, self.module.loss.activation
        box, shape = meta["crop_box"], meta["original_shape"]
        full = None
        if meta["grid"] is None:
            classes, et_prob = decode(probs, activation, schema)
            # Outside the crop is background: the model never saw it (the seed's fixed crop, modern's nonzero box).
            classes = undo_crop(classes, box, shape, fill=0)
            et_prob = None if et_prob is None else undo_crop(et_prob, box, shape, fill=0)
            if probabilities:
                full = uncrop_probabilities(probs, box, shape, activation)
        else:  # the probabilities back on the input's own grid, decoded there (nnU-Net's order)
            full = resample(uncrop_probabilities(probs, box, shape, activation), meta["input_shape"])
            classes, et_prob = decode(full, activation, schema)
        if self.postprocess:
            classes = postprocess(classes, et_prob, schema)
        written = output_schema(schema, loaded.layout)
        labels = written.from_classes(classes)
        if self.cv_postprocessing is not None:  # rules on the written labels, regions looked up by name
            labels = apply_record(labels, self.cv_postprocessing, written.name)
        return loaded, labels, full if probabilities else None

    def to_input_grid(self, volume: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
        """A (*S) map on the model's crop -> the case's own geometry: 0 outside the crop, resampled back if the case
        was resampled to the training spacing."""
        full = undo_crop(volume, meta["crop_box"], meta["original_shape"], fill=0)
        return full if meta["grid"] is None else resample(full, meta["input_shape"])

    def predict(self, case: CaseInput, layout: str | Layout | None = None) -> nib.Nifti1Image:
        """uint8 label map in the dataset's own labels (the model's schema; ET 4 for 2021 names, 3 for 2023), the
        input's shape, affine and header. `layout` says which naming an in-memory case has (default: the training
        data's)."""
        loaded, labels, _ = self.segment(case, layout)
        return label_image(labels, loaded)

    def predict_proba(self, case: CaseInput, layout: str | Layout | None = None) -> np.ndarray:
        """float32 (K, *S) in the input's geometry: softmax classes (background, ncr, ed, et) or sigmoid regions
        (wt, tc, et), whichever head the model has. Outside the model's crop: background 1, the rest 0."""
        _, _, probs = self.segment(case, layout, probabilities=True)
        assert probs is not None
        return probs.astype(np.float32, copy=False)
