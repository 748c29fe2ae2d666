"""The seed paper's own report items: Table 1 (scans x augmentation), Figure 1 (the configured network) and
Figure 2 (one case's modalities and label), each built from the runs and data themselves."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import OmegaConf

from brats_unet.data.cases import load_validated_case, schema_of
from brats_unet.data.discovery import find_cases, resolve_layout
from brats_unet.data.labels import MODALITIES, LabelSchema
from brats_unet.data.preprocess import Recipe
from brats_unet.runs import final_value, find_jobs, format_markdown, read_metrics, read_overrides
from brats_unet.training.checkpoint import upgrade_config
from brats_unet.training.network import build_loss, build_network
from brats_unet.training.targets import UntrustedTarget, check_targets
from brats_unet.utils import BratsError

log = logging.getLogger(__name__)
TABLE1_AXES = ("data.train_cases", "augment")  # a sweep that sets either gets table1.md/.csv
TABLE1_COLUMNS = ("Training data size", "Model", "Data augmentation", "Train loss", "Train Dice", "Val loss",
                  "Val Dice", "job")
# (column, metric): final values, as the paper reports them; its Dice is the 4-class multi-label one (eq. 1-2).
TABLE1_METRICS = (("Train loss", "train/loss"), ("Train Dice", "train/dice_paper"), ("Val loss", "val/loss"),
                  ("Val Dice", "val/dice_paper"))


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The job's resolved config (.hydra/config.yaml) as plain data; {} when absent."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise BratsError(f"{path}: not a YAML config ({e})") from e
    return config if isinstance(config, dict) else {}


def augment_label(augment: Mapping[str, Any] | None) -> str | None:
    """'none', or the active transforms (p > 0) of an augment config; brightness with its range as the paper."""
    if not isinstance(augment, Mapping):
        return None
    active = []
    for name, params in augment.items():
        if not isinstance(params, Mapping) or not params.get("p"):
            continue
        low, high = (params.get("alpha") or [None, None]) if name == "brightness" else (None, None)
        active.append(f"{name} {low}-{high}" if low is not None else name)
    return " + ".join(active) or "none"


def is_table1_sweep(sweep: Path) -> bool:
    return any(key in read_overrides(job) for job in find_jobs(sweep) for key in TABLE1_AXES)


def table1(sweep: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """The paper's Table 1: one row per (training scans, augmentation) job, numbered as its "Model" column.

    Scans and augmentation come from each job's own config (so an experiment's defaults count too), falling back to
    its overrides; rows are ordered by scans, then no augmentation first. An unfinished job keeps its row, blank.
    """
    rows = []
    for job in find_jobs(sweep):
        config, overrides = read_run_config(job), read_overrides(job)
        scans = (config.get("data") or {}).get("train_cases", overrides.get("data.train_cases"))
        scans = int(scans) if isinstance(scans, str) and scans.isdigit() else scans  # an override is text
        label = augment_label(config.get("augment")) or overrides.get("augment", "")
        metrics = read_metrics(job)
        row: dict[str, Any] = {"Training data size": scans, "Data augmentation": label, "job": job.name}
        row |= {column: final_value(metrics, name) if metrics else None for column, name in TABLE1_METRICS}
        rows.append(row)

    def order(row: dict[str, Any]) -> tuple:
        scans = row["Training data size"]
        return (not isinstance(scans, int), scans if isinstance(scans, int) else 0, row["Data augmentation"] != "none",
                str(row["Data augmentation"]))

    rows.sort(key=order)
    for number, row in enumerate(rows, start=1):
        row["Model"] = number
    return list(TABLE1_COLUMNS), [{c: row.get(c) for c in TABLE1_COLUMNS} for row in rows]


def table1_markdown(sweep: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    return (f"# Table 1: {sweep}\n\nFinal values, as in the paper; Dice is its 4-class multi-label Dice "
            "(train/dice_paper, val/dice_paper).\n\n" + format_markdown(columns, rows, []))


# ---- Figure 1: the configured network ------------------------------------------------------------------------------
def meta_network(config: Mapping[str, Any], source: str | Path = "config", trust_targets: Sequence[str] = ()) -> Any:
    """The run's network, instantiated from its config (model, preprocess channels, loss outputs) on the meta device:
    the real module structure at no memory cost. A stored config: upgraded and its `_target_`s checked, as a
    checkpoint's are (UntrustedTarget naming `source`)."""
    # .hydra/config.yaml is stored unresolved (preprocess.modalities: ${data.modalities}): resolve what is needed.
    cfg = OmegaConf.create(upgrade_config(dict(config)))
    needed = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("preprocess", "model", "loss")}
    needed["data"] = {k: cfg.data.get(k) for k in ("layout", "schema")}
    checked = check_targets(needed, source, trust_targets)
    loss = build_loss(checked)
    with torch.device("meta"):
        return build_network(checked["model"], Recipe.from_config(checked["preprocess"]).num_channels,
                             loss.num_outputs)


