"""Causal cache concat + zero padding for ``WanCausalConv3d``, with backward.

diffusers builds the input of a causal 3-D convolution as::

    x = torch.cat([cache, x], dim=2)              # cache: previous frames (may be None)
    x = F.pad(x, (pw, pw, ph, ph, time_pad - Tc, 0))   # Tc = cache frames used
    new_cache = torch.cat([cache, x_in], 2)[:, :, -cache_t:].clone()   # (caller side)

which copies the chunk twice (``cat`` then ``pad``) plus once for the cache.
:func:`causal_pad` writes the padded input in one pass from ``cache`` and
``x`` and emits the next cache in the same launch.  Its backward splits the
incoming gradient (plus the gradient of the emitted cache) back into the
gradient of ``x`` and of ``cache``.  Nothing is saved for backward (shapes only).

Geometry (frames along dim 2): ``Tcp = min(Tc, time_pad)`` cache frames are
used (the *last* ones; diffusers' ``F.pad`` with a negative pad crops the
same way), ``Tz = time_pad - Tcp`` zero frames lead, then ``Tcp`` cache frames,
then the ``Tx`` frames of ``x``.  The emitted cache is the last
``min(cache_t, Tc + Tx)`` frames of ``cat([cache, x])`` -- exactly diffusers'
rule (``x[:, :, -2:]``, or the cache's last frame followed by a 1-frame chunk).

Layout: ``_causal_pad_fwd_kernel`` / ``_causal_pad_bwd_kernel`` (Triton) ->
``causal_pad_forward`` / ``causal_pad_backward`` (dispatching launchers, also
used by the fused norm op) -> custom ops ``torch.ops.chopgrad.causal_pad`` /
``causal_pad_backward`` (with the autograd formula) -> :func:`causal_pad`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List  # torch 2.6 infers custom op schemas from typing.List only, not list[int]

import torch

from ._args import computed_or_empty, not_computed
from ._dispatch import check_float_tensor, tl, triton, triton_kernel, use_triton


@dataclass(frozen=True)
class PadGeometry:
    """Frame bookkeeping of one causal pad (all counts in frames, sizes in pixels)."""

    B: int
    C: int
    TX: int
    TC: int
    H: int
    W: int
    time_pad: int
    ph: int
    pw: int
    cache_t: int

    @property
    def TCP(self) -> int:  # cache frames that appear in the padded output
        return min(self.TC, self.time_pad)

    @property
    def TZ(self) -> int:  # leading zero frames
        return self.time_pad - self.TCP

    @property
    def TP(self) -> int:  # frames of the padded output
        return self.TZ + self.TCP + self.TX

    @property
    def HP(self) -> int:
        return self.H + 2 * self.ph

    @property
    def WP(self) -> int:
        return self.W + 2 * self.pw

    @property
    def TN(self) -> int:  # frames of the emitted cache
        return min(self.cache_t, self.TC + self.TX)

    @property
    def NX(self) -> int:  # emitted-cache frames that come from x (the last ones)
        return min(self.TN, self.TX)

    def padded_shape(self):
        return (self.B, self.C, self.TP, self.HP, self.WP)

    def cache_shape(self):
        return (self.B, self.C, self.TN, self.H, self.W)


def make_geometry(x: torch.Tensor, cache: torch.Tensor | None, time_pad: int, ph: int, pw: int,
                  cache_t: int) -> PadGeometry:
    """Validate arguments and return the :class:`PadGeometry` (clear errors on bad input)."""
    check_float_tensor("x", x, ndim=5, shape_hint="(B, C, T, H, W)")
    B, C, TX, H, W = x.shape
    if TX < 1:
        raise ValueError("x must have at least one frame")
    for name, v in (("time_pad", time_pad), ("pad_h", ph), ("pad_w", pw), ("cache_t", cache_t)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    TC = 0
    if cache is not None:
        check_float_tensor("cache", cache, ndim=5, shape_hint="(B, C, Tc, H, W)")
        if (cache.shape[0], cache.shape[1], cache.shape[3], cache.shape[4]) != (B, C, H, W):
            raise ValueError(
                f"cache must have shape (B, C, Tc, H, W) = ({B}, {C}, Tc, {H}, {W}) to match x, "
                f"got {tuple(cache.shape)}"
            )
        if cache.dtype != x.dtype:
            raise TypeError(f"cache must have the dtype of x ({x.dtype}), got {cache.dtype}")
        if cache.device != x.device:
            raise ValueError(f"cache is on {cache.device} but x is on {x.device}")
        TC = cache.shape[2]
    return PadGeometry(B, C, TX, TC, H, W, time_pad, ph, pw, cache_t)


# ---------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------


@triton_kernel
def _causal_pad_fwd_kernel(
    x_ptr, c_ptr, out_ptr, newc_ptr,
    C, TX, TC, H, W, TZ, TCP, TP, TN, PH, PW, NJ, NCB,
    xsb, xsc, xst, xsh, xsw,
    csb, csc, cst, csh, csw,
    HAS_CACHE: tl.constexpr, SKIP_X: tl.constexpr, CB: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program ((b * NCB + cblk) * NJ + jj, block): CB channels x BLOCK pixels of one frame.

    ``jj < TP``: padded output frame ``jj``; else emitted-cache slot ``jj - TP``.
    ``SKIP_X``: frames of ``x`` only get their zero border (the fused norm op
    writes their interior) and only cache-sourced emitted slots are written.
    """
    pid = tl.program_id(0)
    blk = tl.program_id(1)
    jj = pid % NJ
    bcb = pid // NJ
    b = bcb // NCB
    cc = (bcb % NCB) * CB + tl.arange(0, CB)
    cok = (cc < C)[:, None]
    HP = H + 2 * PH
    WP = W + 2 * PW
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    xb = x_ptr + b.to(tl.int64) * xsb + cc[:, None].to(tl.int64) * xsc
    cb = c_ptr + b.to(tl.int64) * csb + cc[:, None].to(tl.int64) * csc
    row = (b.to(tl.int64) * C + cc[:, None])
    if jj < TP:
        j = jj
        live = offs < HP * WP
        hp = offs // WP
        wp = offs % WP
        h = hp - PH
        w = wp - PW
        inside = (live & (h >= 0) & (h < H) & (w >= 0) & (w < W))[None, :] & cok
        jv = offs * 0 + j
        is_cache = ((jv >= TZ) & (jv < TZ + TCP))[None, :]
        is_x = (jv >= TZ + TCP)[None, :]
        sp_x = ((jv - TZ - TCP).to(tl.int64) * xst + h * xsh + w * xsw)[None, :]
        v = tl.load(xb + sp_x, mask=inside & is_x, other=0.0)
        if HAS_CACHE:
            sp_c = ((jv - TZ + TC - TCP).to(tl.int64) * cst + h * csh + w * csw)[None, :]
            vc = tl.load(cb + sp_c, mask=inside & is_cache, other=0.0)
            v = tl.where(is_cache, vc, v)
        smask = live[None, :] & cok
        if SKIP_X:
            # (no `~` on masks: the interpreter of triton 3.2 cannot invert a boolean)
            smask = smask & (tl.where(is_x & inside, 0, 1) != 0)
        tl.store(out_ptr + (row * TP + j) * HP * WP + offs[None, :], v, mask=smask)
    else:
        # Names differ from the padded-frame branch: Triton requires a variable
        # assigned in both branches of a runtime `if` to keep one shape.
        k = jj - TP
        slot_live = (offs < H * W)[None, :] & cok
        h = offs // W
        w = offs % W
        sv = offs * 0 + (TC + TX - TN + k)
        from_c = (sv < TC)[None, :]
        from_x = (sv >= TC)[None, :]
        v = tl.load(xb + ((sv - TC).to(tl.int64) * xst + h * xsh + w * xsw)[None, :], mask=slot_live & from_x,
                    other=0.0)
        if HAS_CACHE:
            vc = tl.load(cb + (sv.to(tl.int64) * cst + h * csh + w * csw)[None, :], mask=slot_live & from_c,
                         other=0.0)
            v = tl.where(from_c, vc, v)
        tl.store(newc_ptr + (row * TN + k) * H * W + offs[None, :], v, mask=slot_live)


