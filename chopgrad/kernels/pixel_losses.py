"""Fused pixel losses, value-and-grad: ``l1``, ``mse``, ``charbonnier``, ``huber``.

One pass reads the prediction, the target and the optional mask and writes
per-frame loss sums (fp32 accumulation) and the gradient with respect to the
prediction.  Nothing is saved for a backward pass: the gradient *is* the
output, which is what the engine needs (it backpropagates that gradient into
the decoder step right away), and it may overwrite the prediction's buffer
(the decoded frames are dead after the loss).

Layout: ``_pixel_loss_kernel`` (Triton) -> ``_pixel_loss_triton`` (launcher)
-> ``_pixel_loss_reference`` (PyTorch, same outputs) -> custom ops
``torch.ops.chopgrad.pixel_loss_value_and_grad`` (dispatch; its autograd
formula saves only the gradient), ``pixel_loss_value_and_grad_out`` (writes
into a given buffer) and ``pixel_loss_frames`` -> :func:`pixel_loss_value_and_grad`,
:func:`pixel_loss_frames` and :func:`fused_pixel_loss` (public).

Elementwise losses, with ``d = p - target`` (``p`` the prediction, clamped
first in ``clamp="pre"`` mode):

=============  =========================================  ==========================
kind           loss                                       d loss / d p
=============  =========================================  ==========================
``l1``         ``|d|``                                    ``sign(d)`` (0 at d = 0)
``mse``        ``d**2``                                   ``2 d``
``charbonnier`` ``sqrt(d**2 + eps**2)``                   ``d / sqrt(d**2 + eps**2)``
``huber``      ``0.5 d**2`` if ``|d| < delta`` else       ``clamp(d, -delta, delta)``
               ``delta (|d| - 0.5 delta)`` (torch's
               ``huber_loss``)
=============  =========================================  ==========================

Clamp rules (the decoder's output is ``clamp(out, -1, 1)``):

* ``clamp=False``: no clamp handling.
* ``clamp=True`` / ``"post"``: ``pred`` holds values *after* the clamp.  The
  pre-clamp value is gone, so the gradient is zeroed where ``|pred| >= 1``.
  ``torch.clamp`` itself passes the gradient where the pre-clamp value equals
  a bound exactly, so this differs from autograd through ``torch.clamp`` only
  where the decoder produced exactly +-1.0 before the clamp.  A test against
  autograd must therefore use the rule ``grad * (pred.abs() < 1)`` (or avoid
  exact +-1 pre-clamp values).
* ``clamp="pre"``: ``pred`` holds the *raw* decoder output.  The op clamps it
  itself (the loss value is that of ``clamp(pred, -1, 1)``) and the gradient
  is the exact ``torch.clamp`` gradient with respect to the raw output:
  passed where ``-1 < pred < 1``, and at exactly -1 or 1 as the installed
  torch's ``torch.clamp`` does (passed up to torch 2.13, not from 2.14 on;
  ``chopgrad.kernels._args.CLAMP_PASSES_BOUNDS``).  This matches
  ``loss(torch.clamp(pred, -1, 1))`` under autograd bit-for-bit in its mask
  and saves the engine the separate clamp pass.

Masks: elements where ``mask == 0`` contribute exactly zero to the value and
the gradient, even where ``pred`` or ``target`` is not finite; elsewhere the
elementwise loss and gradient are multiplied by the mask value (a weight).
"""

from __future__ import annotations

from typing import List, Mapping, Union  # List: torch 2.6 infers custom op schemas from typing.List only

import torch
import torch.nn.functional as F

from ._args import (CLAMP_NONE, CLAMP_PRE, CLAMP_PRE_PASSES_BOUNDS, Clamp, ClampSpec, GradScale, OutGrad,
                    check_grad_scale, clamp_passes, merge_grad_scale, parse_clamp, register_value_and_grad_autograd,
                    resolve_out, split_grad_scale)
from ._dispatch import check_float_tensor, check_same, force_mode, tl, triton, triton_kernel, use_triton

LOSS_KINDS = ("l1", "mse", "charbonnier", "huber")
"""Names accepted by ``kind`` (alone or as keys of a weight dict)."""

CHARBONNIER_EPS = 1e-3
"""Default ``eps`` of ``charbonnier``: ``sqrt(d**2 + eps**2)``."""

HUBER_DELTA = 1.0
"""Default ``delta`` of ``huber``: quadratic for ``|d| < delta``, linear beyond."""

