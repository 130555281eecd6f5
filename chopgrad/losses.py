"""Loss specifications: built-in pixel losses, weighted dicts of them, and callables.

Built-in pixel losses ("mse", "l1", "charbonnier", "huber") are elementwise
and reduced by a sum per decoder step; the video loss divides by the element
count (or mask sum) of all supervised frames, so `reduction="mean"` equals the
loss of the whole decoded video at once. "ssim" is `1 - SSIM` per frame
(11x11 Gaussian window, data range 2), averaged over supervised frames under
"mean" and summed under "sum". Callables `(pred, target) -> scalar` are applied per decoder step to
(B, C, f, H, W) frame groups and are treated as means over the frames they
see: under "mean" step g is weighted by its share of supervised frames, under
"sum" the per-step values are added.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from .kernels.pixel_losses import CHARBONNIER_EPS, HUBER_DELTA, LOSS_KINDS


def _mse(pred, target):
    return (pred - target).square()


def _l1(pred, target):
    return (pred - target).abs()


def _charbonnier(pred, target):
    return ((pred - target).square() + CHARBONNIER_EPS**2).sqrt()


def _huber(pred, target):
    return torch.nn.functional.huber_loss(pred, target, reduction="none", delta=HUBER_DELTA)


#: Elementwise autograd versions of the fused pixel losses, for the autograd path (fp32 math).
ELEMENTWISE_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": _mse,
    "l1": _l1,
    "charbonnier": _charbonnier,
    "huber": _huber,
}

#: Frame-wise losses computed by fused value-and-grad ops ("ssim" means 1 - SSIM).
FRAME_LOSSES = ("ssim",)

LOSS_NAMES = LOSS_KINDS + FRAME_LOSSES

LossSpec = Union[str, Callable, dict]


@dataclass(frozen=True)
class LossTerm:
    weight: float
    name: Optional[str] = None  # a built-in elementwise loss
    fn: Optional[Callable] = None  # a user callable (pred, target) -> scalar

    @property
    def elementwise(self) -> bool:
        return self.name in ELEMENTWISE_LOSSES

    @property
    def is_ssim(self) -> bool:
        return self.name == "ssim"

    @property
    def is_callable(self) -> bool:
        return self.fn is not None

    def call(self, pred: torch.Tensor, target: torch.Tensor, need_grad: bool = True) -> torch.Tensor:
        """The callable's value on (pred, target) as a 0-dim tensor; ValueError when it is not a scalar, or has no
        graph while pred has one (it would then contribute no gradient, silently)."""
        name = getattr(self.fn, "__name__", self.fn)
        value = self.fn(pred, target)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError(f"loss: the callable {name!r} must return a scalar tensor, got {type(value).__name__} "
                             f"of shape {getattr(value, 'shape', None)}")
        if need_grad and pred.requires_grad and torch.is_grad_enabled() and not value.requires_grad:
            raise ValueError(f"loss: the callable {name!r} returned a value with no graph (requires_grad=False) "
                             f"while gradients are wanted, so it would contribute no gradient: compute it from pred "
                             f"with differentiable torch ops (no .detach(), .item() or numpy round trip)")
        return value.reshape(())


def resolve_loss(loss: LossSpec) -> list[LossTerm]:
    """Turns `loss` (a name, a callable, or a {name_or_callable: weight} dict of finite weights) into terms."""
    if isinstance(loss, str):
        return [_named_term(loss, 1.0)]
    if isinstance(loss, dict):
        if not loss:
            raise ValueError("loss: a weighted dict must name at least one loss")
        terms = []
        for key, weight in loss.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise TypeError(f"loss: the weight of {key!r} must be a number, got {weight!r}")
            if not math.isfinite(weight):
                raise ValueError(f"loss: the weight of {key!r} must be a finite number, got {weight!r}")
            if isinstance(key, str):
                terms.append(_named_term(key, float(weight)))
            elif callable(key):
                terms.append(LossTerm(float(weight), fn=key))
            else:
                raise TypeError(f"loss: dict keys must be loss names or callables, got {key!r}")
        return terms
    if callable(loss):
        return [LossTerm(1.0, fn=loss)]
    raise TypeError(f"loss must be a loss name, a callable (pred, target) -> scalar, or a weighted dict, got {type(loss).__name__}")


def _named_term(name: str, weight: float) -> LossTerm:
    if name not in LOSS_NAMES:
        raise ValueError(f"loss: unknown loss name {name!r}; known names are {sorted(LOSS_NAMES)}")
    return LossTerm(weight, name=name)


def per_frame(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable:
    """Adapts an image loss taking (N, C, H, W) (LPIPS, DISTS, ...) to (B, C, f, H, W) frame groups."""

    def video_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = pred.shape
        as_images = lambda x: x.transpose(1, 2).reshape(b * f, c, h, w)
        return fn(as_images(pred), as_images(target)).mean()

    video_loss.__name__ = f"per_frame({getattr(fn, '__name__', type(fn).__name__)})"
    return video_loss
