import json

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import compose_train

from brats_unet.data import cache
from brats_unet.data.datamodule import BratsDataModule, LoaderSettings
from brats_unet.data.split import SplitSpec, load_split, make_split
from brats_unet.utils import BratsError

PRE = {"name": "modern", "modalities": ["t1ce", "t2", "flair"], "normalize": "zscore", "crop": "nonzero",
       "crop_box": None, "foreground_channel": False, "dtype": "float16"}
MODERN_AUG = {"brightness": {"p": 0.3}, "flip": {"p": 0.5}, "intensity": {"p": 0.5}, "noise": {"p": 0.15}}
SHAPE = (12, 10, 8)


def _names(n):
    return [f"BraTS2021_{i:05d}" for i in range(n)]


# ---- make_split: pure -------------------------------------------------------------------------------------------


def test_split_by_fractions_of_all_cases():
    split = make_split(_names(10), seed=0, val_fraction=0.2, test_fraction=0.1)
    assert [len(split[k]) for k in ("train", "val", "test")] == [7, 2, 1]
    assert sorted(split["train"] + split["val"] + split["test"]) == _names(10)
    assert split["seed"] == 0 and split["fold"] == 0


def test_split_is_seeded():
    assert make_split(_names(20), seed=1) == make_split(_names(20), seed=1)
    assert make_split(_names(20), seed=1)["val"] != make_split(_names(20), seed=2)["val"]


def test_split_by_counts_as_in_the_paper():
    split = make_split(_names(130), seed=0, train_cases=100, val_cases=20)
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (100, 20, 0)
    assert not set(split["train"]) & set(split["val"])


def test_split_by_counts_says_which_key_asks_too_much():
    with pytest.raises(BratsError, match=r"data\.train_cases=100 and data\.val_cases=20 .* only 50 cached cases"):
        make_split(_names(50), seed=0, train_cases=100, val_cases=20)


def test_kfold_folds_are_disjoint_and_cover_the_non_test_cases():
    splits = [make_split(_names(11), seed=3, test_fraction=0.1, num_folds=5, fold=k) for k in range(5)]
    test = splits[0]["test"]
    assert len(test) == 1 and all(s["test"] == test for s in splits)
    vals = [set(s["val"]) for s in splits]
    assert sum(len(v) for v in vals) == 10 and set().union(*vals) == set(_names(11)) - set(test)
    for s in splits:
        assert not set(s["train"]) & set(s["val"]) and len(s["train"]) + len(s["val"]) == 10
    with pytest.raises(BratsError, match=r"data\.fold must be in \[0, 5\)"):
        make_split(_names(11), seed=3, num_folds=5, fold=5)


def _pick(indices):
    return [_names(10)[i] for i in indices]


def test_default_single_split_is_the_one_finished_runs_used():
    # Written by the code before k-fold support: existing runs' cases (and so their numbers) must not move.
    split = make_split(_names(10), seed=0, val_fraction=0.2, test_fraction=0.2)
    assert (split["train"], split["val"], split["test"]) == (_pick([0, 1, 3, 5, 8, 9]), _pick([2, 7]), _pick([4, 6]))
    split = make_split(_names(10), seed=7, train_cases=5, val_cases=3, test_fraction=0.1)
    assert (split["train"], split["val"], split["test"]) == (_pick([2, 3, 4, 5, 6]), _pick([0, 1, 7]), _pick([8]))
    assert (split["fold"], split["num_folds"]) == (0, 1)


def test_kfold_assignment_is_the_same_on_every_machine():
    # SHA-256 of "<seed>:<case>" ranks the cases, so these lists hold on any machine, Python or numpy version.
    splits = [make_split(_names(10), seed=0, test_fraction=0.2, num_folds=3, fold=k) for k in range(3)]
    assert [s["val"] for s in splits] == [_pick([4, 5, 8]), _pick([0, 2, 7]), _pick([1, 3])]
    assert all(s["test"] == _pick([6, 9]) for s in splits)
    assert splits[1] == {"train": _pick([1, 3, 4, 5, 8]), "val": _pick([0, 2, 7]), "test": _pick([6, 9]), "seed": 0,
                         "fold": 1, "num_folds": 3, "val_fraction": 0.2, "test_fraction": 0.2, "train_cases": None,
                         "val_cases": None, "stratify": False}
    assert make_split(_names(10), seed=1, test_fraction=0.2, num_folds=3, fold=0)["val"] != splits[0]["val"]


