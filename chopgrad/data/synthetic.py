"""Procedural synthetic videos for training, tests and benchmarks.

Every clip is a deterministic function of an integer ``seed`` (all random
parameters are drawn from a ``torch.Generator`` on the CPU, so a seed gives the
same clip on every device), of any frame count and any size.

Content of a clip:

* a textured background (oriented sinusoidal gratings plus smooth value noise,
  random colours) seen through a camera that pans with a random velocity and
  acceleration (sub-pixel, bilinear);
* several (3 to 6) moving objects -- discs, ellipses and rotated rectangles with
  anti-aliased edges -- each carrying its own texture (stripes, checkerboard or
  a radial pattern) that moves with it; they bounce off the frame borders and
  occlude each other in a fixed depth order;
* a global brightness change over time (a slow and a faster oscillation) and a
  slight contrast change.

Frame ``t`` depends only on ``(seed, t, height, width)``: a longer clip with the
same seed extends a shorter one.

Values are in ``[-1, 1]``, layout ``(3, F, H, W)`` (or ``(B, 3, F, H, W)`` for
:func:`make_batch`), matching the pixel convention of diffusers video VAEs.

This module depends on ``torch`` only (no other part of chopgrad).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["make_video", "make_batch"]


def _u(g: torch.Generator, lo: float, hi: float, n: int = 1) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _ui(g: torch.Generator, lo: int, hi: int) -> int:
    """Integer in [lo, hi] inclusive."""
    return int(torch.randint(lo, hi + 1, (1,), generator=g).item())


def _rand_color(g: torch.Generator) -> torch.Tensor:
    return torch.rand(3, generator=g, dtype=torch.float64)


def _triangle(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Reflect ``x`` into ``[lo, hi]`` (bouncing motion)."""
    span = max(hi - lo, 1e-6)
    y = torch.remainder(x - lo, 2.0 * span)
    return lo + torch.where(y > span, 2.0 * span - y, y)