def network_spec(net: Any) -> dict[str, Any]:
    """What Figure 1 draws, read off a U-Net module: per level its conv widths and dropout, the head, the extras."""
    def block(b: Any) -> dict[str, Any]:
        return {"in": b.conv1.in_channels, "width": b.conv2.out_channels, "dropout": float(b.dropout.p),
                "norm": "none" if type(b.norm1).__name__ == "Identity" else type(b.norm1).__name__}

    encoders = [block(b) for b in net.encoders]
    return {
        "name": type(net).__name__,
        "dim": net.head.weight.ndim - 2,
        "in_channels": encoders[0]["in"],
        "out_channels": net.head.out_channels,
        "encoder": encoders,
        "decoder": [block(b) for b in net.decoders],  # decoder[i]: the same resolution as encoder[i]
        "deep_supervision_heads": len(net.aux_heads),
        "parameters": sum(p.numel() for p in net.parameters()),
    }


def network_of(run: Path, trust_targets: Sequence[str] = ()) -> tuple[Path, dict[str, Any], list[int] | None] | None:
    """(job, network_spec, patch size) from a run's config, or from a sweep's first job that has one; None when no
    config describes a network or it cannot be built (a report is still worth writing without Figure 1). A config
    naming an untrusted `_target_` is refused (UntrustedTarget), never skipped quietly."""
    for job in [run, *find_jobs(run)]:
        config = read_run_config(job)
        if not all(isinstance(config.get(k), Mapping) for k in ("model", "loss", "preprocess")):
            continue
        try:
            spec = network_spec(meta_network(config, job / ".hydra" / "config.yaml", trust_targets))
        except UntrustedTarget:
            raise
        except Exception as e:  # noqa: BLE001 - any failure to rebuild only costs the diagram
            log.warning("%s: cannot rebuild the network from .hydra/config.yaml (%s): no figures/network.png", job, e)
            return None
        return job, spec, (config.get("data") or {}).get("patch_size")
    return None


# ---- Figure 2: one case's modalities and label -------------------------------------------------------------------
def load_example_case(data_root: str | Path, layout: str, case: str | None = None,
                      schema: LabelSchema | str | None = None) -> tuple[str, dict[str, np.ndarray], np.ndarray]:
    """(case, {modality: volume}, internal classes of `schema`, default the layout's) of `case` (default: the first
    labelled case), read and validated the way brats-preprocess reads it."""
    layout_obj = resolve_layout(layout)
    cases = {c.case: c for c in find_cases(data_root, layout_obj, require_seg=True)}
    if case is None:
        case = sorted(cases)[0]
    elif case not in cases:
        raise BratsError(f"case {case!r} is not a labelled case under {data_root} (config key case; e.g. "
                         f"{sorted(cases)[0]})")
    labels = schema_of(layout_obj, schema)
    images, seg, _ = load_validated_case(cases[case], layout_obj, MODALITIES, schema=labels)
    return case, {m: images[m] for m in MODALITIES}, labels.to_classes(seg)