# The demo's 20 cases (brats-synth --seed 0 ... --nonenhancing-share 0.25 --healthy-fraction 0.2) by stratum.
DEMO_STRATA = {**{c: "wt+tc+et" for c in _names(20)},
               **{f"BraTS2021_{i:05d}": "none" for i in (4, 9, 12, 17)},
               **{f"BraTS2021_{i:05d}": "wt+tc" for i in (13, 14, 19)}}


def test_stratified_split_deals_each_stratum_by_largest_remainder():
    # Unstratified (seed 0), the permutation is 04 19 06 02 | 13 16 03 11 | 10 08 00 12 07 05 18 17 14 09 01 15: test
    # 02 04 06 19 and validation 03 11 13 16, so no healthy head validates. Shares of 4 of 20: wt+tc+et 13 -> 2.6,
    # none 4 -> 0.8, wt+tc 3 -> 0.6. Floors 2 + 0 + 0; the 2 left go by remainder, none (0.8), then the tie at 0.6 to
    # the rarer wt+tc. Each stratum gives its first cases in the permutation: test 06 02 | 04 | 19 (unchanged),
    # validation 16 03 | 12 | 13 (the healthy 12 takes the place of 11).
    names = _names(20)
    plain = make_split(names, seed=0, val_fraction=0.2, test_fraction=0.2)
    split = make_split(names, seed=0, val_fraction=0.2, test_fraction=0.2, stratify=True, strata=DEMO_STRATA)
    assert split["test"] == plain["test"] == [f"BraTS2021_{i:05d}" for i in (2, 4, 6, 19)]
    assert plain["val"] == [f"BraTS2021_{i:05d}" for i in (3, 11, 13, 16)]
    assert split["val"] == [f"BraTS2021_{i:05d}" for i in (3, 12, 13, 16)]
    assert sorted(split["train"]) == sorted(set(names) - set(split["val"]) - set(split["test"]))
    assert split["stratify"] is True and SplitSpec(test_fraction=0.2, stratify=True).deciding()["stratify"] is True


def test_stratified_split_by_counts_and_folds():
    names = _names(20)
    split = make_split(names, seed=0, train_cases=10, val_cases=5, stratify=True, strata=DEMO_STRATA)
    # 5 of 20: 13 -> 3.25, 4 -> 1, 3 -> 0.75: 3 + 1 + 0, the one left to wt+tc (0.75 > 0.25); 10 of 20 for training:
    # 6.5, 2, 1.5 -> 6 + 2 + 1, the one left to the rarer wt+tc's 0.5 (tied with wt+tc+et's), which has 1 left.
    assert [sum(DEMO_STRATA[c] == s for c in split["val"]) for s in ("wt+tc+et", "none", "wt+tc")] == [3, 1, 1]
    assert [sum(DEMO_STRATA[c] == s for c in split["train"]) for s in ("wt+tc+et", "none", "wt+tc")] == [6, 2, 2]
    folds = [make_split(names, seed=0, test_fraction=0.2, num_folds=3, fold=k, stratify=True, strata=DEMO_STRATA)
             for k in range(3)]
    test = folds[0]["test"]
    assert all(f["test"] == test for f in folds) and [DEMO_STRATA[c] for c in test].count("none") == 1
    # 15 healthy-or-tumour cases left over 3 folds, rarest stratum first: wt+tc (2 left) in folds 0, 1; none (3) in
    # 2, 0, 1; wt+tc+et (11) from fold 2 on: sizes 5 / 5 / 6 - 1 ... each fold holds a healthy head.
    vals = [f["val"] for f in folds]
    assert sorted(c for v in vals for c in v) == sorted(set(names) - set(test))
    assert [len(v) for v in vals] == [6, 5, 5]
    assert all([DEMO_STRATA[c] for c in v].count("none") == 1 for v in vals)
    assert [[DEMO_STRATA[c] for c in v].count("wt+tc") for v in vals] == [1, 1, 0]


