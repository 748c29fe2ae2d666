"""2D U-Net on axial slices (the paper's section 5.1 alternative): same blocks as UNet3D with 2D layers."""

from __future__ import annotations

import torch

from brats_unet.models.unet3d import UNetND


class UNet2D(UNetND):
    """Takes volumes (B, C, X, Y, Z), folds z into the batch so every axial slice is one 2D sample, and returns
    (B, out_channels, X, Y, Z). Only X and Y must be divisible by 2**(len(filters)-1).

    Deep-supervision outputs (training mode) are (B, K, X/2**i, Y/2**i, Z): z is never downsampled.
    """

    dim = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if x.ndim != 5:
            raise ValueError(f"UNet2D: expected a 5D volume batch (B, C, X, Y, Z), got shape {tuple(x.shape)}")
        b, c, sx, sy, sz = x.shape
        slices = x.permute(0, 4, 1, 2, 3).reshape(b * sz, c, sx, sy)
        out = super().forward(slices)

        def unfold(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, sz, *t.shape[1:]).permute(0, 2, 3, 4, 1)

        return [unfold(t) for t in out] if isinstance(out, list) else unfold(out)