KindSpec = Union[str, Mapping[str, float]]


# ---------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------


@triton_kernel
def _pixel_loss_kernel(
    pred_ptr, target_ptr, mask_ptr, grad_ptr, partial_ptr, scale_ptr,
    C, F, H, W, NBLK,
    psb, psc, psf, psh, psw,
    tsb, tsc, tsf, tsh, tsw,
    msb, msc, msf, msh, msw,
    gsb, gsc, gsf, gsh, gsw,
    w_l1, w_mse, w_charb, w_huber, eps2, delta, scale_scalar,
    HAS_MASK: tl.constexpr, CLAMP: tl.constexpr, SCALE_PER_FRAME: tl.constexpr,
    USE_L1: tl.constexpr, USE_MSE: tl.constexpr, USE_CHARB: tl.constexpr, USE_HUBER: tl.constexpr,
    WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr, HW_CONTIGUOUS: tl.constexpr,
):
    """One program: frame (b, f) = program_id(0), a block of H*W positions, all channels.

    HW_CONTIGUOUS: every tensor's (H, W) plane is contiguous, so a position's offset is its flat index and no
    per-element division by W is needed.
    """
    pid_bf = tl.program_id(0)
    pid_hw = tl.program_id(1)
    b = pid_bf // F
    f = pid_bf % F
    offs = pid_hw * BLOCK + tl.arange(0, BLOCK)
    inb = offs < H * W
    if HW_CONTIGUOUS:
        p_pos = offs.to(tl.int64)
        t_pos = p_pos
        g_pos = p_pos
        m_pos = p_pos
    else:
        h = (offs // W).to(tl.int64)
        w = (offs % W).to(tl.int64)
        p_pos = h * psh + w * psw
        t_pos = h * tsh + w * tsw
        g_pos = h * gsh + w * gsw
        m_pos = h * msh + w * msw
    p_base = b.to(tl.int64) * psb + f.to(tl.int64) * psf + p_pos
    t_base = b.to(tl.int64) * tsb + f.to(tl.int64) * tsf + t_pos
    g_base = b.to(tl.int64) * gsb + f.to(tl.int64) * gsf + g_pos
    m_base = b.to(tl.int64) * msb + f.to(tl.int64) * msf + m_pos
    if SCALE_PER_FRAME:
        gscale = tl.load(scale_ptr + pid_bf).to(tl.float32)
    else:
        gscale = scale_scalar
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    pp = pred_ptr + p_base
    tp = target_ptr + t_base
    gp = grad_ptr + g_base
    mp = mask_ptr + m_base
    for c in range(C):
        p = tl.load(pp, mask=inb, other=0.0).to(tl.float32)
        t = tl.load(tp, mask=inb, other=0.0).to(tl.float32)
        if CLAMP == CLAMP_PRE:
            pv = tl.minimum(tl.maximum(p, -1.0), 1.0)
            if CLAMP_PRE_PASSES_BOUNDS:
                passes = (p >= -1.0) & (p <= 1.0)
            else:
                passes = (p > -1.0) & (p < 1.0)
        else:
            pv = p
            passes = tl.abs(p) < 1.0
        d = pv - t
        ad = tl.abs(d)
        loss = tl.zeros([BLOCK], dtype=tl.float32)
        g = tl.zeros([BLOCK], dtype=tl.float32)
        if USE_L1:
            loss += w_l1 * ad
            g += w_l1 * tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))
        if USE_MSE:
            loss += w_mse * d * d
            g += (2.0 * w_mse) * d
        if USE_CHARB:
            r = tl.sqrt(d * d + eps2)
            loss += w_charb * r
            g += w_charb * (d / r)
        if USE_HUBER:
            small = ad < delta
            loss += w_huber * tl.where(small, 0.5 * d * d, delta * (ad - 0.5 * delta))
            g += w_huber * tl.minimum(tl.maximum(d, -delta), delta)
        if HAS_MASK:
            mk = tl.load(mp, mask=inb, other=0.0).to(tl.float32)
            keep = mk != 0.0
            loss = tl.where(keep, loss * mk, 0.0)
            g = tl.where(keep, g * mk, 0.0)
            mp += msc
        if CLAMP != CLAMP_NONE:
            g = tl.where(passes, g, 0.0)
        acc += tl.where(inb, loss, 0.0)
        if WRITE_GRAD:
            tl.store(gp, (g * gscale).to(grad_ptr.dtype.element_ty), mask=inb)
        pp += psc
        tp += tsc
        gp += gsc
    tl.store(partial_ptr + pid_bf * NBLK + pid_hw, tl.sum(acc, axis=0))