@triton_kernel
def _causal_pad_bwd_kernel(
    gout_ptr, gnew_ptr, gx_ptr, gc_ptr,
    C, TX, TC, H, W, TZ, TCP, TN, PH, PW, S0, NS, NCB,
    osb, osc, ost, osh, osw,
    nsb, nsc, nst, nsh, nsw,
    HAS_GNEW: tl.constexpr, CB: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program ((b * NCB + cblk) * NS + s - S0, block): gradient of concat frame ``s`` in ``[S0, S0 + NS)``.

    Concat frames are the cache's (``s < TC``) followed by x's.
    """
    pid = tl.program_id(0)
    blk = tl.program_id(1)
    s = S0 + pid % NS
    bcb = pid // NS
    b = bcb // NCB
    cc = (bcb % NCB) * CB + tl.arange(0, CB)
    cok = (cc < C)[:, None]
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    live = (offs < H * W)[None, :] & cok
    h = offs // W
    w = offs % W
    sv = offs * 0 + s
    is_c = sv < TC
    # padded frame of s (cache frames before TC - TCP were cropped)
    j = tl.where(is_c, TZ + sv - (TC - TCP), TZ + TCP + sv - TC)
    in_out = (sv >= TC - TCP)[None, :]  # x's frames, and the cache frames that were not cropped
    c64 = cc[:, None].to(tl.int64)
    g = tl.load(gout_ptr + b.to(tl.int64) * osb + c64 * osc
                + (j.to(tl.int64) * ost + (h + PH) * osh + (w + PW) * osw)[None, :],
                mask=live & in_out, other=0.0).to(tl.float32)
    if HAS_GNEW:
        k = sv - (TC + TX - TN)
        g += tl.load(gnew_ptr + b.to(tl.int64) * nsb + c64 * nsc
                     + (k.to(tl.int64) * nst + h * nsh + w * nsw)[None, :],
                     mask=live & (k >= 0)[None, :], other=0.0).to(tl.float32)
    row = b.to(tl.int64) * C + cc[:, None]
    if s < TC:
        tl.store(gc_ptr + (row * TC + s) * H * W + offs[None, :], g.to(gc_ptr.dtype.element_ty), mask=live)
    else:
        tl.store(gx_ptr + (row * TX + (s - TC)) * H * W + offs[None, :], g.to(gx_ptr.dtype.element_ty),
                 mask=live)


def _tile(C: int, n: int, cuda: bool) -> tuple[int, int]:
    """(CB, BLOCK): channels and pixels per program (large tiles for the interpreter)."""
    if cuda:
        return 1, min(1024, triton.next_power_of_2(max(n, 16)))
    cb = min(triton.next_power_of_2(C), 64)
    return cb, min(triton.next_power_of_2(max(n, 16)), max(16, 65536 // cb))


# ---------------------------------------------------------------------------
# launchers (Triton or reference), shared with the fused norm op
# ---------------------------------------------------------------------------


def causal_pad_forward(x, cache, geo: PadGeometry, *, emit_cache: bool, skip_x: bool, triton_path: bool):
    """Allocate and fill the padded tensor (and emitted cache).

    ``skip_x=True`` leaves the interior of x's frames (and x-sourced emitted
    frames) unwritten: the caller (fused norm op) writes them.  Returns
    ``(out, new_cache or None)``.
    """
    g = geo
    out = torch.empty(g.padded_shape(), dtype=x.dtype, device=x.device)
    newc = torch.empty(g.cache_shape(), dtype=x.dtype, device=x.device) if emit_cache else None
    if triton_path:
        n_slots = 0
        if emit_cache:
            n_slots = g.TN - g.NX if skip_x else g.TN
        NJ = g.TP + n_slots
        npix = max(g.HP * g.WP, g.H * g.W)
        cb, blk = _tile(g.C, npix, x.is_cuda)
        ncb = triton.cdiv(g.C, cb)
        cs = cache.stride() if cache is not None else (0,) * 5
        _causal_pad_fwd_kernel[(g.B * ncb * NJ, triton.cdiv(npix, blk))](
            x, cache if cache is not None else x, out, newc if newc is not None else out,
            g.C, g.TX, g.TC, g.H, g.W, g.TZ, g.TCP, g.TP, g.TN, g.ph, g.pw, NJ, ncb,
            *x.stride(), *cs,
            HAS_CACHE=cache is not None and g.TC > 0, SKIP_X=skip_x, CB=cb, BLOCK=blk,
        )
        return out, newc
    # PyTorch reference: fill regions by slicing (each element written once).
    t_int = g.TZ + g.TCP
    if g.TZ:
        out[:, :, : g.TZ].zero_()
    if g.ph:
        out[:, :, g.TZ:, : g.ph].zero_()
        out[:, :, g.TZ:, g.ph + g.H:].zero_()
    if g.pw:
        out[:, :, g.TZ:, g.ph:g.ph + g.H, : g.pw].zero_()
        out[:, :, g.TZ:, g.ph:g.ph + g.H, g.pw + g.W:].zero_()
    if g.TCP:
        out[:, :, g.TZ:t_int, g.ph:g.ph + g.H, g.pw:g.pw + g.W].copy_(cache[:, :, g.TC - g.TCP:])
    if not skip_x:
        out[:, :, t_int:, g.ph:g.ph + g.H, g.pw:g.pw + g.W].copy_(x)
    if emit_cache:
        n_from_c = g.TN - g.NX
        if n_from_c:
            newc[:, :, :n_from_c].copy_(cache[:, :, g.TC - n_from_c:])
        if not skip_x and g.NX:
            newc[:, :, n_from_c:].copy_(x[:, :, g.TX - g.NX:])
    return out, newc


def interior(out: torch.Tensor, geo: PadGeometry) -> torch.Tensor:
    """View of the padded tensor where x's frames go."""
    g = geo
    return out[:, :, g.TZ + g.TCP:, g.ph:g.ph + g.H, g.pw:g.pw + g.W]


