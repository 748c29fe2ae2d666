from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from brats_unet.data.transforms import brightness, build_augment, flip, intensity, noise
from brats_unet.utils import BratsError

AUGMENT_DIR = Path(__file__).resolve().parents[1] / "conf" / "augment"


def _augment_cfg(name):
    """conf/augment/<name>.yaml on top of none.yaml, as Hydra's defaults list composes it."""
    cfg = OmegaConf.load(AUGMENT_DIR / f"{name}.yaml")
    cfg.pop("defaults", None)
    return OmegaConf.merge(OmegaConf.load(AUGMENT_DIR / "none.yaml"), cfg)


def test_brightness_is_the_paper_formula_on_unit_range_data():
    x = np.random.default_rng(0).random((3, 4, 5, 6), dtype=np.float32)
    ref = np.random.default_rng(7)
    a, g = ref.uniform(0.8, 1.2), ref.uniform(0.8, 1.2)  # the same draws, in the same order
    out = brightness(x, np.random.default_rng(7))
    assert 0.8 <= a <= 1.2 and 0.8 <= g <= 1.2
    np.testing.assert_allclose(out, a * x.astype(np.float64) ** g, rtol=1e-5)
    assert out.dtype == np.float32


def test_brightness_by_hand():
    x = np.array([0.0, 0.5, 1.0], dtype=np.float32).reshape(1, 3, 1, 1)
    out = brightness(x, np.random.default_rng(0), alpha=(1.1, 1.1), gamma=(2.0, 2.0))
    np.testing.assert_allclose(out.ravel(), [0.0, 0.275, 1.1], rtol=1e-6)


def test_brightness_on_zscored_data_rescales_by_min_max_and_back():
    x = np.array([-1.0, 0.0, 1.0], dtype=np.float32).reshape(1, 3, 1, 1)
    x0 = x.copy()
    out = brightness(x, np.random.default_rng(0), alpha=(1.0, 1.0), gamma=(2.0, 2.0))
    # u = [0, .5, 1] -> u^2 = [0, .25, 1] -> -1 + 2 * u^2
    np.testing.assert_allclose(out.ravel(), [-1.0, -0.5, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(x, x0)


def test_flip_with_p1_mirrors_every_spatial_axis_of_image_and_label():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    y = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    xf, yf = flip(x, y, np.random.default_rng(0), p=1.0)
    np.testing.assert_array_equal(xf, x[:, ::-1, ::-1, ::-1])
    np.testing.assert_array_equal(yf, y[::-1, ::-1, ::-1])
    assert xf.flags.c_contiguous and yf.flags.c_contiguous


def test_flip_keeps_image_and_label_aligned_and_varies_the_axes():
    y = np.random.default_rng(1).integers(0, 4, size=(3, 4, 5)).astype(np.uint8)
    x = np.stack([y.astype(np.float32), -y.astype(np.float32)])
    patterns = set()
    for seed in range(40):
        xf, yf = flip(x, y, np.random.default_rng(seed), p=0.5)
        np.testing.assert_array_equal(xf[0], yf)
        np.testing.assert_array_equal(xf[1], -yf.astype(np.float32))
        patterns.add(yf.tobytes())
    assert len(patterns) == 8  # all 2^3 axis combinations occur


def test_intensity_by_hand():
    x = np.array([0.0, 2.0], dtype=np.float32).reshape(1, 2, 1, 1)  # std 1
    out = intensity(x, np.random.default_rng(0), scale=(2.0, 2.0), shift=(0.5, 0.5))
    np.testing.assert_allclose(out.ravel(), [0.5, 4.5])


def test_noise_is_absolute_on_unit_data_and_relative_to_std_otherwise():
    rng = np.random.default_rng(0)
    unit = rng.random((1, 40, 40, 40), dtype=np.float32)
    zscored = (rng.standard_normal((1, 40, 40, 40)) * 2.0).astype(np.float32)
    x = np.concatenate([unit, zscored])
    out = noise(x, np.random.default_rng(1), std=(0.1, 0.1))
    diff = out - x
    assert diff[0].std() == pytest.approx(0.1, rel=0.03)
    assert diff[1].std() == pytest.approx(0.1 * zscored.std(), rel=0.03)
    np.testing.assert_array_equal(noise(x, np.random.default_rng(1), std=(0.0, 0.0)), x)


def test_build_augment_none_is_identity_and_draws_nothing():
    augment = build_augment(_augment_cfg("none"))
    x, y = np.ones((2, 3, 3, 3), dtype=np.float32), np.zeros((3, 3, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    out_x, out_y = augment(x, y, rng)
    assert augment.is_identity and out_x is x and out_y is y
    assert rng.bit_generator.state == state


def test_build_augment_brightness_p1_draws_the_gate_then_the_paper_formula():
    augment = build_augment(_augment_cfg("brightness"))
    x = np.random.default_rng(0).random((3, 4, 4, 4), dtype=np.float32)
    y = np.zeros((4, 4, 4), dtype=np.uint8)
    ref = np.random.default_rng(3)
    ref.random()  # the p-gate
    a, g = ref.uniform(0.8, 1.2), ref.uniform(0.8, 1.2)
    out_x, out_y = augment(x, y, np.random.default_rng(3))
    np.testing.assert_allclose(out_x, a * x.astype(np.float64) ** g, rtol=1e-5)
    assert out_y is y


def test_modern_augment_is_deterministic_per_seed_and_keeps_shapes():
    augment = build_augment(_augment_cfg("modern"))
    x = np.random.default_rng(0).standard_normal((4, 6, 6, 6)).astype(np.float32)
    y = np.random.default_rng(0).integers(0, 4, size=(6, 6, 6)).astype(np.uint8)
    runs = [augment(x, y, np.random.default_rng(seed)) for seed in (5, 5, 6)]
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert not np.array_equal(runs[0][0], runs[2][0])
    assert runs[0][0].shape == x.shape and runs[0][0].dtype == np.float32 and runs[0][1].dtype == np.uint8


def test_intensity_channels_leave_a_mask_channel_alone():
    augment = build_augment({"brightness": {"p": 1.0}, "noise": {"p": 1.0, "std": [0.5, 0.5]}}, intensity_channels=1)
    mask = np.zeros((4, 4, 4), dtype=np.float32)
    mask[1:3] = 1.0
    x = np.stack([np.full((4, 4, 4), 0.5, dtype=np.float32), mask])
    out, _ = augment(x, None, np.random.default_rng(0))
    np.testing.assert_array_equal(out[1], mask)
    assert not np.array_equal(out[0], x[0])


def test_build_augment_rejects_unknown_names_keys_and_bad_values():
    with pytest.raises(BratsError, match=r"augment\.sharpen: unknown augmentation"):
        build_augment({"sharpen": {"p": 0.5}})
    with pytest.raises(BratsError, match=r"augment\.flip: unknown keys \['axes'\]"):
        build_augment({"flip": {"p": 0.5, "axes": [0]}})
    with pytest.raises(BratsError, match=r"augment\.noise\.p must be a probability in \[0, 1\], got 1\.5"):
        build_augment({"noise": {"p": 1.5}})
    with pytest.raises(BratsError, match=r"augment\.brightness\.alpha must be a range"):
        build_augment({"brightness": {"p": 1.0, "alpha": [1.2, 0.8]}})
