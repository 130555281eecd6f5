"""Factories that `chopgrad train --generator` / `--perceptual` / `--video-loss` resolve in the tests."""
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


# ---------------------------------------------------------------- --video-loss: whole-clip losses

class ConvCritic(nn.Module):
    """A video critic stand-in: two 3D convolutions score space-time patches of a (B, 3, F, H, W) clip, and the
    loss is the non-saturating generator loss softplus(-score), averaged. Its weights are torch's default
    initialization, so they depend on the global random state the trainer seeds."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.SiLU(), nn.Conv3d(4, 1, 3, stride=2, padding=1))

    def forward(self, video):
        return nn.functional.softplus(-self.net(video)).mean()


def make_critic():
    return ConvCritic()


def frame_difference():
    """A temporal loss (a plain function, not a module): mean |frame t+1 - frame t|, which flicker raises."""

    def loss(video):
        return (video[:, :, 1:] - video[:, :, :-1]).abs().mean()

    return loss


def not_a_critic():
    return 42


def critic_needing_weights(weights_path):
    return ConvCritic()


def per_frame_scores():
    """Returns one value per frame instead of a scalar."""
    return lambda video: video.mean(dim=(0, 1, 3, 4))


def detached_critic():
    """Returns a value computed off the graph: it would add to the loss and nothing to the gradient."""
    return lambda video: video.detach().abs().mean()


def float_critic():
    return lambda video: video.abs().mean().item()


def image_loss_without_graph():
    """An image loss computed through numpy: its value carries no gradient."""
    return lambda pred, target: torch.tensor(float((pred - target).abs().mean().detach().numpy()))


def image_loss_needing_weights(weights_path):
    raise AssertionError("not reached: called without arguments")


def image_loss_that_raises():
    raise RuntimeError("the weights of this loss are missing")


def too_many_channels(in_channels: int, out_channels: int) -> nn.Module:
    """Returns one latent channel more than the VAE's."""
    return PointwiseGenerator(in_channels, out_channels + 1)


def nan_critic():
    """A video loss that is NaN from the start."""
    return lambda video: video.mean() * float("nan")