def causal_pad_backward(gout, gnew, geo: PadGeometry, *, need_x: bool, need_cache: bool, triton_path: bool,
                        dtype, device):
    """Gradients ``(gx or None, gcache or None)`` from the padded output's and the emitted cache's gradients."""
    g = geo
    need_cache = need_cache and g.TC > 0
    if not (need_x or need_cache):
        return None, None
    if gout is None:
        gout = torch.zeros(g.padded_shape(), dtype=dtype, device=device)
    if triton_path:
        gx = torch.empty((g.B, g.C, g.TX, g.H, g.W), dtype=dtype, device=device) if need_x else None
        gc = torch.empty((g.B, g.C, g.TC, g.H, g.W), dtype=dtype, device=device) if need_cache else None
        # concat frames handled: [s0, s0 + ns) -- cache frames [0, TC), x frames [TC, TC + TX)
        s0 = 0 if need_cache else g.TC
        ns = (g.TC if need_cache else 0) + (g.TX if need_x else 0)
        cb, blk = _tile(g.C, g.H * g.W, gout.is_cuda)
        ncb = triton.cdiv(g.C, cb)
        gs = gnew.stride() if gnew is not None else (0,) * 5
        _causal_pad_bwd_kernel[(g.B * ncb * ns, triton.cdiv(g.H * g.W, blk))](
            gout, gnew if gnew is not None else gout,
            gx if gx is not None else gout, gc if gc is not None else gout,
            g.C, g.TX, g.TC, g.H, g.W, g.TZ, g.TCP, g.TN, g.ph, g.pw, s0, ns, ncb,
            *gout.stride(), *gs,
            HAS_GNEW=gnew is not None, CB=cb, BLOCK=blk,
        )
        return gx, gc
    gx = gc = None
    if need_x:
        gx = interior(gout, g).clone(memory_format=torch.contiguous_format)
        if gnew is not None and g.NX:
            gx[:, :, g.TX - g.NX:] += gnew[:, :, g.TN - g.NX:]
    if need_cache:
        gc = torch.zeros((g.B, g.C, g.TC, g.H, g.W), dtype=dtype, device=device)
        if g.TCP:
            gc[:, :, g.TC - g.TCP:] = gout[:, :, g.TZ:g.TZ + g.TCP, g.ph:g.ph + g.H, g.pw:g.pw + g.W]
        n_from_c = g.TN - g.NX
        if gnew is not None and n_from_c:
            gc[:, :, g.TC - n_from_c:] += gnew[:, :, :n_from_c]
    return gx, gc


