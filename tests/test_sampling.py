import numpy as np
import pytest
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

from brats_unet.data.sampling import (
    PatchSampler,
    case_weights,
    choose_patch_start,
    crop_or_pad,
    random_patch_start,
    region_groups,
    tumour_type,
)


def test_random_patch_start_covers_exactly_the_valid_range():
    shape, patch = (10, 12, 8), (4, 5, 8)
    rng = np.random.default_rng(0)
    starts = np.array([random_patch_start(shape, patch, rng) for _ in range(600)])
    assert [set(starts[:, a].tolist()) for a in range(3)] == [set(range(7)), set(range(8)), {0}]


def test_random_patch_start_on_a_short_axis_is_negative_so_the_volume_fits_inside():
    rng = np.random.default_rng(1)
    starts = {random_patch_start((3, 6, 6), (5, 6, 6), rng)[0] for _ in range(200)}
    assert starts == {-2, -1, 0}


def test_random_patch_start_with_center_keeps_the_voxel_inside_and_within_bounds():
    shape, patch = (20, 15, 9), (8, 6, 4)
    for seed in range(300):
        rng = np.random.default_rng(seed)
        center = [int(rng.integers(s)) for s in shape]
        start = random_patch_start(shape, patch, rng, center=center)
        for c, s, p, size in zip(center, start, patch, shape, strict=True):
            assert 0 <= s <= size - p
            assert s <= c < s + p


def test_random_patch_start_rejects_a_center_outside_the_volume():
    with pytest.raises(ValueError, match=r"center \(5, 0, 0\) lies outside the volume of shape \(5, 5, 5\)"):
        random_patch_start((5, 5, 5), (2, 2, 2), np.random.default_rng(0), center=(5, 0, 0))


def test_crop_or_pad_pads_with_zeros_by_hand():
    x = np.array([5.0, 7.0], dtype=np.float16).reshape(1, 2, 1, 1)
    y = np.array([3, 1], dtype=np.uint8).reshape(2, 1, 1)
    xp, yp = crop_or_pad(x, y, (-1, 0, 0), (4, 1, 1))
    assert xp.ravel().tolist() == [0.0, 5.0, 7.0, 0.0] and xp.dtype == np.float16
    assert yp.ravel().tolist() == [0, 3, 1, 0] and yp.dtype == np.uint8


def test_crop_or_pad_matches_numpy_pad_and_leaves_inputs_alone():
    x = np.arange(2 * 4 * 5 * 3, dtype=np.float32).reshape(2, 4, 5, 3) + 1
    y = (np.arange(4 * 5 * 3).reshape(4, 5, 3) % 4).astype(np.uint8) + 1
    x0, y0 = x.copy(), y.copy()
    xp, yp = crop_or_pad(x, y, (-1, 2, 1), (6, 4, 3))
    # Rows -1..4 of x (pad 1 before, 1 after), columns 2..5 (pad 1 after), slices 1..3 (pad 1 after).
    expected_x = np.pad(x, ((0, 0), (1, 1), (0, 1), (0, 1)))[:, :, 2:6, 1:4]
    expected_y = np.pad(y, ((1, 1), (0, 1), (0, 1)))[:, 2:6, 1:4]
    np.testing.assert_array_equal(xp, expected_x)
    np.testing.assert_array_equal(yp, expected_y)
    assert xp.shape == (2, 6, 4, 3) and yp.shape == (6, 4, 3)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)


def test_crop_or_pad_fully_outside_is_all_zero_and_y_none_is_allowed():
    x = np.ones((1, 4, 4, 4), dtype=np.float32)
    xp, yp = crop_or_pad(x, None, (10, 0, 0), (2, 2, 2))
    assert yp is None and xp.shape == (1, 2, 2, 2) and not xp.any()


def _single_tumour_voxel():
    shape, voxel = (40, 40, 40), (37, 2, 20)
    return shape, voxel, np.array([voxel])


