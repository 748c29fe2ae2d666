"""How far to trust a segmentation: per-voxel uncertainty maps and a per-case QC row (brats-predict
save_uncertainty=true -> <case>_uncertainty.nii.gz and qc.csv).

Samples are every flip (tta=true: 8) of every ensemble member. Each sample's blended logits are turned, as they are
averaged, into extra channels beside its probabilities: its own normalised entropy and its region masks (0/1). The
same running sum the ensemble uses then holds the mean probabilities (bit-identical to a plain prediction), the mean
per-sample entropy and, per voxel, the fraction of samples that predict each region - memory is flat in the number of
samples. From these:

- entropy: predictive entropy of the mean probabilities, normalised to [0, 1] (softmax: H / log K; sigmoid regions:
  the mean binary entropy over regions / log 2);
- mutual_information (several samples only): entropy minus the samples' mean entropy (BALD's disagreement term), in
  the same units; 0 where every sample says the same;
- agreement per region: the pooled pairwise Dice between samples, sum_pairs 2|A_i & A_j| / sum_pairs (|A_i| + |A_j|),
  exact from the per-voxel counts c: sum c (c - 1) / ((S - 1) sum c); 1 when no sample predicts the region.

Review rule (the `review` column of qc.csv; docs/export.md): a case is flagged when
  1. its first region (the whole tumour) is empty, or
  2. a region of at least MIN_VOLUME_ML has a sample agreement below MIN_AGREEMENT (several samples only), or
  3. a region of at least MIN_VOLUME_ML has a mean entropy inside it above MAX_ENTROPY.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor, nn

from brats_unet.data.cases import Case
from brats_unet.data.labels import LabelSchema
from brats_unet.inference.decoding import output_header, output_schema
from brats_unet.inference.inputs import CaseInput
from brats_unet.inference.probabilities import mean_probabilities
from brats_unet.inference.segmenter import Segmenter
from brats_unet.utils import atomic_path, atomic_write_text

MIN_AGREEMENT = 0.9
MAX_ENTROPY = 0.3
MIN_VOLUME_ML = 0.5
UNCERTAINTY_CHANNELS = ("entropy", "mutual_information")


def normalised_entropy(probs: Tensor, activation: str) -> Tensor:
    """(B, K, *S) probabilities -> (B, *S) entropy in [0, 1]."""
    p = probs.double()
    if activation == "softmax":
        return (-torch.xlogy(p, p).sum(1) / math.log(p.shape[1])).float()
    binary = -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p))
    return (binary.mean(1) / math.log(2)).float()


def sample_statistics(head: nn.Module, schema: LabelSchema) -> Callable[[Tensor], Tensor]:
    """The activation that turns one sample's logits (B, K, *S) into (B, K + 1 + R, *S): probabilities, their
    normalised entropy, each region's mask (1.0 / 0.0) of the sample's own decoding."""
    regions = [torch.tensor(schema.region_classes[r]) for r in schema.region_names]

    def activation(logits: Tensor) -> Tensor:
        probs = head.probabilities(logits)
        classes = head.to_classes(logits)
        masks = [torch.isin(classes, r.to(classes.device)) for r in regions]
        return torch.cat([probs, normalised_entropy(probs, head.activation)[:, None],
                          torch.stack(masks, 1).to(probs.dtype)], 1)

    return activation


def pooled_agreement(fraction: np.ndarray, samples: int) -> float | None:
    """Pooled pairwise Dice between `samples` masks, from the per-voxel fraction of samples holding the region."""
    if samples < 2:
        return None
    counts = np.rint(np.asarray(fraction, dtype=np.float64) * samples)
    total = counts.sum()
    return 1.0 if total == 0 else float((counts * (counts - 1)).sum() / ((samples - 1) * total))


@dataclass
class Uncertainty:
    """Maps in the case's geometry (0 outside the model's crop; resampled back like the probabilities when the case
    was resampled to the training spacing) and per-region agreement (on the model's grid)."""

    entropy: np.ndarray
    mutual_information: np.ndarray | None
    agreement: dict[str, float | None]
    samples: int


def segment_with_uncertainty(segmenter: Segmenter, case: CaseInput, layout: str | None = None,
                             probabilities: bool = False
                             ) -> tuple[Case, np.ndarray, np.ndarray | None, Uncertainty]:
    """Segmenter.segment plus its Uncertainty: the labels and probabilities are the plain prediction's, bit for bit."""
    loaded, x, meta = segmenter.prepare(case, layout)
    schema = segmenter.schema
    stats = mean_probabilities(segmenter.modules, segmenter.configs, x, overlap=segmenter.overlap,
                               window_batch=segmenter.window_batch, tta=segmenter.tta, device=segmenter.device,
                               autocast=segmenter._autocast,
                               activation_for=lambda m: sample_statistics(m.loss, schema))
    k = segmenter.module.loss.num_outputs
    probs, mean_entropy, fractions = stats[:k], stats[k], stats[k + 1:]
    samples = len(segmenter.modules) * (2 ** (x.ndim - 1) if segmenter.tta else 1)
    entropy = normalised_entropy(torch.from_numpy(probs)[None], segmenter.module.loss.activation)[0].numpy()
    mi = segmenter.to_input_grid(np.maximum(entropy - mean_entropy, 0), meta) if samples > 1 else None
    agreement = {r: pooled_agreement(fractions[i], samples) for i, r in enumerate(schema.region_names)}
    loaded, labels, full = segmenter.finish(loaded, probs, meta, probabilities)
    return loaded, labels, full, Uncertainty(segmenter.to_input_grid(entropy, meta), mi, agreement, samples)


def save_uncertainty(path: Path, uncertainty: Uncertainty, case: Case) -> None:
    """(x, y, z, 1 or 2) float32 NIfTI: entropy, and mutual information when there were several samples."""
    maps = [uncertainty.entropy] + ([uncertainty.mutual_information] if uncertainty.mutual_information is not None
                                    else [])
    img = nib.Nifti1Image(np.stack(maps, -1).astype(np.float32), case.affine, output_header(case.header, np.float32))
    img.set_data_dtype(np.float32)
    img.header["descrip"] = ",".join(UNCERTAINTY_CHANNELS[: len(maps)]).encode()
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def qc_row(case: Case, labels: np.ndarray, segmenter: Segmenter, uncertainty: Uncertainty, *,
           min_agreement: float = MIN_AGREEMENT, max_entropy: float = MAX_ENTROPY,
           min_volume_ml: float = MIN_VOLUME_ML) -> dict[str, Any]:
    """One qc.csv row: per region volume (mL), mean entropy inside, sample agreement; the review flag and why."""
    schema = segmenter.schema
    classes = output_schema(schema, case.layout).to_classes(labels)
    masks = schema.region_masks(classes)
    voxel_ml = float(np.prod(case.spacing)) / 1000.0
    row: dict[str, Any] = {"case": case.name, "samples": uncertainty.samples}
    reasons = []
    for region, mask in zip(schema.region_names, masks, strict=True):
        volume = float(mask.sum()) * voxel_ml
        entropy = float(uncertainty.entropy[mask].mean()) if mask.any() else None
        agreement = uncertainty.agreement[region]
        row |= {f"volume_{region}_ml": round(volume, 3), f"entropy_{region}": _round(entropy),
                f"agreement_{region}": _round(agreement)}
        if volume >= min_volume_ml and agreement is not None and agreement < min_agreement:
            reasons.append(f"{region} agreement {agreement:.2f} < {min_agreement}")
        if volume >= min_volume_ml and entropy is not None and entropy > max_entropy:
            reasons.append(f"{region} entropy {entropy:.2f} > {max_entropy}")
    if not masks[0].any():
        reasons.insert(0, f"no {schema.region_names[0]} predicted")
    row |= {"review": int(bool(reasons)), "reasons": "; ".join(reasons)}
    return row


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def write_qc(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """qc.csv, one row per case (sorted), columns in the first row's order."""
    if not rows:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: r["case"]):
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def read_qc(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {row["case"]: row for row in csv.DictReader(f)}


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of `scores` for telling `positive` (e.g. wrong voxels) from the rest: the
    Mann-Whitney U statistic with tied scores sharing their mean rank. None when either class is empty."""
    scores, positive = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(positive, dtype=bool).ravel()
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# ---- calibration (measurement: benchmarks/export_uncertainty.py; prediction does not rescale) ---------------------
def expected_calibration_error(probs: np.ndarray, truth: np.ndarray, bins: int = 15) -> float:
    """ECE of binary probabilities: sum over equal-width bins of |mean confidence - accuracy| x share of voxels,
    with confidence p and outcome truth (both flattened; every channel of a region head counts as its own voxel)."""
    p, y = np.asarray(probs, dtype=np.float64).ravel(), np.asarray(truth, dtype=np.float64).ravel()
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, p, bins) - np.bincount(which, y, bins))  # per bin: |sum p - sum y|
    return float(gap.sum() / max(p.size, 1)) if count.any() else 0.0


def scale_temperature(probs: np.ndarray, temperature: float, eps: float = 1e-6) -> np.ndarray:
    """sigmoid(logit(p) / T): T > 1 softens over-confident probabilities, T < 1 sharpens them."""
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    return 1.0 / (1.0 + np.exp(-np.log(p / (1 - p)) / temperature))


def fit_temperature(probs: np.ndarray, truth: np.ndarray, grid: np.ndarray | None = None) -> float:
    """The temperature (on a log grid, 0.25..8) that minimises the binary cross-entropy on these (validation) voxels."""
    grid = np.exp(np.linspace(np.log(0.25), np.log(8.0), 61)) if grid is None else grid
    y = np.asarray(truth, dtype=np.float64).ravel()
    losses = []
    for t in grid:
        q = np.clip(scale_temperature(probs, float(t)).ravel(), 1e-7, 1 - 1e-7)
        losses.append(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))
    return float(grid[int(np.argmin(losses))])
