"""Sliding window, flip TTA and ET post-processing on small volumes with predictors whose answer is known."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from brats_unet.inference.postprocess import postprocess_et
from brats_unet.models.sliding_window import (
    _window_starts,
    device_importance,
    flip_tta,
    gaussian_importance,
    sliding_window,
)

PATCH = (8, 8, 8)


def _image(shape=(2, 3, 19, 13, 11), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def pointwise(x: torch.Tensor) -> torch.Tensor:
    # 2 output channels, each voxel depends only on itself: any tiling must give the whole-volume answer.
    return torch.cat([2 * x[:, :1] + 1, x.sum(1, keepdim=True)], dim=1)


def _conv_predictor(channels=3, seed=1):
    weight = torch.randn(2, channels, 3, 3, 3, generator=torch.Generator().manual_seed(seed))
    return weight, lambda x: F.conv3d(x, weight, padding=1)


# ---------------------------------------------------------------- gaussian
def test_gaussian_importance_shape_max_symmetry():
    g = gaussian_importance((5, 7, 9))
    assert g.shape == (5, 7, 9) and g.dtype == torch.float32
    assert g.max().item() == pytest.approx(1.0) and g[2, 3, 4].item() == pytest.approx(1.0)
    for dim in range(3):
        torch.testing.assert_close(g, g.flip(dim))
    # sigma along x = 5 * 0.125; the corner is 2, 3, 4 voxels from the centre.
    expected = math.exp(-0.5 * ((2 / 0.625) ** 2 + (3 / 0.875) ** 2 + (4 / 1.125) ** 2))
    assert g[0, 0, 0].item() == pytest.approx(expected, rel=1e-5)
    assert (g > 0).all()
    even = gaussian_importance(PATCH)  # centred between voxels 3 and 4: still mirror-symmetric, max 1
    torch.testing.assert_close(even, even.flip(0).flip(1).flip(2))
    assert even.max().item() == pytest.approx(1.0)


def test_gaussian_importance_replaces_underflow_zeros():
    g = gaussian_importance((64, 4, 4), sigma_scale=0.01)  # far voxels underflow float32
    assert (g > 0).all()
    assert g[0, 0, 0].item() == g[g > 0].min().item()
    with pytest.raises(ValueError, match="sigma_scale"):
        gaussian_importance(PATCH, sigma_scale=0)


def test_the_window_weights_are_made_once_per_patch_and_device():
    cpu = torch.device("cpu")
    first = device_importance((6, 8, 8), cpu)
    assert device_importance((6, 8, 8), cpu) is first  # the second case reuses it
    assert torch.equal(first, gaussian_importance((6, 8, 8))) and first.device == cpu
    assert device_importance((8, 8, 8), cpu).shape == (8, 8, 8)


# ---------------------------------------------------------------- sliding window
def test_window_starts_follow_nnunet():
    # (19 - 8) / 4 -> 3 steps of 11/3, rounded: the last window ends exactly at the border.
    assert _window_starts(19, 8, 0.5) == [0, 4, 7, 11]
    assert _window_starts(16, 8, 0.0) == [0, 8]
    assert _window_starts(17, 8, 0.0) == [0, 4, 9]
    assert _window_starts(8, 8, 0.5) == [0]
    assert _window_starts(10, 1, 0.99) == list(range(10))  # never more windows than start positions


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.8])
@pytest.mark.parametrize("gaussian", [True, False])
def test_pointwise_predictor_reproduces_whole_volume(overlap, gaussian):
    image = _image()  # 19 x 13 x 11: not divisible by the patch
    out = sliding_window(image, pointwise, PATCH, overlap=overlap, gaussian=gaussian)
    assert out.shape == (2, 2, 19, 13, 11) and out.dtype == torch.float32
    torch.testing.assert_close(out, pointwise(image), rtol=1e-5, atol=1e-5)


def test_conv_predictor_agrees_where_no_window_edge_interferes():
    image = _image(seed=2)
    _, conv = _conv_predictor()
    out = sliding_window(image, conv, PATCH, overlap=0.5)
    # A voxel is safe when it is off the border of every window that covers it; find those with an indicator
    # predictor (1 inside the patch, 0 on its faces) averaged without weights.
    inner = torch.zeros(PATCH)
    inner[1:-1, 1:-1, 1:-1] = 1

    def indicator(x):
        return inner.expand(x.shape[0], 1, *PATCH)

    safe = sliding_window(image, indicator, PATCH, overlap=0.5, gaussian=False)[:, 0] == 1
    assert 0.2 < safe.float().mean() < 0.9
    expected = conv(image)
    torch.testing.assert_close(out.permute(1, 0, 2, 3, 4)[:, safe], expected.permute(1, 0, 2, 3, 4)[:, safe])
    assert not torch.allclose(out, expected, atol=1e-3)  # the window edges really are different


def test_volume_smaller_than_patch_is_padded_and_cropped_back():
    image = _image((1, 3, 5, 12, 3))
    seen = []

    def recording(x):
        seen.append(tuple(x.shape))
        return pointwise(x)

    out = sliding_window(image, recording, PATCH, overlap=0.5)
    torch.testing.assert_close(out, pointwise(image), rtol=1e-5, atol=1e-5)
    assert set(seen) == {(1, 3, 8, 8, 8)} and len(seen) == 2  # y: 12 -> starts 0, 4


def test_window_batch_gives_the_same_result_with_fewer_calls():
    image = _image(seed=3)
    _, conv = _conv_predictor()
    calls = []

    def counted(x):
        calls.append(x.shape[0])
        return conv(x)

    reference = sliding_window(image, counted, PATCH, overlap=0.5, window_batch=1)
    assert len(calls) == 2 * 4 * 3 * 2  # B=2 cases x (4 x 3 x 2) windows
    for window_batch in (5, 100):
        calls.clear()
        out = sliding_window(image, counted, PATCH, overlap=0.5, window_batch=window_batch)
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
        assert len(calls) == math.ceil(48 / window_batch) and sum(calls) == 48


def test_predictor_shape_errors():
    image = _image((1, 3, 9, 9, 9))
    with pytest.raises(ValueError, match="changed the spatial shape"):
        sliding_window(image, lambda x: x[..., :-1], PATCH)
    with pytest.raises(ValueError, match="predictor must return"):
        sliding_window(image, lambda x: x[0], PATCH)
    with pytest.raises(ValueError, match="overlap must be in"):
        sliding_window(image, pointwise, PATCH, overlap=1.0)
    with pytest.raises(ValueError, match="patch_size must be 3 positive ints"):
        sliding_window(image, pointwise, (8, 8))


# ---------------------------------------------------------------- flip TTA
def test_flip_tta_of_pointwise_predictor_is_the_plain_prediction():
    image = _image()
    torch.testing.assert_close(flip_tta(image, pointwise, PATCH), pointwise(image), rtol=1e-5, atol=1e-5)


def test_flip_tta_is_the_mean_over_the_eight_flips():
    image = _image((1, 3, 8, 8, 8), seed=4)  # one window: sliding_window == predictor, so the mean is explicit
    _, conv = _conv_predictor()
    calls = []

    def counted(x):
        calls.append(1)
        return conv(x)

    flips = [d for r in range(4) for d in itertools.combinations((2, 3, 4), r)]
    expected = sum(conv(image.flip(d)).flip(d) for d in flips) / 8
    out = flip_tta(image, counted, PATCH)
    assert len(calls) == 8
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, conv(image), atol=1e-2)  # the kernel is not symmetric


# ---------------------------------------------------------------- ET post-processing
def _et_map():
    classes = np.zeros((20, 20, 20), dtype=np.uint8)
    classes[2:7, 2:7, 2:6] = 3  # big: 100 voxels
    classes[15, 15, 10:13] = 3  # small: 3 voxels
    classes[10, 2, 2] = 3  # single voxel
    classes[15, 2, 2:10] = 3  # exactly 8 voxels: not "< 8"
    classes[12:14, 12:14, 2] = 2  # oedema: never touched
    return classes


def test_postprocess_small_components_become_ncr_by_size_alone():
    classes = _et_map()
    before = classes.copy()
    out = postprocess_et(classes)
    assert np.array_equal(classes, before)  # input untouched
    assert (out[15, 15, 10:13] == 1).all() and out[10, 2, 2] == 1
    assert (out[2:7, 2:7, 2:6] == 3).all() and (out[15, 2, 2:10] == 3).all()
    assert (out[12:14, 12:14, 2] == 2).all()
    assert np.count_nonzero(out != classes) == 4


def test_postprocess_confident_small_component_is_kept():
    classes = _et_map()
    prob = np.full(classes.shape, 0.5)
    prob[15, 15, 10:13] = 0.95  # mean >= 0.9: kept
    out = postprocess_et(classes, prob)
    assert (out[15, 15, 10:13] == 3).all() and out[10, 2, 2] == 1


def test_postprocess_components_are_face_connected():
    classes = np.zeros((20, 20, 20), dtype=np.uint8)
    classes[10:15, 10:15, 10:13] = 3  # 75 voxels: keeps the total above 73
    classes[0:2, 0:2, 0] = 3  # two 4-voxel squares touching only at a corner: two components, each < 8
    classes[2:4, 2:4, 1] = 3
    out = postprocess_et(classes)
    assert (out[0:2, 0:2, 0] == 1).all() and (out[2:4, 2:4, 1] == 1).all()


def test_postprocess_total_rule():
    classes = np.zeros((10, 10, 10), dtype=np.uint8)
    classes[2:7, 2:6, 2:5] = 3  # one component of 60 voxels: < 73 in total
    assert (postprocess_et(classes)[2:7, 2:6, 2:5] == 1).all()
    assert (postprocess_et(classes, np.full(classes.shape, 0.89))[2:7, 2:6, 2:5] == 1).all()
    assert (postprocess_et(classes, np.full(classes.shape, 0.9))[2:7, 2:6, 2:5] == 3).all()
    assert (postprocess_et(classes, min_total=60)[2:7, 2:6, 2:5] == 3).all()  # exactly 60 is not "< 60"
    with pytest.raises(ValueError, match="et_prob shape"):
        postprocess_et(classes, np.zeros((10, 10, 9)))


def test_flip_tta_activation_averages_each_flips_probabilities():
    image = _image((1, 3, 8, 8, 8), seed=5)
    _, conv = _conv_predictor()
    flips = [d for r in range(4) for d in itertools.combinations((2, 3, 4), r)]
    expected = sum(torch.sigmoid(conv(image.flip(d))).flip(d) for d in flips) / 8
    out = flip_tta(image, conv, PATCH, activation=torch.sigmoid)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # not the same as the sigmoid of averaged logits: the order of mean and activation matters
    assert not torch.allclose(out, torch.sigmoid(flip_tta(image, conv, PATCH)), atol=1e-4)


TRAINING_ONLY = {"lightning", "pytorch_lightning", "torchmetrics"}


def _imported_training_packages(modules: str) -> list[str]:
    code = (f"import sys, {modules}; "
            f"print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(TRAINING_ONLY)!r}))))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()


def test_inference_commands_and_the_segmenter_start_without_lightning() -> None:
    """Only brats-train needs Lightning and torchmetrics (about 1.7 s of a start on 2 cores): the commands that load a
    checkpoint rebuild its network without them."""
    assert _imported_training_packages("brats_unet.cli.train") == sorted(TRAINING_ONLY - {"pytorch_lightning"})
    assert _imported_training_packages("brats_unet.cli.predict, brats_unet.cli.postprocess, brats_unet.cli.report, "
                                       "brats_unet.cli.evaluate, brats_unet.cli.export, "
                                       "brats_unet.inference.segmenter") == []
