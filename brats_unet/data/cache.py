"""The preprocessed-case cache: one folder per (layout, data root, preprocess recipe), one .npy pair per case.

<cache_dir>/<recipe>-<key>/<case>_x.npy   (C, *S) in preprocess['dtype']
                          <case>_y.npy   (*S) uint8 internal classes
                          <case>.json    meta; written LAST, so it marks the case as done
                          config.json    what the folder was built from; bad_cases.json  skipped cases and why
Every file is written atomically, so a killed run leaves no half-written case that looks done; a re-run skips
finished cases and redoes the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from brats_unet.data.cases import load_validated_case, schema_of
from brats_unet.data.discovery import case_files, list_case_dirs, note_extra_files, resolve_layout
from brats_unet.data.labels import resolve_schema
from brats_unet.data.preprocess import Recipe
from brats_unet.utils import BratsError, atomic_save_npy, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the file format or the maths changes, so old folders are not reused
FOREGROUND_SAMPLE = 10_000
_RESERVED = {"config", "bad_cases"}


def to_plain(obj: Any) -> Any:
    """DictConfig/ListConfig/tuples -> dicts and lists (interpolations resolved): hashing and JSON see the same."""
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def cache_key(layout: str, root: str | Path, preprocess: Mapping, schema: str | None = None) -> str:
    """Short stable hash (12 hex) of the layout, the resolved absolute data root, the preprocess recipe and the label
    schema (only when it is not the layout's own, so caches built before schemas existed keep their key)."""
    payload = {"version": CACHE_VERSION, "layout": str(layout), "root": str(Path(root).expanduser().resolve()),
               "preprocess": to_plain(preprocess)}
    if schema is not None and schema != resolve_layout(layout).schema:
        payload["schema"] = str(schema)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def cache_path(cache_dir: str | Path, layout: str, root: str | Path, preprocess: Mapping, schema: str | None = None
               ) -> Path:
    return Path(cache_dir).expanduser() / f"{preprocess['name']}-{cache_key(layout, root, preprocess, schema)}"


def cached_cases(cache_dir_for_key: Path) -> list[str]:
    """Cases whose meta .json exists (i.e. finished), sorted."""
    folder = Path(cache_dir_for_key)
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json") if not p.name.startswith(".") and p.stem not in _RESERVED)


def load_cached(cache_dir_for_key: Path, case: str, mmap: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """x (C, *S) as stored (memory-mapped by default), y (*S) uint8, meta."""
    folder = Path(cache_dir_for_key)
    meta_path = folder / f"{case}.json"
    if not meta_path.is_file():
        raise BratsError(f"{meta_path}: case {case} is not in the cache (run brats-preprocess)")
    mode = "r" if mmap else None
    x = np.load(folder / f"{case}_x.npy", mmap_mode=mode)
    y = np.load(folder / f"{case}_y.npy", mmap_mode=mode)
    return x, y, json.loads(meta_path.read_text())


def foreground_sample(y: np.ndarray, case: str, limit: int = FOREGROUND_SAMPLE) -> list[list[int]]:
    """Up to `limit` random tumour voxel coordinates, the same on every run (seeded from the case name)."""
    coords = np.argwhere(y > 0)
    if len(coords) > limit:
        rng = np.random.default_rng(zlib.crc32(case.encode()))
        coords = coords[np.sort(rng.choice(len(coords), size=limit, replace=False))]
    return coords.tolist()


@dataclass(frozen=True)
class _Task:
    case_dir: Path
    layout: str
    preprocess: dict
    out: Path | None  # None: check only, write nothing
    schema: str


def _process(task: _Task) -> tuple[str, str | None]:
    """Validate, preprocess and write one case; returns (case, None) or (case, reason). Runs in a worker."""
    case = task.case_dir.name
    recipe, schema = Recipe.from_config(task.preprocess), resolve_schema(task.schema)
    layout = resolve_layout(task.layout)
    try:
        files = case_files(task.case_dir, layout, require_seg=True, modalities=recipe.modalities)
        images, seg, load_meta = load_validated_case(files, layout, recipe.modalities, schema=schema)
        x, y, meta = recipe.apply(images, seg, schema)
    except BratsError as e:
        message = str(e)
        return case, message if message.startswith(case) else f"{case}: {message}"
    dtype = np.dtype(recipe.dtype)
    with np.errstate(over="ignore"):  # reported below with the case name instead of a bare RuntimeWarning
        x_stored = x.astype(dtype, copy=False)
    if not np.all(np.isfinite(x_stored)):  # x is finite, so the storage type overflowed (float16 tops out at 65504)
        raise BratsError(f"{case}: preprocessed values up to {float(np.abs(x).max()):.6g} do not fit "
                         f"preprocess.dtype {dtype}; use float32 or a normalising recipe")
    if task.out is None:
        return case, None
    counts = np.bincount(schema.to_classes(seg).ravel(), minlength=schema.num_classes)
    meta = {
        "case": case,
        **meta,
        "affine": load_meta["affine"],
        "spacing": load_meta["spacing"],
        "source_files": load_meta["files"],
        "dtype": str(dtype),
        "class_voxels": {name: int(n) for name, n in zip(schema.class_names, counts, strict=True)},
        "foreground_coords_sample": foreground_sample(y, case),
    }
    atomic_save_npy(task.out / f"{case}_x.npy", x_stored)
    atomic_save_npy(task.out / f"{case}_y.npy", y.astype(np.uint8, copy=False))
    # Last: the done marker. Compact, since indenting 10k coordinate triples would triple its size.
    atomic_write_text(task.out / f"{case}.json", json.dumps(meta, separators=(",", ":")))
    return case, None


def _run(tasks: list[_Task], num_workers: int, progress: bool, desc: str) -> Iterator[tuple[str, str | None]]:
    bar = tqdm(total=len(tasks), desc=desc, unit="case", disable=not progress or not tasks)
    try:
        if num_workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                yield _process(task)
                bar.update()
        else:
            with multiprocessing.get_context().Pool(min(num_workers, len(tasks))) as pool:
                for result in pool.imap_unordered(_process, tasks):
                    yield result
                    bar.update()
    finally:
        bar.close()


def build_cache(root: str | Path, layout: str, cache_dir: str | Path, preprocess: Mapping, num_workers: int = 2,
                skip_bad_cases: bool = False, check_only: bool = False, progress: bool = True,
                schema: str | None = None) -> Path:
    """Validate and preprocess every case of `root` not cached yet; return the cache folder for this recipe.

    A bad case raises its BratsError, or with skip_bad_cases is skipped and listed in bad_cases.json. check_only
    validates every case (done or not) and writes nothing.
    """
    layout_obj = resolve_layout(layout)
    recipe = to_plain(preprocess)
    Recipe.from_config(recipe)  # checked here once, not in every worker
    schema = schema_of(layout_obj, schema).name
    case_dirs = list_case_dirs(root, layout_obj)
    note_extra_files(case_dirs, layout_obj)
    out = cache_path(cache_dir, layout_obj.name, root, recipe, schema)
    done = set() if check_only else set(cached_cases(out))
    todo = [_Task(d, layout_obj.name, recipe, None if check_only else out, schema)
            for d in case_dirs if d.name not in done]
    if done:
        log.info("%d of %d cases already cached in %s", len(done & {d.name for d in case_dirs}), len(case_dirs), out)

    bad: list[dict[str, str]] = []
    desc = "checking" if check_only else f"preprocess {recipe['name']}"
    # closing(): raising out of the loop must stop the worker pool now, not when the traceback is freed.
    with contextlib.closing(_run(todo, num_workers, progress, desc)) as results:
        for case, reason in results:
            if reason is None:
                continue
            if not skip_bad_cases and not check_only:
                raise BratsError(reason)  # stop at once: no point preprocessing hours of data past a broken case
            bad.append({"case": case, "reason": reason})
    bad.sort(key=lambda b: b["case"])

    if check_only:
        if bad and not skip_bad_cases:
            lines = "\n".join(b["reason"] for b in bad)
            raise BratsError(f"{len(bad)} of {len(case_dirs)} cases in {root} failed validation:\n{lines}")
        for b in bad:
            log.warning("bad case (would be skipped): %s", b["reason"])
        return out

    if bad:
        log.warning("skipped %d bad cases (listed in %s): %s", len(bad), out / "bad_cases.json",
                    "; ".join(b["reason"] for b in bad[:3]))
    if skip_bad_cases or (out / "bad_cases.json").exists():
        atomic_write_json(out / "bad_cases.json", bad)  # rewritten every run, so a fixed case drops off the list
    cases = cached_cases(out)
    if not cases:
        raise BratsError(f"no usable cases in {root}: all {len(case_dirs)} failed validation "
                         f"(see {out / 'bad_cases.json'})")
    atomic_write_json(out / "config.json", {
        "version": CACHE_VERSION, "layout": layout_obj.name, "root": str(Path(root).expanduser().resolve()),
        "preprocess": recipe, "schema": schema, "key": cache_key(layout_obj.name, root, recipe, schema), "cases": cases,
    })
    return out
