"""The one-step latent model a training recipe trains, and how a user supplies their own.

The model stands in for a video diffusion model used in one-step mode: it
maps condition latents ``(B, z_dim + extra, T, h, w)`` (the encoded condition
video, plus the task's extra channels at latent resolution) to target latents
``(B, z_dim, T, h, w)``. It is causal in time like the VAE, so latent frame
``t`` of the output depends on input frames ``<= t`` only.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalConv3d(nn.Conv3d):
    """A 3-D convolution padded so that output frame t sees input frames t-k+1 .. t only."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3):
        super().__init__(in_channels, out_channels, kernel_size=kernel, padding=0)
        self.time_pad, self.space_pad = kernel - 1, kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.space_pad
        return super().forward(F.pad(x, (s, s, s, s, self.time_pad, 0)))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(1, channels)
        self.conv1 = CausalConv3d(channels, channels)
        self.norm2 = nn.GroupNorm(1, channels)
        self.conv2 = CausalConv3d(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GroupNorm(1, C) normalises over all frames: use per-frame statistics to stay causal.
        h = self.conv1(F.silu(_per_frame(self.norm1, x)))
        return x + self.conv2(F.silu(_per_frame(self.norm2, h)))


def _per_frame(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    b, c, t, h, w = x.shape
    frames = x.transpose(1, 2).reshape(b * t, c, h, w)
    return norm(frames).reshape(b, t, c, h, w).transpose(1, 2)


class OneStepLatentModel(nn.Module):
    """A small causal residual network: condition latents (+ extra channels) -> target latents.

    It starts as "output = the condition latents": the last convolution is
    zero, so training begins from the latent-copy baseline and learns the
    correction.
    """

    def __init__(self, z_dim: int, extra_channels: int = 0, width: int = 64, blocks: int = 3):
        super().__init__()
        for name, value, low in (("z_dim", z_dim, 1), ("extra_channels", extra_channels, 0), ("width", width, 1),
                                 ("blocks", blocks, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.z_dim, self.extra_channels = z_dim, extra_channels
        self.conv_in = CausalConv3d(z_dim + extra_channels, width)
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(blocks))
        self.conv_out = CausalConv3d(width, z_dim)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        expected = self.z_dim + self.extra_channels
        if inputs.dim() != 5 or inputs.shape[1] != expected:
            raise ValueError(f"inputs must be (B, {expected}, T, h, w) (z_dim {self.z_dim} + {self.extra_channels} "
                             f"extra channels), got {tuple(inputs.shape)}")
        h = self.conv_in(inputs)
        for block in self.blocks:
            h = block(h)
        return inputs[:, :self.z_dim] + self.conv_out(F.silu(h))


def resolve_factory(spec: str, what: str = "--generator") -> Callable[..., nn.Module]:
    """`"package.module:function"` -> that callable, with a clear error naming `what` if it does not resolve.

    The module is looked up as ``python -m`` does: in the current folder first, then on ``sys.path``. The
    ``chopgrad`` console script, unlike ``python -m chopgrad``, does not put the current folder on ``sys.path``.
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"{what}: expected 'module:function', got {spec!r}")
    module_name, attribute = spec.split(":")
    here = os.getcwd()
    if not any(isinstance(entry, str) and os.path.abspath(entry or ".") == here for entry in sys.path):
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{what}: cannot import module {module_name!r} ({exc})") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"{what}: module {module_name!r} has no callable {attribute!r}")
    return factory
