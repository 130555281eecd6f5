"""Wan RMSNorm + SiLU (channel-first), forward and backward, optionally fused with the causal pad.

diffusers' ``WanRMS_norm`` followed by ``SiLU`` computes, per position::

    y = silu(x / max(||x||_2 over C, eps) * sqrt(C) * gamma + bias)

Eagerly that keeps ``x``, the norm, ``x / norm * scale`` and the SiLU input
alive for backward (three to four activation-sized tensors).  Here the
autograd Function saves only ``x`` and one fp32 statistic per position
(``1 / max(norm, eps)``, 1/C of the activation) and recomputes the rest.

Backward, with ``r = 1/max(norm, eps)``, ``n = x r``, ``z = n s gamma + bias``,
``gz = gy * sigmoid(z) (1 + z (1 - sigmoid(z)))``, ``gn = gz s gamma``:
``gx = r (gn - n sum_c(gn n))`` (the projection term is absent where the
norm was clamped to ``eps``), ``dgamma = sum gz n s``, ``dbias = sum gz``.
The sign of the stored statistic marks the clamped positions.

:func:`rms_norm_silu_pad` fuses the op with :func:`chopgrad.kernels.causal_pad`:
it writes ``silu(norm(x))`` straight into the interior of the padded
convolution input and into the emitted cache (the cache holds post-SiLU
frames, as in diffusers), while the pad kernel writes the zero border and the
cached frames.  The eager chain ``norm -> silu -> clone cache -> cat -> pad``
becomes one producer of the padded input whose own saved state is ``x`` and
the statistic; the SiLU output itself is never materialised outside the
padded buffer.

Layout: ``_rms_norm_silu_fwd_kernel`` / ``_rms_norm_silu_bwd_kernel``
(Triton) -> ``_norm_forward`` / ``_norm_backward`` (dispatching launchers
with PyTorch references ``_norm_forward_reference`` /
``_norm_backward_reference``) -> custom ops ``torch.ops.chopgrad.rms_norm_silu``,
``rms_norm_silu_pad`` and ``rms_norm_silu_pad_conv3d``, each with a
``*_backward`` op and the autograd formula that calls it -> :func:`rms_norm_silu`,
:func:`rms_norm_silu_pad`, :func:`rms_norm_silu_pad_conv3d`.
:func:`rms_norm_silu_reference` is the eager diffusers math for tests.
"""

from __future__ import annotations

from typing import List, Union  # List: torch 2.6 infers custom op schemas from typing.List only

import torch
import torch.nn.functional as F

from ._args import computed_or_empty, not_computed
from ._cpu_conv3d import conv3d, conv3d_backward
from ._dispatch import check_float_tensor, tl, triton, triton_kernel, use_triton
from .causal_pad import causal_pad_backward, causal_pad_forward, geometry_from_sizes, interior, make_geometry

BiasSpec = Union[None, float, torch.Tensor]


# ---------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------


