"""The seed's 3D U-Net, with a configurable width and depth.

At the default depth of two levels the module layout and parameter names follow the seed
research pipeline exactly, so a plain ``state_dict`` saved by the seed loads unchanged
(keys ``encoder1.*``, ``encoder2.*``, ``bottleneck.*``, ``up2.*``, ``decoder2.*``, ``up1.*``,
``decoder1.*``, ``conv_last.*``). Deeper networks continue the numbering (``encoder3``,
``up3``, ``decoder3``, ...) and double the width at each level.
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
    depth
        Number of down-sampling levels above the bottleneck; the seed used 2. Each level
        halves the grid and doubles the width, so the receptive field grows about twofold
        per level (on the 64x64x56 grid, 4 levels leave a 4x4x3 bottleneck).
    """

    in_channels: int = 1
    out_channels: int = 1
    init_features: int = 32
    depth: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.depth, int) or isinstance(self.depth, bool) or self.depth < 1:
            raise ValueError(f"depth must be an integer >= 1, got {self.depth!r}")

    def to_dict(self) -> dict[str, int]:
        """Plain-dict form stored in checkpoints (without ``depth`` at the seed's 2, so that
        code from before the setting still reads them)."""
        spec = asdict(self)
        if self.depth == 2:
            del spec["depth"]
        return spec

    def describe(self, sep: str = "=") -> str:
        """Short label, e.g. ``f=16`` or ``f=16 depth 3`` (the depth only when not the seed's)."""
        return f"f{sep}{self.init_features}" + (f" depth {self.depth}" if self.depth != 2 else "")


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
    """3D U-Net with transposed-convolution upsampling (two levels: the seed's network).

    Input ``(N, C_in, X, Y, Z)`` float, output logits ``(N, C_out, X, Y, Z)`` of the
    same spatial size. Any size of at least ``2 ** depth`` per axis works (training needs
    ``2 ** (depth + 1)``: BatchNorm wants more than one bottleneck value): odd sizes are
    handled by padding the upsampled maps to their skip connection (the seed's
    ``output_padding=1`` makes the upsampled map one voxel larger on even sizes; it is
    cropped then).
    """

    def __init__(self, spec: UNetSpec | None = None) -> None:
        super().__init__()
        self.spec = spec or UNetSpec()
        f, depth = self.spec.init_features, self.spec.depth
        # registration order is the seed's: encoders and pools going down, then the
        # bottleneck, then up/decoder pairs coming back, then the output convolution
        channels = self.spec.in_channels
        for level in range(1, depth + 1):
            width = f * 2 ** (level - 1)
            setattr(self, f"encoder{level}", _block(channels, width))
            setattr(self, f"pool{level}", nn.MaxPool3d(kernel_size=2, stride=2))
            channels = width
        self.bottleneck = _block(channels, f * 2**depth)
        for level in range(depth, 0, -1):
            width = f * 2 ** (level - 1)
            setattr(self, f"up{level}", nn.ConvTranspose3d(width * 2, width, kernel_size=2, stride=2, output_padding=1))
            setattr(self, f"decoder{level}", _block(width * 2, width))
        self.conv_last = nn.Conv3d(f, self.spec.out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for level in range(1, self.spec.depth + 1):
            x = getattr(self, f"encoder{level}")(x)
            skips.append(x)
            x = getattr(self, f"pool{level}")(x)
        x = self.bottleneck(x)
        for level in range(self.spec.depth, 0, -1):
            skip = skips[level - 1]
            x = _match_size(getattr(self, f"up{level}")(x), skip)
            x = getattr(self, f"decoder{level}")(torch.cat((x, skip), dim=1))
        return self.conv_last(x)

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