def make_video(
    seed: int,
    frames: int,
    height: int,
    width: int,
    *,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    layout: bool = False,
):
    """Return a deterministic synthetic clip of shape ``(3, frames, height, width)`` in ``[-1, 1]``.

    ``seed`` fully determines the clip (for a given size and frame count).
    Object speeds and sizes scale with ``min(height, width)`` so a clip looks
    alike at 64x64 and 128x128; texture periods are in pixels.

    With ``layout=True`` it returns ``(clip, labels)``: ``labels`` is a
    ``(1, frames, height, width)`` int64 map of the visible object at each
    pixel (0 for the background, ``k`` for the ``k``-th object), the scene's
    semantic layout. The clip is the same as without it.
    """
    if frames < 1 or height < 1 or width < 1:
        raise ValueError("frames, height and width must be positive")
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    dev = torch.device(device)
    wd = torch.float32  # working precision
    H, W, T = int(height), int(width), int(frames)
    S = float(min(H, W))
    scale = S / 64.0

    t = torch.arange(T, device=dev, dtype=wd).view(T, 1, 1)
    yy = torch.arange(H, device=dev, dtype=wd).view(1, H, 1) + 0.5
    xx = torch.arange(W, device=dev, dtype=wd).view(1, 1, W) + 0.5

    # ---------------- background with camera pan ----------------
    pan_v = _u(g, -1.2, 1.2, 2) * scale  # pixels / frame (y, x)
    pan_a = _u(g, -0.01, 0.01, 2) * scale  # pixels / frame^2
    py = (pan_v[0] * t + 0.5 * pan_a[0] * t * t).to(wd)
    px = (pan_v[1] * t + 0.5 * pan_a[1] * t * t).to(wd)
    by = yy + py  # (T, H, 1)
    bx = xx + px  # (T, 1, W)

    bg = torch.zeros(3, T, H, W, device=dev, dtype=wd)
    base = _rand_color(g) * 0.6 + 0.2
    bg += base.to(dev, wd).view(3, 1, 1, 1)
    for _ in range(_ui(g, 2, 3)):  # oriented gratings
        period = float(_u(g, 8.0, 32.0))
        ang = float(_u(g, 0.0, math.pi))
        ph = float(_u(g, 0.0, 2 * math.pi))
        amp = float(_u(g, 0.05, 0.18))
        col = (_rand_color(g) - 0.5) * 2.0
        k = 2 * math.pi / period
        wave = torch.sin(k * (math.cos(ang) * bx + math.sin(ang) * by) + ph)  # (T, H, W)
        bg += amp * col.to(dev, wd).view(3, 1, 1, 1) * wave.unsqueeze(0)
    # smooth value noise on a coarse lattice, sampled with the pan (periodic)
    cell = float(_u(g, 8.0, 16.0))
    nh, nw = 16, 16
    noise = (torch.rand(3, nh, nw, generator=g, dtype=torch.float64) - 0.5).to(dev, wd) * float(_u(g, 0.2, 0.5))
    gy = torch.remainder(by / cell, nh) / nh * 2 - 1  # (T, H, 1) in [-1, 1)
    gx = torch.remainder(bx / cell, nw) / nw * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(gx, gy), dim=-1)  # (T, H, W, 2): (x, y)
    tex = noise.unsqueeze(0).expand(T, 3, nh, nw)
    # pad periodically so bilinear sampling wraps around
    tex = torch.cat([tex, tex[:, :, :1]], dim=2)
    tex = torch.cat([tex, tex[:, :, :, :1]], dim=3)
    grid = (grid + 1) * torch.tensor([nw / (nw + 1), nh / (nh + 1)], device=dev, dtype=wd) - 1
    sampled = F.grid_sample(tex, grid, mode="bilinear", padding_mode="border", align_corners=False)  # (T,3,H,W)
    bg += sampled.permute(1, 0, 2, 3)
    img = bg
    labels = torch.zeros(1, T, H, W, device=dev, dtype=torch.int64) if layout else None

    # ---------------- moving, occluding, textured objects ----------------
    n_obj = _ui(g, 3, 6)
    for index in range(n_obj):
        kind = _ui(g, 0, 2)  # 0 disc/ellipse, 1 rectangle, 2 disc
        r1 = float(_u(g, 0.08, 0.22)) * S
        r2 = r1 * float(_u(g, 0.5, 1.0)) if kind != 2 else r1
        cy0, cx0 = float(_u(g, 0.0, H)), float(_u(g, 0.0, W))
        vy, vx = float(_u(g, -1.5, 1.5)) * scale, float(_u(g, -1.5, 1.5)) * scale
        rot0 = float(_u(g, 0.0, math.pi))
        rot_v = float(_u(g, -0.05, 0.05))
        cy = _triangle(cy0 + vy * t, 0.0, float(H))  # (T,1,1)
        cx = _triangle(cx0 + vx * t, 0.0, float(W))
        th = rot0 + rot_v * t
        c, s = torch.cos(th), torch.sin(th)
        dy, dx = yy - cy, xx - cx
        u = c * dx + s * dy  # object-local coordinates, (T, H, W)
        v = -s * dx + c * dy
        if kind == 1:  # rectangle: signed distance (approx.) in pixels
            sd = torch.maximum(u.abs() - r1, v.abs() - r2)
        else:  # ellipse
            rn = torch.sqrt((u / r1) ** 2 + (v / r2) ** 2 + 1e-12)
            sd = (rn - 1.0) * min(r1, r2)
        alpha = (0.5 - sd).clamp(0.0, 1.0)  # ~1 px anti-aliased edge
        # texture in local coordinates
        c1 = _rand_color(g).to(dev, wd).view(3, 1, 1, 1)
        c2 = _rand_color(g).to(dev, wd).view(3, 1, 1, 1)
        period = float(_u(g, 6.0, 20.0))
        k = 2 * math.pi / period
        pat = _ui(g, 0, 2)
        if pat == 0:  # stripes
            m = 0.5 + 0.5 * torch.sin(k * u)
        elif pat == 1:  # soft checkerboard
            m = 0.5 + 0.5 * torch.tanh(2.0 * torch.sin(k * u) * torch.sin(k * v))
        else:  # radial rings
            m = 0.5 + 0.5 * torch.cos(k * torch.sqrt(u * u + v * v + 1e-12))
        obj = c1 + (c2 - c1) * m.unsqueeze(0)
        a = alpha.unsqueeze(0)
        img = img * (1 - a) + obj * a
        if labels is not None:
            labels = torch.where(a > 0.5, index + 1, labels)

    # ---------------- global brightness / contrast change ----------------
    # (functions of the absolute frame index only, so a longer clip extends a
    # shorter one with the same seed frame for frame)
    slow_a = float(_u(g, 0.0, 0.25))
    slow_p = float(_u(g, 64.0, 160.0))
    slow_ph = float(_u(g, 0.0, 2 * math.pi))
    osc_a = float(_u(g, 0.0, 0.15))
    osc_p = float(_u(g, 12.0, 48.0))
    osc_ph = float(_u(g, 0.0, 2 * math.pi))
    con_a = float(_u(g, 0.0, 0.15))
    con_ph = float(_u(g, 0.0, 2 * math.pi))
    gain = (
        1.0
        + slow_a * torch.sin(2 * math.pi * t / slow_p + slow_ph)
        + osc_a * torch.sin(2 * math.pi * t / osc_p + osc_ph)
    )
    contrast = 1.0 + con_a * torch.sin(2 * math.pi * t / slow_p + con_ph)
    img = (img - 0.5) * contrast.unsqueeze(0) + 0.5
    img = img * gain.unsqueeze(0)

    out = (img.clamp(0.0, 1.0) * 2.0 - 1.0).to(dtype).contiguous()
    return (out, labels) if layout else out


def make_batch(
    seed: int,
    batch: int,
    frames: int,
    height: int,
    width: int,
    *,
    device="cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Return ``batch`` clips stacked to ``(batch, 3, frames, height, width)``.

    Clip ``i`` is ``make_video(seed * 1_000_003 + i, ...)``, so batches with
    different seeds do not share clips (for seeds < 1_000_003 / batch apart).
    """
    return torch.stack(
        [
            make_video(int(seed) * 1_000_003 + i, frames, height, width, device=device, dtype=dtype)
            for i in range(int(batch))
        ]
    )
