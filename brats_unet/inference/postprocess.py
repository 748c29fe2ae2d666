"""Post-processing rules on label maps, and choosing them on out-of-fold predictions (nnU-Net's way). Pure: arrays in,
arrays and numbers out; no IO, no config.

Rules work on a challenge's regions (evaluation.challenges: wt, tc, et for gliomas) in the files' own label values:
- `min_size`: drop every connected component of the region smaller than `min_size` voxels;
- `largest`: keep only the region's largest component;
- `et_to_ncr`: NVIDIA's BraTS21 rule (`postprocess_et`) with its total-size threshold `min_total`.
A voxel dropped from a region takes the label it would have without that region: ET -> the necrotic core (ncr/netc),
TC -> oedema (ed/snfh), any other region -> background. `choose_rules` tries each rule on every case, region by region
(outermost first), and keeps one only where it raises the mean score over the cases.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from brats_unet.evaluation.challenges import CHALLENGES, Challenge
from brats_unet.evaluation.lesionwise import lesionwise_metrics
from brats_unet.evaluation.region import dice
from brats_unet.utils import BratsError

RULES = ("min_size", "largest", "et_to_ncr")
RECORD_VERSION = 1  # of a postprocessing.json (brats-postprocess), also carried in a model package's model.json
# Each rule's own keys, beside "rule" (and the scores postprocessing.json keeps with it).
RULE_KEYS = {"min_size": ("region", "min_size"), "largest": ("region",), "et_to_ncr": ("min_total",)}
DEFAULT_SIZES = (10, 25, 50, 100, 200, 500, 1000)
# Voxels; 1000 and 2000 are 8 and 16 mL at 2 mm voxels (the demo's), 1 and 2 mL at BraTS's 1 mm.
DEFAULT_ET_TOTALS = (25, 50, 73, 100, 200, 500, 1000, 2000)
# What a voxel dropped from a region becomes: the next region out's own label, by name (first present wins).
FILL_NAMES = {"et": ("ncr", "netc"), "tc": ("ed", "snfh")}


def postprocess_et(
    classes: np.ndarray,
    et_prob: np.ndarray | None = None,
    min_component: int = 8,
    min_total: int = 73,
    prob_threshold: float = 0.9,
    et_class: int = 3,
    core_class: int = 1,
) -> np.ndarray:
    """NVIDIA's BraTS21 rule: unconvincing small enhancing tumour becomes necrosis (class 3 -> 1).

    1. Each ET connected component (face connectivity, as scipy.ndimage.label's default in the notebook) with fewer
       than `min_component` voxels and mean ET probability < `prob_threshold` becomes NCR. (The notebook's test is
       `1 < size < 8`, which spares single voxels - apparently by accident; we relabel them too.)
    2. If what is left of ET has 0 < voxels < `min_total` and mean probability < `prob_threshold`, all of it becomes
       NCR. BraTS scores a false-positive ET on an ET-free case as Dice 0, which is what this guards against.
    With et_prob None the probability counts as 0, so the size rules alone decide. `et_class`/`core_class`: the
    values of ET and of the necrotic core (internal classes 3 and 1 in BraTS glioma schemas, or a file's label
    values). Returns a new array.
    """
    classes = np.asarray(classes)
    if et_prob is not None:
        et_prob = np.asarray(et_prob, dtype=np.float64)
        if et_prob.shape != classes.shape:
            raise ValueError(f"et_prob shape {et_prob.shape} != class map shape {classes.shape}")
    out = classes.copy()
    components, n = ndimage.label(out == et_class)
    if n:
        flat = components.ravel()
        sizes = np.bincount(flat, minlength=n + 1)
        means = np.zeros(n + 1) if et_prob is None else np.bincount(flat, et_prob.ravel(), n + 1) / np.maximum(sizes, 1)
        relabel = (sizes < min_component) & (means < prob_threshold)
        relabel[0] = False  # background
        out[relabel[components]] = core_class
    et = out == et_class
    total = int(np.count_nonzero(et))
    mean_prob = 0.0 if et_prob is None or total == 0 else float(et_prob[et].mean())
    if 0 < total < min_total and mean_prob < prob_threshold:
        out[et] = core_class
    return out


def fill_label(challenge: Challenge, region: str) -> int:
    """The label a voxel dropped from `region` gets (see the module docstring)."""
    by_name = {name: value for value, name in challenge.labels.items()}
    return next((by_name[n] for n in FILL_NAMES.get(region, ()) if n in by_name), 0)


def _drop_components(labels: np.ndarray, mask: np.ndarray, keep: Callable[[np.ndarray], np.ndarray],
                     fill: int) -> np.ndarray:
    # Full connectivity (26 in 3D): the lesions BraTS's lesion-wise metrics count, and nnU-Net's components.
    components, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim))
    if n == 0:
        return labels
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    kept = keep(sizes)
    kept[0] = True  # not a component
    drop = ~kept[components]
    if not drop.any():
        return labels
    out = labels.copy()
    out[drop] = fill
    return out


def remove_small_components(labels: np.ndarray, region_labels: Sequence[int], min_size: int, fill: int = 0
                            ) -> np.ndarray:
    """Components (26-connected) of the region (union of `region_labels`) below `min_size` voxels -> `fill`."""
    return _drop_components(labels, np.isin(labels, region_labels), lambda sizes: sizes >= min_size, fill)


def keep_largest_component(labels: np.ndarray, region_labels: Sequence[int], fill: int = 0) -> np.ndarray:
    """Every component of the region but its largest (the first of equal largest ones) -> `fill`."""
    def keep(sizes: np.ndarray) -> np.ndarray:
        kept = np.zeros(len(sizes), dtype=bool)
        kept[1 + int(np.argmax(sizes[1:]))] = True
        return kept

    return _drop_components(labels, np.isin(labels, region_labels), keep, fill)


def apply_rule(labels: np.ndarray, rule: Mapping[str, Any], challenge: Challenge) -> np.ndarray:
    """One rule, as postprocessing.json stores it: {"rule": ..., "region": ..., its threshold}."""
    kind = rule["rule"]
    if kind == "et_to_ncr":
        return postprocess_et(labels, None, min_total=int(rule["min_total"]), et_class=challenge.regions["et"][0],
                              core_class=fill_label(challenge, "et"))
    region = rule["region"]
    if region not in challenge.regions:
        raise ValueError(f"post-processing rule {dict(rule)} names region {region!r}, which {challenge.name} lacks "
                         f"({sorted(challenge.regions)})")
    fill = fill_label(challenge, region)
    if kind == "min_size":
        return remove_small_components(labels, challenge.regions[region], int(rule["min_size"]), fill)
    if kind == "largest":
        return keep_largest_component(labels, challenge.regions[region], fill)
    raise ValueError(f"unknown post-processing rule {kind!r}; known: {list(RULES)}")


def apply_rules(labels: np.ndarray, rules: Sequence[Mapping[str, Any]], challenge: Challenge) -> np.ndarray:
    for rule in rules:
        labels = apply_rule(labels, rule, challenge)
    return labels


def apply_record(labels: np.ndarray, record: Mapping[str, Any], labels_schema: str) -> np.ndarray:
    """A postprocessing.json's rules on a label map written in schema `labels_schema`'s values. Regions are looked up
    by name, so a choice made on brats2021 files (ET 4) applies to 2023-named ones (ET 3) too."""
    challenge = CHALLENGES.get(labels_schema) or CHALLENGES[record["challenge"]]
    return apply_rules(labels, record["rules"], challenge)


def check_record(record: Any, where: str) -> dict[str, Any]:
    """A post-processing choice as brats-postprocess writes it (postprocessing.json, or a model package's copy),
    checked before any label map is touched: BratsError naming `where` and what is wrong."""
    if not isinstance(record, Mapping) or record.get("version") != RECORD_VERSION \
            or not isinstance(record.get("rules"), list):
        raise BratsError(f"{where} is not a post-processing choice written by brats-postprocess (version "
                         f"{RECORD_VERSION} with a list of rules)")
    challenge = CHALLENGES.get(str(record.get("challenge")))
    if challenge is None:
        raise BratsError(f"{where}: challenge {record.get('challenge')!r} is not one of {sorted(CHALLENGES)}")
    for i, rule in enumerate(record["rules"]):
        kind = rule.get("rule") if isinstance(rule, Mapping) else None
        if kind not in RULE_KEYS or any(k not in rule for k in RULE_KEYS[kind]):
            raise BratsError(f"{where}: rules[{i}] = {rule!r} is not a known rule ({list(RULES)} with "
                             f"{RULE_KEYS.get(kind, 'its keys')})")
        if "region" in RULE_KEYS[kind] and rule["region"] not in challenge.regions:
            raise BratsError(f"{where}: rules[{i}] names region {rule['region']!r}, which {challenge.name} lacks "
                             f"({list(challenge.regions)})")
    return dict(record)


def lesion_score(tp: float, fp: float, fn: float, mean_dice: float) -> float:
    """BraTS 2023's lesion-wise Dice: the matched lesions' Dice summed, over TP + FP + FN (every missed or false lesion
    counts 0); no lesion on either side: 1."""
    total = tp + fp + fn
    return 1.0 if total == 0 else (tp * mean_dice if tp else 0.0) / total


def case_score(pred: np.ndarray, truth: np.ndarray, challenge: Challenge, lesionwise: bool,
               spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """Mean over the challenge's regions of Dice (both empty: 1), or of BraTS 2023's lesion-wise Dice."""
    if not lesionwise:
        return float(np.mean([dice(np.isin(pred, v), np.isin(truth, v)) for v in challenge.regions.values()]))
    out = lesionwise_metrics(pred, truth, challenge, spacing, distances=False)
    return float(np.mean([lesion_score(out[f"all_instance_tp_{r}"], out[f"all_instance_fp_{r}"],
                                       out[f"all_instance_fn_{r}"], out.get(f"lesionwise_dsc_mean_{r}", 0.0))
                          for r in challenge.regions]))


def candidates(challenge: Challenge, sizes: Sequence[int] = DEFAULT_SIZES,
               et_totals: Sequence[int] = DEFAULT_ET_TOTALS) -> list[list[dict[str, Any]]]:
    """Groups of alternative rules, tried in this order; at most one rule of a group is kept. Thresholds ascend, so
    tied neighbours (tied_middle) are neighbouring sizes whatever order the config lists them in."""
    regions = sorted(challenge.regions, key=lambda r: -len(challenge.regions[r]))  # outermost first
    groups = [[*({"rule": "min_size", "region": r, "min_size": int(s)} for s in sorted(set(sizes))),
               {"rule": "largest", "region": r}] for r in regions]
    if "et" in challenge.regions and len(challenge.regions["et"]) == 1 and fill_label(challenge, "et"):
        groups.append([{"rule": "et_to_ncr", "min_total": int(t)} for t in sorted(set(et_totals))])
    return groups


def foreground_box(pred: np.ndarray, truth: np.ndarray, margin: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Both maps cut to the box around every non-zero voxel of either (plus `margin`): every rule and score is the same
    on the box (components never cross empty voxels; Dice and lesion counts only count non-zero ones), and scoring ~35
    candidates on a tumour's box instead of a whole head is what makes choosing on many full-size cases affordable."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
    where = np.argwhere((pred != 0) | (truth != 0))
    if not len(where):
        return pred[(slice(0, 1),) * pred.ndim], truth[(slice(0, 1),) * truth.ndim]
    box = tuple(slice(max(lo - margin, 0), hi + margin + 1) for lo, hi in zip(where.min(0), where.max(0), strict=True))
    return pred[box], truth[box]


def tied_middle(group: Sequence[Mapping[str, Any]], values: Sequence[float]) -> int:
    """Index of the rule to keep from a group: the best score, and among neighbouring thresholds of the same rule that
    tie with it (the same outcome on every case), the middle one. On a few validation cases several sizes remove the
    same false components and spare the same true ones; the smallest of them sits at the edge of that evidence (a
    false component a little larger on a new case survives it), the middle keeps a margin on both sides."""
    best = max(values)
    first = values.index(best)
    last = first
    while last + 1 < len(group) and values[last + 1] == best and group[last + 1]["rule"] == group[first]["rule"]:
        last += 1
    return (first + last) // 2


def choose_rules(cases: Sequence[tuple[np.ndarray, np.ndarray]], challenge: Challenge, *, lesionwise: bool = False,
                 sizes: Sequence[int] = DEFAULT_SIZES, et_totals: Sequence[int] = DEFAULT_ET_TOTALS,
                 spacings: Sequence[Sequence[float]] | None = None) -> dict[str, Any]:
    """Greedy selection on (prediction, truth) label maps: per group (a region's sizes + largest; the ET rule's
    thresholds) the rule that scores best on top of the rules kept so far (of tied thresholds the middle one,
    tied_middle), kept only if it raises the mean score.

    Returns {"metric", "score_before", "score_after", "rules": kept rules (with their scores), "tried": every rule
    with its mean score}."""
    if not cases:
        raise ValueError("no cases to choose post-processing on")
    spacings = list(spacings) if spacings is not None else [(1.0, 1.0, 1.0)] * len(cases)
    pairs = [foreground_box(np.asarray(p), np.asarray(t)) for p, t in cases]
    current = [p for p, _ in pairs]
    truths = [t for _, t in pairs]

    def mean_score(preds: Sequence[np.ndarray]) -> float:
        return float(np.mean([case_score(p, t, challenge, lesionwise, s)
                              for p, t, s in zip(preds, truths, spacings, strict=True)]))

    before = score = mean_score(current)
    kept, tried = [], []
    for group in candidates(challenge, sizes, et_totals):
        values = [mean_score([apply_rule(p, rule, challenge) for p in current]) for rule in group]
        tried += [{**rule, "score": value} for rule, value in zip(group, values, strict=True)]
        top = max(values)
        if top > score:
            rule = group[tied_middle(group, values)]
            # Applied again rather than kept from scoring: holding every candidate's maps would cost a group's worth
            # of label maps per case, on hundreds of full-size out-of-fold cases.
            current = [apply_rule(p, rule, challenge) for p in current]
            kept.append({**rule, "score_before": score, "score_after": top})
            score = top
    metric = "lesionwise_dice_mean" if lesionwise else "dice_mean"
    return {"metric": metric, "cases": len(cases), "score_before": before, "score_after": score, "rules": kept,
            "tried": tried}
