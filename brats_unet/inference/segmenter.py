"""A trained checkpoint as a segmenter you can call from Python: `Segmenter.from_checkpoint(path).predict(case)`.

The checkpoint carries its training config (`brats_config`): it rebuilds the network and says how to preprocess, so a
prediction always matches what the model was trained on. Windows are blended as logits (as whole-volume validation
does), so without TTA the labels equal what validation scored; with TTA the 8 flips are averaged as probabilities.
Several checkpoints (a list or a sweep dir) make an ensemble: their probabilities (every flip of every model) are
averaged before decoding, with one running sum per case.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from brats_unet.data.cases import Case, load_nifti, load_validated_case
from brats_unet.data.discovery import EXTENSIONS, CaseFiles, detect_case_files, resolve_layout
from brats_unet.data.labels import LAYOUTS, MODALITIES, SCHEMAS, LabelSchema, Layout, compatible
from brats_unet.data.preprocess import Recipe, undo_crop
from brats_unet.inference.ensemble import CheckpointSpec, check_compatible, resolve_checkpoints
from brats_unet.models.sliding_window import flip_tta, postprocess_et, sliding_window
from brats_unet.runtime import auto_precision, detect
from brats_unet.training.build import build_module
from brats_unet.training.checkpoint import load_checkpoint, upgrade_config, weight_mismatches
from brats_unet.training.module import BratsModule
from brats_unet.training.targets import check_targets
from brats_unet.utils import BratsError

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
# A case: a case folder, {modality: NIfTI path}, or {modality: (array, 4x4 affine)}.
CaseInput = str | Path | Mapping[str, Any]


# ---- model ---------------------------------------------------------------------------------------------------------
def load_model(ckpt_path: str | Path, channels_last: bool = False, trust_targets: Sequence[str] = ()
               ) -> tuple[BratsModule, dict[str, Any]]:
    """Rebuild the module from the checkpoint's own config, load its weights strictly: (module in eval mode, config).
    Its `_target_`s must be the project's own or named in `trust_targets` (training.targets.check_targets)."""
    path = Path(ckpt_path).expanduser()
    checkpoint = load_checkpoint(path)
    config = checkpoint.get("brats_config")
    if not config or "state_dict" not in checkpoint:
        raise BratsError(f"{path} is not a brats-unet checkpoint: it lacks the 'brats_config' or 'state_dict' that "
                         "brats-train writes")
    absent = [k for k in ("data", "preprocess", "model", "loss", "optimizer") if k not in config]
    if absent:
        raise BratsError(f"checkpoint {path}: its stored config lacks {absent}; was it written by another version?")
    cfg = OmegaConf.create(check_targets(upgrade_config(config), path, trust_targets))
    cfg.runtime.compile = False  # a one-off inference pass does not repay compilation
    cfg.runtime.channels_last = bool(channels_last)
    try:
        module = build_module(cfg, in_channels=Recipe.from_config(cfg.preprocess).num_channels)
    except (InstantiationException, ValueError, TypeError) as e:
        raise BratsError(f"checkpoint {path}: cannot rebuild the model from its stored config: {e}") from e
    state, problems = weight_mismatches(checkpoint["state_dict"], module)
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise BratsError(f"checkpoint {path}: its weights do not fit the model its stored config describes (the model "
                         f"config differs from the one that wrote them): {'; '.join(problems[:5])}{more}")
    module.load_state_dict(state, strict=True)
    return module.eval(), OmegaConf.to_container(cfg, resolve=True)


