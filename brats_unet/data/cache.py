"""The preprocessed-case cache: one folder per (layout, data root, preprocess recipe), one .npy pair per case.

<cache_dir>/<recipe>-<key>/<case>_x.npy   (C, *S) in preprocess['dtype']
                          <case>_y.npy   (*S) uint8 internal classes
                          <case>.json    meta, incl. `raw_files` (name, size, mtime_ns of each raw file it was built
                                         from); written LAST, so it marks the case as done
                          config.json    what the folder was built from; bad_cases.json  skipped cases, why, and
                                         their raw files' stamps
Every file is written atomically, so a killed run leaves no half-written case that looks done; a re-run skips
finished cases and redoes the rest.

The cache follows the raw files (`cache_status`, run by `build_cache`, i.e. by brats-preprocess and by every
training's `prepare_data`): a case whose raw files changed (size or modification time, or a file added or removed)
is rebuilt; a case whose raw folder is gone is evicted with a warning naming it, so no new split holds it; a case
that failed validation is tried again once its files change. Only this module knows the folder's file names: other
stages call `cached_cases`, `load_cached`, `cached_shape` and `build_cache`.
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
from brats_unet.data.discovery import case_files, find_file, list_case_dirs, note_extra_files, resolve_layout
from brats_unet.data.labels import Layout, resolve_schema
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


def cached_shape(cache_dir_for_key: Path, case: str) -> tuple[int, ...]:
    """Spatial shape (*S) of a cached case, read from its .npy header only."""
    x = np.load(Path(cache_dir_for_key) / f"{case}_x.npy", mmap_mode="r")
    return tuple(int(s) for s in x.shape[1:])


# ---- following the raw files -------------------------------------------------------------------------------------
Stamp = dict[str, list | None]  # file key (modality or "seg") -> [file name, size, mtime_ns], None when absent


def raw_stamp(case_dir: Path, layout: Layout, modalities: Sequence[str]) -> Stamp:
    """What a case is built from, cheaply comparable: name, size and modification time (ns) of each of its files
    (the recipe's modalities and the label map), None for a file that is absent. Taken before the files are read,
    so a file rewritten while it is read shows as changed on the next check."""
    stamp: Stamp = {}
    for key in (*modalities, "seg"):
        path = find_file(case_dir, layout, key)
        try:
            st = path.stat() if path is not None else None
        except OSError:
            st = None
        stamp[key] = [path.name, st.st_size, st.st_mtime_ns] if path is not None and st is not None else None
    return stamp


def _unchanged(recorded: Stamp | None, now: Stamp, marker: Path) -> bool:
    """Whether raw files still match what a cache entry recorded. Entries written before stamps existed have none:
    they count as unchanged when no raw file is newer than the entry itself."""
    if recorded is not None:
        return recorded == now
    written = _mtime_ns(marker)
    return written is not None and all(v is not None and v[2] <= written for v in now.values())


@dataclass(frozen=True)
class CacheStatus:
    """Cases of a cache folder against the raw root, each in one list (sorted)."""

    current: list[str]  # cached, raw files unchanged
    changed: list[str]  # cached, but a raw file changed since: to rebuild
    gone: list[str]  # cached, but the raw case is no longer under the root: to evict
    todo: list[str]  # in the root, not cached (new, or a bad case whose files changed, or any bad case to recheck)
    bad: list[str]  # failed validation before and their files are unchanged (skipped with skip_bad_cases)
    stamps: dict[str, Stamp]  # every raw case's stamp now


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _bad_records(folder: Path) -> dict[str, dict]:
    records = _read_json(folder / "bad_cases.json")
    return {r["case"]: r for r in records if isinstance(r, dict) and "case" in r} if isinstance(records, list) else {}


def _mtime_ns(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _recorded_stamp(folder: Path, case: str, index: Mapping) -> Stamp | None:
    """The raw stamp a cached case was built from: from config.json's index while the case's meta is the one the
    index saw (same modification time), else from the meta itself (a 100 kB parse per case)."""
    entry = index.get(case)
    marker = folder / f"{case}.json"
    if isinstance(entry, list) and len(entry) == 2 and entry[0] == _mtime_ns(marker):
        return entry[1]
    meta = _read_json(marker)
    return meta.get("raw_files") if isinstance(meta, dict) else {}  # unreadable meta: {} never matches, rebuild


def cache_status(folder: Path, case_dirs: Sequence[Path], layout: Layout | str, modalities: Sequence[str],
                 skip_bad_cases: bool = False) -> CacheStatus:
    """Compare a cache folder with the raw case folders `case_dirs` (stat() calls and the cached metas: no volume is
    read). Known-bad cases with unchanged files are `bad` only with skip_bad_cases; otherwise they are checked again."""
    folder, layout = Path(folder), resolve_layout(layout)
    stamps = {d.name: raw_stamp(d, layout, modalities) for d in case_dirs}
    cached = set(cached_cases(folder))
    bad_records = _bad_records(folder) if skip_bad_cases else {}
    config = _read_json(folder / "config.json")
    index = config.get("raw_files", {}) if isinstance(config, dict) else {}
    current, changed, todo, bad = [], [], [], []
    for case, now in stamps.items():
        if case in cached:
            recorded = _recorded_stamp(folder, case, index if isinstance(index, dict) else {})
            (current if _unchanged(recorded, now, folder / f"{case}.json") else changed).append(case)
        elif case in bad_records and bad_records[case].get("raw_files") == now:
            bad.append(case)
        else:
            todo.append(case)
    gone = sorted(cached - set(stamps))
    return CacheStatus(sorted(current), sorted(changed), gone, sorted(todo), sorted(bad), stamps)


def _evict(folder: Path, case: str) -> None:
    """Remove one case from the cache: the done marker first, so a kill midway leaves an unfinished case."""
    for name in (f"{case}.json", f"{case}_x.npy", f"{case}_y.npy"):
        (folder / name).unlink(missing_ok=True)


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


def _process(task: _Task) -> tuple[str, str | None, Stamp]:
    """Validate, preprocess and write one case; returns (case, None or the reason it is bad, its raw stamp). Runs in
    a worker."""
    case = task.case_dir.name
    recipe, schema = Recipe.from_config(task.preprocess), resolve_schema(task.schema)
    layout = resolve_layout(task.layout)
    stamp = raw_stamp(task.case_dir, layout, recipe.modalities)  # before reading: a rewrite meanwhile shows next time
    try:
        files = case_files(task.case_dir, layout, require_seg=True, modalities=recipe.modalities)
        images, seg, load_meta = load_validated_case(files, layout, recipe.modalities, schema=schema)
        x, y, meta = recipe.apply(images, seg, schema)
    except BratsError as e:
        message = str(e)
        return case, message if message.startswith(case) else f"{case}: {message}", stamp
    dtype = np.dtype(recipe.dtype)
    with np.errstate(over="ignore"):  # reported below with the case name instead of a bare RuntimeWarning
        x_stored = x.astype(dtype, copy=False)
    if not np.all(np.isfinite(x_stored)):  # x is finite, so the storage type overflowed (float16 tops out at 65504)
        raise BratsError(f"{case}: preprocessed values up to {float(np.abs(x).max()):.6g} do not fit "
                         f"preprocess.dtype {dtype}; use float32 or a normalising recipe")
    if task.out is None:
        return case, None, stamp
    counts = np.bincount(schema.to_classes(seg).ravel(), minlength=schema.num_classes)
    meta = {
        "case": case,
        **meta,
        "affine": load_meta["affine"],
        "spacing": load_meta["spacing"],
        "source_files": load_meta["files"],
        "raw_files": stamp,
        "dtype": str(dtype),
        "class_voxels": {name: int(n) for name, n in zip(schema.class_names, counts, strict=True)},
        "foreground_coords_sample": foreground_sample(y, case),
    }
    atomic_save_npy(task.out / f"{case}_x.npy", x_stored)
    atomic_save_npy(task.out / f"{case}_y.npy", y.astype(np.uint8, copy=False))
    # Last: the done marker. Compact, since indenting 10k coordinate triples would triple its size.
    atomic_write_text(task.out / f"{case}.json", json.dumps(meta, separators=(",", ":")))
    return case, None, stamp


def _run(tasks: list[_Task], num_workers: int, progress: bool, desc: str
         ) -> Iterator[tuple[str, str | None, Stamp]]:
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
    """Bring the cache of `root` up to date and return its folder: preprocess the cases not cached yet, rebuild those
    whose raw files changed, evict those whose raw folder is gone (warning naming them). Cheap when nothing changed
    (stat() calls), so every training runs it.

    A bad case raises its BratsError, or with skip_bad_cases is skipped and listed in bad_cases.json (and tried again
    once its files change). check_only validates every case (done or not) and writes nothing.
    """
    layout_obj = resolve_layout(layout)
    recipe = to_plain(preprocess)
    modalities = Recipe.from_config(recipe).modalities  # checked here once, not in every worker
    schema = schema_of(layout_obj, schema).name
    case_dirs = list_case_dirs(root, layout_obj)
    note_extra_files(case_dirs, layout_obj)
    out = cache_path(cache_dir, layout_obj.name, root, recipe, schema)
    if check_only:
        todo = [_Task(d, layout_obj.name, recipe, None, schema) for d in case_dirs]
        bad = _collect(todo, num_workers, progress, "checking", raise_first=False)
        if bad and not skip_bad_cases:
            lines = "\n".join(b["reason"] for b in bad)
            raise BratsError(f"{len(bad)} of {len(case_dirs)} cases in {root} failed validation:\n{lines}")
        for b in bad:
            log.warning("bad case (would be skipped): %s", b["reason"])
        return out

    status = cache_status(out, case_dirs, layout_obj, modalities, skip_bad_cases)
    for case in status.gone:
        log.warning("%s: its raw case is no longer in %s; removed from the cache %s (no new split will hold it)",
                    case, root, out)
        _evict(out, case)
    for case in status.changed:
        log.warning("%s: raw files changed since it was cached; preprocessing it again", case)
        _evict(out, case)
    if status.current:
        log.info("%d of %d cases already cached in %s", len(status.current), len(case_dirs), out)
    redo = set(status.todo) | set(status.changed)
    tasks = [_Task(d, layout_obj.name, recipe, out, schema) for d in case_dirs if d.name in redo]
    built: dict[str, Stamp] = {}
    bad = _collect(tasks, num_workers, progress, f"preprocess {recipe['name']}", not skip_bad_cases, built)
    known = _bad_records(out)
    bad = sorted(bad + [known[c] for c in status.bad], key=lambda b: b["case"])
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
        # Index of the cases' raw stamps with their meta's mtime: the next check reads this, not every meta.
        "raw_files": {c: [_mtime_ns(out / f"{c}.json"), {**status.stamps, **built}[c]] for c in cases
                      if c in built or c in status.current},
    })
    return out


def _collect(tasks: list[_Task], num_workers: int, progress: bool, desc: str, raise_first: bool,
             built: dict[str, Stamp] | None = None) -> list[dict]:
    """Run the tasks; the bad cases as {case, reason, raw_files}, or with raise_first the first one's BratsError.
    The raw stamps of the cases built go into `built`."""
    bad: list[dict] = []
    # closing(): raising out of the loop must stop the worker pool now, not when the traceback is freed.
    with contextlib.closing(_run(tasks, num_workers, progress, desc)) as results:
        for case, reason, stamp in results:
            if reason is None:
                if built is not None:
                    built[case] = stamp
                continue
            if raise_first:
                raise BratsError(reason)  # stop at once: no point preprocessing hours of data past a broken case
            bad.append({"case": case, "reason": reason, "raw_files": stamp})
    return sorted(bad, key=lambda b: b["case"])
