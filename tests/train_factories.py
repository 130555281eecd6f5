"""Factories that `chopgrad train --generator` / `--perceptual` resolve in the tests."""
import torch
import torch.nn as nn


class PointwiseGenerator(nn.Module):
    """A 1x1x1 convolution: causal in time, any number of channels."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x):
        return self.proj(x)


def pointwise(in_channels: int, out_channels: int) -> nn.Module:
    return PointwiseGenerator(in_channels, out_channels)


def not_a_module(in_channels: int, out_channels: int):
    return "a string"


class GradientL1(nn.Module):
    """An image loss with a buffer (like LPIPS's normalisation constants): L1 of horizontal gradients."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(1.0))

    def forward(self, pred, target):
        dx = lambda x: x[..., 1:] - x[..., :-1]
        return self.scale * (dx(pred) - dx(target)).abs().mean()


def gradient_l1():
    return GradientL1()


class DropoutGenerator(nn.Module):
    """Two 1x1x1 convolutions with dropout between them: a model that draws from torch's global random state."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(in_channels, 8, 1), nn.Dropout(0.3), nn.Conv3d(8, out_channels, 1))

    def forward(self, x):
        return self.net(x)


def dropout(in_channels: int, out_channels: int) -> nn.Module:
    return DropoutGenerator(in_channels, out_channels)
