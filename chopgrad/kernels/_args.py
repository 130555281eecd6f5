"""Argument handling shared by the ops: clamp modes, gradient buffers and scales, custom-op encodings.

Kept apart from the ops so that no op borrows private helpers of another.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Union

import torch

from ._dispatch import check_same, tl

ClampSpec = Union[bool, str, None]
GradScale = Union[float, torch.Tensor]
OutGrad = Union[None, str, torch.Tensor]


class Clamp(IntEnum):
    """How the prediction relates to the decoder's ``clamp(out, -1, 1)``.

    An ``IntEnum`` so a member passes to a Triton kernel as a ``tl.constexpr`` int
    and through a custom op's ``int`` argument unchanged.
    """

    NONE = 0
    """No clamp handling."""
    POST = 1
    """``pred`` is post-clamp: zero gradient where ``|pred| >= 1``."""
    PRE = 2
    """``pred`` is the raw output: clamp inside, exact ``torch.clamp`` gradient (see :data:`CLAMP_PASSES_BOUNDS`)."""


def _torch_clamp_passes_gradient_at_its_bounds() -> bool:
    """Whether ``torch.clamp`` passes the gradient where its input equals a bound (torch <= 2.13: yes; 2.14: no)."""
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.tensor([-1.0, 1.0], device="cpu", requires_grad=True)
        (grad,) = torch.autograd.grad(torch.clamp(x, -1.0, 1.0).sum(), x)
    return bool(grad.all())


CLAMP_PASSES_BOUNDS = _torch_clamp_passes_gradient_at_its_bounds()
"""The ``"pre"`` clamp's gradient where the raw output is exactly -1 or 1: the installed torch's own
``torch.clamp`` rule, so the fused ops match autograd through the model's clamp on every supported torch."""

# Triton kernels may read module globals only when they are ``tl.constexpr``.
CLAMP_NONE = tl.constexpr(int(Clamp.NONE))
CLAMP_PRE = tl.constexpr(int(Clamp.PRE))
CLAMP_PRE_PASSES_BOUNDS = tl.constexpr(CLAMP_PASSES_BOUNDS)


def clamp_passes(raw: torch.Tensor) -> torch.Tensor:
    """Where ``torch.clamp(raw, -1, 1)`` passes the gradient (the reference paths' ``"pre"`` rule)."""
    if CLAMP_PASSES_BOUNDS:
        return (raw >= -1.0) & (raw <= 1.0)
    return (raw > -1.0) & (raw < 1.0)


def parse_clamp(clamp: ClampSpec) -> Clamp:
    """``False``/``None`` -> ``NONE``, ``True``/``"post"`` -> ``POST``, ``"pre"`` -> ``PRE``."""
    if clamp is False or clamp is None:
        return Clamp.NONE
    if clamp is True or clamp == "post":
        return Clamp.POST
    if clamp == "pre":
        return Clamp.PRE
    raise ValueError(f"clamp must be False, True/'post' or 'pre', got {clamp!r}")


def check_grad_scale(pred: torch.Tensor, grad_scale: GradScale) -> None:
    """Raise unless ``grad_scale`` is a number or a ``(B, F)`` tensor on ``pred``'s device."""
    if isinstance(grad_scale, torch.Tensor):
        B, _, F = pred.shape[:3]
        if grad_scale.shape != (B, F):
            raise ValueError(f"grad_scale tensor must have shape (B, F) = ({B}, {F}), got {tuple(grad_scale.shape)}")
        if grad_scale.device != pred.device:
            raise ValueError(f"grad_scale is on {grad_scale.device} but pred is on {pred.device}")
    elif not isinstance(grad_scale, (int, float)):
        raise TypeError(f"grad_scale must be a float or a (B, F) tensor, got {type(grad_scale).__name__}")


def resolve_out(pred: torch.Tensor, out_grad: OutGrad) -> torch.Tensor | None:
    """The tensor the gradient is written to: ``None`` (allocate), ``pred`` itself or the given buffer."""
    if out_grad is None:
        return None
    if isinstance(out_grad, str):
        if out_grad != "inplace":
            raise ValueError(f"out_grad must be None, 'inplace' or a tensor, got {out_grad!r}")
        if not pred.is_contiguous():
            raise ValueError("out_grad='inplace' needs a contiguous pred; call pred.contiguous() or pass out_grad=None")
        return pred
    if not isinstance(out_grad, torch.Tensor):
        raise TypeError(f"out_grad must be None, 'inplace' or a tensor, got {type(out_grad).__name__}")
    check_same("pred", pred, "out_grad", out_grad)
    if not out_grad.is_contiguous():
        raise ValueError("out_grad must be contiguous")
    return out_grad


def split_grad_scale(grad_scale: GradScale) -> tuple[torch.Tensor | None, float]:
    """``(per-frame tensor or None, scalar)``: the two forms a custom op can take as separate arguments."""
    if isinstance(grad_scale, torch.Tensor):
        return grad_scale, 1.0
    return None, float(grad_scale)


def merge_grad_scale(scale_t: torch.Tensor | None, scale: float) -> GradScale:
    """Inverse of :func:`split_grad_scale`, for the launchers."""
    return scale_t if scale_t is not None else scale


def not_computed(like: torch.Tensor) -> torch.Tensor:
    """Stand-in for a ``None`` output of a custom op (which must return tensors): an empty tensor."""
    return like.new_empty((0,))


def computed_or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``t``, or :func:`not_computed` when it is ``None``."""
    return t if t is not None else not_computed(like)


def register_value_and_grad_autograd(op, *, num_inputs: int) -> None:
    """Autograd for a custom op returning ``(per-frame values (B, F), gradient of their sum)``.

    The gradient is the only saved state: ``d values / d pred`` is that
    gradient divided by the scale, so it is differentiable only unscaled (the
    op's last two inputs are the per-frame scale tensor or None and the float
    scale). Only ``pred``, the first input, gets a gradient.
    """
    name = op._qualname if hasattr(op, "_qualname") else str(op)

    def setup_context(ctx, inputs, output):
        scale_frames, scale = inputs[-2], inputs[-1]
        _, grad = output
        ctx.mark_non_differentiable(grad)
        ctx.save_for_backward(grad)
        ctx.unscaled = scale_frames is None and scale == 1.0

    def backward(ctx, grad_values, _grad_of_grad):
        (grad,) = ctx.saved_tensors
        if not ctx.unscaled:
            raise RuntimeError(f"{name} is differentiable only with grad_scale=1")
        return grad * grad_values.to(grad.dtype)[:, None, :, None, None], *([None] * (num_inputs - 1))

    op.register_autograd(backward, setup_context=setup_context)
