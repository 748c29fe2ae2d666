"""ResEncUNet (model=resenc): shapes, deep-supervision outputs and their nnU-Net weights, residual wiring, init."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_train, tiny_overrides
from torch import nn

from brats_unet import Segmenter
from brats_unet.models.resenc import ResEncUNet, ResidualBlock, default_blocks
from brats_unet.training.fit import train
from brats_unet.training.losses import RegionDiceBCELoss
from brats_unet.training.module import BratsModule

TINY = {"filters": [4, 8, 8, 16], "blocks": [1, 2, 2, 2]}


def test_eval_output_and_deep_supervision_outputs_per_level() -> None:
    torch.manual_seed(0)
    net = ResEncUNet(4, 3, **TINY)
    x = torch.randn(2, 4, 16, 16, 8)
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 3, 16, 16, 8)
    net.train()
    outputs = net(x)
    # 4 levels: heads at full, 1/2 (nnU-Net's extra head at 1/4 has weight 0, so it is not built).
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 16, 16, 8), (2, 3, 8, 8, 4)]
    six = ResEncUNet(4, 3, filters=[4, 4, 4, 4, 4, 4], deep_supervision=True).train()
    assert [o.shape[2] for o in six(torch.randn(1, 4, 64, 64, 64))] == [64, 32, 16, 8]
    off = ResEncUNet(4, 3, **TINY, deep_supervision=False).train()
    assert off(x).shape == (2, 3, 16, 16, 8) and len(off.aux_heads) == 0


def test_module_weights_equal_nnunets_deep_supervision_weights() -> None:
    # nnU-Net: one output per decoder level (5 for 6 levels), weights 1/2**i, the coarsest set to 0, normalised.
    nnunet = [1 / 2**i for i in range(5)]
    nnunet[-1] = 0.0
    nnunet = [w / sum(nnunet) for w in nnunet]
    assert nnunet[:4] == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15])

    class Recorder(nn.Module):  # the loss of output i is i + 1, so the module's total reveals its weights
        schema = RegionDiceBCELoss().schema

        def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return torch.tensor(float({64: 1, 32: 2, 16: 3, 8: 4}[logits.shape[2]]))

    module = BratsModule(nn.Identity(), Recorder(), optimizer=torch.optim.SGD)
    net = ResEncUNet(4, 3, filters=[4, 4, 4, 4, 4, 4]).train()
    outputs = net(torch.randn(1, 4, 64, 64, 64))
    total = module.supervised_loss(outputs, torch.zeros(1, 64, 64, 64, dtype=torch.long))
    assert float(total) == pytest.approx(sum(w * (i + 1) for i, w in enumerate(nnunet)))


def test_residual_encoder_wiring_and_default_blocks() -> None:
    assert default_blocks(6) == [1, 3, 4, 6, 6, 6] and default_blocks(4) == [1, 3, 4, 6]
    assert default_blocks(7) == [1, 3, 4, 6, 6, 6, 6]
    net = ResEncUNet(4, 3, **TINY)
    assert [len(level) for level in net.encoders] == [1, 2, 2, 2]
    down = net.encoders[1][0]  # first block of level 1: stride 2, skip = avg-pool + 1x1 conv (ResNet-D)
    assert down.conv1[0].stride == (2, 2, 2)
    assert isinstance(down.skip[0], nn.AvgPool3d) and down.skip[1][0].kernel_size == (1, 1, 1)
    assert isinstance(net.encoders[1][1].skip, nn.Identity)
    norms = {type(m) for m in net.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm))}
    assert norms == {nn.InstanceNorm3d}
    assert any(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.01 for m in net.modules())
    # The decoder is plain: no residual blocks outside the encoder.
    assert not any(isinstance(m, ResidualBlock) for m in net.decoders.modules())


def test_each_residual_block_starts_as_identity_plus_activation() -> None:
    # nnU-Net zeroes the last norm scale of every residual branch: at init a block is act(skip(x)).
    torch.manual_seed(0)
    block = ResEncUNet(4, 3, **TINY).encoders[1][1]
    x = torch.randn(1, 8, 4, 4, 4)
    torch.testing.assert_close(block(x), nn.functional.leaky_relu(x, 0.01))


def test_dropout_per_level_and_bad_configs() -> None:
    net = ResEncUNet(4, 3, **TINY, dropout=[0.0, 0.1, 0.2, 0.3])
    rates = [[m.p for m in level.modules() if isinstance(m, nn.Dropout)] for level in net.encoders]
    assert rates == [[], [0.1, 0.1], [0.2, 0.2], [0.3, 0.3]]
    with pytest.raises(ValueError, match=r"model\.blocks needs one positive block count per level of model\.filters "
                                         r"\(4\), got \[1, 2\]"):
        ResEncUNet(4, 3, filters=[4, 8, 8, 16], blocks=[1, 2])
    with pytest.raises(ValueError, match=r"not divisible by 8 = 2\*\*\(len\(filters\)-1\)"):
        ResEncUNet(4, 3, **TINY)(torch.randn(1, 4, 12, 16, 16))


def test_channels_last_gives_the_same_output() -> None:
    torch.manual_seed(0)
    a = ResEncUNet(4, 3, **TINY, deep_supervision=False).eval()
    b = ResEncUNet(4, 3, **TINY, deep_supervision=False, channels_last=True).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_resenc_experiment_trains_with_nnunet_augment_and_predicts(synthetic_root: Path, cache_dir: Path,
                                                                     tmp_path: Path) -> None:
    run = tmp_path / "resenc"
    overrides = [o for o in tiny_overrides(synthetic_root, cache_dir, run) if not o.startswith("model")]
    cfg = compose_train(["experiment=resenc", *overrides, "model.filters=[4,8,16,16]", "logger=none",
                         "augment.spatial.p_rotation=1.0", "trainer.check_val_every_n_epoch=1"])
    assert cfg.augment.spatial.p == 1.0 and cfg.model._target_.endswith("ResEncUNet") and cfg.model.deep_supervision
    train(cfg)
    segmenter = Segmenter.from_checkpoint(run / "checkpoints" / "last.ckpt", device="cpu", precision="fp32")
    assert isinstance(segmenter.module.net, ResEncUNet) and not segmenter.module.training
    case = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    labels = np.asarray(segmenter.predict(case).dataobj)
    assert labels.shape == (64, 64, 48) and set(np.unique(labels)) <= {0, 1, 2, 4}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resenc_trains_on_cuda_in_bf16_channels_last_like_fp32() -> None:
    # The deep-supervision step the recipe runs on a GPU: autocast, channels_last, the module's weighted loss.
    torch.manual_seed(0)
    loss = RegionDiceBCELoss()
    net = ResEncUNet(4, 3, **TINY, channels_last=True).cuda().train()
    module = BratsModule(net, loss, optimizer=torch.optim.SGD)
    x = torch.randn(2, 4, 32, 32, 32, device="cuda")
    y = torch.randint(0, 4, (2, 32, 32, 32), device="cuda")
    with torch.no_grad():
        torch.backends.cudnn.allow_tf32 = False
        try:
            loss32 = module.supervised_loss(net(x), y)
        finally:
            torch.backends.cudnn.allow_tf32 = True
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outputs = net(x)
        loss16 = module.supervised_loss(outputs, y)
    loss16.backward()
    assert [o.shape[2] for o in outputs] == [32, 16] and outputs[0].dtype == torch.bfloat16
    assert abs(loss16.item() - loss32.item()) <= 1e-2 * abs(loss32.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
