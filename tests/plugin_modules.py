"""Researcher-style attention modules the tests load as `attention: "plugin_modules:<Class>"`."""

from __future__ import annotations

import torch
from torch import nn


class ChannelScale(nn.Module):
    """x * sigmoid(a * avgpool(x) + b), per channel: a gate the probe can read, MACs it declares."""

    def __init__(self, channels: int, init: float = 0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels, 1, 1))
        self.shift = nn.Parameter(torch.full((channels, 1, 1), float(init)))
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.scale * x.mean((2, 3), keepdim=True) + self.shift)

    def macs_beyond_convs(self, shape: torch.Size) -> int:
        n, c, h, w = shape
        return 2 * n * c * h * w + 7  # the 7 proves the declared number is what gets added


class Ungated(nn.Module):
    """A module without a `gate`: trains and counts, but the probe has nothing to read."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class SpatialOnly(nn.Module):
    """Its `gate` gives one value per position, not per channel: the probe must leave it out."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.conv(x))


class Halves(nn.Module):
    """Changes the shape (drops half the channels): must be refused."""

    def __init__(self, channels: int):
        super().__init__()
        self.keep = channels // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : self.keep]


class NeedsWidth(nn.Module):
    """A required keyword argument: constructing it without attention_args must fail with the reason."""

    def __init__(self, channels: int, *, width: int):
        super().__init__()
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


NOT_A_CLASS = 3


class HostScaled(nn.Module):
    """Reads a number back to the host in its forward: it cannot run on the meta device."""

    def __init__(self, channels: int):
        super().__init__()
        self.strength = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float(torch.sigmoid(self.strength))