def test_stratify_needs_every_cases_stratum_and_a_boolean():
    with pytest.raises(BratsError, match="data.stratify needs each case's stratum"):
        make_split(_names(5), seed=0, stratify=True, strata={"BraTS2021_00000": "none"})
    with pytest.raises(BratsError, match="data.stratify must be true or false, got 'yes'"):
        BratsDataModule("x", "brats2021", "c", PRE, patch_size=(8, 8, 8), stratify="yes")


@pytest.mark.parametrize(("n", "k", "test_fraction", "seed"), [(6, 2, 0.2, 0), (20, 3, 0.2, 0), (23, 5, 0.0, 4),
                                                               (50, 5, 0.1, 123)])
def test_kfold_partition_properties(n, k, test_fraction, seed):
    names = [f"case_{i:03d}" for i in range(n)]
    splits = [make_split(list(reversed(names)), seed=seed, test_fraction=test_fraction, num_folds=k, fold=f)
              for f in range(k)]
    assert splits == [make_split(names, seed=seed, test_fraction=test_fraction, num_folds=k, fold=f) for f in range(k)]
    test = set(splits[0]["test"])
    assert len(test) == (max(1, round(test_fraction * n)) if test_fraction else 0)
    assert all(set(s["test"]) == test for s in splits)  # held out identically for every fold
    vals = [set(s["val"]) for s in splits]
    assert sorted(c for v in vals for c in v) == sorted(set(names) - test)  # each non-test case in exactly one fold
    assert max(map(len, vals)) - min(map(len, vals)) <= 1
    for s in splits:
        assert set(s["train"]) | set(s["val"]) == set(names) - test and not set(s["train"]) & set(s["val"])
        assert (s["seed"], s["num_folds"]) == (seed, k)


@pytest.mark.parametrize(("num_folds", "fold", "message"), [
    (1, 1, r"data\.fold must be in \[0, 1\) for data\.num_folds=1, got 1 \(data\.fold picks a fold of a k-fold split: "
           r"set data\.num_folds too\)"),
    (3, -1, r"data\.fold must be in \[0, 3\) for data\.num_folds=3, got -1"),
    (0, 0, r"data\.num_folds must be an integer >= 1, got 0"),
])
def test_bad_folds_are_refused(num_folds, fold, message):
    with pytest.raises(BratsError, match=message):
        make_split(_names(10), seed=0, num_folds=num_folds, fold=fold)


def test_a_fold_without_num_folds_stops_brats_train_before_caching(tmp_path):
    from helpers import compose_train, tiny_overrides

    from brats_unet.training.preflight import check_values as validate_train_config

    cfg = compose_train([*tiny_overrides(tmp_path, tmp_path, tmp_path), "data.fold=1"])
    with pytest.raises(BratsError, match=r"data\.fold must be in \[0, 1\) for data\.num_folds=1, got 1 \(data\.fold "):
        validate_train_config(cfg)


def test_split_files_from_before_folds_read_as_one_fold(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ["a"], "val": ["b"], "test": [], "seed": 0, "fold": 0}))
    assert load_split(path)["num_folds"] == 1


def test_split_rejects_fractions_that_leave_nothing():
    with pytest.raises(BratsError, match=r"data\.val_fraction \(0\.6\) and data\.test_fraction \(0\.5\)"):
        make_split(_names(10), seed=0, val_fraction=0.6, test_fraction=0.5)


# ---- DataModule on a tiny cache ---------------------------------------------------------------------------------


