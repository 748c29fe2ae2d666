"""UNet3D / UNet2D: shapes, the paper model's size and init, dropout/norm wiring, deep supervision, input checks."""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from torch import nn

from brats_unet.models.unet2d import UNet2D
from brats_unet.models.unet3d import UNet3D, UNetND, group_count

PAPER_FILTERS = [32, 64, 128, 256, 512]


@pytest.fixture(scope="module")
def paper_model() -> UNet3D:
    torch.manual_seed(0)
    return UNet3D(3, 4, PAPER_FILTERS, dropout=[0.1, 0.1, 0.2, 0.2, 0.2], norm="none")


def test_paper_parameter_count(paper_model: UNet3D) -> None:
    # conv(i, o, k) = i*o*k^3 weights + o biases. Encoder level l: conv(in_l, f_l, 3) + conv(f_l, f_l, 3) with
    # in_0 = 3 and in_l = f_(l-1). Decoder level l < 4: up conv(f_(l+1), f_l, 2) + conv(2 f_l, f_l, 3) +
    # conv(f_l, f_l, 3). Head conv(32, 4, 1).
    def conv(i: int, o: int, k: int) -> int:
        return i * o * k**3 + o

    f = PAPER_FILTERS
    encoder = sum(conv(c, o, 3) + conv(o, o, 3) for c, o in zip([3, *f[:-1]], f, strict=True))
    decoder = sum(conv(f[l + 1], f[l], 2) + conv(2 * f[l], f[l], 3) + conv(f[l], f[l], 3) for l in range(4))
    expected = encoder + decoder + conv(32, 4, 1)
    assert expected == 22_577_156
    assert sum(p.numel() for p in paper_model.parameters()) == expected