# ---------------------------------------------------------------------------
# custom ops (forward and backward) with their autograd formula
# ---------------------------------------------------------------------------


def geometry_from_sizes(x_shape, cache_frames: int, time_pad: int, ph: int, pw: int, cache_t: int) -> PadGeometry:
    """The :class:`PadGeometry` of an already validated call, from sizes only (what a custom op can carry)."""
    B, C, TX, H, W = x_shape
    return PadGeometry(B, C, TX, cache_frames, H, W, time_pad, ph, pw, cache_t)


@torch.library.custom_op("chopgrad::causal_pad", mutates_args=())
def _causal_pad_op(x: torch.Tensor, cache: torch.Tensor | None, time_pad: int, pad_h: int, pad_w: int, cache_t: int,
                   emit_cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_pad, next cache)``; the cache is an empty tensor without ``emit_cache``."""
    geo = make_geometry(x, cache, time_pad, pad_h, pad_w, cache_t)
    out, newc = causal_pad_forward(x, cache, geo, emit_cache=emit_cache, skip_x=False,
                                   triton_path=use_triton(x, cache))
    return out, computed_or_empty(newc, x)


@_causal_pad_op.register_fake
def _(x, cache, time_pad, pad_h, pad_w, cache_t, emit_cache):
    geo = make_geometry(x, cache, time_pad, pad_h, pad_w, cache_t)
    newc = x.new_empty(geo.cache_shape()) if emit_cache else not_computed(x)
    return x.new_empty(geo.padded_shape()), newc


@torch.library.custom_op("chopgrad::causal_pad_backward", mutates_args=())
def _causal_pad_backward_op(gout: torch.Tensor | None, gnew: torch.Tensor | None, x_shape: List[int],
                            cache_frames: int, time_pad: int, pad_h: int, pad_w: int, cache_t: int, need_x: bool,
                            need_cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad x, grad cache)``, each an empty tensor when not asked for (or, for the cache, when it has no frames)."""
    geo = geometry_from_sizes(x_shape, cache_frames, time_pad, pad_h, pad_w, cache_t)
    like = gout if gout is not None else gnew
    gx, gc = causal_pad_backward(gout, gnew, geo, need_x=need_x, need_cache=need_cache,
                                 triton_path=use_triton(gout, gnew), dtype=like.dtype, device=like.device)
    return computed_or_empty(gx, like), computed_or_empty(gc, like)