@pytest.fixture
def tiny_cache(tmp_path):
    """Six cases in the cache format, at the folder the DataModule computes; no raw data (root is absent)."""
    root, cache_dir = tmp_path / "raw", tmp_path / "cache"
    folder = cache.cache_path(cache_dir, "brats2021", root, PRE)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for case in _names(6):
        x = rng.standard_normal((3, *SHAPE)).astype(np.float16)
        y = np.zeros(SHAPE, dtype=np.uint8)
        y[2:5, 3:6, 1:4] = rng.integers(1, 4, size=(3, 3, 3))
        np.save(folder / f"{case}_x.npy", x)
        np.save(folder / f"{case}_y.npy", y)
        meta = {"foreground_coords_sample": np.argwhere(y > 0).tolist(), "spacing": [1.0, 1.0, 2.0]}
        (folder / f"{case}.json").write_text(json.dumps(meta))
    return {"root": root, "cache_dir": cache_dir, "folder": folder, "out": tmp_path / "run"}


def _dm(tiny_cache, **kw):
    args = dict(root=tiny_cache["root"], layout="brats2021", cache_dir=tiny_cache["cache_dir"], preprocess=PRE,
                augment=MODERN_AUG, patch_size=(8, 8, 8), batch_size=2, num_workers=0, val_fraction=0.2,
                test_fraction=0.2, output_dir=tiny_cache["out"], seed=0)
    args.update(kw)
    dm = BratsDataModule(**{k: v for k, v in args.items() if v is not None})  # None: leave the key out
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_split_json_is_written_and_reused_on_resume(tiny_cache):
    dm = _dm(tiny_cache)
    written = json.loads((tiny_cache["out"] / "split.json").read_text())
    assert [len(written[k]) for k in ("train", "val", "test")] == [4, 1, 1]
    assert written == dm.split
    assert (written["val_fraction"], written["test_fraction"], written["seed"]) == (0.2, 0.2, 0)  # the spec too
    resumed = _dm(tiny_cache)
    assert resumed.split == written


def test_a_stratified_split_reads_each_cases_regions_from_the_cache(tiny_cache):
    with pytest.raises(BratsError, match=r"BraTS2021_00000\.json: no class_voxels to stratify the split by"):
        _dm(tiny_cache, stratify=True)
    for i, case in enumerate(_names(6)):  # 00000-00002 heads without tumour, 00003-00005 tumours with every class
        path = tiny_cache["folder"] / f"{case}.json"
        counts = {"background": 100, "ncr": 0, "ed": 0, "et": 0} if i < 3 else {"background": 90, "ncr": 3, "ed": 4,
                                                                                 "et": 3}
        path.write_text(json.dumps({**json.loads(path.read_text()), "class_voxels": counts}))
    dm = _dm(tiny_cache, stratify=True)
    # 1 test and 1 validation case of 6: each stratum's share is 0.5, a tie of equal strata, which goes to "none"
    # (ordered by name), so both held-out cases are healthy and training keeps one healthy head.
    healthy = set(_names(3))
    assert set(dm.split["test"]) <= healthy and set(dm.split["val"]) <= healthy
    assert len(set(dm.split["train"]) & healthy) == 1 and dm.split["stratify"] is True
    assert json.loads((tiny_cache["out"] / "split.json").read_text()) == dm.split


def _checkpoint_in(run):
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"trained on the split beside it")


@pytest.mark.parametrize(("key", "value", "message"), [
    ("fold", 2, r"data\.fold: split\.json has 0, the config asks 2"),
    ("num_folds", 2, r"data\.num_folds: split\.json has 3, the config asks 2"),
    ("split_seed", 9, r"data\.split_seed: split\.json has 0, the config asks 9"),
    ("test_fraction", 0.4, r"data\.test_fraction: split\.json has 0\.2, the config asks 0\.4"),
    ("stratify", True, r"data\.stratify: split\.json has False, the config asks True"),
])
def test_a_run_dirs_split_for_other_settings_is_refused_when_a_checkpoint_depends_on_it(tiny_cache, key, value,
                                                                                         message):
    _dm(tiny_cache, num_folds=3, fold=0)
    _checkpoint_in(tiny_cache["out"])
    with pytest.raises(BratsError, match=message + r".*last\.ckpt was trained on it"):
        _dm(tiny_cache, **{"num_folds": 3, "fold": 0, key: value})