def resolve_device(name: str | torch.device) -> torch.device:
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise BratsError(f"device {name!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BratsError(f"device={name} but CUDA is not available here; use device=cpu")
    return device


def autocast_for(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    if precision not in PRECISIONS:
        raise BratsError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "auto":  # bf16 where the hardware runs it natively, fp16 on older GPUs, else fp32
        precision = auto_precision(detect(device))[0]
    if precision == "fp32":
        return contextlib.nullcontext
    if precision == "fp16" and device.type != "cuda":
        raise BratsError("precision=fp16 needs a CUDA device; use precision=bf16 or fp32 on CPU")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return lambda: torch.autocast(device.type, dtype=dtype)


def predict_probabilities(module: BratsModule, x: np.ndarray, patch_size: Sequence[int], *, overlap: float,
                          window_batch: int, tta: bool, device: torch.device,
                          autocast: Callable[[], contextlib.AbstractContextManager]) -> np.ndarray:
    """(C, *S) preprocessed volume -> (K, *S) float32 probabilities (softmax classes or sigmoid regions)."""
    def predictor(batch: torch.Tensor) -> torch.Tensor:
        with autocast():
            return module(batch).float()

    to_probabilities = module.loss.probabilities
    with torch.inference_mode():
        image = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None].to(device)
        if tta:
            probs = flip_tta(image, predictor, patch_size, overlap=overlap, window_batch=window_batch,
                             activation=to_probabilities)
        else:
            probs = to_probabilities(sliding_window(image, predictor, patch_size, overlap=overlap,
                                                    window_batch=window_batch))
    return probs[0].float().cpu().numpy()


def decode(probs: np.ndarray, activation: str, schema: LabelSchema = SCHEMAS["brats2021"]
           ) -> tuple[np.ndarray, np.ndarray | None]:
    """(internal classes uint8, ET probability or None without an ET) from softmax class or sigmoid region
    probabilities of `schema`."""
    if activation == "sigmoid":
        et = schema.region_names.index("et") if "et" in schema.region_names else None
        return schema.classes_from_regions(probs > 0.5), None if et is None else probs[et]
    et = schema.class_index("et")
    return probs.argmax(0).astype(np.uint8), None if et is None else probs[et]


def output_schema(model: LabelSchema, layout: Layout) -> LabelSchema:
    """The labels to write: the input layout's own when it has the model's classes (a brats2021 model on 2023-named
    files writes ET as 3, as those files do), else the model's."""
    return layout.label_schema if compatible(layout.label_schema, model) else model


def postprocess(classes: np.ndarray, et_prob: np.ndarray | None, schema: LabelSchema) -> np.ndarray:
    """NVIDIA's small-ET rule with the schema's classes: unconvincing ET becomes the necrotic/non-enhancing core."""
    et = schema.class_index("et")
    core = next((schema.class_index(n) for n in ("ncr", "netc") if n in schema.class_names), None)
    if et is None or core is None:
        raise BratsError(f"postprocess=true relabels small enhancing tumour as necrosis, but label schema "
                         f"{schema.name} has no et/ncr classes ({list(schema.class_names)}): use postprocess=false")
    return postprocess_et(classes, et_prob, et_class=et, core_class=core)


# ---- cases ---------------------------------------------------------------------------------------------------------
def _canonical(key: str) -> str:
    """t1/t1ce/t2/flair, or a release's own name for one (t1n, t1c, t2w, t2f)."""
    if key in MODALITIES:
        return key
    for layout in LAYOUTS.values():
        for canonical, suffix in layout.suffixes.items():
            if suffix == key and canonical in MODALITIES:
                return canonical
    raise BratsError(f"unknown modality {key!r}: use {list(MODALITIES)} (or a release's names, e.g. t1n, t1c, t2w, "
                     "t2f)")


def load_input(case: CaseInput, modalities: Sequence[str], layout: Layout) -> Case:
    """A case folder, {modality: path} or {modality: (array, affine)} -> Case, checked as preprocessing checks."""
    if isinstance(case, str | Path):
        files, found = detect_case_files(case, modalities, layout)
        files = CaseFiles(files.case, files.images, None)  # the label map, if any, is not read to predict
        images, _, meta = load_validated_case(files, found, modalities)  # NaN/shape/affine checks
        header = nib.load(files.images[modalities[0]]).header
        return Case(files.case, images, np.asarray(meta["affine"]), header, found)
    if not isinstance(case, Mapping):
        raise BratsError(f"a case is a folder, a {{modality: path}} or a {{modality: (array, affine)}} mapping, got "
                         f"{type(case).__name__}")
    given = {_canonical(str(k)): v for k, v in case.items()}
    missing = [m for m in modalities if m not in given]
    if missing:
        raise BratsError(f"the model needs modalities {list(modalities)}; the case lacks {missing}")
    images, affines, header = {}, {}, None
    for m in modalities:
        value = given[m]
        if isinstance(value, str | Path):
            data, affine, hdr = load_nifti(value)
            header = header or hdr
        elif isinstance(value, Sequence) and len(value) == 2:
            data, affine = np.asarray(value[0]), np.asarray(value[1], dtype=np.float64)
            if affine.shape != (4, 4):
                raise BratsError(f"{m}: the affine must be a 4x4 matrix, got shape {affine.shape}")
        else:
            raise BratsError(f"{m}: expected a NIfTI path or an (array, affine) pair, got {type(value).__name__}")
        if data.ndim != 3:
            raise BratsError(f"{m}: expected a 3D volume, got shape {data.shape}")
        if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
            raise BratsError(f"{m}: {int((~np.isfinite(data)).sum())} NaN or Inf voxels")
        images[m], affines[m] = data.astype(np.float32, copy=False), affine
    first = modalities[0]
    for m in modalities[1:]:
        if images[m].shape != images[first].shape:
            raise BratsError(f"{m} has shape {images[m].shape} but {first} has {images[first].shape}")
        if not np.allclose(affines[m], affines[first], atol=1e-3):
            raise BratsError(f"{m} and {first} have different affines: they are not in the same space")
    return Case("case", images, affines[first], header, layout)


# ---- the segmenter -------------------------------------------------------------------------------------------------
class Segmenter:
    """Predict BraTS label maps and probabilities with a trained checkpoint, in each input's own geometry.

    >>> seg = Segmenter.from_checkpoint("outputs/demo/train/checkpoints/best.ckpt", tta=True)
    >>> img = seg.predict("data/synthetic/BraTS2021_00000")      # nibabel image, uint8, the dataset's labels
    >>> ensemble = Segmenter.from_checkpoint(["fold0/best.ckpt", "fold1/best.ckpt"])  # or a sweep dir
    """

    def __init__(self, module: BratsModule | Sequence[BratsModule], config: Mapping[str, Any] | Sequence[Mapping],
                 *, device: str | torch.device = "auto", tta: bool = False, postprocess: bool = False,
                 precision: str = "auto", overlap: float = 0.5, window_batch: int = 2,
                 names: Sequence[str] | None = None) -> None:
        """One module and its run config, or equal-length lists of them (an ensemble; `names` for its errors)."""
        modules = [module] if isinstance(module, BratsModule) else list(module)
        configs = [dict(config)] if isinstance(config, Mapping) else [dict(c) for c in config]
        if not modules or len(modules) != len(configs):
            raise BratsError(f"a Segmenter needs one config per model, got {len(modules)} models, {len(configs)} "
                             "configs")
        names = list(names) if names is not None else [f"model {i}" for i in range(len(modules))]
        check_compatible(names, configs, [m.loss.activation for m in modules])
        self.device = resolve_device(device)
        self._autocast = autocast_for(self.device, precision)
        self.precision = auto_precision(detect(self.device))[0] if precision == "auto" else precision  # as run
        self.modules = [m.to(self.device).eval() for m in modules]
        self.module = self.modules[0]  # the decoding head, shared by every member
        self.configs, self.names = configs, names
        self._config = configs[0]
        self.tta, self.postprocess = bool(tta), bool(postprocess)
        self.overlap, self.window_batch = float(overlap), int(window_batch)

    @classmethod
    def from_checkpoint(cls, path: CheckpointSpec, device: str | torch.device = "auto", tta: bool = False,
                        postprocess: bool = False, precision: str = "auto", channels_last: bool = False,
                        trust_targets: Sequence[str] = (), **window: Any) -> Segmenter:
        """Rebuild the model of a brats-train checkpoint (best.ckpt / last.ckpt), or an ensemble of several: a list
        of checkpoints or a sweep dir (each job's checkpoints/best.ckpt); `window`: overlap, window_batch.
        `trust_targets`: your own `_target_`s a checkpoint may name (docs/trust.md)."""
        device = resolve_device(device)  # before loading: a bad device is a quick error
        paths = resolve_checkpoints(path)
        models = [load_model(p, channels_last=channels_last, trust_targets=trust_targets) for p in paths]
        return cls([m for m, _ in models], [c for _, c in models], device=device, tta=tta, postprocess=postprocess,
                   precision=precision, names=[str(p) for p in paths], **window)

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
        loaded = load_input(case, self.modalities, resolve_layout(layout) if layout else self.layout)
        schema = self.schema
        x, _, meta = Recipe.from_config(self._config["preprocess"]).apply(loaded.images, None, schema)
        probs = self._mean_probabilities(x)
        classes, et_prob = decode(probs, self.module.loss.activation, schema)
        if self.postprocess:
            classes = postprocess(classes, et_prob, schema)
        box, shape = meta["crop_box"], meta["original_shape"]
        # Outside the crop is background: the model never saw it (the seed's fixed crop, the nonzero box of modern).
        labels = output_schema(schema, loaded.layout).from_classes(undo_crop(classes, box, shape, fill=0))
        full = None
        if probabilities:
            full = undo_crop(probs, box, shape, fill=0)
            if self.module.loss.activation == "softmax":
                full[0] = undo_crop(probs[0], box, shape, fill=1)
        return loaded, labels, full

    def _mean_probabilities(self, x: np.ndarray) -> np.ndarray:
        """The members' mean (K, *S) probabilities; one running sum, so memory does not grow with the models."""
        total: np.ndarray | None = None
        for module, config in zip(self.modules, self.configs, strict=True):  # each model its own patch size
            probs = predict_probabilities(module, x, config["data"]["patch_size"], overlap=self.overlap,
                                          window_batch=self.window_batch, tta=self.tta, device=self.device,
                                          autocast=self._autocast)
            if total is None:
                total = probs
            else:
                total += probs
        assert total is not None
        if len(self.modules) > 1:
            total /= len(self.modules)
        return total

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


def output_header(header: nib.Nifti1Header | None, dtype: type) -> nib.Nifti1Header | None:
    """The input image's header (orientation codes, units, description) with the output's data type."""
    if header is None:
        return None
    header = header.copy()
    header.set_data_dtype(dtype)
    return header


def label_image(labels: np.ndarray, case: Case) -> nib.Nifti1Image:
    img = nib.Nifti1Image(np.asarray(labels), np.asarray(case.affine, dtype=np.float64),
                          header=output_header(case.header, np.uint8))
    img.set_data_dtype(np.uint8)
    return img


def is_case_folder(path: Path) -> bool:
    prefixes = tuple(f"{path.name}{layout.separator}" for layout in LAYOUTS.values())
    return any(p.is_file() and p.name.startswith(prefixes) and p.name.endswith(EXTENSIONS) for p in path.iterdir())