# ---------------------------------------------------------------------------
# argument handling
# ---------------------------------------------------------------------------


def _parse_kind(kind: KindSpec) -> dict[str, float]:
    if isinstance(kind, str):
        weights = {kind: 1.0}
    elif isinstance(kind, Mapping):
        weights = {}
        for k, v in kind.items():
            if not isinstance(k, str):
                raise TypeError(f"kind dict keys must be loss names, got {k!r}")
            weights[k] = float(v)
        if not weights:
            raise ValueError("kind dict is empty; give at least one of " + ", ".join(LOSS_KINDS))
    else:
        raise TypeError(f"kind must be a loss name or a dict name -> weight, got {type(kind).__name__}")
    for k in weights:
        if k not in LOSS_KINDS:
            raise ValueError(f"unknown pixel loss {k!r}; expected one of {', '.join(LOSS_KINDS)}")
    return weights


def _encode_kind(weights: dict[str, float]) -> tuple[list[int], list[float]]:
    """``(indices into LOSS_KINDS, weights)``: a custom op takes lists of ints and floats, not a dict."""
    return [LOSS_KINDS.index(k) for k in weights], list(weights.values())


def _check_inputs(pred, target, mask, grad_scale):
    check_float_tensor("pred", pred, ndim=5, shape_hint="(B, C, F, H, W)")
    check_float_tensor("target", target)
    check_same("pred", pred, "target", target)
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if not (mask.is_floating_point() or mask.dtype == torch.bool):
            raise TypeError(f"mask must be a floating or bool tensor, got {mask.dtype}")
        B, C, F, H, W = pred.shape
        if mask.dim() != 5 or mask.shape[0] != B or mask.shape[1] not in (1, C) or tuple(mask.shape[2:]) != (F, H, W):
            raise ValueError(
                f"mask must have shape (B, 1 or C, F, H, W) = ({B}, 1 or {C}, {F}, {H}, {W}), got {tuple(mask.shape)}"
            )
        if mask.device != pred.device:
            raise ValueError(f"mask is on {mask.device} but pred is on {pred.device}")
    check_grad_scale(pred, grad_scale)


# ---------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------


def _pixel_loss_triton(pred, target, mask, weights, clamp_mode, delta, eps, grad_scale, out, write_grad=True,
                       block=None):
    """Launch :func:`_pixel_loss_kernel`; returns ``(sums (B, F) fp32, grad or None)``."""
    B, C, F, H, W = pred.shape
    if out is None and write_grad:
        out = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    HW = H * W
    if block is None:
        block = 1024 if pred.is_cuda else 256
    block = min(block, triton.next_power_of_2(max(HW, 16)))
    nblk = triton.cdiv(HW, block)
    partial = torch.empty((B * F, nblk), dtype=torch.float32, device=pred.device)
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
        ms = list(mask.stride())
        if mask.shape[1] == 1:
            ms[1] = 0
    else:
        ms = [0] * 5
    scale_per_frame = isinstance(grad_scale, torch.Tensor)
    scale_t = grad_scale.contiguous() if scale_per_frame else partial  # dummy pointer when scalar
    g = out if write_grad else pred  # dummy pointer when no grad is written
    planes = [pred.stride()[3:], target.stride()[3:], g.stride()[3:]] + ([tuple(ms[3:])] if mask is not None else [])
    hw_contiguous = all(sw == 1 and sh == W for sh, sw in planes) or H * W == 1
    _pixel_loss_kernel[(B * F, nblk)](
        pred, target, mask if mask is not None else pred, g, partial, scale_t,
        C, F, H, W, nblk,
        *pred.stride(), *target.stride(), *ms, *g.stride(),
        float(weights.get("l1", 0.0)), float(weights.get("mse", 0.0)),
        float(weights.get("charbonnier", 0.0)), float(weights.get("huber", 0.0)),
        float(eps) ** 2, float(delta), 1.0 if scale_per_frame else float(grad_scale),
        HAS_MASK=mask is not None, CLAMP=int(clamp_mode), SCALE_PER_FRAME=scale_per_frame,
        USE_L1="l1" in weights, USE_MSE="mse" in weights, USE_CHARB="charbonnier" in weights,
        USE_HUBER="huber" in weights, WRITE_GRAD=write_grad, BLOCK=block, HW_CONTIGUOUS=hw_contiguous,
    )
    sums = partial.sum(dim=1).view(B, F)
    return sums, (out if write_grad else None)


