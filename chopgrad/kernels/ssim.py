"""Fused SSIM, value-and-grad, per frame.

Definition (the one of ``pytorch_msssim.ssim`` and scikit-image's
``structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False)``): an 11x11 Gaussian window with sigma 1.5
(separable, normalised 1-D taps), "valid" filtering (no padding), constants
``C1 = (0.01 * data_range)**2``, ``C2 = (0.03 * data_range)**2``, the SSIM map
averaged over the valid positions and the channels of each frame.  Frames are
in ``[-1, 1]`` so ``data_range = 2``.

With ``mu_x = G*x``, ``m_xx = G*(x*x)``, ``m_xy = G*(x*y)`` (``G`` the
filter) and ``S = A1 A2 / (B1 B2)``, ``A1 = 2 mu_x mu_y + C1``,
``B1 = mu_x^2 + mu_y^2 + C1``, ``A2 = 2 (m_xy - mu_x mu_y) + C2``,
``B2 = (m_xx - mu_x^2) + (m_yy - mu_y^2) + C2``, the gradient of
``mean(S)`` is ``G^T a + 2 x G^T b + y G^T c`` with the per-position maps

* ``a = dS/dmu_x = 2 mu_y (A2 - A1) / (B1 B2) - 2 mu_x S (1/B1 - 1/B2)``,
* ``b = dS/dm_xx = -S / B2``,
* ``c = dS/dm_xy = 2 A1 / (B1 B2)``,

each divided by the number of averaged positions.  Pass 1 filters the five
moments (registers only: shifted loads for the horizontal taps, a dot with a
banded window matrix for the vertical ones) and writes ``a, b, c`` (three
fp32 maps of the valid size, the only scratch); pass 2 applies ``G^T`` the
same way and writes the gradient.  The target is treated as a constant.

Layout: ``_ssim_fwd_kernel`` / ``_ssim_bwd_kernel`` (Triton) ->
``_ssim_triton`` (launcher) -> ``_ssim_reference`` (PyTorch, same outputs) ->
custom ops ``torch.ops.chopgrad.ssim_value_and_grad`` (dispatch; its autograd
formula saves only the gradient), ``ssim_value_and_grad_out`` and
``ssim_frames`` -> :func:`ssim_value_and_grad`, :func:`ssim_frames` and
:func:`fused_ssim` (public).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import check_float_tensor, check_same, tl, triton, triton_kernel, use_triton
from ._args import (CLAMP_NONE, CLAMP_PRE, CLAMP_PRE_PASSES_BOUNDS, Clamp, ClampSpec, GradScale, OutGrad,
                    check_grad_scale, clamp_passes, merge_grad_scale, parse_clamp, register_value_and_grad_autograd,
                    resolve_out, split_grad_scale)

WIN_SIZE = 11
WIN_SIGMA = 1.5
K1 = 0.01
K2 = 0.03


def check_frame_size(height: int, width: int, what: str = "frames") -> None:
    """Raises ValueError unless ``height x width`` frames hold one whole SSIM window."""
    if height < WIN_SIZE or width < WIN_SIZE:
        raise ValueError(f"SSIM needs {what} of at least {WIN_SIZE}x{WIN_SIZE} pixels, got {height}x{width}")


def gaussian_window(dtype=torch.float32, device=None) -> torch.Tensor:
    """The normalised 1-D window (11 taps, sigma 1.5), computed like ``pytorch_msssim``."""
    coords = torch.arange(WIN_SIZE, dtype=torch.float32) - WIN_SIZE // 2
    g = torch.exp(-(coords**2) / (2 * WIN_SIGMA**2))
    g = g / g.sum()
    return g.to(dtype=dtype, device=device)


# ---------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------


@triton_kernel
def _ssim_fwd_kernel(
    x_ptr, y_ptr, win_ptr, abc_ptr, partial_ptr, scale_ptr,
    C, F, H, W, HV, WV, NT_W, NTILES,
    xsb, xsc, xsf, xsh, xsw,
    ysb, ysc, ysf, ysh, ysw,
    c1, c2, inv_n, scale_scalar,
    CLAMP: tl.constexpr, WRITE_ABC: tl.constexpr, SCALE_PER_FRAME: tl.constexpr,
    BH: tl.constexpr, BW: tl.constexpr, RH: tl.constexpr, KS: tl.constexpr,
):
    """Program: one (b, f, c) plane, one BH x BW tile of the valid SSIM map.

    Horizontal pass: KS shifted [RH, BW] loads (RH >= BH + KS - 1 input rows).
    Vertical pass: a dot with the banded [BH, RH] window matrix.
    """
    pid = tl.program_id(0)
    tile = tl.program_id(1)
    c = pid % C
    bf = pid // C
    b = bf // F
    f = bf % F
    oh0 = (tile // NT_W) * BH
    ow0 = (tile % NT_W) * BW
    orow = tl.arange(0, BH)
    ocol = tl.arange(0, BW)
    irow = tl.arange(0, RH)
    xbase = x_ptr + b.to(tl.int64) * xsb + c.to(tl.int64) * xsc + f.to(tl.int64) * xsf
    ybase = y_ptr + b.to(tl.int64) * ysb + c.to(tl.int64) * ysc + f.to(tl.int64) * ysf
    ir = oh0 + irow
    row_ok = (irow < BH + KS - 1) & (ir < H)
    hx = tl.full([RH, BW], 0.0, tl.float32)
    hy = tl.full([RH, BW], 0.0, tl.float32)
    hxx = tl.full([RH, BW], 0.0, tl.float32)
    hyy = tl.full([RH, BW], 0.0, tl.float32)
    hxy = tl.full([RH, BW], 0.0, tl.float32)
    for j in tl.static_range(KS):
        wj = tl.load(win_ptr + j)
        ic = ow0 + ocol + j
        m = row_ok[:, None] & (ic < W)[None, :]
        xv = tl.load(xbase + ir[:, None] * xsh + ic[None, :] * xsw, mask=m, other=0.0).to(tl.float32)
        yv = tl.load(ybase + ir[:, None] * ysh + ic[None, :] * ysw, mask=m, other=0.0).to(tl.float32)
        if CLAMP == CLAMP_PRE:
            xv = tl.minimum(tl.maximum(xv, -1.0), 1.0)
        hx += wj * xv
        hy += wj * yv
        hxx += wj * (xv * xv)
        hyy += wj * (yv * yv)
        hxy += wj * (xv * yv)
    k = irow[None, :] - orow[:, None]
    wv = tl.load(win_ptr + k, mask=(k >= 0) & (k < KS), other=0.0)
    mx = tl.dot(wv, hx, input_precision="ieee")
    my = tl.dot(wv, hy, input_precision="ieee")
    mxx = tl.dot(wv, hxx, input_precision="ieee")
    myy = tl.dot(wv, hyy, input_precision="ieee")
    mxy = tl.dot(wv, hxy, input_precision="ieee")
    a1 = 2.0 * mx * my + c1
    b1 = mx * mx + my * my + c1
    a2 = 2.0 * (mxy - mx * my) + c2
    b2 = (mxx - mx * mx) + (myy - my * my) + c2
    den = b1 * b2
    s = a1 * a2 / den
    vh = oh0 + orow
    vw = ow0 + ocol
    valid = (vh[:, None] < HV) & (vw[None, :] < WV)
    tl.store(partial_ptr + pid * NTILES + tile, tl.sum(tl.sum(tl.where(valid, s, 0.0), axis=1), axis=0))
    if WRITE_ABC:
        if SCALE_PER_FRAME:
            k_scale = inv_n * tl.load(scale_ptr + bf).to(tl.float32)
        else:
            k_scale = inv_n * scale_scalar
        ga = (2.0 * my * (a2 - a1) / den - 2.0 * mx * s * (1.0 / b1 - 1.0 / b2)) * k_scale
        gb = (-s / b2) * k_scale
        gc = (2.0 * a1 / den) * k_scale
        plane = HV * WV
        off = pid.to(tl.int64) * (3 * plane) + vh[:, None] * WV + vw[None, :]
        tl.store(abc_ptr + off, ga, mask=valid)
        tl.store(abc_ptr + off + plane, gb, mask=valid)
        tl.store(abc_ptr + off + 2 * plane, gc, mask=valid)


@triton_kernel
def _ssim_bwd_kernel(
    x_ptr, y_ptr, win_ptr, abc_ptr, g_ptr,
    C, F, H, W, HV, WV, NT_W,
    xsb, xsc, xsf, xsh, xsw,
    ysb, ysc, ysf, ysh, ysw,
    gsb, gsc, gsf, gsh, gsw,
    CLAMP: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, RH: tl.constexpr, KS: tl.constexpr,
):
    """Program: one (b, f, c) plane, one BH x BW tile of the gradient (full frame size).

    Applies the transposed window to the a, b, c maps (rows ``ih0 - KS + 1 ..``)
    the same way: shifted loads horizontally, a banded dot vertically.
    """
    pid = tl.program_id(0)
    tile = tl.program_id(1)
    c = pid % C
    bf = pid // C
    b = bf // F
    f = bf % F
    ih0 = (tile // NT_W) * BH
    iw0 = (tile % NT_W) * BW
    orow = tl.arange(0, BH)
    ocol = tl.arange(0, BW)
    irow = tl.arange(0, RH)
    plane = HV * WV
    abase = abc_ptr + pid.to(tl.int64) * (3 * plane)
    ar = ih0 - (KS - 1) + irow
    row_ok = (irow < BH + KS - 1) & (ar >= 0) & (ar < HV)
    ha = tl.full([RH, BW], 0.0, tl.float32)
    hb = tl.full([RH, BW], 0.0, tl.float32)
    hc = tl.full([RH, BW], 0.0, tl.float32)
    for v in tl.static_range(KS):
        wj = tl.load(win_ptr + v)
        ac = iw0 + ocol - v
        m = row_ok[:, None] & ((ac >= 0) & (ac < WV))[None, :]
        off = ar[:, None] * WV + ac[None, :]
        ha += wj * tl.load(abase + off, mask=m, other=0.0)
        hb += wj * tl.load(abase + plane + off, mask=m, other=0.0)
        hc += wj * tl.load(abase + 2 * plane + off, mask=m, other=0.0)
    k = orow[:, None] + (KS - 1) - irow[None, :]
    wv = tl.load(win_ptr + k, mask=(k >= 0) & (k < KS), other=0.0)
    acc_a = tl.dot(wv, ha, input_precision="ieee")
    acc_b = tl.dot(wv, hb, input_precision="ieee")
    acc_c = tl.dot(wv, hc, input_precision="ieee")
    ih = ih0 + orow
    iw = iw0 + ocol
    inb = (ih[:, None] < H) & (iw[None, :] < W)
    b64 = b.to(tl.int64)
    c64 = c.to(tl.int64)
    f64 = f.to(tl.int64)
    xo = b64 * xsb + c64 * xsc + f64 * xsf + ih[:, None] * xsh + iw[None, :] * xsw
    yo = b64 * ysb + c64 * ysc + f64 * ysf + ih[:, None] * ysh + iw[None, :] * ysw
    go = b64 * gsb + c64 * gsc + f64 * gsf + ih[:, None] * gsh + iw[None, :] * gsw
    xr = tl.load(x_ptr + xo, mask=inb, other=0.0).to(tl.float32)
    yv = tl.load(y_ptr + yo, mask=inb, other=0.0).to(tl.float32)
    if CLAMP == CLAMP_PRE:
        xv = tl.minimum(tl.maximum(xr, -1.0), 1.0)
        if CLAMP_PRE_PASSES_BOUNDS:
            passes = (xr >= -1.0) & (xr <= 1.0)
        else:
            passes = (xr > -1.0) & (xr < 1.0)
    else:
        xv = xr
        passes = tl.abs(xr) < 1.0
    g = acc_a + 2.0 * xv * acc_b + yv * acc_c
    if CLAMP != CLAMP_NONE:
        g = tl.where(passes, g, 0.0)
    tl.store(g_ptr + go, g.to(g_ptr.dtype.element_ty), mask=inb)


# ---------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------


def _tiles(pred: torch.Tensor):
    """(BH, BW, RH): output tile and the power-of-two input row count RH >= BH + 10."""
    if pred.is_cuda:
        return 16, 64, 32
    return 32, 64, 64  # interpreter: fewer, larger programs


def _ssim_triton(pred, target, clamp_mode, data_range, grad_scale, out, write_grad=True):
    B, C, Fr, H, W = pred.shape
    HV, WV = H - WIN_SIZE + 1, W - WIN_SIZE + 1
    BH, BW, RH = _tiles(pred)
    win = gaussian_window(device=pred.device)
    nth, ntw = triton.cdiv(HV, BH), triton.cdiv(WV, BW)
    ntiles = nth * ntw
    planes = B * Fr * C
    partial = torch.empty((planes, ntiles), dtype=torch.float32, device=pred.device)
    scale_per_frame = isinstance(grad_scale, torch.Tensor)
    scale_t = grad_scale.to(torch.float32).contiguous() if scale_per_frame else partial
    abc = torch.empty((planes, 3, HV, WV), dtype=torch.float32, device=pred.device) if write_grad else partial
    inv_n = 1.0 / (C * HV * WV)
    _ssim_fwd_kernel[(planes, ntiles)](
        pred, target, win, abc, partial, scale_t,
        C, Fr, H, W, HV, WV, ntw, ntiles,
        *pred.stride(), *target.stride(),
        (K1 * data_range) ** 2, (K2 * data_range) ** 2, inv_n, 1.0 if scale_per_frame else float(grad_scale),
        CLAMP=int(clamp_mode), WRITE_ABC=write_grad, SCALE_PER_FRAME=scale_per_frame, BH=BH, BW=BW, RH=RH, KS=WIN_SIZE,
    )
    values = partial.view(B, Fr, C * ntiles).sum(-1) * inv_n
    if not write_grad:
        return values, None
    if out is None:
        out = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    bth, btw = triton.cdiv(H, BH), triton.cdiv(W, BW)
    _ssim_bwd_kernel[(planes, bth * btw)](
        pred, target, win, abc, out,
        C, Fr, H, W, HV, WV, btw,
        *pred.stride(), *target.stride(), *out.stride(),
        CLAMP=int(clamp_mode), BH=BH, BW=BW, RH=RH, KS=WIN_SIZE,
    )
    return values, out


# ---------------------------------------------------------------------------
# PyTorch reference (same outputs, no autograd graph)
# ---------------------------------------------------------------------------


def _filter_valid(t: torch.Tensor, taps: list) -> torch.Tensor:
    """Separable "valid" filtering of the last two dims by shifted multiply-adds.

    On CPU this is several times faster than a grouped ``conv2d`` with 1-D
    kernels for these shapes, and exact to fp32 rounding.
    """
    k = len(taps)
    wv = t.shape[-1] - k + 1
    h = t[..., 0:wv] * taps[0]
    for j in range(1, k):
        h.add_(t[..., j:j + wv], alpha=taps[j])
    hv = t.shape[-2] - k + 1
    out = h[..., 0:hv, :] * taps[0]
    for j in range(1, k):
        out.add_(h[..., j:j + hv, :], alpha=taps[j])
    return out


def _planes(t: torch.Tensor, dtype) -> torch.Tensor:
    B, C, Fr, H, W = t.shape
    return t.to(dtype).permute(0, 2, 1, 3, 4).reshape(B * Fr * C, 1, H, W)


def _ssim_reference(pred, target, clamp_mode, data_range, grad_scale, out, write_grad=True):
    """PyTorch implementation of the kernels (separable shifted sums), fp32 (fp64 for fp64 input), no graph."""
    B, C, Fr, H, W = pred.shape
    dt = torch.float64 if pred.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        xr = _planes(pred, dt)
        x = xr.clamp(-1.0, 1.0) if clamp_mode == Clamp.PRE else xr
        y = _planes(target, dt)
        g1 = gaussian_window(dtype=dt, device=pred.device).tolist()
        mom = _filter_valid(torch.cat([x, y, x * x, y * y, x * y], dim=1), g1)
        mx, my, mxx, myy, mxy = mom.unbind(1)
        del mom
        c1 = (K1 * data_range) ** 2
        c2 = (K2 * data_range) ** 2
        a1 = 2 * mx * my + c1
        b1 = mx * mx + my * my + c1
        a2 = 2 * (mxy - mx * my) + c2
        b2 = (mxx - mx * mx) + (myy - my * my) + c2
        den = b1 * b2
        s = a1 * a2 / den
        n = C * s.shape[-2] * s.shape[-1]
        values = s.reshape(B, Fr, -1).sum(-1) / n
        if not write_grad:
            return values.to(torch.float64 if dt == torch.float64 else torch.float32), None
        ga = 2 * my * (a2 - a1) / den - 2 * mx * s * (1 / b1 - 1 / b2)
        gb = -s / b2
        gc = 2 * a1 / den
        abc = torch.stack([ga, gb, gc], dim=1) / n
        if isinstance(grad_scale, torch.Tensor):
            abc = abc * grad_scale.to(dt).reshape(B * Fr, 1).repeat_interleave(C, 0)[:, :, None, None]
        elif grad_scale != 1.0:
            abc = abc * grad_scale
        # G^T of a "valid" correlation = "full" correlation with the flipped (here: same, symmetric) window
        k = WIN_SIZE - 1
        full = _filter_valid(F.pad(abc, (k, k, k, k)), g1)
        g = full[:, 0:1] + 2 * x * full[:, 1:2] + y * full[:, 2:3]
        if clamp_mode == Clamp.PRE:
            g = torch.where(clamp_passes(xr), g, 0.0)
        elif clamp_mode == Clamp.POST:
            g = torch.where(xr.abs() < 1, g, 0.0)
        g = g.reshape(B, Fr, C, H, W).permute(0, 2, 1, 3, 4)
        if out is None:
            return values, g.to(pred.dtype).contiguous()
        out.copy_(g)
        return values, out


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------


def _check(pred, target, grad_scale, data_range):
    check_float_tensor("pred", pred, ndim=5, shape_hint="(B, C, F, H, W)")
    check_float_tensor("target", target)
    check_same("pred", pred, "target", target)
    check_frame_size(*pred.shape[-2:])
    if not (isinstance(data_range, (int, float)) and data_range > 0):
        raise ValueError(f"data_range must be a positive number, got {data_range!r}")
    check_grad_scale(pred, grad_scale)


# ---------------------------------------------------------------------------
# custom ops (the dispatch lives inside them) and the autograd formula
# ---------------------------------------------------------------------------


def _values_dtype(pred: torch.Tensor) -> torch.dtype:
    return torch.float64 if pred.dtype == torch.float64 else torch.float32


def _compute(pred, target, clamp, data_range, grad_scale, out, write_grad):
    clamp_mode = Clamp(clamp)
    if use_triton(pred, target):
        with torch.no_grad():
            return _ssim_triton(pred, target, clamp_mode, data_range, grad_scale, out, write_grad=write_grad)
    return _ssim_reference(pred, target, clamp_mode, data_range, grad_scale, out, write_grad=write_grad)


@torch.library.custom_op("chopgrad::ssim_value_and_grad", mutates_args=())
def _ssim_value_and_grad_op(pred: torch.Tensor, target: torch.Tensor, clamp: int, data_range: float,
                            grad_scale_frames: torch.Tensor | None,
                            grad_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per-frame SSIM, gradient of their sum)``."""
    return _compute(pred, target, clamp, data_range, merge_grad_scale(grad_scale_frames, grad_scale), None, True)


