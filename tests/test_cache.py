"""brats_unet.data.cache and the brats-preprocess / brats-stats entry points, on small real NIfTI cases."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from brats_unet.cli.preprocess import preprocess
from brats_unet.cli.stats import stats
from brats_unet.data.cache import build_cache, cache_key, cache_path, cached_cases, cached_shape, load_cached
from brats_unet.data.cases import read_case_files
from brats_unet.data.discovery import case_files
from brats_unet.data.preprocess import preprocess_case
from brats_unet.data.stats import dataset_stats
from brats_unet.utils import BratsError

SHAPE = (20, 18, 16)
MODERN = {"name": "modern", "modalities": ["t1", "t1ce", "t2", "flair"], "normalize": "zscore", "crop": "nonzero",
          "crop_box": None, "foreground_channel": False, "dtype": "float16"}
SEED = {"name": "seed", "modalities": ["t1ce", "t2", "flair"], "normalize": "minmax", "crop": "fixed",
        "crop_box": [[2, 18], [2, 18], [0, 16]], "foreground_channel": False, "dtype": "float32"}


def write_case(root: Path, i: int, seg: np.ndarray | None = None) -> str:
    """BraTS 2021 case i: brain block [3:17, 4:15, 2:14], 40 NCR + 20 ED + 1 ET voxels (unless `seg` given)."""
    case = f"BraTS2021_{i:05d}"
    rng = np.random.default_rng(i)
    folder = root / case
    folder.mkdir(parents=True)
    for k, mod in enumerate(("t1", "t1ce", "t2", "flair")):
        img = np.zeros(SHAPE, np.int16)
        img[3:17, 4:15, 2:14] = rng.integers(100, 900, size=(14, 11, 12)) + 50 * k
        nib.save(nib.Nifti1Image(img, np.eye(4)), folder / f"{case}_{mod}.nii.gz")
    if seg is None:
        seg = np.zeros(SHAPE, np.uint8)
        seg[5:9, 5:10, 4:6] = 1
        seg[5:9, 5:10, 6] = 2
        seg[10, 10, 10] = 4
    nib.save(nib.Nifti1Image(seg, np.eye(4)), folder / f"{case}_seg.nii.gz")
    return case


@pytest.fixture
def root(tmp_path):
    for i in range(3):
        write_case(tmp_path / "raw", i)
    return tmp_path / "raw"


def test_cache_key_stable_and_sensitive(tmp_path, monkeypatch):
    key = cache_key("brats2021", tmp_path, MODERN)
    assert re.fullmatch(r"[0-9a-f]{12}", key), key  # 12 hex digits: a folder name on every file system
    monkeypatch.chdir(tmp_path)
    assert cache_key("brats2021", ".", dict(reversed(list(MODERN.items())))) == key  # resolved root, sorted keys
    assert cache_key("brats2021", ".", OmegaConf.create(MODERN)) == key
    assert cache_key("brats2023", tmp_path, MODERN) != key
    assert cache_key("brats2021", tmp_path / "x", MODERN) != key
    assert cache_key("brats2021", tmp_path, {**MODERN, "foreground_channel": True}) != key
    # Every recipe field that changes the stored arrays changes the key: storage type, channel order, crop box.
    assert cache_key("brats2021", tmp_path, {**MODERN, "dtype": "float32"}) != key
    assert cache_key("brats2021", tmp_path, {**MODERN, "modalities": MODERN["modalities"][::-1]}) != key
    assert cache_key("brats2021", tmp_path, SEED) != cache_key("brats2021", tmp_path, {**SEED, "crop_box":
                                                                                       [[2, 18], [2, 18], [1, 16]]})
    assert cache_path("c", "brats2021", tmp_path, MODERN) == Path("c") / f"modern-{key}"


def test_build_cache_files_match_preprocessing(root, tmp_path):
    out = build_cache(root, "brats2021", tmp_path / "cache", MODERN, num_workers=0, progress=False)
    assert out == cache_path(tmp_path / "cache", "brats2021", root, MODERN)
    assert cached_cases(out) == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]
    x, y, meta = load_cached(out, "BraTS2021_00001")
    assert isinstance(x, np.memmap) and x.dtype == np.float16 and y.dtype == np.uint8
    files = case_files(root / "BraTS2021_00001", "brats2021")
    images, seg, _ = read_case_files(files, MODERN["modalities"])
    ex, ey, _ = preprocess_case(images, seg, modalities=MODERN["modalities"], normalize="zscore", crop="nonzero",
                                crop_box=None, foreground_channel=False, schema="brats2021")
    assert x.shape == (4, 14, 11, 12) == ex.shape and cached_shape(out, "BraTS2021_00001") == (14, 11, 12)
    np.testing.assert_array_equal(x, ex.astype(np.float16))
    np.testing.assert_array_equal(y, ey)
    assert meta["crop_box"] == [[3, 17], [4, 15], [2, 14]] and meta["original_shape"] == list(SHAPE)
    assert meta["class_voxels"] == {"background": 20 * 18 * 16 - 61, "ncr": 40, "ed": 20, "et": 1}
    coords = np.array(meta["foreground_coords_sample"])
    assert coords.shape == (61, 3) and (y[tuple(coords.T)] > 0).all()
    assert meta["source_files"]["seg"] == str(files.seg) and meta["spacing"] == [1.0, 1.0, 1.0]
    config = json.loads((out / "config.json").read_text())
    assert config["preprocess"] == MODERN and config["cases"] == cached_cases(out)
    assert config["root"] == str(root.resolve())
    assert not list(out.glob(".tmp-*"))


def test_foreground_sample_capped_and_deterministic(tmp_path):
    seg = np.zeros(SHAPE, np.uint8)
    seg[2:18, 2:18, 0:16] = 2  # 4096 tumour voxels, more than the cap below
    write_case(tmp_path / "raw", 7, seg=seg)
    from brats_unet.data.cache import foreground_sample
    y = seg[2:18, 2:18, :]
    a = foreground_sample(y, "BraTS2021_00007", limit=1000)
    assert len(a) == 1000 and len(set(map(tuple, a))) == 1000
    assert a == foreground_sample(y, "BraTS2021_00007", limit=1000)
    assert a != foreground_sample(y, "BraTS2021_00008", limit=1000)
    out = build_cache(tmp_path / "raw", "brats2021", tmp_path / "cache", SEED, num_workers=0, progress=False)
    _, y2, meta = load_cached(out, "BraTS2021_00007", mmap=False)
    assert y2.shape == (16, 16, 16) and len(meta["foreground_coords_sample"]) == 4096


def test_finished_cases_skipped_partial_case_completed(root, tmp_path):
    out = build_cache(root, "brats2021", tmp_path / "cache", SEED, num_workers=0, progress=False)
    done_x = out / "BraTS2021_00000_x.npy"
    done_x.write_bytes(b"corrupt but marked done")  # a finished case is never re-read or rebuilt
    mtime = done_x.stat().st_mtime_ns
    (out / "BraTS2021_00002.json").unlink()  # x.npy and y.npy present, json missing: an interrupted case
    (out / "BraTS2021_00002_x.npy").write_bytes(b"half written")
    build_cache(root, "brats2021", tmp_path / "cache", SEED, num_workers=0, progress=False)
    assert done_x.read_bytes() == b"corrupt but marked done" and done_x.stat().st_mtime_ns == mtime
    x, y, meta = load_cached(out, "BraTS2021_00002")
    assert x.shape == (3, 16, 16, 16) and x.dtype == np.float32 and meta["case"] == "BraTS2021_00002"
    assert cached_cases(out) == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]


def test_worker_pool(root, tmp_path):
    serial = build_cache(root, "brats2021", tmp_path / "a", SEED, num_workers=0, progress=False)
    pooled = build_cache(root, "brats2021", tmp_path / "b", SEED, num_workers=2, progress=False)
    assert cached_cases(pooled) == cached_cases(serial) == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]
    for case in cached_cases(serial):
        (xs, ys, ms), (xp, yp, mp) = load_cached(serial, case), load_cached(pooled, case)
        np.testing.assert_array_equal(xs, xp)
        np.testing.assert_array_equal(ys, yp)
        assert ms == mp  # including the seeded foreground sample


def test_values_that_overflow_the_storage_dtype_are_refused(root, tmp_path):
    raw = {**MODERN, "name": "raw", "normalize": "none"}
    out = build_cache(root, "brats2021", tmp_path / "ok", raw, num_workers=0, progress=False)
    assert load_cached(out, "BraTS2021_00000")[0].max() == 1049.0  # raw flair tops out at 899 + 50 * 3: fits
    big = np.zeros(SHAPE, np.float32)
    big[3:17, 4:15, 2:14] = 70000.0  # beyond float16's largest finite value, 65504
    nib.save(nib.Nifti1Image(big, np.eye(4)), root / "BraTS2021_00001" / "BraTS2021_00001_t2.nii.gz")
    with pytest.raises(BratsError, match=r"^BraTS2021_00001: preprocessed values up to 70000 do not fit "
                                         r"preprocess\.dtype float16; use float32"):
        build_cache(root, "brats2021", tmp_path / "bad", raw, num_workers=0, progress=False)
    out = build_cache(root, "brats2021", tmp_path / "f32", {**raw, "dtype": "float32"}, num_workers=0,
                      progress=False)
    assert load_cached(out, "BraTS2021_00001")[0][2].max() == 70000.0


def _break_case(root: Path) -> None:
    seg = np.zeros(SHAPE, np.uint8)
    seg[1, 1, 1] = 3  # not a BraTS 2021 label
    nib.save(nib.Nifti1Image(seg, np.eye(4)), root / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz")
    (root / "BraTS2021_00002" / "BraTS2021_00002_flair.nii.gz").unlink()


def test_bad_case_raises_without_skip(root, tmp_path):
    _break_case(root)
    with pytest.raises(BratsError, match=r"^BraTS2021_0000[12]: BraTS2021_0000[12]_(seg|flair)\.nii\.gz: "):
        build_cache(root, "brats2021", tmp_path / "cache", SEED, num_workers=0, progress=False)


def test_skip_bad_cases_writes_report(root, tmp_path, caplog):
    _break_case(root)
    with caplog.at_level(logging.WARNING):
        out = build_cache(root, "brats2021", tmp_path / "cache", SEED, num_workers=2, skip_bad_cases=True,
                          progress=False)
    assert cached_cases(out) == ["BraTS2021_00000"]
    bad = json.loads((out / "bad_cases.json").read_text())
    assert [b["case"] for b in bad] == ["BraTS2021_00001", "BraTS2021_00002"]
    assert bad[0]["reason"] == ("BraTS2021_00001: BraTS2021_00001_seg.nii.gz: label values [3] are not brats2021 "
                                "labels (allowed [0, 1, 2, 4]; brats2021 cases label ET as 4)")
    assert bad[1]["reason"].startswith("BraTS2021_00002: BraTS2021_00002_flair.nii.gz: missing flair file")
    assert "skipped 2 bad cases" in caplog.text
    assert json.loads((out / "config.json").read_text())["cases"] == ["BraTS2021_00000"]


def test_check_only_writes_nothing(root, tmp_path):
    out = build_cache(root, "brats2021", tmp_path / "cache", MODERN, check_only=True, num_workers=0, progress=False)
    assert not out.exists() and not (tmp_path / "cache").exists()
    _break_case(root)
    with pytest.raises(BratsError, match=r"2 of 3 cases in .* failed validation:\nBraTS2021_00001: .*seg.*\n"
                                         r"BraTS2021_00002: .*flair"):
        build_cache(root, "brats2021", tmp_path / "cache", MODERN, check_only=True, num_workers=2, progress=False)
    assert not (tmp_path / "cache").exists()


def test_load_cached_missing_case(tmp_path):
    with pytest.raises(BratsError, match=r"BraTS2021_00009\.json: case BraTS2021_00009 is not in the cache"):
        load_cached(tmp_path, "BraTS2021_00009")


# ---- entry points ----

def _compose(name: str, overrides: list[str]):
    with initialize_config_module(config_module="brats_unet.conf", version_base="1.3"):
        return compose(config_name=name, overrides=overrides, return_hydra_config=True)


def test_preprocess_cli_function(root, tmp_path, capsys):
    cfg = _compose("preprocess", [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "preprocess=modern",
                                  "num_workers=0"])
    assert cfg.data.layout == "brats2021" and cfg.check_only is False and cfg.task_name == "preprocess"
    out = preprocess(cfg)
    assert out.parent == tmp_path / "cache" and out.name.startswith("modern-")
    assert f"cache: {out}\ncases: 3" in capsys.readouterr().out
    assert load_cached(out, "BraTS2021_00000")[0].dtype == np.float16


def test_dataset_stats_hand_computed(root, tmp_path):
    seg = np.zeros(SHAPE, np.uint8)
    seg[0:10, :, :] = 2  # half the volume oedema
    write_case(root, 3, seg=seg)
    result = dataset_stats(root, "brats2021")
    n = 20 * 18 * 16
    assert result["cases"] == 4
    assert result["per_case"][0] == pytest.approx({"case": "BraTS2021_00000", "voxels": n, "background":
                                                   100 * (n - 61) / n, "ncr": 100 * 40 / n, "ed": 100 * 20 / n,
                                                   "et": 100 / n})
    assert result["mean_percent"]["ed"] == pytest.approx((3 * 100 * 20 / n + 50.0) / 4)
    assert sum(result["mean_percent"].values()) == pytest.approx(100.0)
    cfg = _compose("stats", [f"data.root={root}", f"paths.output_dir={tmp_path / 'run'}"])
    stats(cfg)
    assert json.loads((tmp_path / "run" / "stats.json").read_text())["mean_percent"] == result["mean_percent"]


def _script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def test_preprocess_script_missing_root_is_a_clean_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "BRATS_DEBUG")}
    proc = subprocess.run([_script("brats-preprocess"), f"data.root={tmp_path / 'nope'}"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert f"error: data root {tmp_path / 'nope'} does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_preprocess_and_stats_scripts_end_to_end(root, tmp_path):
    def run(script: str, *overrides: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([_script(script), f"data.root={root}", *overrides], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc

    proc = run("brats-preprocess", "data.cache_dir=cache", "preprocess=modern", "check_only=true")
    assert "checked 3 cases" in proc.stdout and not (tmp_path / "cache").exists()
    proc = run("brats-preprocess", "data.cache_dir=cache", "preprocess=modern")
    assert "cases: 3" in proc.stdout and len(cached_cases(next((tmp_path / "cache").iterdir()))) == 3
    run("brats-stats", "hydra.run.dir=run")
    assert json.loads((tmp_path / "run" / "stats.json").read_text())["cases"] == 3


# ---- the cache follows the raw files (issue 19 item 2) ----

def _rewrite_seg(root: Path, case: str, seg: np.ndarray) -> None:
    """Rewrite a label map in place; the modification time is moved on by a second, as an edit a moment later
    would, so the test does not depend on the file system's timestamp granularity."""
    path = root / case / f"{case}_seg.nii.gz"
    before = path.stat().st_mtime_ns
    nib.save(nib.Nifti1Image(seg, np.eye(4)), path)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def _datamodule(root: Path, tmp_path: Path, run: str, **kw):
    from brats_unet.data.datamodule import BratsDataModule

    dm = BratsDataModule(root=root, layout="brats2021", cache_dir=tmp_path / "cache", preprocess=SEED,
                         patch_size=(8, 8, 8), batch_size=1, num_workers=0, val_fraction=0.34,
                         output_dir=tmp_path / run, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_a_label_map_rewritten_in_place_is_preprocessed_again(root, tmp_path, caplog):
    out = build_cache(root, "brats2021", tmp_path / "cache", SEED, num_workers=0, progress=False)
    assert load_cached(out, "BraTS2021_00001", mmap=False)[1][3, 3, 4] == 1  # NCR at [5, 5, 4] (box starts at 2)
    assert load_cached(out, "BraTS2021_00001")[2]["raw_files"]["seg"][0] == "BraTS2021_00001_seg.nii.gz"
    seg = np.zeros(SHAPE, np.uint8)
    seg[5:9, 5:10, 4:6] = 2  # the NCR block relabelled as oedema
    _rewrite_seg(root, "BraTS2021_00001", seg)
    untouched = (out / "BraTS2021_00000_x.npy").stat().st_mtime_ns
    with caplog.at_level(logging.WARNING):
        build_cache(root, "brats2021", tmp_path / "cache", SEED, num_workers=0, progress=False)  # brats-preprocess
    assert "BraTS2021_00001: raw files changed since it was cached; preprocessing it again" in caplog.text
    y = load_cached(out, "BraTS2021_00001", mmap=False)[1]
    assert y[3, 3, 4] == 2 and np.count_nonzero(y == 1) == 0 and np.count_nonzero(y == 2) == 40
    assert (out / "BraTS2021_00000_x.npy").stat().st_mtime_ns == untouched  # unchanged cases are not rebuilt
    # A training's prepare_data does the same check: a second edit reaches the arrays its split reads.
    seg[5:9, 5:10, 4:6] = 4
    _rewrite_seg(root, "BraTS2021_00001", seg)
    _datamodule(root, tmp_path, "run")
    assert load_cached(out, "BraTS2021_00001", mmap=False)[1][3, 3, 4] == 3  # ET, internal class 3


def test_a_deleted_case_folder_leaves_the_cache_and_the_next_split(root, tmp_path, caplog):
    import shutil

    before = _datamodule(root, tmp_path, "run1")
    assert sorted(before.split["train"] + before.split["val"]) == [f"BraTS2021_0000{i}" for i in range(3)]
    shutil.rmtree(root / "BraTS2021_00002")
    with caplog.at_level(logging.WARNING):
        after = _datamodule(root, tmp_path, "run2")
    assert sorted(after.split["train"] + after.split["val"]) == ["BraTS2021_00000", "BraTS2021_00001"]
    assert f"BraTS2021_00002: its raw case is no longer in {root}; removed from the cache" in caplog.text
    assert cached_cases(after.cache_path) == ["BraTS2021_00000", "BraTS2021_00001"]
    # Resuming the first run, whose split names the deleted case, is refused with the case named.
    with pytest.raises(BratsError, match=r"split\.json: names 1 cases missing from the cache .*: BraTS2021_00002"):
        _datamodule(root, tmp_path, "run1")


def test_skip_bad_cases_takes_a_bad_case_in_once_its_files_are_fixed(root, tmp_path):
    write_case(root, 3)
    _break_case(root)
    first = _datamodule(root, tmp_path, "run1", skip_bad_cases=True)
    assert set(first.split["train"] + first.split["val"]) == {"BraTS2021_00000", "BraTS2021_00003"}
    bad = json.loads((first.cache_path / "bad_cases.json").read_text())
    assert [b["case"] for b in bad] == ["BraTS2021_00001", "BraTS2021_00002"]
    again = _datamodule(root, tmp_path, "run2", skip_bad_cases=True)  # nothing fixed: still out
    assert set(again.split["train"] + again.split["val"]) == {"BraTS2021_00000", "BraTS2021_00003"}
    seg = np.zeros(SHAPE, np.uint8)
    seg[5:9, 5:10, 4:6] = 1
    _rewrite_seg(root, "BraTS2021_00001", seg)  # the wrong label fixed
    fixed = _datamodule(root, tmp_path, "run3", skip_bad_cases=True)
    assert set(fixed.split["train"] + fixed.split["val"]) == {"BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00003"}
    assert [b["case"] for b in json.loads((fixed.cache_path / "bad_cases.json").read_text())] == ["BraTS2021_00002"]
    assert load_cached(fixed.cache_path, "BraTS2021_00001", mmap=False)[1].sum() == 40


def test_a_cache_built_before_raw_stamps_is_kept_unless_a_raw_file_is_newer(root, tmp_path):
    out = build_cache(root, "brats2021", tmp_path / "cache", SEED, num_workers=0, progress=False)
    for case in cached_cases(out):  # as an older version wrote them: no raw_files
        meta = json.loads((out / f"{case}.json").read_text())
        del meta["raw_files"]
        (out / f"{case}.json").write_text(json.dumps(meta))
    seg = np.zeros(SHAPE, np.uint8)
    seg[5:9, 5:10, 4:6] = 2
    path = root / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz"
    nib.save(nib.Nifti1Image(seg, np.eye(4)), path)
    later = (out / "BraTS2021_00001.json").stat().st_mtime_ns + 10**9
    os.utime(path, ns=(later, later))  # edited after the entry was written
    build_cache(root, "brats2021", tmp_path / "cache", SEED, num_workers=0, progress=False)
    assert "raw_files" not in json.loads((out / "BraTS2021_00000.json").read_text())  # older raw files: kept
    assert load_cached(out, "BraTS2021_00001", mmap=False)[1].max() == 2  # newer: rebuilt (and stamped)
    assert "raw_files" in load_cached(out, "BraTS2021_00001")[2]


def test_the_check_reads_the_index_not_every_meta(root, tmp_path):
    from brats_unet.data.cache import cache_status

    out = build_cache(root, "brats2021", tmp_path / "cache", SEED, num_workers=0, progress=False)
    meta = out / "BraTS2021_00001.json"
    written = meta.stat().st_mtime_ns
    meta.write_text("not json")  # were it parsed, the case would count as changed
    os.utime(meta, ns=(written, written))  # ... but config.json's index still vouches for this very file
    dirs = sorted(p for p in root.iterdir())
    status = cache_status(out, dirs, "brats2021", SEED["modalities"])
    assert status.current == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"] and not status.changed
    os.utime(meta, ns=(written + 1, written + 1))  # another meta than the index saw: read it, and rebuild
    assert cache_status(out, dirs, "brats2021", SEED["modalities"]).changed == ["BraTS2021_00001"]