def test_a_single_splits_fractions_and_counts_are_checked_too(tiny_cache):
    _dm(tiny_cache)
    _checkpoint_in(tiny_cache["out"])
    with pytest.raises(BratsError, match=r"data\.val_fraction: split\.json has 0\.2, the config asks 0\.4"):
        _dm(tiny_cache, val_fraction=0.4)
    with pytest.raises(BratsError, match=r"data\.val_cases: split\.json has None, the config asks 1"):
        _dm(tiny_cache, val_cases=1)


def test_a_split_json_no_checkpoint_depends_on_is_written_anew(tiny_cache, caplog):
    first = _dm(tiny_cache, num_folds=3, fold=0).split
    again = _dm(tiny_cache, num_folds=3, fold=2)
    assert "no checkpoint depends on it, so it is written anew" in caplog.text
    stored = json.loads((tiny_cache["out"] / "split.json").read_text())
    assert stored["fold"] == 2 and stored["val"] == again.split["val"] != first["val"]
    assert again.split["val"] == make_split(_names(6), seed=0, test_fraction=0.2, num_folds=3, fold=2)["val"]


def test_a_fresh_run_allowed_to_overwrite_writes_its_own_split(tiny_cache):
    _dm(tiny_cache, num_folds=3, fold=0)
    _checkpoint_in(tiny_cache["out"])
    args = dict(root=tiny_cache["root"], layout="brats2021", cache_dir=tiny_cache["cache_dir"], preprocess=PRE,
                patch_size=(8, 8, 8), num_workers=0, test_fraction=0.2, num_folds=3, fold=1,
                output_dir=tiny_cache["out"])
    dm = BratsDataModule(**args)
    dm.fresh_run = True  # what brats-train sets for a run without ckpt_path (overwrite=true let it start)
    dm.setup("fit")
    assert json.loads((tiny_cache["out"] / "split.json").read_text())["fold"] == 1


def test_a_split_json_from_before_the_spec_was_recorded_is_still_checked_on_what_it_holds(tiny_cache):
    run = tiny_cache["out"]
    run.mkdir(parents=True)
    old = make_split(_names(6), seed=0, test_fraction=0.2, num_folds=3, fold=0)
    (run / "split.json").write_text(json.dumps({k: old[k] for k in ("train", "val", "test", "seed", "fold",
                                                                    "num_folds")}))
    _checkpoint_in(run)
    assert _dm(tiny_cache, num_folds=3, fold=0, test_fraction=0.4).split["val"] == old["val"]  # not recorded
    with pytest.raises(BratsError, match=r"data\.fold: split\.json has 0, the config asks 1"):
        _dm(tiny_cache, num_folds=3, fold=1)


def test_split_from_counts_and_a_clear_error_when_short(tiny_cache):
    dm = _dm(tiny_cache, output_dir=None, test_fraction=0.0, train_cases=3, val_cases=2)
    assert (len(dm.split["train"]), len(dm.split["val"])) == (3, 2)
    with pytest.raises(BratsError, match=r"data\.train_cases=5"):
        _dm(tiny_cache, output_dir=None, train_cases=5, val_cases=2)


def test_split_file_naming_unknown_cases_is_refused(tiny_cache, tmp_path):
    bad = tmp_path / "other_split.json"
    bad.write_text(json.dumps({"train": ["BraTS2021_00000", "BraTS2021_99999"], "val": [], "test": []}))
    with pytest.raises(BratsError, match=r"other_split\.json: names 1 cases missing from the cache .*BraTS2021_99999"):
        _dm(tiny_cache, split_file=bad)


def test_train_batches_have_patch_shapes_and_dtypes(tiny_cache):
    dm = _dm(tiny_cache, steps_per_epoch=3)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    b = batches[0]
    assert b["image"].shape == (2, 3, 8, 8, 8) and b["image"].dtype == torch.float32
    assert b["label"].shape == (2, 8, 8, 8) and b["label"].dtype == torch.uint8  # widened in the module
    assert len(b["case"]) == 2 and set(b["case"]) <= set(dm.split["train"])
    assert set(torch.unique(b["label"]).tolist()) <= {0, 1, 2, 3}