@_ssim_value_and_grad_op.register_fake
def _(pred, target, clamp, data_range, grad_scale_frames, grad_scale):
    B, _, Fr = pred.shape[:3]
    return pred.new_empty((B, Fr), dtype=_values_dtype(pred)), pred.new_empty(pred.shape)


register_value_and_grad_autograd(_ssim_value_and_grad_op, num_inputs=6)


@torch.library.custom_op("chopgrad::ssim_value_and_grad_out", mutates_args=("out",))
def _ssim_value_and_grad_out_op(pred: torch.Tensor, target: torch.Tensor, clamp: int, data_range: float,
                                grad_scale_frames: torch.Tensor | None, grad_scale: float,
                                out: torch.Tensor) -> torch.Tensor:
    """Per-frame SSIM; the gradient goes to ``out``, which may be ``pred`` (pass 2 reads ``pred`` only where it
    writes)."""
    values, _ = _compute(pred, target, clamp, data_range, merge_grad_scale(grad_scale_frames, grad_scale), out, True)
    return values


@_ssim_value_and_grad_out_op.register_fake
def _(pred, target, clamp, data_range, grad_scale_frames, grad_scale, out):
    B, _, Fr = pred.shape[:3]
    return pred.new_empty((B, Fr), dtype=_values_dtype(pred))


