"""The seed paper's network (section 3.1): the original U-Net of Ronneberger et al., in 3D, DigitalSreeni/Keras style.

Per level: conv3 -> ReLU -> Dropout -> conv3 -> ReLU (padding 1, so sizes are kept; `activation="leaky_relu"` is
nnU-Net's LeakyReLU(0.01) instead); MaxPool(2) down,
ConvTranspose(k=2, s=2) up, concatenation [up, skip] (Keras order), and a final 1x1 conv to logits (the loss applies
softmax or sigmoid). `filters[-1]` is the bottleneck. The layers are built by dimension so UNet2D (unet2d.py) shares
everything here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

NORMS = ("none", "batch", "instance", "group")
ACTIVATIONS = ("relu", "leaky_relu")  # leaky_relu: nnU-Net's LeakyReLU(0.01)
_LAYERS = {
    2: {"conv": nn.Conv2d, "up": nn.ConvTranspose2d, "pool": nn.MaxPool2d, "batch": nn.BatchNorm2d,
        "instance": nn.InstanceNorm2d, "memory_format": torch.channels_last},
    3: {"conv": nn.Conv3d, "up": nn.ConvTranspose3d, "pool": nn.MaxPool3d, "batch": nn.BatchNorm3d,
        "instance": nn.InstanceNorm3d, "memory_format": torch.channels_last_3d},
}


def group_count(channels: int, max_groups: int = 8) -> int:
    """Largest group count <= max_groups that divides `channels` (GroupNorm needs divisibility)."""
    return max(g for g in range(1, max_groups + 1) if channels % g == 0)


def _norm(kind: str, dim: int, channels: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return _LAYERS[dim]["batch"](channels)
    if kind == "instance":
        return _LAYERS[dim]["instance"](channels, affine=True)
    return nn.GroupNorm(group_count(channels), channels)


class ConvBlock(nn.Module):
    """Two 3x3(x3) convs with ReLU (or LeakyReLU) and element-wise dropout between them (Keras `Dropout` is
    element-wise too)."""

    def __init__(self, dim: int, in_channels: int, out_channels: int, dropout: float, norm: str,
                 activation: str = "relu") -> None:
        super().__init__()
        conv = _LAYERS[dim]["conv"]
        bias = norm == "none"  # a norm layer right after the conv makes its bias redundant
        self.conv1 = conv(in_channels, out_channels, kernel_size=3, padding=1, bias=bias)
        self.norm1 = _norm(norm, dim, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(out_channels, out_channels, kernel_size=3, padding=1, bias=bias)
        self.norm2 = _norm(norm, dim, out_channels)
        self.act = nn.ReLU(inplace=True) if activation == "relu" else nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.act(self.norm1(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


def _per_level(dropout: float | Sequence[float], levels: int) -> list[float]:
    rates = [float(dropout)] * levels if isinstance(dropout, (int, float)) else [float(d) for d in dropout]
    if len(rates) != levels:
        raise ValueError(f"model.dropout has {len(rates)} rates but model.filters has {levels} levels; "
                         "give one rate per level (or a single number)")
    bad = [d for d in rates if not 0.0 <= d < 1.0]
    if bad:
        raise ValueError(f"model.dropout rates must be in [0, 1), got {bad}")
    return rates


class UNetND(nn.Module):
    """U-Net over `dim` spatial dims. Use UNet3D or UNet2D; this class holds the shared structure."""

    dim = 3

    def __init__(self, in_channels: int, out_channels: int, filters: Sequence[int] = (32, 64, 128, 256, 512),
                 dropout: float | Sequence[float] = 0.0, norm: str = "none", deep_supervision: bool = False,
                 channels_last: bool = False, activation: str = "relu") -> None:
        super().__init__()
        filters = [int(f) for f in filters]
        if len(filters) < 2 or min(filters) < 1:
            raise ValueError(f"model.filters needs at least 2 positive widths (the last is the bottleneck), "
                             f"got {filters}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
        if norm not in NORMS:
            raise ValueError(f"model.norm must be one of {NORMS}, got {norm!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation must be one of {ACTIVATIONS}, got {activation!r}")
        rates = _per_level(dropout, len(filters))
        layers = _LAYERS[self.dim]
        self.in_channels, self.out_channels = in_channels, out_channels
        self.filters, self.dropout, self.norm = filters, rates, norm
        self.deep_supervision, self.channels_last = deep_supervision, channels_last

        widths_in = [in_channels, *filters[:-1]]
        self.encoders = nn.ModuleList(ConvBlock(self.dim, c, f, d, norm, activation)
                                      for c, f, d in zip(widths_in, filters, rates, strict=True))
        self.pool = layers["pool"](2)
        # ups[i] / decoders[i] produce decoder level i (same resolution as encoder level i); level i reuses dropout[i].
        self.ups = nn.ModuleList(layers["up"](filters[i + 1], filters[i], kernel_size=2, stride=2)
                                 for i in range(len(filters) - 1))
        self.decoders = nn.ModuleList(ConvBlock(self.dim, 2 * filters[i], filters[i], rates[i], norm, activation)
                                      for i in range(len(filters) - 1))
        self.head = layers["conv"](filters[0], out_channels, kernel_size=1)
        # Deep supervision: one head per decoder level below full resolution (1/2, 1/4, ... of the input).
        self.aux_heads = nn.ModuleList(layers["conv"](filters[i], out_channels, kernel_size=1)
                                       for i in range(1, len(filters) - 1)) if deep_supervision else nn.ModuleList()
        self.reset_parameters()
        if channels_last:
            self.to(memory_format=layers["memory_format"])

    def reset_parameters(self) -> None:
        """He-normal weights (fan_in, ReLU gain), zero biases: the paper's kernel initializer (section 3.3.6).

        For transposed convs torch's fan_in is out_channels * k**dim, which is also what Keras uses for them.
        """
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def divisor(self) -> int:
        """Every (pooled) spatial size must be a multiple of this: one halving per level below the top."""
        return 2 ** (len(self.filters) - 1)

    def _check_input(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        if x.ndim != self.dim + 2:
            raise ValueError(f"{name}: expected a {self.dim + 2}D input (B, C, *spatial), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{name}: input has {x.shape[1]} channels but the model was built for "
                             f"in_channels={self.in_channels}")
        spatial = tuple(x.shape[2:])
        if any(s % self.divisor for s in spatial):
            raise ValueError(f"{name}: input spatial shape {spatial} is not divisible by {self.divisor} = "
                             f"2**(len(filters)-1) for filters={self.filters}; use a patch size that is a multiple "
                             f"of {self.divisor} (data.patch_size)")

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self._check_input(x)
        if self.channels_last:
            x = x.contiguous(memory_format=_LAYERS[self.dim]["memory_format"])
        skips = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x)
            if i < len(self.encoders) - 1:
                skips.append(x)
                x = self.pool(x)
        aux = []  # collected from the coarsest level up
        for i in reversed(range(len(self.decoders))):
            x = self.decoders[i](torch.cat([self.ups[i](x), skips[i]], dim=1))
            if self.deep_supervision and self.training and i >= 1:
                aux.append(self.aux_heads[i - 1](x))
        logits = self.head(x)
        if self.deep_supervision and self.training:
            return [logits, *reversed(aux)]
        return logits


class UNet3D(UNetND):
    """3D U-Net: forward((B, C, X, Y, Z)) -> logits (B, out_channels, X, Y, Z).

    In training mode with deep_supervision the result is a list [full, 1/2, 1/4, ...] of logits (each level's
    resolution); in eval mode only the full-resolution tensor.
    """

    dim = 3
