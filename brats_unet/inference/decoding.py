"""Probabilities -> the label map a user gets: decode (argmax of softmax classes, or thresholded sigmoid regions),
the optional small-ET rule, the input's own label values, and the NIfTI written in the input's geometry."""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np

from brats_unet.data.cases import Case
from brats_unet.data.labels import SCHEMAS, LabelSchema, Layout, compatible
from brats_unet.data.preprocess import undo_crop
from brats_unet.inference.postprocess import postprocess_et
from brats_unet.utils import BratsError


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


def uncrop_probabilities(probs: np.ndarray, box: Sequence, shape: Sequence[int], activation: str) -> np.ndarray:
    """(K, *crop) -> (K, *shape): outside the model's crop is background (softmax background 1, the rest 0)."""
    full = undo_crop(probs, box, shape, fill=0)
    if activation == "softmax":
        full[0] = undo_crop(probs[0], box, shape, fill=1)
    return full


def output_header(header: nib.Nifti1Header | None, dtype: type) -> nib.Nifti1Header | None:
    """The input image's header (orientation codes, units, description) with the output's data type."""
    if header is None:
        return None
    header = header.copy()
    header.set_data_dtype(dtype)
    return header


def label_image(labels: np.ndarray, case: Case) -> nib.Nifti1Image:
    """uint8 labels as a NIfTI with the case's affine and header."""
    img = nib.Nifti1Image(np.asarray(labels), np.asarray(case.affine, dtype=np.float64),
                          header=output_header(case.header, np.uint8))
    img.set_data_dtype(np.uint8)
    return img