@torch.library.custom_op("chopgrad::ssim_frames", mutates_args=())
def _ssim_frames_op(pred: torch.Tensor, target: torch.Tensor, clamp: int, data_range: float) -> torch.Tensor:
    """Per-frame SSIM only."""
    with torch.no_grad():
        return _compute(pred, target, clamp, data_range, 1.0, None, False)[0]


@_ssim_frames_op.register_fake
def _(pred, target, clamp, data_range):
    B, _, Fr = pred.shape[:3]
    return pred.new_empty((B, Fr), dtype=_values_dtype(pred))


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def ssim_value_and_grad(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    clamp: ClampSpec = False,
    data_range: float = 2.0,
    grad_scale: GradScale = 1.0,
    out_grad: OutGrad = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame SSIM and the gradient of their sum with respect to ``pred``.

    Args:
        pred: frames ``(B, C, F, H, W)`` in ``[-1, 1]``, ``H, W >= 11``;
            float32/bfloat16/float16 (float64 runs the reference in float64).
        target: same shape, dtype and device; a constant.
        clamp: as for :func:`chopgrad.kernels.pixel_loss_value_and_grad`:
            ``True``/``"post"`` zeroes the gradient where ``|pred| >= 1``;
            ``"pre"`` clamps ``pred`` to ``[-1, 1]`` first and applies the exact
            ``torch.clamp`` gradient.
        data_range: value range (2 for ``[-1, 1]`` frames).
        grad_scale: float or ``(B, F)`` tensor multiplying the gradient
            (``-w`` for a ``w * (1 - ssim)`` loss term).
        out_grad: ``None``, ``"inplace"`` (overwrite contiguous ``pred``: safe
            because pass 2 reads ``pred`` only at the position it writes) or a
            tensor of ``pred``'s shape and dtype.

    Returns:
        ``(ssim, grad)``: ``ssim`` is ``(B, F)`` float32 (mean over channels
        and valid positions, as ``pytorch_msssim.ssim(..., size_average=False)``
        on each frame), ``grad = grad_scale * d ssim.sum() / d pred``.
    """
    clamp_mode = parse_clamp(clamp)
    _check(pred, target, grad_scale, data_range)
    out = resolve_out(pred, out_grad)
    scale_frames, scale = split_grad_scale(grad_scale)
    args = (int(clamp_mode), float(data_range), scale_frames, scale)
    # detached: the result is a value and a gradient, not a graph (out_grad="inplace" still bumps pred's
    # version, which a detached tensor shares)
    if out is None:
        return torch.ops.chopgrad.ssim_value_and_grad(pred.detach(), target, *args)
    return torch.ops.chopgrad.ssim_value_and_grad_out(pred.detach(), target, *args, out), out


def ssim_frames(pred: torch.Tensor, target: torch.Tensor, *, clamp: ClampSpec = False,
                data_range: float = 2.0) -> torch.Tensor:
    """Per-frame SSIM ``(B, F)`` only (no gradient pass)."""
    clamp_mode = parse_clamp(clamp)
    _check(pred, target, 1.0, data_range)
    return torch.ops.chopgrad.ssim_frames(pred.detach(), target, int(clamp_mode), float(data_range))


def fused_ssim(pred: torch.Tensor, target: torch.Tensor, *, reduction: str = "none",
               clamp: ClampSpec = False, data_range: float = 2.0) -> torch.Tensor:
    """Differentiable per-frame SSIM: ``"none"`` -> ``(B, F)``, ``"mean"`` -> mean over frames."""
    if isinstance(target, torch.Tensor) and target.requires_grad:
        raise ValueError("fused_ssim treats target as a constant; detach target first")
    clamp_mode = parse_clamp(clamp)
    _check(pred, target, 1.0, data_range)
    # the op's autograd formula keeps only the gradient it computed alongside the values
    values, _ = torch.ops.chopgrad.ssim_value_and_grad(pred, target, int(clamp_mode), float(data_range), None, 1.0)
    if reduction == "none":
        return values
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


__all__ = ["ssim_value_and_grad", "ssim_frames", "fused_ssim", "check_frame_size", "gaussian_window"]