@_causal_pad_backward_op.register_fake
def _(gout, gnew, x_shape, cache_frames, time_pad, pad_h, pad_w, cache_t, need_x, need_cache):
    like = gout if gout is not None else gnew
    B, C, TX, H, W = x_shape
    gx = like.new_empty((B, C, TX, H, W)) if need_x else not_computed(like)
    gc = like.new_empty((B, C, cache_frames, H, W)) if (need_cache and cache_frames > 0) else not_computed(like)
    return gx, gc


def _causal_pad_setup_context(ctx, inputs, output):
    x, cache, time_pad, pad_h, pad_w, cache_t, emit_cache = inputs
    ctx.emit_cache = emit_cache
    if not emit_cache:
        ctx.mark_non_differentiable(output[1])
    # nothing but sizes is kept: the backward only routes gradients
    ctx.sizes = (list(x.shape), 0 if cache is None else cache.shape[2], time_pad, pad_h, pad_w, cache_t)
    ctx.has_cache = cache is not None
    ctx.set_materialize_grads(False)


def _causal_pad_autograd(ctx, gout, gnew):
    need_x, need_cache = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and ctx.has_cache
    if not ctx.emit_cache:
        gnew = None
    if gout is None and gnew is None:
        return None, None, None, None, None, None, None
    gx, gc = torch.ops.chopgrad.causal_pad_backward(gout, gnew, *ctx.sizes, need_x, need_cache)
    has_cache_grad = need_cache and ctx.sizes[1] > 0
    return (gx if need_x else None), (gc if has_cache_grad else None), None, None, None, None, None