def test_he_normal_init(paper_model: UNet3D) -> None:
    # Bottleneck second conv: fan_in = 512 * 27 -> std sqrt(2 / 13824); 7M samples, so 2% is a wide margin.
    w = paper_model.encoders[4].conv2.weight
    assert w.std().item() == pytest.approx(math.sqrt(2 / (512 * 27)), rel=0.02)
    assert abs(w.mean().item()) < 1e-4
    # Transposed conv weight (in=512, out=256, 2,2,2): torch (and Keras) fan_in = 256 * 8.
    up = paper_model.ups[3].weight
    assert up.shape == (512, 256, 2, 2, 2)
    assert up.std().item() == pytest.approx(math.sqrt(2 / (256 * 8)), rel=0.02)
    biases = [m.bias for m in paper_model.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    assert len(biases) == 2 * 5 + 3 * 4 + 1 and all(torch.all(b == 0) for b in biases)


def test_3d_output_shape() -> None:
    model = UNet3D(3, 4, filters=[4, 8, 16], dropout=0.1)
    out = model(torch.randn(2, 3, 16, 16, 8))
    assert out.shape == (2, 4, 16, 16, 8)


def test_2d_output_shape_and_slicewise() -> None:
    torch.manual_seed(0)
    model = UNet2D(3, 4, filters=[4, 8, 16]).eval()
    x = torch.randn(2, 3, 16, 8, 5)  # z = 5 need not be divisible: it is folded into the batch
    out = model(x)
    assert out.shape == (2, 4, 16, 8, 5)
    # Folding must keep every (case, slice) pair together: slice z of case 1 alone gives the same logits.
    torch.testing.assert_close(out[1:2, :, :, :, 3], UNetND.forward(model, x[1:2, :, :, :, 3]))


def test_dropout_rates_reach_layers() -> None:
    rates = [0.1, 0.2, 0.3]
    model = UNet3D(1, 2, filters=[4, 8, 16], dropout=rates)
    assert [b.dropout.p for b in model.encoders] == rates
    assert [b.dropout.p for b in model.decoders] == rates[:2]  # decoder level i reuses dropout[i]
    assert all(b.dropout.p == 0.25 for b in UNet3D(1, 2, filters=[4, 8], dropout=0.25).encoders)
    with pytest.raises(ValueError, match="model.dropout has 2 rates but model.filters has 3 levels"):
        UNet3D(1, 2, filters=[4, 8, 16], dropout=[0.1, 0.2])


def test_dropout_is_elementwise_in_train_only() -> None:
    torch.manual_seed(0)
    model = UNet3D(1, 2, filters=[4, 8], dropout=0.5)
    x = torch.randn(1, 1, 8, 8, 8)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize(("norm", "norm_type", "bias"), [
    ("none", nn.Identity, True), ("batch", nn.BatchNorm3d, False), ("instance", nn.InstanceNorm3d, False),
    ("group", nn.GroupNorm, False),
])
def test_norm_variants(norm: str, norm_type: type, bias: bool) -> None:
    model = UNet3D(2, 3, filters=[4, 16], norm=norm)
    block = model.encoders[1]
    assert isinstance(block.norm1, norm_type) and isinstance(block.norm2, norm_type)
    assert (block.conv1.bias is not None) is bias
    if norm == "group":
        assert block.norm1.num_groups == 8 and model.encoders[0].norm1.num_groups == 4
    assert model(torch.randn(2, 2, 4, 4, 4)).shape == (2, 3, 4, 4, 4)


def test_leaky_relu_lets_negative_features_through_and_relu_stays_the_default() -> None:
    plain, leaky = UNet3D(2, 3, filters=[4, 8]), UNet3D(2, 3, filters=[4, 8], activation="leaky_relu")
    assert all(type(b.act) is nn.ReLU for b in [*plain.encoders, *plain.decoders])  # the paper's
    acts = [b.act for b in [*leaky.encoders, *leaky.decoders]]
    assert all(type(a) is nn.LeakyReLU and a.negative_slope == 0.01 for a in acts)  # nnU-Net's
    x = torch.tensor([-2.0, 3.0])
    assert acts[0](x.clone()).tolist() == pytest.approx([-0.02, 3.0])
    assert list(plain.state_dict()) == list(leaky.state_dict())  # the same weights: only the nonlinearity differs
    with pytest.raises(ValueError, match=r"model\.activation must be one of \('relu', 'leaky_relu'\), got 'gelu'"):
        UNet3D(1, 2, filters=[4, 8], activation="gelu")


def test_group_count() -> None:
    assert [group_count(c) for c in (1, 4, 6, 8, 12, 32)] == [1, 4, 6, 8, 6, 8]


def test_bad_norm() -> None:
    with pytest.raises(ValueError, match="model.norm must be one of"):
        UNet3D(1, 2, filters=[4, 8], norm="layer")


def test_deep_supervision_train_list_eval_tensor() -> None:
    model = UNet3D(3, 4, filters=[4, 8, 16, 32], deep_supervision=True)
    x = torch.randn(2, 3, 16, 16, 8)
    outs = model.train()(x)
    assert [tuple(o.shape) for o in outs] == [(2, 4, 16, 16, 8), (2, 4, 8, 8, 4), (2, 4, 4, 4, 2)]
    assert model.eval()(x).shape == (2, 4, 16, 16, 8)
    outs2d = UNet2D(3, 4, filters=[4, 8, 16], deep_supervision=True).train()(x)
    assert [tuple(o.shape) for o in outs2d] == [(2, 4, 16, 16, 8), (2, 4, 8, 8, 8)]


def test_bad_spatial_shape_message() -> None:
    model = UNet3D(1, 2, filters=[4, 8, 16])
    with pytest.raises(ValueError, match=r"input spatial shape \(16, 16, 18\) is not divisible by 4"):
        model(torch.randn(1, 1, 16, 16, 18))
    with pytest.raises(ValueError, match="input has 3 channels but the model was built for in_channels=1"):
        model(torch.randn(1, 3, 16, 16, 16))
    with pytest.raises(ValueError, match=r"UNet2D: input spatial shape \(16, 6\)"):
        UNet2D(1, 2, filters=[4, 8, 16])(torch.randn(1, 1, 16, 6, 3))


def test_channels_last_matches() -> None:
    torch.manual_seed(0)
    plain = UNet3D(2, 3, filters=[4, 8]).eval()
    fast = UNet3D(2, 3, filters=[4, 8], channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    assert fast.encoders[0].conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    x = torch.randn(1, 2, 8, 8, 8)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)


def test_model_configs_instantiate() -> None:
    with initialize_config_module(config_module="brats_unet.conf", version_base="1.3"):
        paper = compose(overrides=["+model=unet3d"]).model
        small = compose(overrides=["+model=unet3d_small"]).model
        flat = compose(overrides=["+model=unet2d"]).model
    assert list(paper.filters) == PAPER_FILTERS and list(paper.dropout) == [0.1, 0.1, 0.2, 0.2, 0.2]
    assert paper.norm == "none" and paper.activation == "relu" and "in_channels" not in paper
    assert "compile" not in paper and "channels_last" not in paper  # speed knobs live in the runtime group
    model = instantiate(small, in_channels=3, out_channels=4)
    assert isinstance(model, UNet3D) and model.filters == [8, 16, 32, 64, 128] and model.dropout[2] == 0.2
    assert isinstance(instantiate(flat, in_channels=3, out_channels=3), UNet2D)