def test_train_patches_are_aligned_windows_of_the_cached_case(tiny_cache):
    dm = _dm(tiny_cache, augment=None, steps_per_epoch=6)
    n = 0
    for b in dm.train_dataloader():
        for image, label, case in zip(b["image"], b["label"], b["case"], strict=True):
            x, y, _ = cache.load_cached(tiny_cache["folder"], case, mmap=False)
            # The 8^3 patch fits 5 x 3 x 1 ways into the 12 x 10 x 8 volume: find where image and label came from.
            hits = [(i, j) for i in range(5) for j in range(3)
                    if np.array_equal(image.numpy(), x[:, i:i + 8, j:j + 8].astype(np.float32))
                    and np.array_equal(label.numpy(), y[i:i + 8, j:j + 8])]
            assert len(hits) == 1, f"{case}: patch is not one aligned window of the cached volume"
            n += 1
    assert n == 12


def test_samples_per_epoch_defaults_to_one_patch_per_training_case(tiny_cache):
    dm = _dm(tiny_cache, batch_size=3)
    assert dm.samples_per_epoch == 4 and len(dm.train_dataloader()) == 1  # drop_last: 4 patches -> 1 batch of 3


def test_patch_larger_than_the_volume_is_zero_padded(tiny_cache):
    dm = _dm(tiny_cache, patch_size=(16, 8, 8), augment=None, foreground_fraction=0.0, steps_per_epoch=4)
    for b in dm.train_dataloader():
        assert b["image"].shape == (2, 3, 16, 8, 8)
        for image, label in zip(b["image"], b["label"], strict=True):
            empty = (image == 0).all(dim=(0, 2, 3)).tolist()  # per x-plane
            lead = empty.index(False)
            # The 12 data planes sit in one block; the 4 padding planes are split between the two ends.
            assert empty == [True] * lead + [False] * 12 + [True] * (4 - lead)
            assert not label[:lead].any() and not label[lead + 12 :].any()


def test_split_file_from_another_run_is_reused_and_copied(tiny_cache, tmp_path):
    first = _dm(tiny_cache)
    second = _dm(tiny_cache, split_seed=7, split_file=tiny_cache["out"] / "split.json", output_dir=tmp_path / "run2")
    assert second.split == first.split
    assert json.loads((tmp_path / "run2" / "split.json").read_text()) == first.split


