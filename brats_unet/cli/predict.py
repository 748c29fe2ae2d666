"""brats-predict: segment BraTS cases with a trained checkpoint; one uint8 label map per case in the input's geometry.

    brats-predict ckpt_path=<run>/checkpoints/best.ckpt input=<BraTS root or one case folder> output=<dir> [tta=true]

The checkpoint carries its training config (`brats_config`): it rebuilds the network and says how to preprocess,
so a prediction always matches what the model was trained on.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
import nibabel as nib
import numpy as np
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from brats_unet.cli.common import CONFIG_PATH, read_split, require, user_errors
from brats_unet.cli.train import build_module, load_checkpoint, weight_mismatches
from brats_unet.data import io
from brats_unet.data.labels import CLASS_NAMES, LAYOUTS, REGION_NAMES, Layout, classes_from_regions, classes_to_brats
from brats_unet.data.preprocess import num_channels, preprocess_case, undo_crop
from brats_unet.inference import flip_tta, postprocess_et, sliding_window
from brats_unet.module import BratsModule
from brats_unet.perf import configure_runtime
from brats_unet.utils import BratsError, atomic_path, check_writable_output

log = logging.getLogger("brats_unet.predict")

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


# ---- model ---------------------------------------------------------------------------------------------------------
def load_model(ckpt_path: str | Path) -> tuple[BratsModule, dict[str, Any]]:
    """Rebuild the module from the checkpoint's own config and load its weights strictly; (module, config)."""
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise BratsError(f"checkpoint {path} does not exist (config key ckpt_path)")
    checkpoint = load_checkpoint(path)
    config = checkpoint.get("brats_config") if isinstance(checkpoint, dict) else None
    if not config or "state_dict" not in checkpoint:
        raise BratsError(f"{path} is not a brats-unet checkpoint: it lacks the 'brats_config' or 'state_dict' that "
                         "brats-train writes")
    absent = [k for k in ("data", "preprocess", "model", "loss", "optimizer") if k not in config]
    if absent:
        raise BratsError(f"checkpoint {path}: its stored config lacks {absent}; was it written by another version?")
    cfg = OmegaConf.create(config)
    cfg.model.compile = False  # a one-off inference pass does not repay compilation
    pre = cfg.preprocess
    in_channels = num_channels(pre)
    try:
        module = build_module(cfg, in_channels=in_channels)
    except (InstantiationException, ValueError, TypeError) as e:
        raise BratsError(f"checkpoint {path}: cannot rebuild the model from its stored config: {e}") from e
    state, problems = weight_mismatches(checkpoint["state_dict"], module)
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise BratsError(f"checkpoint {path}: its weights do not fit the model its stored config describes (the model "
                         f"config differs from the one that wrote them): {'; '.join(problems[:5])}{more}")
    module.load_state_dict(state, strict=True)
    return module.eval(), OmegaConf.to_container(cfg, resolve=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
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
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext
    if precision == "fp16" and device.type != "cuda":
        raise BratsError("precision=fp16 needs a CUDA device; use precision=bf16 or fp32 on CPU")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return lambda: torch.autocast(device.type, dtype=dtype)


# ---- cases ---------------------------------------------------------------------------------------------------------
def _case_in(case_dir: Path, modalities: Sequence[str], preferred: str) -> tuple[io.CaseFiles, Layout]:
    """The case's images in whichever layout names them all (the preferred one first)."""
    for layout in io.layout_order(preferred):
        images = {m: io.find_file(case_dir, layout, m) for m in modalities}
        if all(images.values()):
            return io.CaseFiles(case_dir.name, images, None), layout  # type: ignore[arg-type]
    want = ", ".join(LAYOUTS[preferred].filename(case_dir.name, m) for m in modalities)
    raise BratsError(f"{case_dir}: the model needs modalities {list(modalities)} but the folder does not hold them in "
                     f"any known layout {sorted(LAYOUTS)} (expected e.g. {want})")


def _is_case_folder(path: Path) -> bool:
    prefixes = tuple(f"{path.name}{layout.separator}" for layout in LAYOUTS.values())
    return any(p.is_file() and p.name.startswith(prefixes) and p.name.endswith(io.EXTENSIONS) for p in path.iterdir())


def find_input_cases(input_path: str | Path, modalities: Sequence[str], preferred: str,
                     only: Sequence[str] | None = None) -> list[tuple[io.CaseFiles, Layout]]:
    """Cases under a BraTS root (or the one case folder given), optionally restricted to the names in `only`."""
    root = Path(input_path).expanduser()
    dirs = io.subfolders(root, "input")
    if _is_case_folder(root):
        dirs = [root]
    elif not dirs:
        raise BratsError(f"input {root} holds no case folders and is not a case folder itself (expected "
                         f"{io.expected_pattern(LAYOUTS[preferred])})")
    if only is not None:
        by_name = {d.name: d for d in dirs}
        absent = [c for c in only if c not in by_name]
        if absent:
            raise BratsError(f"input {root} lacks {len(absent)} cases named by split_file: "
                             f"{', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}")
        dirs = [by_name[c] for c in sorted(only)]
    return [_case_in(d, modalities, preferred) for d in dirs]


# ---- one case ------------------------------------------------------------------------------------------------------
def predict_probabilities(module: BratsModule, x: np.ndarray, patch_size: Sequence[int], *, overlap: float,
                          window_batch: int, tta: bool, device: torch.device,
                          autocast: Callable[[], contextlib.AbstractContextManager]) -> np.ndarray:
    """(C, *S) preprocessed volume -> (K, *S) float32 probabilities (softmax classes or sigmoid regions).

    Windows are blended as logits, as in whole-volume validation, so without TTA the labels equal what validation
    scored; with TTA the 8 flips are averaged as probabilities.
    """
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


def decode(probs: np.ndarray, activation: str) -> tuple[np.ndarray, np.ndarray]:
    """(internal classes uint8, ET probability) from softmax class or sigmoid region probabilities."""
    if activation == "sigmoid":
        return classes_from_regions(probs > 0.5), probs[REGION_NAMES.index("et")]
    return probs.argmax(0).astype(np.uint8), probs[CLASS_NAMES.index("et")]


def output_header(reference: Path, dtype: type) -> nib.Nifti1Header:
    """The input image's header (orientation codes, units, description) with the output's data type."""
    header = nib.load(reference).header.copy()
    header.set_data_dtype(dtype)
    return header


def save_probabilities(path: Path, probs: np.ndarray, affine: np.ndarray, reference: Path) -> None:
    """(K, *S) -> one 4D NIfTI (x, y, z, K), stored as uint8 scaled to [0, 1] (steps of ~0.004; NIfTI has no fp16)."""
    img = nib.Nifti1Image(np.moveaxis(probs, 0, -1).astype(np.float32), affine, output_header(reference, np.float32))
    img.set_data_dtype(np.uint8)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def predict_case(module: BratsModule, files: io.CaseFiles, layout: Layout, out_dir: Path, pre: dict[str, Any],
                 patch_size: Sequence[int], *, postprocess: bool, probabilities: bool, **window: Any) -> Path:
    """Read, preprocess, predict, undo the crop and write `<out_dir>/<case>.nii.gz` (written last: the done marker)."""
    images, _, meta = io.load_validated_case(files, layout, pre["modalities"])  # NaN/shape/affine checks
    x, _, pmeta = preprocess_case(images, None, modalities=pre["modalities"], normalize=pre["normalize"],
                                  crop=pre["crop"], crop_box=pre.get("crop_box"),
                                  foreground_channel=bool(pre.get("foreground_channel", False)),
                                  et_label=layout.et_label)
    probs = predict_probabilities(module, x, patch_size, **window)
    classes, et_prob = decode(probs, module.loss.activation)
    if postprocess:
        classes = postprocess_et(classes, et_prob)
    box, shape = pmeta["crop_box"], pmeta["original_shape"]
    # Outside the crop is background: the model never saw it (the seed's fixed crop, the nonzero box of modern).
    labels = classes_to_brats(undo_crop(classes, box, shape, fill=0), layout.et_label)
    affine, reference = np.asarray(meta["affine"]), files.images[pre["modalities"][0]]
    if probabilities:
        full = undo_crop(probs, box, shape, fill=0)
        if module.loss.activation == "softmax":
            full[0] = undo_crop(probs[0], box, shape, fill=1)
        save_probabilities(out_dir / f"{files.case}_prob.nii.gz", full, affine, reference)
    out = out_dir / f"{files.case}.nii.gz"
    io.save_nifti(out, labels, affine, output_header(reference, np.uint8))
    return out


# ---- entry point ---------------------------------------------------------------------------------------------------
def predict(cfg: DictConfig) -> list[Path]:
    """Predict every case in scope; return the prediction files (including those a resume skipped)."""
    require(cfg, "ckpt_path", "input", "output", usage="brats-predict ckpt_path=<ckpt> input=<root|case> output=<dir>")
    if cfg.overwrite and cfg.resume:
        raise BratsError("overwrite=true and resume=true contradict each other: pick one")
    log.info("runtime: %s", configure_runtime(**(cfg.get("runtime") or {})))
    device = resolve_device(str(cfg.device))
    autocast = autocast_for(device, str(cfg.precision))
    module, config = load_model(cfg.ckpt_path)
    module.to(device)
    pre, data = config["preprocess"], config["data"]
    only = read_split(cfg.split_file, cfg.split_subset) if cfg.get("split_file") else None
    preferred = io.resolve_layout(cfg.get("layout") or data["layout"]).name
    cases = find_input_cases(cfg.input, pre["modalities"], preferred, only)

    out_dir = Path(cfg.output).expanduser()
    if not cfg.resume and out_dir.is_dir() and not cfg.overwrite:
        held = [p for p in out_dir.iterdir() if not p.name.startswith(".")]
        if held:
            raise BratsError(f"output folder {out_dir} already holds {len(held)} files; pass overwrite=true to "
                             "replace them, or resume=true to predict only the cases not written yet")
    check_writable_output(out_dir, overwrite=True)

    outputs, todo = [], []
    for files, layout in cases:
        out = out_dir / f"{files.case}.nii.gz"
        outputs.append(out)
        if not (cfg.resume and out.is_file()):
            todo.append((files, layout))
    if len(todo) < len(cases):
        log.info("resume: %d of %d cases already predicted in %s", len(cases) - len(todo), len(cases), out_dir)
    window = {"overlap": float(cfg.overlap), "window_batch": int(cfg.window_batch), "tta": bool(cfg.tta),
              "device": device, "autocast": autocast}
    start = time.perf_counter()
    for files, layout in tqdm(todo, desc="predict", unit="case"):
        predict_case(module, files, layout, out_dir, pre, data["patch_size"], postprocess=bool(cfg.postprocess),
                     probabilities=bool(cfg.save_probabilities), **window)
    seconds = time.perf_counter() - start
    per_case = f" ({seconds / len(todo):.1f} s/case)" if todo else ""
    log.info("predicted %d cases in %.1f s%s on %s -> %s", len(todo), seconds, per_case, device, out_dir)
    return outputs


@hydra.main(config_path=CONFIG_PATH, config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        predict(cfg)


if __name__ == "__main__":
    main()