def test_foreground_oversampling_always_hits_the_tumour_when_forced():
    shape, voxel, coords = _single_tumour_voxel()
    for seed in range(300):
        start = choose_patch_start(shape, (8, 8, 8), np.random.default_rng(seed), coords, foreground_fraction=1.0)
        assert all(s <= v < s + 8 for s, v in zip(start, voxel, strict=True))
        assert all(0 <= s <= 32 for s in start)


def test_foreground_fraction_sets_the_share_of_tumour_patches():
    shape, voxel, coords = _single_tumour_voxel()

    def share(fraction):
        hits = 0
        for seed in range(1000):
            start = choose_patch_start(shape, (8, 8, 8), np.random.default_rng(seed), coords, fraction)
            hits += all(s <= v < s + 8 for s, v in zip(start, voxel, strict=True))
        return hits / 1000

    # A uniform 8^3 patch contains this corner voxel with probability 3/33 * 3/33 * 8/33 = 0.002.
    assert share(0.0) < 0.01
    assert 0.28 < share(0.33) < 0.39


def test_foreground_oversampling_without_tumour_falls_back_to_uniform():
    empty = np.zeros((0, 3), dtype=np.int16)
    for seed in range(20):
        start = choose_patch_start((10, 10, 10), (4, 4, 4), np.random.default_rng(seed), empty, 1.0)
        # The forcing gate is still drawn (so later draws do not depend on the fraction), then a uniform origin.
        expected = np.random.default_rng(seed)
        expected.random()
        assert start == random_patch_start((10, 10, 10), (4, 4, 4), expected)
        assert choose_patch_start((10, 10, 10), (4, 4, 4), np.random.default_rng(seed), None, 0.0) == start


BRATS_REGIONS = [(1, 2, 3), (1, 3), (3,)]  # WT, TC, ET as internal classes (ncr 1, ed 2, et 3)


def test_region_groups_index_the_coordinates_of_each_region_present():
    classes = np.array([2, 1, 3, 2, 3], dtype=np.uint8)  # ed, ncr, et, ed, et
    groups = region_groups(classes, BRATS_REGIONS)
    assert [g.tolist() for g in groups] == [[0, 1, 2, 3, 4], [1, 2, 4], [2, 4]]
    oedema_only = region_groups(np.array([2, 2], dtype=np.uint8), BRATS_REGIONS)
    assert [g.tolist() for g in oedema_only] == [[0, 1]]  # no TC, no ET: left out, never an empty group


def test_region_sampling_centres_a_small_enhancing_rim_as_often_as_nnunet_does():
    # 99 oedema voxels and 1 enhancing voxel on a line; a 1^3 patch starts at its centre voxel.
    coords = np.array([[i, 0, 0] for i in range(100)], dtype=np.int16)
    classes = np.full(100, 2, dtype=np.uint8)
    classes[50] = 3
    groups = region_groups(classes, BRATS_REGIONS)  # WT: all 100; TC and ET: the enhancing voxel

    def share_on_et(g):
        starts = [choose_patch_start((100, 1, 1), (1, 1, 1), np.random.default_rng(seed), coords, 1.0, g)
                  for seed in range(3000)]
        return sum(st == (50, 0, 0) for st in starts) / 3000

    assert share_on_et(None) < 0.02  # "voxel": 1 in 100
    # "region": WT, TC or ET with 1/3 each, then a voxel of it: 1/3 * 1/100 + 1/3 + 1/3 = 0.673
    assert share_on_et(groups) == pytest.approx(0.673, abs=0.03)


def test_patch_sampler_is_a_function_of_seed_and_epoch():
    a, b = PatchSampler(5, 12, seed=3), PatchSampler(5, 12, seed=3)
    assert list(a) == list(b) and len(a) == 12
    epoch0 = list(a)
    a.set_epoch(1)
    assert list(a) != epoch0
    assert list(PatchSampler(5, 12, seed=4)) != epoch0