# ---------------------------------------------------------------------------
# PyTorch reference (same outputs, no autograd graph)
# ---------------------------------------------------------------------------


def _pixel_loss_reference(pred, target, mask, weights, clamp_mode, delta, eps, grad_scale, out, write_grad=True):
    """PyTorch implementation of the kernel: same math, fp32 (fp64 for fp64 inputs), no graph."""
    acc_dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        p = pred.to(acc_dtype)
        t = target.to(acc_dtype)
        if clamp_mode == Clamp.PRE:
            pv = p.clamp(-1.0, 1.0)
            passes = clamp_passes(p)
        else:
            pv = p
            passes = p.abs() < 1.0 if clamp_mode == Clamp.POST else None
        d = pv - t
        del pv
        loss = None
        g = None

        def _add(a, b):
            return b if a is None else a.add_(b)

        def _w(t, wt):
            return t if wt == 1.0 else t.mul_(wt)

        if "l1" in weights:
            wt = weights["l1"]
            loss = _add(loss, _w(d.abs(), wt))
            if write_grad:
                g = _add(g, _w(torch.sign(d), wt))
        if "mse" in weights:
            wt = weights["mse"]
            loss = _add(loss, _w(d.square(), wt))
            if write_grad:
                g = _add(g, d * (2.0 * wt))
        if "charbonnier" in weights:
            wt = weights["charbonnier"]
            r = d.square().add_(float(eps) ** 2).sqrt_()
            if write_grad:
                g = _add(g, _w(d / r, wt))
            loss = _add(loss, _w(r, wt))
        if "huber" in weights:
            wt = weights["huber"]
            ad = d.abs()
            hl = torch.where(ad < delta, 0.5 * d.square(), delta * (ad - 0.5 * delta))
            loss = _add(loss, _w(hl, wt))
            if write_grad:
                g = _add(g, _w(d.clamp(-delta, delta), wt))
        if mask is not None:
            mk = mask.to(acc_dtype)
            keep = mk != 0
            loss = torch.where(keep, loss * mk, 0.0)
            if write_grad:
                g = torch.where(keep, g * mk, 0.0)
        if write_grad and passes is not None:
            g = torch.where(passes, g, 0.0)
        sums = loss.sum(dim=(1, 3, 4))
        if not write_grad:
            return sums, None
        if isinstance(grad_scale, torch.Tensor):
            g = g * grad_scale.to(acc_dtype)[:, None, :, None, None]
        elif grad_scale != 1.0:
            g = g * grad_scale
        if out is None:
            return sums, g.to(pred.dtype)
        out.copy_(g)
        return sums, out


# ---------------------------------------------------------------------------
# custom ops (the dispatch lives inside them) and the autograd formula
# ---------------------------------------------------------------------------


def _sums_dtype(pred: torch.Tensor) -> torch.dtype:
    return torch.float64 if pred.dtype == torch.float64 else torch.float32


def _compute(pred, target, mask, kinds, weights, clamp, delta, eps, grad_scale, out, write_grad):
    weight_of = {LOSS_KINDS[k]: w for k, w in zip(kinds, weights)}
    clamp_mode = Clamp(clamp)
    if use_triton(pred, target, mask if (mask is not None and mask.is_floating_point()) else None):
        with torch.no_grad():
            return _pixel_loss_triton(pred, target, mask, weight_of, clamp_mode, delta, eps, grad_scale, out,
                                      write_grad=write_grad)
    return _pixel_loss_reference(pred, target, mask, weight_of, clamp_mode, delta, eps, grad_scale, out,
                                 write_grad=write_grad)