_causal_pad_op.register_autograd(_causal_pad_autograd, setup_context=_causal_pad_setup_context)


def causal_pad(
    x: torch.Tensor,
    cache: torch.Tensor | None,
    *,
    time_pad: int,
    pad_h: int = 0,
    pad_w: int = 0,
    cache_t: int = 2,
    emit_cache: bool = True,
):
    """Build a causal conv's padded input from ``cache`` and ``x`` in one pass.

    Args:
        x: current chunk ``(B, C, T, H, W)``.
        cache: previous frames ``(B, C, Tc, H, W)`` or ``None`` (first chunk).
        time_pad: frames of causal padding the conv needs in front
            (``WanCausalConv3d._padding[4]``, i.e. ``2 * padding[0]``).
        pad_h, pad_w: symmetric zero padding of H and W
            (``_padding[2]`` and ``_padding[0]``).
        cache_t: frames kept in the emitted cache (diffusers' ``CACHE_T = 2``).
        emit_cache: also return the next cache.

    Returns:
        ``x_pad`` of shape ``(B, C, time_pad + T, H + 2 pad_h, W + 2 pad_w)``
        (when ``Tc <= time_pad``), and with ``emit_cache`` the next cache
        ``(B, C, min(cache_t, Tc + T), H, W)``, a new tensor (not a view).
        Both are differentiable with respect to ``x`` and ``cache``.
    """
    make_geometry(x, cache, time_pad, pad_h, pad_w, cache_t)  # argument errors before dispatch
    out, newc = torch.ops.chopgrad.causal_pad(x, cache, time_pad, pad_h, pad_w, cache_t, emit_cache)
    return (out, newc) if emit_cache else out


def causal_pad_reference(x, cache, *, time_pad, pad_h=0, pad_w=0, cache_t=2):
    """diffusers' eager code path (``torch.cat`` + ``F.pad`` + ``clone``), for tests and benchmarks."""
    import torch.nn.functional as F

    cache_src = cache
    tp = time_pad
    if cache is not None and time_pad > 0:
        x_cat = torch.cat([cache, x], dim=2)
        tp = time_pad - cache.shape[2]
    else:
        x_cat = x
    out = F.pad(x_cat, (pad_w, pad_w, pad_h, pad_h, tp, 0))
    full = torch.cat([cache_src, x], dim=2) if cache_src is not None else x
    newc = full[:, :, -cache_t:].clone()
    return out, newc