def test_same_seed_same_batches_and_workers_do_not_matter(tiny_cache):
    def batches(**kw):
        return [(b["image"], b["label"], b["case"]) for b in _dm(tiny_cache, output_dir=None, **kw).train_dataloader()]

    a, b, c = batches(), batches(), batches(num_workers=2)
    for (xa, ya, ca), (xb, yb, cb), (xc, yc, cc) in zip(a, b, c, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and ca == cb
        assert torch.equal(xa, xc) and torch.equal(ya, yc) and ca == cc
    other = batches(seed=1)
    assert any(not torch.equal(x, o[0]) for (x, _, _), o in zip(a, other, strict=True))


def test_val_loader_returns_whole_volumes_with_spacing(tiny_cache):
    dm = _dm(tiny_cache)
    (b,) = list(dm.val_dataloader())
    case = dm.split["val"][0]
    x, y, _ = cache.load_cached(tiny_cache["folder"], case)
    assert b["case"] == [case]
    assert b["image"].shape == (1, 3, *SHAPE) and b["image"].dtype == torch.float32
    assert torch.equal(b["image"][0], torch.from_numpy(x.astype(np.float32)))
    assert torch.equal(b["label"][0], torch.from_numpy(y.astype(np.uint8)))
    assert b["spacing"].tolist() == [[1.0, 1.0, 2.0]]
    assert len(list(dm.test_dataloader())) == 1


def test_bad_arguments_name_their_config_key_as_brats_train_does(tiny_cache):
    """One check, one message: the DataModule built directly says what brats-train's preflight says."""
    from brats_unet.training.preflight import check_values

    cases = [({"patch_size": [128, 128]}, r"data\.patch_size must hold 3 positive integers, got 2: \[128, 128\]"),
             ({"patch_size": [8, 0, 8]}, r"data\.patch_size must be positive .*\[0\] <= 0"),
             ({"batch_size": 0}, r"data\.batch_size must be a positive integer, got 0"),
             ({"foreground_fraction": 1.5}, r"data\.foreground_fraction must be a number in \[0, 1\], got 1\.5"),
             ({"steps_per_epoch": 0}, r"data\.steps_per_epoch must be a positive integer or null, got 0"),
             ({"pin_memory": "yes"}, r"data\.pin_memory must be true, false or auto, got 'yes'"),
             ({"foreground_sampling": "class"},
              r"data\.foreground_sampling must be one of voxel, region, got 'class'")]
    for change, message in cases:
        with pytest.raises(BratsError, match=message):
            _dm(tiny_cache, **change)
        key, value = next(iter(change.items()))
        with pytest.raises(BratsError, match=message):
            check_values(compose_train([f"data.{key}={value}".replace(" ", "")]))
    with pytest.raises(BratsError, match=r"unknown data config keys: data\.batchsize"):
        _dm(tiny_cache, batchsize=2)


def test_region_sampling_changes_only_where_forced_patches_centre(tiny_cache):
    voxel, region = _dm(tiny_cache), _dm(tiny_cache, foreground_sampling="region")
    assert voxel.train_set.region_classes is None
    assert region.train_set.region_classes == [(1, 2, 3), (1, 3), (3,)]  # WT, TC, ET of brats2021
    batch = next(iter(region.train_dataloader()))
    assert batch["image"].shape == (2, 3, 8, 8, 8) and batch["label"].dtype == torch.uint8
    # Each case's groups are the regions of its own cached labels at its foreground coordinates.
    case = region.split["train"][0]
    y = np.load(tiny_cache["folder"] / f"{case}_y.npy")
    _, _, labels, coords, _ = region.train_set.cases.get(region.train_set.cases.cases.index(case))
    groups = region.train_set.groups(case, labels, coords)
    assert len(groups) == 3  # the fixture's tumours hold every class
    for group, classes in zip(groups, [(1, 2, 3), (1, 3), (3,)], strict=True):
        assert np.isin(y[tuple(coords[group].T)], classes).all()


def test_pin_memory_auto_pins_only_for_a_cuda_trainer(tiny_cache):
    from lightning.pytorch import Trainer

    dm = _dm(tiny_cache)  # data.pin_memory defaults to auto
    assert dm.loader.pin_memory == "auto" and dm.pin_memory is False  # no trainer: nothing says CUDA
    dm.trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    assert dm.pin_memory is False and dm.train_dataloader().pin_memory is False
    assert _dm(tiny_cache, pin_memory=True).train_dataloader().pin_memory is True  # an explicit value wins


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pin_memory_auto_pins_for_a_gpu_trainer(tiny_cache):
    from lightning.pytorch import Trainer

    dm = _dm(tiny_cache)
    dm.trainer = Trainer(accelerator="gpu", devices=1, logger=False, enable_checkpointing=False)
    assert dm.pin_memory is True and dm.train_dataloader().pin_memory is True
    assert _dm(tiny_cache, pin_memory=False).pin_memory is False


def test_the_split_and_loader_come_as_one_argument_each_or_as_the_configs_flat_keys(tiny_cache):
    grouped = _dm(tiny_cache, batch_size=None, num_workers=None, val_fraction=None, test_fraction=None,
                  split=SplitSpec(val_fraction=0.2, test_fraction=0.2), loader=LoaderSettings(batch_size=2,
                                                                                              num_workers=0))
    flat = _dm(tiny_cache)
    assert grouped.split == flat.split and grouped.loader == flat.loader
    with pytest.raises(BratsError, match=r"pass either split= or its data\.\* keys \(fold\), not both"):
        _dm(tiny_cache, split=SplitSpec(), val_fraction=None, test_fraction=None, fold=0)


def test_num_channels_needs_no_setup(tmp_path):
    dm = BratsDataModule(root=tmp_path, layout="brats2021", cache_dir=tmp_path, preprocess=PRE)
    assert dm.num_channels == 3
    with_mask = BratsDataModule(root=tmp_path, layout="brats2021", cache_dir=tmp_path,
                                preprocess={**PRE, "modalities": ["t1", "t1ce", "t2", "flair"],
                                            "foreground_channel": True})
    assert with_mask.num_channels == 5


def _write_raw_case(root, case, rng):
    folder = root / case
    folder.mkdir(parents=True)
    shape = (20, 18, 14)
    brain = np.zeros(shape, dtype=bool)
    brain[3:17, 2:16, 2:12] = True
    seg = np.zeros(shape, dtype=np.int16)
    seg[6:10, 6:10, 5:8] = 2
    seg[7:9, 7:9, 6:7] = 4
    for mod in ("t1", "t1ce", "t2", "flair", "seg"):
        data = seg if mod == "seg" else (brain * rng.integers(100, 1000, size=shape)).astype(np.int16)
        nib.save(nib.Nifti1Image(data, np.eye(4)), folder / f"{case}_{mod}.nii.gz")


def test_prepare_data_builds_the_cache_from_raw_nifti(tmp_path):
    root = tmp_path / "raw"
    rng = np.random.default_rng(0)
    for case in _names(3):
        _write_raw_case(root, case, rng)
    dm = BratsDataModule(root=root, layout="brats2021", cache_dir=tmp_path / "cache", preprocess=PRE,
                         patch_size=(8, 8, 8), batch_size=2, num_workers=0, val_fraction=0.34, seed=0)
    dm.prepare_data()
    assert cache.cached_cases(dm.cache_path) == _names(3)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b["image"].shape == (2, 3, 8, 8, 8)
    (v,) = list(dm.val_dataloader())
    assert v["image"].shape == (1, 3, 14, 14, 10)  # cropped to the non-zero brain box


def test_case_balance_weights_training_cases_by_tumour_type_from_the_cache_meta(tiny_cache):
    assert _dm(tiny_cache).case_weights() is None  # default: uniform permutations, as before
    dm = _dm(tiny_cache, case_balance=1.0)
    rare = dm.split["train"][0]
    for case in dm.split["train"]:
        path = tiny_cache["folder"] / f"{case}.json"
        meta = json.loads(path.read_text())
        meta["class_voxels"] = {"background": 900, "ncr": 5, "ed": 20, "et": 0 if case == rare else 7}
        path.write_text(json.dumps(meta))
    weights = dm.case_weights()  # 1 case without ET, 3 with: each type half of the draws
    assert weights.tolist() == pytest.approx([0.5, 0.5 / 3, 0.5 / 3, 0.5 / 3])
    drawn = [c for c, _ in dm.train_dataloader().sampler]
    assert drawn.count(0) > len(drawn) / 4
    with pytest.raises(BratsError, match="data.case_balance must be a number in \\[0, 1\\], got 2"):
        _dm(tiny_cache, case_balance=2)


def test_nnunet_augment_in_the_loader_is_seeded_and_keeps_labels(tiny_cache):
    # Every spatial sample rotated and zoomed (cut from a larger region), all intensity steps on.
    steps = {"spatial": {"p": 1.0, "p_rotation": 1.0, "p_scaling": 1.0}, "flip": {"p": 0.5},
             **{name: {"p": 1.0} for name in ("gaussian_noise", "blur", "multiplicative_brightness", "contrast",
                                              "low_resolution", "inverted_gamma", "gamma")}}
    dm = _dm(tiny_cache, augment=steps)
    first, again, other = (dm.train_set[(0, seed)] for seed in (11, 11, 12))
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["label"], again["label"])
    assert not torch.equal(first["image"], other["image"])
    for item in (first, other):
        assert item["image"].shape == (3, 8, 8, 8) and item["label"].shape == (8, 8, 8)
        assert set(item["label"].unique().tolist()) <= {0, 1, 2, 3}