@torch.library.custom_op("chopgrad::pixel_loss_value_and_grad", mutates_args=())
def _pixel_loss_value_and_grad_op(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                                  kinds: List[int], weights: List[float], clamp: int, delta: float, eps: float,
                                  grad_scale_frames: torch.Tensor | None,
                                  grad_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per-frame sums, gradient)``; the loss is ``sum(w * LOSS_KINDS[k])`` over ``zip(kinds, weights)``."""
    sums, grad = _compute(pred, target, mask, kinds, weights, clamp, delta, eps,
                          merge_grad_scale(grad_scale_frames, grad_scale), None, True)
    return sums, grad.contiguous()


@_pixel_loss_value_and_grad_op.register_fake
def _(pred, target, mask, kinds, weights, clamp, delta, eps, grad_scale_frames, grad_scale):
    B, _, F = pred.shape[:3]
    return pred.new_empty((B, F), dtype=_sums_dtype(pred)), pred.new_empty(pred.shape)


register_value_and_grad_autograd(_pixel_loss_value_and_grad_op, num_inputs=10)


@torch.library.custom_op("chopgrad::pixel_loss_value_and_grad_out", mutates_args=("out",))
def _pixel_loss_value_and_grad_out_op(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                                      kinds: List[int], weights: List[float], clamp: int, delta: float, eps: float,
                                      grad_scale_frames: torch.Tensor | None, grad_scale: float,
                                      out: torch.Tensor) -> torch.Tensor:
    """Per-frame sums; the gradient is written to ``out`` (which may be ``pred`` itself: each element is read
    before it is overwritten)."""
    sums, _ = _compute(pred, target, mask, kinds, weights, clamp, delta, eps,
                       merge_grad_scale(grad_scale_frames, grad_scale), out, True)
    return sums


@_pixel_loss_value_and_grad_out_op.register_fake
def _(pred, target, mask, kinds, weights, clamp, delta, eps, grad_scale_frames, grad_scale, out):
    B, _, F = pred.shape[:3]
    return pred.new_empty((B, F), dtype=_sums_dtype(pred))


@torch.library.custom_op("chopgrad::pixel_loss_frames", mutates_args=())
def _pixel_loss_frames_op(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, kinds: List[int],
                          weights: List[float], clamp: int, delta: float, eps: float) -> torch.Tensor:
    """Per-frame sums only."""
    with torch.no_grad():
        return _compute(pred, target, mask, kinds, weights, clamp, delta, eps, 1.0, None, False)[0]


@_pixel_loss_frames_op.register_fake
def _(pred, target, mask, kinds, weights, clamp, delta, eps):
    B, _, F = pred.shape[:3]
    return pred.new_empty((B, F), dtype=_sums_dtype(pred))


def _autograd_is_cheaper(weights: dict[str, float], mask, clamp_mode) -> bool:
    """Whether :func:`fused_pixel_loss` runs as ``F.mse_loss`` under autograd instead of the fused op.

    A plain unmasked, unclamped MSE under autograd keeps only ``pred`` and ``target``, which the caller holds
    anyway, while the differentiable fused op keeps the gradient it computed: on an H200 (1x3x16x480x832 fp32)
    the fused op took 0.5 ms and 222 MiB for forward and backward against autograd's 0.3 ms and 74 MiB. Every
    other loss keeps an intermediate under autograd and stays fused. ``CHOPGRAD_FORCE_TRITON=1`` keeps the
    fused op (so its kernel can be tested).
    """
    return set(weights) == {"mse"} and mask is None and clamp_mode == Clamp.NONE and force_mode() != "triton"


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def pixel_loss_value_and_grad(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    kind: KindSpec = "mse",
    clamp: ClampSpec = False,
    delta: float = HUBER_DELTA,
    eps: float = CHARBONNIER_EPS,
    grad_scale: GradScale = 1.0,
    out_grad: OutGrad = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame loss sums and the gradient with respect to ``pred``, in one pass.

    Args:
        pred: decoded frames ``(B, C, F, H, W)``, float32/bfloat16/float16
            (float64 runs the reference in float64).  Any strides.
        target: same shape, dtype and device as ``pred``.  Treated as a constant.
        mask: optional ``(B, 1, F, H, W)`` or ``(B, C, F, H, W)`` float or
            bool weights; ``mask == 0`` removes an element completely (see module
            docstring).  Frames whose mask is all zero get a zero sum and a zero
            gradient.
        kind: one of ``"l1"``, ``"mse"``, ``"charbonnier"``, ``"huber"``, or a
            dict ``{name: weight}`` for a weighted combination computed in the
            same single pass.
        clamp: ``False``, ``True``/``"post"`` (``pred`` is post-clamp: zero
            gradient where ``|pred| >= 1``) or ``"pre"`` (``pred`` is the raw
            output: clamp inside, exact ``torch.clamp`` gradient).  See the
            module docstring for the exact rules.
        delta: Huber threshold (as ``torch.nn.functional.huber_loss``).
        eps: Charbonnier epsilon, loss ``sqrt(d**2 + eps**2)``.
        grad_scale: a float, or a ``(B, F)`` tensor of per-frame factors, the
            gradient is multiplied by (e.g. ``1 / numel`` and the upstream
            gradient); the returned sums are *not* scaled.
        out_grad: ``None`` (new tensor), ``"inplace"`` (overwrite ``pred``,
            which must be contiguous; its autograd version counter is bumped so
            a graph that saved it refuses to run backward instead of silently
            using the gradient as activations) or a tensor of ``pred``'s shape
            and dtype.

    Returns:
        ``(sums, grad)``: ``sums`` is ``(B, F)`` float32 (float64 for float64
        input), the unnormalised sum over ``C, H, W`` of the (masked, weighted)
        elementwise loss of each frame, accumulated in fp32; ``grad`` has
        ``pred``'s shape and dtype and equals ``grad_scale * d(sums.sum())/d pred``
        (with the clamp rule applied).
    """
    weights = _parse_kind(kind)
    clamp_mode = parse_clamp(clamp)
    _check_inputs(pred, target, mask, grad_scale)
    if delta <= 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    out = resolve_out(pred, out_grad)
    scale_frames, scale = split_grad_scale(grad_scale)
    args = (*_encode_kind(weights), int(clamp_mode), float(delta), float(eps), scale_frames, scale)
    # detached: the result is a value and a gradient, not a graph (out_grad="inplace" still bumps pred's
    # version, which a detached tensor shares)
    if out is None:
        return torch.ops.chopgrad.pixel_loss_value_and_grad(pred.detach(), target, mask, *args)
    sums = torch.ops.chopgrad.pixel_loss_value_and_grad_out(pred.detach(), target, mask, *args, out)
    return sums, out


