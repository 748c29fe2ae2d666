"""A report for a finished run or a sweep: figures and tables, written only after every input has been read.

    run dir    -> <output>/{summary.md, figures/curves.png, figures/lr.png}
    sweep dir  -> <output>/{ablation.csv, ablation.md, figures/ablation.png}
                  + table1.csv, table1.md when the sweep sets data.train_cases or augment
                  + cv.csv, cv.md when the sweep varies data.fold (cross-validation)
    either     -> figures/network.png (Figure 1) from the run's (first job's) config
    data_root  -> figures/class_distribution.png (Figure 3), figures/case.png (Figure 2)
    predictions + data_root -> figures/overlays.png (Figure 7)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brats_unet.data.cases import read_case_files, read_label_map, schema_of
from brats_unet.data.discovery import EXTENSIONS, find_cases, resolve_layout
from brats_unet.data.labels import LAYOUTS, SCHEMAS, LabelSchema, Layout
from brats_unet.data.stats import dataset_stats
from brats_unet.reporting.cv import cv_csv, cv_markdown, cv_rows, is_cv_sweep
from brats_unet.reporting.paper import (
    is_table1_sweep,
    load_example_case,
    network_of,
    read_run_config,
    table1,
    table1_markdown,
)
from brats_unet.reporting.plots import (
    plot_ablation,
    plot_case,
    plot_class_distribution,
    plot_curves,
    plot_lr,
    plot_network,
    plot_overlays,
    save_figure,
)
from brats_unet.runs import (
    ablation_table,
    find_jobs,
    format_csv,
    format_markdown,
    is_run,
    override_columns,
    read_metrics,
    read_overrides,
    read_scalars,
    varying_keys,
)
from brats_unet.utils import BratsError, atomic_write_text, check_writable_output

log = logging.getLogger("brats_unet.report")


def report_labels(run: Path, layout: str | None = None, schema: str | None = None) -> tuple[Layout, LabelSchema]:
    """The file layout and label schema a report reads data_root and predictions with: the ones given, else the run's
    own (data.layout, data.schema of its, or a sweep's first job's, .hydra/config.yaml), else brats2021 and the
    layout's own schema."""
    data: dict[str, Any] = {}
    for job in [run, *find_jobs(run)]:
        data = read_run_config(job).get("data") or {}
        if data:
            break

    def stored(key: str) -> str | None:
        value = data.get(key)
        return value if isinstance(value, str) and "${" not in value else None

    run_layout, run_schema = stored("layout") or "brats2021", stored("schema")
    name = layout or run_layout
    if name not in LAYOUTS:
        raise BratsError(f"layout={name!r} is not a file layout; choose one of {sorted(LAYOUTS)} (config key layout; "
                         f"a label set such as brats2024_gli is schema=, one of {sorted(SCHEMAS)})")
    if schema is not None and schema not in SCHEMAS:
        raise BratsError(f"schema={schema!r} is not a label schema; choose one of {sorted(SCHEMAS)} (config key "
                         "schema)")
    # The run's schema, unless another layout was asked for and the run's schema is just its own layout's (then the
    # asked layout's own applies: a brats2021 run reported on 2023-named data reads ET as 3).
    own = LAYOUTS[run_layout].schema if run_layout in LAYOUTS else None
    chosen = schema or (run_schema if layout in (None, run_layout) or run_schema != own else None)
    return LAYOUTS[name], schema_of(name, chosen)


