"""nnU-Net's residual-encoder U-Net (ResEnc, Isensee et al. 2024, "nnU-Net Revisited"), written here.

Encoder: a 3x3x3 stem conv, then per level a stack of ResNet-D basic blocks (conv-norm-LeakyReLU, conv-norm, + skip,
LeakyReLU); the first block of every level below the top halves the size with a stride-2 conv, and its skip path
average-pools and projects with a 1x1 conv (ResNet-D). Decoder: plain, as nnU-Net's: transposed conv up, concat with
the skip, `decoder_convs` conv-norm-LeakyReLU, and a 1x1 segmentation head per level for deep supervision.
Instance norm (affine), LeakyReLU(0.01), He init with a=0.01 and biases 0, every residual branch's last norm scale
zeroed (so each block starts as the identity), as nnU-Net's `InitWeights_He` and `init_last_bn_before_add_to_0`.

Deep supervision returns [full, 1/2, ..., 1/2**(L-3)]: nnU-Net also builds a head at 1/2**(L-2) but gives it weight 0,
so with the module's 0.5**i weights normalised over these outputs the loss equals nnU-Net's exactly.

Why not `dynamic-network-architectures` (nnU-Net's own package): its 0.4 releases require timm (which pulls
torchvision, so pip may replace the pinned torch) and einops for architectures we do not use, and its state_dict key
names are its own to change, while our checkpoints name `brats_unet.models.resenc.ResEncUNet` and must keep loading.
The network is ~120 lines here, shares the layer table with unet3d.py, and its key names are ours.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from brats_unet.models.unet3d import _LAYERS, NORMS, UNetND, _norm, _per_level

# nnU-Net's ResEnc M preset for 3D (L only widens the patch): 6 levels, widths capped at 320, blocks per level.
RESENC_M = {"filters": (32, 64, 128, 256, 320, 320), "blocks": (1, 3, 4, 6, 6, 6)}


def default_blocks(levels: int) -> list[int]:
    """ResEnc M's residual blocks per level for `levels` levels: 1, 3, 4, 6, 6, ... (deeper levels keep 6)."""
    return [RESENC_M["blocks"][min(i, len(RESENC_M["blocks"]) - 1)] for i in range(levels)]


class ConvNormAct(nn.Sequential):
    def __init__(self, dim: int, in_channels: int, out_channels: int, stride: int = 1, kernel: int = 3,
                 norm: str = "instance", act: bool = True) -> None:
        conv = _LAYERS[dim]["conv"](in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=True)
        layers = [conv, _norm(norm, dim, out_channels)]
        if act:
            layers.append(nn.LeakyReLU(0.01, inplace=True))
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """ResNet-D basic block: out = act(norm(conv(act(norm(conv(x))))) + skip(x)), skip = [avgpool] [1x1 conv-norm]."""

    def __init__(self, dim: int, in_channels: int, out_channels: int, stride: int, norm: str, dropout: float = 0.0
                 ) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(dim, in_channels, out_channels, stride, norm=norm)
        if dropout:  # nnU-Net's place for it: after the first conv's activation
            self.conv1.append(nn.Dropout(dropout))
        self.conv2 = ConvNormAct(dim, out_channels, out_channels, norm=norm, act=False)
        skip: list[nn.Module] = []
        if stride != 1:
            skip.append(nn.AvgPool3d(stride, stride) if dim == 3 else nn.AvgPool2d(stride, stride))
        if in_channels != out_channels:
            skip.append(ConvNormAct(dim, in_channels, out_channels, kernel=1, norm=norm, act=False))
        self.skip = nn.Sequential(*skip) if skip else nn.Identity()
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.skip(x))