def pixel_loss_frames(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    kind: KindSpec = "mse",
    clamp: ClampSpec = False,
    delta: float = HUBER_DELTA,
    eps: float = CHARBONNIER_EPS,
) -> torch.Tensor:
    """Per-frame loss sums only (no gradient computed or written); same rules as the value-and-grad."""
    weights = _parse_kind(kind)
    clamp_mode = parse_clamp(clamp)
    _check_inputs(pred, target, mask, 1.0)
    return torch.ops.chopgrad.pixel_loss_frames(pred.detach(), target, mask, *_encode_kind(weights),
                                                int(clamp_mode), float(delta), float(eps))


def fused_pixel_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    kind: KindSpec = "mse",
    reduction: str = "none",
    clamp: ClampSpec = False,
    delta: float = HUBER_DELTA,
    eps: float = CHARBONNIER_EPS,
) -> torch.Tensor:
    """Differentiable fused pixel loss over ``(B, C, F, H, W)`` frames.

    ``reduction``: ``"none"`` (default, as :func:`fused_ssim`) gives the ``(B, F)`` per-frame sums, ``"sum"``
    their total, ``"mean"`` the total divided by ``pred.numel()`` (as
    ``F.mse_loss(..., reduction="mean")`` for an unmasked loss).  The graph
    keeps one gradient-sized tensor alive instead of the inputs, except for a plain MSE (no mask, no clamp),
    which runs as ``F.mse_loss`` under autograd: that keeps nothing the caller does not hold already.
    """
    if isinstance(target, torch.Tensor) and target.requires_grad:
        raise ValueError("fused_pixel_loss treats target as a constant; detach target first")
    weights = _parse_kind(kind)
    clamp_mode = parse_clamp(clamp)
    _check_inputs(pred, target, mask, 1.0)
    if delta <= 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    if _autograd_is_cheaper(weights, mask, clamp_mode):
        sums = F.mse_loss(pred, target, reduction="none").sum(dim=(1, 3, 4), dtype=_sums_dtype(pred))
        sums = sums * weights["mse"] if weights["mse"] != 1.0 else sums
    else:
        # the op's autograd formula keeps only the gradient it computed alongside the sums
        sums, _ = torch.ops.chopgrad.pixel_loss_value_and_grad(pred, target, mask, *_encode_kind(weights),
                                                               int(clamp_mode), float(delta), float(eps), None, 1.0)
    if reduction == "none":
        return sums
    if reduction == "sum":
        return sums.sum()
    if reduction == "mean":
        return sums.sum() / pred.numel()
    raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