def load_overlay_cases(predictions: str | Path, data_root: str | Path, layout: str | Layout, max_cases: int,
                       schema: LabelSchema | str | None = None) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(case, FLAIR, true classes, predicted classes) for the first `max_cases` predictions that have a truth, in
    `schema`'s classes (default: the layout's)."""
    pred_dir = Path(predictions).expanduser()
    if not pred_dir.is_dir():
        raise BratsError(f"predictions folder {pred_dir} does not exist or is not a folder (config key predictions)")
    layout_obj = resolve_layout(layout)
    truth = {c.case: c for c in find_cases(data_root, layout_obj, require_seg=True)}
    preds: dict[str, Path] = {}
    for path in sorted(pred_dir.iterdir()):
        ext = next((e for e in EXTENSIONS if path.name.endswith(e)), None)
        if ext and path.is_file():
            preds.setdefault(path.name.removesuffix(ext), path)
    matched = sorted(set(preds) & set(truth))[:max_cases]
    if not matched:
        example = next(iter(sorted(preds)), "none")
        raise BratsError(f"predictions folder {pred_dir}: no <case>.nii.gz matches a labelled case under {data_root} "
                         f"(first prediction: {example}; first case: {next(iter(truth))})")
    cases = []
    for case in matched:
        images, _, _ = read_case_files(truth[case], ["flair"])
        truth_classes, _, _ = read_label_map(truth[case].seg, layout_obj, schema)
        pred_classes, _, _ = read_label_map(preds[case], layout_obj, schema)
        if pred_classes.shape != truth_classes.shape:
            raise BratsError(f"{preds[case]}: shape {tuple(pred_classes.shape)} differs from the truth "
                             f"{tuple(truth_classes.shape)} of case {case}")
        cases.append((case, images["flair"], truth_classes, pred_classes))
    return cases


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summary_markdown(run: Path, metrics: dict[str, Any] | None, overrides: dict[str, str], metric: str,
                     figures: list[str]) -> str:
    lines = [f"# Run report: {run}", ""]
    if metrics is None:
        lines += ["Status: **incomplete** (no metrics.json: the run was interrupted or failed)", ""]
    else:
        best = (metrics.get("best") or {})
        lines += [f"- epochs: {metrics.get('epochs')}, optimiser steps: {metrics.get('global_step')}",
                  f"- best {metric}: {_num(best.get(metric))} (checkpoint: {best.get('checkpoint')})", ""]
    if overrides:
        lines += ["## Overrides", "", *(f"- `{k}={v}`" for k, v in overrides.items()), ""]
    final = (metrics or {}).get("final") or {}
    if final:
        lines += ["## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_num(v)} |" for k, v in sorted(final.items())]
        lines.append("")
    if figures:
        lines += ["## Figures", "", *(f"![{Path(f).stem}]({f})" for f in figures), ""]
    return "\n".join(lines)


def run_report(run: Path, output: Path, metric: str, extra: dict[str, Path] | None = None) -> dict[str, Path]:
    """curves.png, lr.png and summary.md (which also links the `extra` figures) for one training run."""
    written: dict[str, Path] = {}
    scalars = read_scalars(run / "tensorboard")
    if not scalars:
        log.warning("no TensorBoard scalars under %s: no curves (was the run started with logger=none?)", run)
    for name, plot in (("curves", plot_curves), ("lr", plot_lr)):
        fig = plot(scalars, title=f"{run.parent.name}/{run.name}")
        if fig is not None:
            written[name] = save_figure(fig, output / "figures" / f"{name}.png")
        elif scalars:
            log.warning("%s: nothing to plot for figures/%s.png", run, name)
    figures = [str(p.relative_to(output)) for p in (*written.values(), *(extra or {}).values())]
    text = summary_markdown(run, read_metrics(run), read_overrides(run), metric, figures)
    atomic_write_text(output / "summary.md", text)
    written["summary"] = output / "summary.md"
    return written


def sweep_report(sweep: Path, output: Path, metric: str) -> dict[str, Path]:
    """ablation.csv, ablation.md and figures/ablation.png for a Hydra multirun folder."""
    columns, rows = ablation_table(sweep, metric)
    keys = override_columns(columns, metric)
    written = {"ablation_csv": output / "ablation.csv", "ablation_md": output / "ablation.md"}
    atomic_write_text(written["ablation_csv"], format_csv(columns, rows))
    header = (f"# Ablation: {sweep}\n\n{len(rows)} jobs, sorted by best {metric} (the best epoch); the other metric "
              "columns are final values.\n\n")
    atomic_write_text(written["ablation_md"], header + format_markdown(columns, rows, keys))
    fig = plot_ablation(rows, metric, varying_keys(columns, rows, keys))
    if fig is not None:
        written["ablation"] = save_figure(fig, output / "figures" / "ablation.png")
    else:
        log.warning("%s: no job has finished (no metrics.json): no figures/ablation.png", sweep)
    if is_table1_sweep(sweep):
        t_columns, t_rows = table1(sweep)
        written |= {"table1_csv": output / "table1.csv", "table1_md": output / "table1.md"}
        atomic_write_text(written["table1_csv"], format_csv(t_columns, t_rows))
        atomic_write_text(written["table1_md"], table1_markdown(sweep, t_columns, t_rows))
    if is_cv_sweep(sweep):
        fold_rows, num_folds = cv_rows(sweep)
        written |= {"cv_csv": output / "cv.csv", "cv_md": output / "cv.md"}
        atomic_write_text(written["cv_csv"], cv_csv(fold_rows))
        atomic_write_text(written["cv_md"], cv_markdown(sweep, fold_rows, num_folds))
    incomplete = [r["job"] for r in rows if r["status"] != "complete"]
    if incomplete:
        log.warning("%s: incomplete jobs (no metrics.json): %s", sweep, ", ".join(incomplete))
    return written


def write_report(run: str | Path, output: str | Path | None = None, *, metric: str = "val/dice_mean",
                 data_root: str | Path | None = None, layout: str | None = None, predictions: str | Path | None = None,
                 case: str | None = None, max_cases: int = 4, overwrite: bool = False, schema: str | None = None,
                 trust_targets: Sequence[str] = ()) -> dict[str, Path]:
    """Write the report for `run` (a run dir or a sweep dir) into `output` (default <run>/report); return
    {name: file written}. `layout` and `schema` (how data_root and predictions are read): default the run's own
    (report_labels). `trust_targets`: your own `_target_`s the run's config may name (docs/trust.md)."""
    run = Path(run).expanduser()
    if not run.is_dir():
        raise BratsError(f"run folder {run} does not exist or is not a folder (config key run)")
    sweep = not is_run(run) and bool(find_jobs(run))
    if not sweep and not is_run(run):
        raise BratsError(f"run folder {run} holds neither a training run (metrics.json, tensorboard/ or .hydra/) nor "
                         "a sweep (job folders with .hydra/overrides.yaml) (config key run)")
    if predictions and not data_root:
        raise BratsError("predictions= needs data_root=<BraTS root> for the ground truth (config key data_root)")
    output = Path(output).expanduser() if output else run / "report"

    # Read every input before writing anything, so a bad input leaves no half-written report behind.
    stats, overlay_cases = None, None
    layout_obj, labels = report_labels(run, layout, schema)
    if data_root:
        stats = dataset_stats(data_root, layout_obj.name, progress=True, schema=labels.name)
    if predictions:
        overlay_cases = load_overlay_cases(predictions, data_root, layout_obj, int(max_cases), labels)
    example = load_example_case(data_root, layout_obj.name, case, labels) if data_root else None
    network = network_of(run, trust_targets)

    check_writable_output(output, bool(overwrite))
    data_figures: dict[str, Path] = {}
    if stats is not None:
        fig = plot_class_distribution(stats["mean_percent"], stats["cases"])
        data_figures["class_distribution"] = save_figure(fig, output / "figures" / "class_distribution.png")
    if overlay_cases:
        fig = plot_overlays(overlay_cases, labels)
        data_figures["overlays"] = save_figure(fig, output / "figures" / "overlays.png", dpi=150)
    if example is not None:
        data_figures["case"] = save_figure(plot_case(*example, schema=labels), output / "figures" / "case.png", dpi=150)
    if network is not None:
        job, spec, patch = network
        data_figures["network"] = save_figure(plot_network(spec, patch, title=f"network of {job}"),
                                              output / "figures" / "network.png")
    if sweep:
        written = sweep_report(run, output, metric) | data_figures
    else:
        written = run_report(run, output, metric, extra=data_figures) | data_figures
    log.info("report for %s %s written to %s", "sweep" if sweep else "run", run, output)
    return written