def test_patch_sampler_resume_reproduces_a_later_epoch():
    running = PatchSampler(7, 10, seed=11)
    seen = []
    for epoch in range(4):
        running.set_epoch(epoch)
        seen.append(list(running))
    resumed = PatchSampler(7, 10, seed=11)
    resumed.set_epoch(3)
    assert list(resumed) == seen[3]


def test_patch_sampler_cycles_permutations_so_cases_are_balanced():
    items = list(PatchSampler(4, 10, seed=0))
    cases = [c for c, _ in items]
    assert sorted(cases[:4]) == [0, 1, 2, 3] and sorted(cases[4:8]) == [0, 1, 2, 3]
    assert np.bincount(cases, minlength=4).tolist().count(3) == 2  # 10 = 2 full rounds + 2 extra
    assert all(isinstance(s, int) and s >= 0 for _, s in items)
    assert len({s for _, s in items}) == 10


def test_patch_sampler_under_lightning_ddp_wrapper_shards_the_same_sequence():
    shards = []
    for rank in range(2):
        inner = PatchSampler(6, 8, seed=5)
        wrapper = DistributedSamplerWrapper(inner, num_replicas=2, rank=rank, shuffle=True, seed=0)
        wrapper.set_epoch(2)  # forwarded to the inner sampler
        assert inner.epoch == 2
        shards.append(list(wrapper))
    reference = PatchSampler(6, 8, seed=5)
    reference.set_epoch(2)
    assert len(shards[0]) == len(shards[1]) == 4
    assert sorted(shards[0] + shards[1]) == sorted(reference)


def test_patch_sampler_rejects_empty_inputs():
    with pytest.raises(ValueError, match="num_cases must be positive, got 0"):
        PatchSampler(0, 4)
    with pytest.raises(ValueError, match="samples_per_epoch must be positive, got 0"):
        PatchSampler(4, 0)


def test_tumour_type_names_the_tumour_classes_present():
    assert tumour_type({"background": 900, "ncr": 3, "ed": 10, "et": 0}) == ("ed", "ncr")  # non-enhancing
    assert tumour_type({"background": 900, "ncr": 0, "ed": 10, "et": 4}) == ("ed", "et")
    assert tumour_type({"background": 900, "ncr": 0, "ed": 0, "et": 0}) == ()


def test_case_weights_oversample_rare_tumour_types_by_the_balance_power():
    types = ["ring"] * 9 + ["net"]
    assert case_weights(types, 0.0).tolist() == [0.1] * 10
    full = case_weights(types, 1.0)  # each type half of the draws
    assert full[9] == pytest.approx(0.5) and full[:9] == pytest.approx([0.5 / 9] * 9)
    half = case_weights(types, 0.5)  # weights 9 ** -0.5 = 1/3 each and 1: the rare case gets 1 / (9/3 + 1)
    assert half[9] == pytest.approx(0.25) and half[:9] == pytest.approx([0.75 / 9] * 9)
    with pytest.raises(ValueError, match="case balance must be in \\[0, 1\\], got 1.5"):
        case_weights(types, 1.5)


def test_patch_sampler_with_weights_draws_cases_by_them_reproducibly():
    sampler = PatchSampler(3, 4000, seed=1, weights=[0.5, 0.25, 0.25])
    counts = np.bincount([c for c, _ in sampler], minlength=3) / 4000
    assert counts == pytest.approx([0.5, 0.25, 0.25], abs=0.03)
    assert list(sampler) == list(PatchSampler(3, 4000, seed=1, weights=[2, 1, 1]))  # normalised
    never = PatchSampler(3, 50, seed=1, weights=[1, 0, 1])
    assert 1 not in {c for c, _ in never}
    with pytest.raises(ValueError, match="weights must be 3 non-negative numbers with a positive sum, got \\[1.0, 1.0"):
        PatchSampler(3, 5, weights=[1, 1])