@triton_kernel
def _rms_norm_silu_fwd_kernel(
    x_ptr, gamma_ptr, bias_ptr, out_ptr, rstd_ptr, newc_ptr,
    C, S, H, W, T0, PH, PW, TX, TN, NX,
    osb, osc, ost, osh, osw,
    scale, eps, bias_scalar,
    HAS_BIAS: tl.constexpr, EMIT: tl.constexpr, LOAD_RSTD: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (b, block of S = T*H*W positions): norm over C, then write y at the strided output.

    ``LOAD_RSTD``: reuse the statistic stored by an earlier forward (backward
    recomputation) instead of reducing over C again.

    Output position of (t, h, w): ``(t + T0, h + PH, w + PW)`` in ``out``'s
    strides; with ``EMIT`` the last ``NX`` frames also go to slots
    ``TN - NX ..`` of the emitted cache ``(B, C, TN, H, W)``.
    """
    b = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    live = offs < S
    xb = x_ptr + b.to(tl.int64) * C * S + offs
    if LOAD_RSTD:
        r = tl.abs(tl.load(rstd_ptr + b.to(tl.int64) * S + offs, mask=live, other=1.0))
    else:
        ss = tl.full([BLOCK], 0.0, tl.float32)
        p = xb
        for c in range(C):
            xv = tl.load(p, mask=live, other=0.0).to(tl.float32)
            ss += xv * xv
            p += S
        nrm = tl.sqrt(ss)
        clamped = nrm <= eps
        r = 1.0 / tl.maximum(nrm, eps)
        tl.store(rstd_ptr + b.to(tl.int64) * S + offs, tl.where(clamped, -r, r), mask=live)
    HWp = H * W
    t = offs // HWp
    hw = offs % HWp
    h = hw // W
    w = hw % W
    ob = out_ptr + b.to(tl.int64) * osb + (t + T0).to(tl.int64) * ost + (h + PH) * osh + (w + PW) * osw
    kslot = t - (TX - NX)
    to_cache = live & (kslot >= 0)
    nb = newc_ptr + (b.to(tl.int64) * C * TN + (TN - NX) + kslot) * HWp + hw
    p = xb
    for c in range(C):
        xv = tl.load(p, mask=live, other=0.0).to(tl.float32)
        gs = tl.load(gamma_ptr + c).to(tl.float32) * scale
        z = xv * r * gs
        if HAS_BIAS:
            z += tl.load(bias_ptr + c).to(tl.float32)
        else:
            z += bias_scalar
        y = z / (1.0 + tl.exp(-z))
        yo = y.to(out_ptr.dtype.element_ty)
        tl.store(ob, yo, mask=live)
        if EMIT:
            tl.store(nb, yo, mask=to_cache)
        p += S
        ob += osc
        nb += TN * HWp


@triton_kernel
def _rms_norm_silu_bwd_kernel(
    x_ptr, gamma_ptr, bias_ptr, rstd_ptr, gy_ptr, gnew_ptr, gx_ptr, pg_ptr, pb_ptr,
    C, S, H, W, T0, PH, PW, TX, TN, NX, NBLK,
    gsb, gsc, gst, gsh, gsw,
    nsb, nsc, nst, nsh, nsw,
    scale, bias_scalar,
    HAS_BIAS: tl.constexpr, HAS_GNEW: tl.constexpr, NEED_X: tl.constexpr, NEED_PARAMS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (b, block): recompute n, z; pass 1 the projection sum over C, pass 2 gx and partial dgamma/dbias."""
    b = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    live = offs < S
    rs = tl.load(rstd_ptr + b.to(tl.int64) * S + offs, mask=live, other=1.0)
    r = tl.abs(rs)
    proj = tl.where(rs > 0.0, 1.0, 0.0)
    HWp = H * W
    t = offs // HWp
    hw = offs % HWp
    h = hw // W
    w = hw % W
    gb0 = gy_ptr + b.to(tl.int64) * gsb + (t + T0).to(tl.int64) * gst + (h + PH) * gsh + (w + PW) * gsw
    kslot = (TN - NX) + t - (TX - NX)
    from_new = live & (t >= TX - NX)
    nb0 = gnew_ptr + b.to(tl.int64) * nsb + kslot.to(tl.int64) * nst + h * nsh + w * nsw
    xb = x_ptr + b.to(tl.int64) * C * S + offs
    dot = tl.full([BLOCK], 0.0, tl.float32)
    if NEED_X:
        p = xb
        gp = gb0
        npp = nb0
        for c in range(C):
            xv = tl.load(p, mask=live, other=0.0).to(tl.float32)
            gy = tl.load(gp, mask=live, other=0.0).to(tl.float32)
            if HAS_GNEW:
                gy += tl.load(npp, mask=from_new, other=0.0).to(tl.float32)
            gs = tl.load(gamma_ptr + c).to(tl.float32) * scale
            n = xv * r
            z = n * gs
            if HAS_BIAS:
                z += tl.load(bias_ptr + c).to(tl.float32)
            else:
                z += bias_scalar
            sg = 1.0 / (1.0 + tl.exp(-z))
            gz = gy * sg * (1.0 + z * (1.0 - sg))
            dot += gz * gs * n
            p += S
            gp += gsc
            npp += nsc
    p = xb
    gp = gb0
    npp = nb0
    op = gx_ptr + b.to(tl.int64) * C * S + offs
    pid = b * NBLK + blk
    for c in range(C):
        xv = tl.load(p, mask=live, other=0.0).to(tl.float32)
        gy = tl.load(gp, mask=live, other=0.0).to(tl.float32)
        if HAS_GNEW:
            gy += tl.load(npp, mask=from_new, other=0.0).to(tl.float32)
        gam = tl.load(gamma_ptr + c).to(tl.float32)
        gs = gam * scale
        n = xv * r
        z = n * gs
        if HAS_BIAS:
            z += tl.load(bias_ptr + c).to(tl.float32)
        else:
            z += bias_scalar
        sg = 1.0 / (1.0 + tl.exp(-z))
        gz = gy * sg * (1.0 + z * (1.0 - sg))
        if NEED_X:
            gx = r * (gz * gs - proj * n * dot)
            tl.store(op, gx.to(gx_ptr.dtype.element_ty), mask=live)
        if NEED_PARAMS:
            tl.store(pg_ptr + pid.to(tl.int64) * C + c, tl.sum(tl.where(live, gz * n * scale, 0.0), axis=0))
            tl.store(pb_ptr + pid.to(tl.int64) * C + c, tl.sum(tl.where(live, gz, 0.0), axis=0))
        p += S
        gp += gsc
        npp += nsc
        op += S


def _block(S: int, cuda: bool) -> int:
    return min(512 if cuda else 2048, triton.next_power_of_2(max(S, 16)))


# ---------------------------------------------------------------------------
# argument handling
# ---------------------------------------------------------------------------


def norm_scale(channels: int, scale: float | None) -> float:
    """The factor after the division by the norm: ``WanRMS_norm``'s ``sqrt(C)`` unless given."""
    return float(channels**0.5) if scale is None else float(scale)


def _prep_params(x: torch.Tensor, gamma: torch.Tensor, bias: BiasSpec):
    C = x.shape[1]
    if not isinstance(gamma, torch.Tensor) or not gamma.is_floating_point():
        raise TypeError(f"gamma must be a floating tensor with C = {C} elements, got {type(gamma).__name__}"
                        + (f" of dtype {gamma.dtype}" if isinstance(gamma, torch.Tensor) else ""))
    if gamma.numel() != C:
        raise ValueError(f"gamma must have C = {C} elements (shape (C,) or (C, 1, 1[, 1])), got {tuple(gamma.shape)}")
    if gamma.device != x.device:
        raise ValueError(f"gamma is on {gamma.device} but x is on {x.device}")
    bias_t = None
    bias_scalar = 0.0
    if isinstance(bias, torch.Tensor):
        if not bias.is_floating_point() or bias.numel() != C:
            raise ValueError(f"bias must be a float, None or a floating tensor with C = {C} elements, "
                             f"got {bias.dtype} {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
        bias_t = bias
    elif bias is None:
        pass
    elif isinstance(bias, (int, float)):
        bias_scalar = float(bias)
    else:
        raise TypeError(f"bias must be None, a float or a tensor, got {type(bias).__name__}")
    return bias_t, bias_scalar


# ---------------------------------------------------------------------------
# launchers (Triton and reference)
# ---------------------------------------------------------------------------


def _norm_forward(x, gamma, bias_t, bias_scalar, scale, eps, dst, newc, geo, triton_path, rstd=None):
    """Write ``silu(norm(x))`` into ``dst``, x-sourced cache frames into ``newc``.

    ``dst`` has x's shape (``geo is None``) or is the whole padded tensor of
    ``geo`` (x's frames go to its interior).  Returns the signed fp32 statistic ``(B, S)``;
    when ``rstd`` (a statistic from an earlier call) is given it is reused, not recomputed.
    """
    B, C = x.shape[:2]
    S = x[0, 0].numel()
    if triton_path:
        load_rstd = rstd is not None
        if rstd is None:
            rstd = torch.empty((B, S), dtype=torch.float32, device=x.device)
        if geo is None:
            T0 = PH = PW = 0
            TX, H, W = 1, 1, S
            TN = NX = 0
            ost = osh = 0
            osb, osc = dst.stride(0), dst.stride(1)
            osw = 1
        else:
            T0, PH, PW = geo.TZ + geo.TCP, geo.ph, geo.pw
            TX, H, W, TN, NX = geo.TX, geo.H, geo.W, geo.TN, geo.NX
            osb, osc, ost, osh, osw = dst.stride()
        emit = newc is not None and NX > 0
        blk = _block(S, x.is_cuda)
        _rms_norm_silu_fwd_kernel[(B, triton.cdiv(S, blk))](
            x, gamma, bias_t if bias_t is not None else gamma, dst, rstd, newc if emit else dst,
            C, S, H, W, T0, PH, PW, TX, TN, NX,
            osb, osc, ost, osh, osw,
            float(scale), float(eps), float(bias_scalar),
            HAS_BIAS=bias_t is not None, EMIT=emit, LOAD_RSTD=load_rstd, BLOCK=blk,
        )
        return rstd
    if geo is not None:
        dst = interior(dst, geo)
    rstd, y = _norm_forward_reference(x, gamma, bias_t, bias_scalar, scale, eps, dst, rstd)
    if newc is not None and geo is not None and geo.NX:
        newc[:, :, geo.TN - geo.NX:].copy_(y[:, :, geo.TX - geo.NX:])
    return rstd


def _norm_forward_reference(x, gamma, bias_t, bias_scalar, scale, eps, dst, rstd=None):
    """PyTorch forward writing into ``dst``; returns ``(signed stat (B, S), dst)``."""
    B, C = x.shape[:2]
    bshape = (1, C) + (1,) * (x.dim() - 2)
    with torch.no_grad():
        lowp = x.dtype in (torch.float16, torch.bfloat16)
        xf = x.float() if lowp else x
        if rstd is not None:
            r = rstd.reshape((B, 1) + tuple(x.shape[2:])).abs().to(xf.dtype)
            nrm = None
        else:
            nrm = torch.linalg.vector_norm(xf, dim=1, keepdim=True)
            r = 1.0 / nrm.clamp_min(eps)
        gs = gamma.reshape(bshape).to(xf.dtype) * scale
        if lowp:
            z = xf * r
            z.mul_(gs)
        else:
            z = torch.mul(xf, r, out=dst) if dst is not None else xf * r
            z.mul_(gs)
        if bias_t is not None:
            z.add_(bias_t.reshape(bshape).to(z.dtype))
        elif bias_scalar != 0.0:
            z.add_(bias_scalar)
        F.silu(z, inplace=True)
        if lowp or dst is None:
            if dst is None:
                dst = z.to(x.dtype)
            else:
                dst.copy_(z)
        if nrm is None:
            return rstd, dst
        signed = torch.where(nrm > eps, r, -r).reshape(B, -1)
        if signed.dtype != torch.float32 and x.dtype != torch.float64:
            signed = signed.float()
    return signed, dst


def _norm_backward(x, gamma, bias_t, bias_scalar, scale, rstd, gy, gnew, geo, need_x, need_params, triton_path):
    """Gradients ``(gx or None, dgamma (C,) fp32 or None, dbias (C,) fp32 or None)``.

    ``gy`` is the gradient of the (possibly padded) output, ``gnew`` that of
    the emitted cache (or ``None``).
    """
    B, C = x.shape[:2]
    S = x[0, 0].numel()
    if triton_path:
        if geo is None:
            T0 = PH = PW = 0
            TX, H, W = 1, 1, S
            TN = NX = 0
            gsb, gsc = gy.stride(0), gy.stride(1)
            gst = gsh = 0
            gsw = 1 if gy.dim() == 2 else gy.stride(-1)
            if not gy.is_contiguous():
                gy = gy.contiguous()
                gsb, gsc, gsw = gy.stride(0), gy.stride(1), 1
        else:
            T0, PH, PW = geo.TZ + geo.TCP, geo.ph, geo.pw
            TX, H, W, TN, NX = geo.TX, geo.H, geo.W, geo.TN, geo.NX
            gsb, gsc, gst, gsh, gsw = gy.stride()
        has_gnew = gnew is not None and NX > 0
        ns = gnew.stride() if has_gnew else (0,) * 5
        blk = _block(S, x.is_cuda)
        nblk = triton.cdiv(S, blk)
        gx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None
        if need_params:
            pg = torch.empty((B * nblk, C), dtype=torch.float32, device=x.device)
            pb = torch.empty((B * nblk, C), dtype=torch.float32, device=x.device)
        else:
            pg = pb = rstd
        _rms_norm_silu_bwd_kernel[(B, nblk)](
            x, gamma, bias_t if bias_t is not None else gamma, rstd, gy, gnew if has_gnew else gy,
            gx if gx is not None else rstd, pg, pb,
            C, S, H, W, T0, PH, PW, TX, TN, NX, nblk,
            gsb, gsc, gst, gsh, gsw,
            *ns,
            float(scale), float(bias_scalar),
            HAS_BIAS=bias_t is not None, HAS_GNEW=has_gnew, NEED_X=need_x, NEED_PARAMS=need_params, BLOCK=blk,
        )
        if need_params:
            return gx, pg.sum(0), pb.sum(0)
        return gx, None, None
    if geo is not None:
        g_int = interior(gy, geo)
        if gnew is not None and geo.NX:
            g_int = g_int.clone()
            g_int[:, :, geo.TX - geo.NX:] += gnew[:, :, geo.TN - geo.NX:]
        gy = g_int
    return _norm_backward_reference(x, gamma, bias_t, bias_scalar, scale, rstd, gy, need_x, need_params)


def _norm_backward_reference(x, gamma, bias_t, bias_scalar, scale, rstd, gy, need_x, need_params):
    B, C = x.shape[:2]
    bshape = (1, C) + (1,) * (x.dim() - 2)
    sshape = (B, 1) + tuple(x.shape[2:])
    with torch.no_grad():
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(dt)
        rs = rstd.reshape(sshape).to(dt)
        r = rs.abs()
        n = xf * r
        gs = gamma.reshape(bshape).to(dt) * scale
        z = n * gs
        if bias_t is not None:
            z.add_(bias_t.reshape(bshape).to(dt))
        elif bias_scalar != 0.0:
            z.add_(bias_scalar)
        gz = torch.ops.aten.silu_backward(gy.to(dt), z)  # gy * sig(z) * (1 + z * (1 - sig(z))), one pass
        del z
        gx = dgamma = dbias = None
        red = [0] + list(range(2, x.dim()))
        if need_params:
            dbias = gz.sum(dim=red)
            dgamma = torch.einsum("bc...,bc...->c", gz, n) * scale
        if need_x:
            gn = gz.mul_(gs)
            dot = torch.einsum("bc...,bc...->b...", gn, n).unsqueeze(1)
            dot.mul_(rs > 0).neg_()
            gx = torch.addcmul(gn, n, dot, out=gn).mul_(r).to(x.dtype)
    return gx, dgamma, dbias


# ---------------------------------------------------------------------------
# custom ops (forward and backward) with their autograd formulas
# ---------------------------------------------------------------------------


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _param_grads(ctx, dgamma, dbias, gamma, bias_t):
    gg = dgamma.to(gamma.dtype).reshape(gamma.shape) if ctx.needs_input_grad[1] else None
    gb = dbias.to(bias_t.dtype).reshape(bias_t.shape) if (bias_t is not None and ctx.needs_input_grad[2]) else None
    return gg, gb


def _fake_param_grads(x, gamma, need_params):
    C = x.shape[1]
    if not need_params:
        return not_computed(x), not_computed(x)
    return x.new_empty((C,), dtype=_stat_dtype(x)), x.new_empty((C,), dtype=_stat_dtype(x))


def _stat_shape(x: torch.Tensor):
    S = 1
    for n in x.shape[2:]:
        S *= n
    return (x.shape[0], S)


@torch.library.custom_op("chopgrad::rms_norm_silu", mutates_args=())
def _rms_norm_silu_op(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None, bias_scalar: float,
                      scale: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(silu(rms_norm(x)), signed statistic (B, S))``."""
    triton_path = use_triton(x, gamma, bias)
    if triton_path:
        x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = _norm_forward(x, gamma, bias, bias_scalar, scale, eps, out, None, None, triton_path)
    return out, rstd


@_rms_norm_silu_op.register_fake
def _(x, gamma, bias, bias_scalar, scale, eps):
    return x.new_empty(x.shape), x.new_empty(_stat_shape(x), dtype=_stat_dtype(x))


@torch.library.custom_op("chopgrad::rms_norm_silu_backward", mutates_args=())
def _rms_norm_silu_backward_op(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None, rstd: torch.Tensor,
                               gy: torch.Tensor, bias_scalar: float, scale: float, need_x: bool,
                               need_params: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad x, dgamma (C,), dbias (C,))`` in the statistic's dtype; empty tensors where not asked for."""
    triton_path = use_triton(x, gamma, bias)
    if triton_path:
        x = x.contiguous()
    gx, dgamma, dbias = _norm_backward(x, gamma, bias, bias_scalar, scale, rstd, gy, None, None, need_x,
                                       need_params, triton_path)
    if gx is not None and not gx.is_contiguous():
        gx = gx.contiguous()
    return computed_or_empty(gx, x), computed_or_empty(dgamma, x), computed_or_empty(dbias, x)


@_rms_norm_silu_backward_op.register_fake
def _(x, gamma, bias, rstd, gy, bias_scalar, scale, need_x, need_params):
    return (x.new_empty(x.shape) if need_x else not_computed(x)), *_fake_param_grads(x, gamma, need_params)


def _rms_norm_silu_setup_context(ctx, inputs, output):
    x, gamma, bias, bias_scalar, scale, _ = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, gamma, bias, rstd)
    ctx.cfg = (bias_scalar, scale)


def _rms_norm_silu_autograd(ctx, gy, _grad_rstd):
    x, gamma, bias, rstd = ctx.saved_tensors
    bias_scalar, scale = ctx.cfg
    need_x = ctx.needs_input_grad[0]
    need_params = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    gx, dgamma, dbias = torch.ops.chopgrad.rms_norm_silu_backward(x, gamma, bias, rstd, gy, bias_scalar, scale,
                                                                  need_x, need_params)
    gg, gb = _param_grads(ctx, dgamma, dbias, gamma, bias)
    return (gx if need_x else None), gg, gb, None, None, None


_rms_norm_silu_op.register_autograd(_rms_norm_silu_autograd, setup_context=_rms_norm_silu_setup_context)


def _grads_through_norm_pad(x, gamma, bias_t, rstd, g_pad, gnew, geo, bias_scalar, scale, triton_path,
                            need_x, need_params, need_cache):
    """Gradients of x, gamma, bias (raw, statistic dtype) and the cache from the padded input's and next cache's."""
    gx = dgamma = dbias = None
    if need_x or need_params:
        gx, dgamma, dbias = _norm_backward(x, gamma, bias_t, bias_scalar, scale, rstd, g_pad, gnew, geo,
                                           need_x, need_params, triton_path)
    gc = None
    if need_cache:
        _, gc = causal_pad_backward(g_pad, gnew, geo, need_x=False, need_cache=True, triton_path=triton_path,
                                    dtype=x.dtype, device=x.device)
    if gx is not None and not gx.is_contiguous():
        gx = gx.contiguous()
    return computed_or_empty(gx, x), computed_or_empty(dgamma, x), computed_or_empty(dbias, x), computed_or_empty(gc, x)


def _fake_grads_through_norm_pad(x, gamma, cache_frames, need_x, need_params, need_cache):
    gx = x.new_empty(x.shape) if need_x else not_computed(x)
    gc = x.new_empty((*x.shape[:2], cache_frames, *x.shape[3:])) if (need_cache and cache_frames > 0) \
        else not_computed(x)
    return (gx, *_fake_param_grads(x, gamma, need_params), gc)


def _norm_silu_into_padded(x, gamma, bias, cache, bias_scalar, scale, eps, time_pad, pad_h, pad_w, cache_t,
                           emit_cache):
    """The padded buffer with ``silu(norm(x))`` in its interior, the next cache or empty, the signed statistic."""
    geo = make_geometry(x, cache, time_pad, pad_h, pad_w, cache_t)
    triton_path = use_triton(x, gamma, bias, cache)
    if triton_path:
        x = x.contiguous()
    x_pad, newc = causal_pad_forward(x, cache, geo, emit_cache=emit_cache, skip_x=True, triton_path=triton_path)
    rstd = _norm_forward(x, gamma, bias, bias_scalar, scale, eps, x_pad, newc, geo, triton_path)
    return x_pad, computed_or_empty(newc, x), rstd


@torch.library.custom_op("chopgrad::rms_norm_silu_pad", mutates_args=())
def _rms_norm_silu_pad_op(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None,
                          cache: torch.Tensor | None, bias_scalar: float, scale: float, eps: float, time_pad: int,
                          pad_h: int, pad_w: int, cache_t: int,
                          emit_cache: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_pad, next cache or empty, signed statistic)``."""
    return _norm_silu_into_padded(x, gamma, bias, cache, bias_scalar, scale, eps, time_pad, pad_h, pad_w, cache_t,
                                  emit_cache)


@_rms_norm_silu_pad_op.register_fake
def _(x, gamma, bias, cache, bias_scalar, scale, eps, time_pad, pad_h, pad_w, cache_t, emit_cache):
    geo = make_geometry(x, cache, time_pad, pad_h, pad_w, cache_t)
    newc = x.new_empty(geo.cache_shape()) if emit_cache else not_computed(x)
    return x.new_empty(geo.padded_shape()), newc, x.new_empty(_stat_shape(x), dtype=_stat_dtype(x))


@torch.library.custom_op("chopgrad::rms_norm_silu_pad_backward", mutates_args=())
def _rms_norm_silu_pad_backward_op(
    x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None, rstd: torch.Tensor, gout: torch.Tensor | None,
    gnew: torch.Tensor | None, bias_scalar: float, scale: float, cache_frames: int, time_pad: int, pad_h: int,
    pad_w: int, cache_t: int, need_x: bool, need_params: bool, need_cache: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad x, dgamma, dbias, grad cache)``; empty tensors where not asked for."""
    geo = geometry_from_sizes(x.shape, cache_frames, time_pad, pad_h, pad_w, cache_t)
    triton_path = use_triton(x, gamma, bias)
    if triton_path:
        x = x.contiguous()
    if gout is None:
        gout = torch.zeros(geo.padded_shape(), dtype=x.dtype, device=x.device)
    return _grads_through_norm_pad(x, gamma, bias, rstd, gout, gnew, geo, bias_scalar, scale, triton_path,
                                   need_x, need_params, need_cache)


@_rms_norm_silu_pad_backward_op.register_fake
def _(x, gamma, bias, rstd, gout, gnew, bias_scalar, scale, cache_frames, time_pad, pad_h, pad_w, cache_t, need_x,
      need_params, need_cache):
    return _fake_grads_through_norm_pad(x, gamma, cache_frames, need_x, need_params, need_cache)


def _rms_norm_silu_pad_setup_context(ctx, inputs, output):
    x, gamma, bias, cache, bias_scalar, scale, _, time_pad, pad_h, pad_w, cache_t, emit_cache = inputs
    rstd = output[2]
    ctx.mark_non_differentiable(rstd, *(() if emit_cache else (output[1],)))
    ctx.emit_cache = emit_cache
    # the cache and the padded output are not kept: backward needs x and the statistic only
    ctx.save_for_backward(x, gamma, bias, rstd)
    ctx.cfg = (bias_scalar, scale, 0 if cache is None else cache.shape[2], time_pad, pad_h, pad_w, cache_t)
    ctx.set_materialize_grads(False)


def _rms_norm_silu_pad_autograd(ctx, gout, gnew, _grad_rstd):
    x, gamma, bias, rstd = ctx.saved_tensors
    if not ctx.emit_cache:
        gnew = None
    need_x = ctx.needs_input_grad[0]
    need_params = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    need_cache = ctx.needs_input_grad[3] and ctx.cfg[2] > 0
    gx, dgamma, dbias, gc = torch.ops.chopgrad.rms_norm_silu_pad_backward(
        x, gamma, bias, rstd, gout, gnew, *ctx.cfg, need_x, need_params, need_cache)
    gg, gb = _param_grads(ctx, dgamma, dbias, gamma, bias)
    return (gx if need_x else None), gg, gb, (gc if need_cache else None), *([None] * 8)


_rms_norm_silu_pad_op.register_autograd(_rms_norm_silu_pad_autograd, setup_context=_rms_norm_silu_pad_setup_context)


def _conv3d_in_dtype(x_pad, weight, conv_bias, stride, dilation, groups):
    # the conv runs in x's dtype even under autocast: backward calls convolution_backward on
    # the rebuilt input with the saved weight, which needs the dtypes the forward used
    with torch.autocast(device_type=x_pad.device.type, enabled=False):
        return conv3d(x_pad, weight.to(x_pad.dtype), None if conv_bias is None else conv_bias.to(x_pad.dtype),
                      stride, dilation, groups)


@torch.library.custom_op("chopgrad::rms_norm_silu_pad_conv3d", mutates_args=())
def _rms_norm_silu_pad_conv3d_op(
    x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None, cache: torch.Tensor | None,
    weight: torch.Tensor, conv_bias: torch.Tensor | None, bias_scalar: float, scale: float, eps: float,
    time_pad: int, pad_h: int, pad_w: int, cache_t: int, emit_cache: bool, stride: List[int], dilation: List[int],
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(conv output, next cache or empty, signed statistic)``; the padded input lives only inside."""
    x_pad, newc, rstd = _norm_silu_into_padded(x, gamma, bias, cache, bias_scalar, scale, eps, time_pad, pad_h, pad_w,
                                               cache_t, emit_cache)
    return _conv3d_in_dtype(x_pad, weight, conv_bias, stride, dilation, groups), newc, rstd


@_rms_norm_silu_pad_conv3d_op.register_fake
def _(x, gamma, bias, cache, weight, conv_bias, bias_scalar, scale, eps, time_pad, pad_h, pad_w, cache_t, emit_cache,
      stride, dilation, groups):
    geo = make_geometry(x, cache, time_pad, pad_h, pad_w, cache_t)
    out = _conv3d_in_dtype(x.new_empty(geo.padded_shape()), weight, conv_bias, stride, dilation, groups)
    newc = x.new_empty(geo.cache_shape()) if emit_cache else not_computed(x)
    return out, newc, x.new_empty(_stat_shape(x), dtype=_stat_dtype(x))


@torch.library.custom_op("chopgrad::rms_norm_silu_pad_conv3d_backward", mutates_args=())
def _rms_norm_silu_pad_conv3d_backward_op(
    x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None, rstd: torch.Tensor, cache: torch.Tensor | None,
    weight: torch.Tensor, gout: torch.Tensor | None, gnew: torch.Tensor | None, bias_scalar: float, scale: float,
    cache_frames: int, time_pad: int, pad_h: int, pad_w: int, cache_t: int, stride: List[int], dilation: List[int],
    groups: int, has_conv_bias: bool, need_x: bool, need_params: bool, need_cache: bool, need_weight: bool,
    need_conv_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad x, dgamma, dbias, grad cache, grad weight, grad conv bias)``; empty tensors where not asked for.

    ``cache`` is the part of the cache the padded input used (``None`` when none was).
    """
    geo = geometry_from_sizes(x.shape, cache_frames, time_pad, pad_h, pad_w, cache_t)
    triton_path = use_triton(x, gamma, bias, cache)
    if triton_path:
        x = x.contiguous()
    g_pad = g_w = g_cb = None
    if gout is not None:
        with torch.no_grad():
            x_pad, _ = causal_pad_forward(x, cache, geo, emit_cache=False, skip_x=True, triton_path=triton_path)
            _norm_forward(x, gamma, bias, bias_scalar, scale, 0.0, x_pad, None, geo, triton_path, rstd=rstd)
            g_pad, g_w, g_cb = conv3d_backward(
                gout.to(x.dtype), x_pad, weight.to(x.dtype), has_conv_bias, stride, dilation, groups,
                [need_x or need_params or need_cache, need_weight, need_conv_bias and has_conv_bias],
            )
        del x_pad
    if g_pad is None:
        g_pad = torch.zeros(geo.padded_shape(), dtype=x.dtype, device=x.device)
    gx, dgamma, dbias, gc = _grads_through_norm_pad(x, gamma, bias, rstd, g_pad, gnew, geo, bias_scalar, scale,
                                                    triton_path, need_x, need_params, need_cache)
    g_w = g_w.to(weight.dtype) if (g_w is not None and need_weight) else not_computed(x)
    g_cb = g_cb.to(weight.dtype) if (g_cb is not None and need_conv_bias) else not_computed(x)
    return gx, dgamma, dbias, gc, g_w, g_cb


@_rms_norm_silu_pad_conv3d_backward_op.register_fake
def _(x, gamma, bias, rstd, cache, weight, gout, gnew, bias_scalar, scale, cache_frames, time_pad, pad_h, pad_w,
      cache_t, stride, dilation, groups, has_conv_bias, need_x, need_params, need_cache, need_weight, need_conv_bias):
    grads = _fake_grads_through_norm_pad(x, gamma, cache_frames, need_x, need_params, need_cache)
    g_w = weight.new_empty(weight.shape) if (gout is not None and need_weight) else not_computed(x)
    has_cb = gout is not None and need_conv_bias and has_conv_bias
    g_cb = weight.new_empty((weight.shape[0],)) if has_cb else not_computed(x)
    return (*grads, g_w, g_cb)


def _rms_norm_silu_pad_conv3d_setup_context(ctx, inputs, output):
    (x, gamma, bias, cache, weight, conv_bias, bias_scalar, scale, _, time_pad, pad_h, pad_w, cache_t, emit_cache,
     stride, dilation, groups) = inputs
    rstd = output[2]
    ctx.mark_non_differentiable(rstd, *(() if emit_cache else (output[1],)))
    ctx.emit_cache = emit_cache
    cache_frames = 0 if cache is None else cache.shape[2]
    # the padded input is rebuilt in backward; of the cache only what it used is kept
    used_cache = cache if (cache is not None and min(cache_frames, time_pad) > 0) else None
    ctx.save_for_backward(x, gamma, bias, rstd, used_cache, weight)
    ctx.cfg = (bias_scalar, scale, cache_frames, time_pad, pad_h, pad_w, cache_t, list(stride), list(dilation),
               groups, conv_bias is not None)
    ctx.set_materialize_grads(False)


def _rms_norm_silu_pad_conv3d_autograd(ctx, gout, gnew, _grad_rstd):
    x, gamma, bias, rstd, cache, weight = ctx.saved_tensors
    if not ctx.emit_cache:
        gnew = None
    need_x, need_gamma, need_bias, need_cache, need_w, need_cb = ctx.needs_input_grad[:6]
    need_cache = need_cache and ctx.cfg[2] > 0
    need_cb = need_cb and ctx.cfg[-1]
    gx, dgamma, dbias, gc, g_w, g_cb = torch.ops.chopgrad.rms_norm_silu_pad_conv3d_backward(
        x, gamma, bias, rstd, cache, weight, gout, gnew, *ctx.cfg, need_x, need_gamma or need_bias, need_cache,
        need_w, need_cb)
    gg, gb = _param_grads(ctx, dgamma, dbias, gamma, bias)
    return ((gx if need_x else None), gg, gb, (gc if need_cache else None),
            (g_w if (need_w and gout is not None) else None), (g_cb if (need_cb and gout is not None) else None),
            *([None] * 11))


_rms_norm_silu_pad_conv3d_op.register_autograd(_rms_norm_silu_pad_conv3d_autograd,
                                               setup_context=_rms_norm_silu_pad_conv3d_setup_context)


# ---------------------------------------------------------------------------
# public ops
# ---------------------------------------------------------------------------


def rms_norm_silu(x: torch.Tensor, gamma: torch.Tensor, bias: BiasSpec = None, *, eps: float = 1e-12,
                  scale: float | None = None) -> torch.Tensor:
    """``silu(x / max(||x||_C, eps) * scale * gamma + bias)`` over the channel dim 1, memory-lean.

    Args:
        x: ``(B, C, ...)`` channel-first activations (any number of trailing
            dims); float32/bfloat16/float16/float64.  Non-contiguous ``x`` is
            copied once on the Triton path.
        gamma: ``C`` elements (diffusers stores ``(C, 1, 1, 1)``).
        bias: ``None``/a float (diffusers' ``bias=False`` is ``0.0``) or ``C`` elements.
        eps: clamp of the norm (``F.normalize``'s default ``1e-12``).
        scale: defaults to ``sqrt(C)`` (``WanRMS_norm.scale``).

    Saved for backward: ``x`` and a ``(B, prod(x.shape[2:]))`` fp32 statistic.
    Math runs in fp32 for low-precision inputs.
    """
    check_float_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must be channel-first (B, C, ...), got shape {tuple(x.shape)}")
    bias_t, bias_scalar = _prep_params(x, gamma, bias)
    scale = norm_scale(x.shape[1], scale)
    return torch.ops.chopgrad.rms_norm_silu(x, gamma, bias_t, bias_scalar, scale, float(eps))[0]


def rms_norm_silu_pad(
    x: torch.Tensor,
    gamma: torch.Tensor,
    bias: BiasSpec,
    cache: torch.Tensor | None,
    *,
    time_pad: int,
    pad_h: int = 0,
    pad_w: int = 0,
    cache_t: int = 2,
    eps: float = 1e-12,
    scale: float | None = None,
    emit_cache: bool = True,
):
    """Fused ``silu(rms_norm(x))`` + :func:`chopgrad.kernels.causal_pad`.

    Equal to ``causal_pad(rms_norm_silu(x, gamma, bias), cache, ...)`` (same
    outputs, same gradients for ``x``, ``gamma``, ``bias`` and ``cache``), with
    ``cache`` holding *post-SiLU* frames as diffusers' Wan cache does.  Returns
    ``x_pad`` and, with ``emit_cache``, the next cache.  Saved for backward:
    ``x`` and the fp32 statistic only.
    """
    make_geometry(x, cache, time_pad, pad_h, pad_w, cache_t)
    bias_t, bias_scalar = _prep_params(x, gamma, bias)
    scale = norm_scale(x.shape[1], scale)
    out, newc, _ = torch.ops.chopgrad.rms_norm_silu_pad(x, gamma, bias_t, cache, bias_scalar, scale, float(eps),
                                                        time_pad, pad_h, pad_w, cache_t, emit_cache)
    return (out, newc) if emit_cache else out


def rms_norm_silu_pad_conv3d(
    x: torch.Tensor,
    gamma: torch.Tensor,
    bias: BiasSpec,
    cache: torch.Tensor | None,
    weight: torch.Tensor,
    conv_bias: torch.Tensor | None = None,
    *,
    time_pad: int,
    pad_h: int = 0,
    pad_w: int = 0,
    stride=(1, 1, 1),
    dilation=(1, 1, 1),
    groups: int = 1,
    cache_t: int = 2,
    eps: float = 1e-12,
    scale: float | None = None,
    emit_cache: bool = True,
):
    """``conv3d(rms_norm_silu_pad(x, ...), weight, conv_bias)`` that never keeps the padded input.

    The whole ``norm -> SiLU -> cache -> cat -> pad -> conv`` chain of a
    ``WanResidualBlock`` half.  Saved for backward: ``x``, the fp32 statistic,
    the cache (at most ``cache_t`` frames) and the parameters; the padded
    input (``time_pad + T`` frames) is rebuilt in backward by the fused
    producer, which costs one extra elementwise pass.  Returns the conv output
    and, with ``emit_cache``, the next cache (post-SiLU frames).
    """
    make_geometry(x, cache, time_pad, pad_h, pad_w, cache_t)
    bias_t, bias_scalar = _prep_params(x, gamma, bias)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 5 or weight.shape[1] * groups != x.shape[1]:
        raise ValueError(f"weight must be a conv3d weight (C_out, C/groups, kT, kH, kW) for C = {x.shape[1]}, "
                         f"got {tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    scale = norm_scale(x.shape[1], scale)
    out, newc, _ = torch.ops.chopgrad.rms_norm_silu_pad_conv3d(
        x, gamma, bias_t, cache, weight, conv_bias, bias_scalar, scale, float(eps), time_pad, pad_h, pad_w, cache_t,
        emit_cache, [int(v) for v in stride], [int(v) for v in dilation], int(groups))
    return (out, newc) if emit_cache else out


def rms_norm_silu_reference(x: torch.Tensor, gamma: torch.Tensor, bias: BiasSpec = None, *, eps: float = 1e-12,
                            scale: float | None = None) -> torch.Tensor:
    """diffusers' eager math (``WanRMS_norm`` then ``SiLU``), with autograd, for tests and benchmarks."""
    scale = norm_scale(x.shape[1], scale)
    needs_fp32 = x.dtype in (torch.float16, torch.bfloat16)
    normalized = F.normalize(x.float() if needs_fp32 else x, dim=1, eps=eps).to(x.dtype)
    g = gamma.reshape((x.shape[1],) + (1,) * (x.dim() - 2))
    out = normalized * scale * g
    if isinstance(bias, torch.Tensor):
        out = out + bias.reshape(g.shape)
    elif bias is not None:
        out = out + bias
    return F.silu(out)
