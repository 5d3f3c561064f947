"""The seed's two-level 3D U-Net, with a configurable width.

The module layout and parameter names follow the seed research pipeline exactly, so a
plain ``state_dict`` saved by the seed loads unchanged (keys ``encoder1.*``, ``encoder2.*``,
``bottleneck.*``, ``up2.*``, ``decoder2.*``, ``up1.*``, ``decoder1.*``, ``conv_last.*``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetSpec:
    """Hyper-parameters that fully describe a :class:`UNet3D`.

    Parameters
    ----------
    in_channels, out_channels
        Input and output channels (1 and 1 for myocardium segmentation).
    init_features
        Width of the first level; the seed used 32, 16 is ~4x cheaper.
    """

    in_channels: int = 1
    out_channels: int = 1
    init_features: int = 32

    def to_dict(self) -> dict[str, int]:
        """Plain-dict form stored in checkpoints."""
        return asdict(self)


def _block(in_channels: int, features: int) -> nn.Sequential:
    """Conv3d-BN-ReLU twice, bias-free convolutions (the seed's block)."""
    return nn.Sequential(
        nn.Conv3d(in_channels, features, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm3d(features),
        nn.ReLU(inplace=True),
        nn.Conv3d(features, features, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm3d(features),
        nn.ReLU(inplace=True),
    )


def _match_size(upsampled: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """Pad (or crop) ``upsampled`` so its spatial size equals ``skip``'s."""
    pads: list[int] = []
    for dim in (4, 3, 2):  # F.pad takes the last dimension first
        diff = skip.shape[dim] - upsampled.shape[dim]
        # output_padding adds its extra voxel at the far end: crop it there.
        pads += [diff // 2, diff - diff // 2] if diff >= 0 else [0, diff]
    if any(pads):
        upsampled = F.pad(upsampled, pads)
    return upsampled


class UNet3D(nn.Module):
    """Two-level 3D U-Net with transposed-convolution upsampling.

    Input ``(N, C_in, X, Y, Z)`` float, output logits ``(N, C_out, X, Y, Z)`` of the
    same spatial size. Any spatial size works: odd sizes are handled by padding the
    upsampled maps to their skip connection (the seed's ``output_padding=1`` makes the
    upsampled map one voxel larger on even sizes; it is cropped then).
    """

    def __init__(self, spec: UNetSpec | None = None) -> None:
        super().__init__()
        self.spec = spec or UNetSpec()
        f = self.spec.init_features
        self.encoder1 = _block(self.spec.in_channels, f)
        self.pool1 = nn.MaxPool3d(kernel_size=2, stride=2)
        self.encoder2 = _block(f, f * 2)
        self.pool2 = nn.MaxPool3d(kernel_size=2, stride=2)
        self.bottleneck = _block(f * 2, f * 4)
        self.up2 = nn.ConvTranspose3d(f * 4, f * 2, kernel_size=2, stride=2, output_padding=1)
        self.decoder2 = _block(f * 4, f * 2)
        self.up1 = nn.ConvTranspose3d(f * 2, f, kernel_size=2, stride=2, output_padding=1)
        self.decoder1 = _block(f * 2, f)
        self.conv_last = nn.Conv3d(f, self.spec.out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc1 = self.encoder1(x)
        enc2 = self.encoder2(self.pool1(enc1))
        bottleneck = self.bottleneck(self.pool2(enc2))
        dec2 = _match_size(self.up2(bottleneck), enc2)
        dec2 = self.decoder2(torch.cat((dec2, enc2), dim=1))
        dec1 = _match_size(self.up1(dec2), enc1)
        dec1 = self.decoder1(torch.cat((dec1, enc1), dim=1))
        return self.conv_last(dec1)

    def init_output_bias(self, foreground_prior: float) -> None:
        """Set the output bias to the log-odds of the foreground prior.

        With ~0.3% foreground voxels, a zero bias makes the first epochs learn
        "everything is background"; starting at the prior removes that phase.
        """
        p = min(max(foreground_prior, 1e-6), 1 - 1e-6)
        with torch.no_grad():
            self.conv_last.bias.fill_(math.log(p / (1 - p)))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
