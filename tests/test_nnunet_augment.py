"""nnU-Net's augmentation (augment=modern, data/nnunet_augment.py): determinism under a seed, labels kept in their set
and aligned with the image through the spatial step, each intensity step against its definition by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from brats_unet.data.nnunet_augment import (
    SpatialDraw,
    apply_spatial,
    bg_factor,
    contrast,
    gamma,
    gaussian_noise,
    inverted_gamma,
    low_resolution,
    multiplicative_brightness,
)
from brats_unet.data.transforms import build_augment
from brats_unet.utils import BratsError

AUGMENT_DIR = Path(__file__).resolve().parents[1] / "conf" / "augment"


def modern(**forced: float) -> dict:
    """conf/augment/modern.yaml as Hydra composes it (on none.yaml), with some steps' p forced."""
    cfg = OmegaConf.load(AUGMENT_DIR / "modern.yaml")
    cfg.pop("defaults", None)
    cfg = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(AUGMENT_DIR / "none.yaml"), cfg))
    for key, value in forced.items():
        step, _, name = key.partition("__")
        cfg[step][name or "p"] = value
    return cfg


def volume(shape=(20, 20, 20), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A label map of a nested tumour (2 around 1 around 3) and 4 channels: the tumour mask, then noise."""
    y = np.zeros(shape, dtype=np.uint8)
    y[4:16, 5:15, 6:14] = 2
    y[7:13, 8:12, 8:12] = 1
    y[9:11, 9:11, 9:11] = 3
    x = np.random.default_rng(seed).standard_normal((4, *shape)).astype(np.float32)
    x[0] = (y > 0).astype(np.float32)
    return x, y


def test_modern_is_nnunets_pipeline_with_its_probabilities() -> None:
    steps = build_augment(modern()).steps
    assert {k: v["p"] for k, v in steps.items()} == {
        "spatial": 1.0, "flip": 0.5, "gaussian_noise": 0.1, "blur": 0.2, "multiplicative_brightness": 0.15,
        "contrast": 0.15, "low_resolution": 0.25, "inverted_gamma": 0.1, "gamma": 0.3}
    spatial = steps["spatial"]
    assert (spatial["p_rotation"], spatial["p_scaling"], spatial["p_elastic"]) == (0.2, 0.2, 0.0)
    assert spatial["rotation"] == (-30.0, 30.0) and spatial["scaling"] == (0.7, 1.4)
    assert steps["blur"]["p_per_channel"] == 0.5 and steps["low_resolution"]["scale"] == (0.5, 1.0)
    # The seed paper's brightness stays as it was, and off here.
    assert "brightness" not in steps and build_augment(modern())


def test_same_seed_same_patch_other_seed_other_patch_every_step_on() -> None:
    everything = {"spatial": 1.0, "spatial__p_rotation": 1.0, "spatial__p_scaling": 1.0, "spatial__p_elastic": 1.0,
                  "flip": 0.5, "gaussian_noise": 1.0, "blur": 1.0, "multiplicative_brightness": 1.0, "contrast": 1.0,
                  "low_resolution": 1.0, "inverted_gamma": 1.0, "gamma": 1.0}
    augment = build_augment(modern(**everything), intensity_channels=4)
    x, y = volume()
    runs = [augment(x, y, np.random.default_rng(seed)) for seed in (7, 7, 8)]
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert not np.array_equal(runs[0][0], runs[2][0]) and not np.array_equal(runs[0][1], runs[2][1])
    for out_x, out_y in runs:
        assert out_x.shape == x.shape and out_x.dtype == np.float32 and out_y.dtype == np.uint8
        assert set(np.unique(out_y)) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(x, volume()[0])  # inputs untouched


def test_spatial_step_keeps_labels_in_their_set_and_aligned_with_the_image() -> None:
    x, y = volume((24, 24, 24))
    x = x[:1]  # the tumour-mask channel only: it must stay on the resampled labels
    seen = set()
    for seed in range(4):
        rng = np.random.default_rng(seed)
        draw = SpatialDraw(tuple(rng.uniform(-0.5, 0.5, size=3)), float(rng.uniform(0.7, 1.4)), None)
        out_x, out_y = apply_spatial(x, y, draw, (24, 24, 24))
        assert set(np.unique(out_y)) <= {0, 1, 2, 3} and out_y.dtype == np.uint8
        assert not np.array_equal(out_y, y)
        inside, outside = out_x[0][out_y > 0], out_x[0][out_y == 0]
        assert inside.mean() > 0.85 and outside.mean() < 0.15  # linear image and nearest labels stay together
        seen |= set(np.unique(out_y).tolist())
    assert seen == {0, 1, 2, 3}


def test_patch_is_cut_from_the_centre_of_the_larger_region() -> None:
    draw = SpatialDraw(None, 1.0, None)  # zoom 1: a pure centre crop
    assert draw.input_size((16, 16, 10)) == (18, 18, 12)
    x = np.random.default_rng(0).standard_normal((2, 18, 18, 12)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 4, size=(18, 18, 12)).astype(np.uint8)
    out_x, out_y = apply_spatial(x, y, draw, (16, 16, 10))
    np.testing.assert_allclose(out_x, x[:, 1:17, 1:17, 1:11], atol=1e-5)
    np.testing.assert_array_equal(out_y, y[1:17, 1:17, 1:11])
    rotated = SpatialDraw((0.5, 0.5, 0.5), 1.4, None).input_size((16, 16, 10))
    assert rotated == (26, 26, 16)  # capped at 1.6 x the patch, size - patch even


def test_bg_factor_draws_below_and_above_one_by_halves() -> None:
    ref = np.random.default_rng(3)
    expected = ref.uniform(0.75, 1.0) if ref.random() < 0.5 else ref.uniform(1.0, 1.25)
    assert bg_factor(np.random.default_rng(3), 0.75, 1.25) == expected
    draws = np.array([bg_factor(np.random.default_rng(s), 0.7, 1.5) for s in range(400)])
    assert 0.4 < (draws < 1).mean() < 0.6 and draws.min() >= 0.7 and draws.max() <= 1.5


def test_intensity_steps_by_their_definitions() -> None:
    x = np.random.default_rng(0).standard_normal((2, 6, 6, 6)).astype(np.float32)
    # Multiplicative brightness: one BGContrast factor per channel.
    ref = np.random.default_rng(1)
    m = [bg_factor(ref, 0.75, 1.25) for _ in range(2)]
    out = multiplicative_brightness(x, np.random.default_rng(1))
    np.testing.assert_allclose(out, x * np.array(m, dtype=np.float32)[:, None, None, None], rtol=1e-6)
    # Contrast: mean kept where nothing is clipped, range never exceeded.
    out = contrast(x, np.random.default_rng(2))
    assert out.min() >= x.min() and out.max() <= x.max()
    # Gamma (plain and inverted): mean and standard deviation retained, values changed.
    for fn in (gamma, inverted_gamma):
        out = fn(x, np.random.default_rng(3))
        np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), x.mean(axis=(1, 2, 3)), atol=1e-5)
        np.testing.assert_allclose(out.std(axis=(1, 2, 3)), x.std(axis=(1, 2, 3)), rtol=1e-4)
        assert not np.allclose(out, x)
    # Gaussian noise: one field, the same in every channel.
    out = gaussian_noise(x, np.random.default_rng(4))
    np.testing.assert_allclose(out[0] - x[0], out[1] - x[1], atol=1e-6)
    # Low resolution at p_per_channel 1: a blockier channel of the same shape.
    out = low_resolution(x, np.random.default_rng(5), scale=(0.5, 0.5), p_per_channel=1.0)
    assert out.shape == x.shape and not np.allclose(out, x)


def test_bad_spatial_config_is_named() -> None:
    with pytest.raises(BratsError, match=r"augment\.spatial\.p_rotation must be a probability in \[0, 1\], got 2"):
        build_augment({"spatial": {"p": 1.0, "p_rotation": 2}})
    with pytest.raises(BratsError, match=r"augment\.blur: unknown keys \['radius'\]; allowed p, sigma, p_per_channel"):
        build_augment({"blur": {"p": 0.2, "radius": 3}})
    assert build_augment({"spatial": {"p": 1.0, "p_rotation": 0.0, "p_scaling": 0.0, "p_elastic": 0.0}}).is_identity