class ResEncUNet(nn.Module):
    """forward((B, C, X, Y, Z)) -> logits (B, out_channels, X, Y, Z); a list [full, 1/2, ...] in training with
    deep_supervision. `filters[i]`/`blocks[i]`: width and residual blocks of encoder level i (the last is the
    bottleneck; null: ResEnc M's 1, 3, 4, 6, 6, ...); `dropout`: one rate or one per level, in the encoder blocks
    (nnU-Net's default is none). Sizes must be multiples of 2**(len(filters)-1) (`divisor`), as for UNet3D."""

    dim = 3
    divisor = UNetND.divisor
    _check_input = UNetND._check_input

    def __init__(self, in_channels: int, out_channels: int, filters: Sequence[int] = RESENC_M["filters"],
                 blocks: Sequence[int] | None = None, decoder_convs: int = 1, norm: str = "instance",
                 dropout: float | Sequence[float] = 0.0, deep_supervision: bool = True, channels_last: bool = False
                 ) -> None:
        super().__init__()
        filters = [int(f) for f in filters]
        blocks = default_blocks(len(filters)) if blocks is None else [int(b) for b in blocks]
        if len(filters) < 2 or min(filters) < 1:
            raise ValueError(f"model.filters needs at least 2 positive widths (the last is the bottleneck), "
                             f"got {filters}")
        if len(blocks) != len(filters) or min(blocks) < 1:
            raise ValueError(f"model.blocks needs one positive block count per level of model.filters "
                             f"({len(filters)}), got {blocks}")
        if decoder_convs < 1:
            raise ValueError(f"model.decoder_convs must be >= 1, got {decoder_convs}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
        if norm not in NORMS:
            raise ValueError(f"model.norm must be one of {NORMS}, got {norm!r}")
        rates = _per_level(dropout, len(filters))
        d, layers = self.dim, _LAYERS[self.dim]
        self.in_channels, self.out_channels, self.filters, self.blocks = in_channels, out_channels, filters, blocks
        self.deep_supervision, self.channels_last = deep_supervision, channels_last

        self.stem = ConvNormAct(d, in_channels, filters[0], norm=norm)
        self.encoders = nn.ModuleList(
            nn.Sequential(*(ResidualBlock(d, filters[max(i - 1, 0)] if b == 0 else f, f, 2 if b == 0 and i > 0 else 1,
                                          norm, rate) for b in range(n)))
            for i, (f, n, rate) in enumerate(zip(filters, blocks, rates, strict=True)))
        self.ups = nn.ModuleList(layers["up"](filters[i + 1], filters[i], kernel_size=2, stride=2, bias=True)
                                 for i in range(len(filters) - 1))
        self.decoders = nn.ModuleList(
            nn.Sequential(*(ConvNormAct(d, 2 * filters[i] if c == 0 else filters[i], filters[i], norm=norm)
                            for c in range(decoder_convs)))
            for i in range(len(filters) - 1))
        self.head = layers["conv"](filters[0], out_channels, kernel_size=1)
        self.aux_heads = nn.ModuleList(layers["conv"](filters[i], out_channels, kernel_size=1)
                                       for i in range(1, len(filters) - 2)) if deep_supervision else nn.ModuleList()
        self.reset_parameters()
        if channels_last:
            self.to(memory_format=layers["memory_format"])

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, a=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResidualBlock) and isinstance(m.conv2[1], (nn.InstanceNorm3d, nn.BatchNorm3d,
                                                                        nn.GroupNorm)):
                nn.init.zeros_(m.conv2[1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self._check_input(x)
        if self.channels_last:
            x = x.contiguous(memory_format=_LAYERS[self.dim]["memory_format"])
        x = self.stem(x)
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
        x = skips.pop()  # the bottleneck
        supervise = self.deep_supervision and self.training
        aux = []  # coarsest first
        for i in reversed(range(len(self.decoders))):
            x = self.decoders[i](torch.cat([self.ups[i](x), skips[i]], dim=1))
            if supervise and 1 <= i <= len(self.aux_heads):
                aux.append(self.aux_heads[i - 1](x))
        logits = self.head(x)
        return [logits, *reversed(aux)] if supervise else logits
