"""Training pairs for the four video tasks ChopGrad is used for: ``clean clip -> (condition, target)``.

Every pair maker is seeded and shape-preserving: it takes a clean clip
``(3, F, H, W)`` in ``[-1, 1]`` and a ``torch.Generator`` and returns a
:class:`TaskPair` whose ``condition`` has the clip's shape and range, and whose
``target`` is the clip itself. The same clip and seed give the same pair on
every device. The trainer encodes ``condition`` with the VAE; the model then
sees the condition latents plus the task's extra channels (:attr:`Task.extra`)
and predicts the target latents.

* ``vsr`` (x4 video super-resolution, as in DOVE): each frame is blurred
  (Gaussian, sigma 1.6-3.2 full-resolution pixels), downscaled 4x with
  antialiasing, given Gaussian noise (std 0-0.03) and quantised to 32-96
  levels per channel (the banding of a strong compression), then upsampled
  back bicubically. The condition is that upsampled video; one degradation is
  drawn per clip and applied to every frame alike, as a real low-resolution
  source would be.
* ``inpaint`` (video inpainting): a box or a free-form mask (a thick random
  brush stroke), static or moving over time at a constant velocity. The
  condition is the clip with the hole filled with grey (0); the extra channel
  is the mask (1 in the hole), which the trainer brings to latent resolution.
  ``loss_weights`` weight hole pixels ``hole_weight`` times more, for
  ``pixel_loss(mask=...)``: they scale its elementwise terms, while a callable
  (perceptual) loss, for which a mask only selects pixels, sees the plain
  prediction (every weight is > 0).
* ``enhance`` (enhancing novel views rendered from a 3D Gaussian splatting /
  NeRF reconstruction): artefacts that stay consistent over time, drawn once
  per clip. They are a spatially varying blur (a smooth random map blends the
  frame with a blurred copy), floaters (semi-transparent soft blobs drifting
  together at one velocity, like geometry attached to the scene), ghosting (a
  faint copy shifted by a few pixels), an exposure and colour shift, and
  temporal flicker (a small random gain per frame).
* ``driving`` (controlled driving-video generation): the condition is a
  per-frame control video. For synthetic clips it is the generator's own
  object layout as a semantic map (pass ``layout=`` from
  ``make_video(..., layout=True)``); for real footage it is a Sobel edge map
  of the luma. The first clean frame is the extra input, so the model knows the
  scene's appearance. The target is the clean clip.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = ["TASKS", "Task", "TaskPair", "get_task"]


@dataclass(frozen=True)
class TaskPair:
    """One training pair; every video tensor is ``(C, F, H, W)``.

    condition: ``(3, F, H, W)`` in ``[-1, 1]``, the video the model is conditioned on (encoded by the trainer).
    target: ``(3, F, H, W)`` in ``[-1, 1]``, the clean clip.
    extra: the task's pixel-space extra input or None: the hole mask ``(1, F, H, W)`` in ``{0, 1}``
        (inpaint), or the first clean frame ``(3, 1, H, W)`` (driving).
    loss_weights: ``(1, F, H, W)`` non-negative weights for ``pixel_loss(mask=...)``, or None.
    """

    condition: torch.Tensor
    target: torch.Tensor
    extra: Optional[torch.Tensor] = None
    loss_weights: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class Task:
    """A task: its name, its pair maker, and what extra input its model sees.

    extra: "none", "mask" (one channel at latent resolution) or "first_frame" (the first clean frame's latents).
    spatial_multiple: H and W must be multiples of this (vsr's 4x downscale).
    """

    name: str
    make: Callable[..., TaskPair]
    extra: str
    spatial_multiple: int = 1

    def pair(self, clip: torch.Tensor, seed: int, **options) -> TaskPair:
        """The pair of ``clip`` for ``seed`` (options go to the pair maker, e.g. ``layout=`` for driving)."""
        _check_clip(clip, self)
        generator = torch.Generator().manual_seed(int(seed))
        return self.make(clip, generator, **options)


def _check_clip(clip, task: Task) -> None:
    if not isinstance(clip, torch.Tensor) or clip.dim() != 4 or clip.shape[0] != 3:
        shape = tuple(clip.shape) if isinstance(clip, torch.Tensor) else type(clip).__name__
        raise ValueError(f"clip must be a (3, F, H, W) tensor in [-1, 1], got {shape}")
    if not clip.is_floating_point():
        raise TypeError(f"clip must be a floating-point tensor, got dtype {clip.dtype}")
    h, w = clip.shape[-2:]
    m = task.spatial_multiple
    if h % m or w % m:
        raise ValueError(f"task {task.name!r} needs H and W that are multiples of {m}, got {h}x{w}")


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _frames_first(video: torch.Tensor) -> torch.Tensor:
    """(C, F, H, W) -> (F, C, H, W), the layout of the 2-D image ops."""
    return video.transpose(0, 1)


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) images, reflect-padded."""
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    pad_h = min(radius, images.shape[-2] - 1)
    pad_w = min(radius, images.shape[-1] - 1)
    out = F.pad(images, (pad_w, pad_w, 0, 0), mode="reflect" if pad_w else "replicate")
    out = F.conv2d(out, kernel[radius - pad_w:radius + pad_w + 1].view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.pad(out, (0, 0, pad_h, pad_h), mode="reflect" if pad_h else "replicate")
    return F.conv2d(out, kernel[radius - pad_h:radius + pad_h + 1].view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


# ---------------------------------------------------------------------------
# vsr
# ---------------------------------------------------------------------------

VSR_FACTOR = 4


def _vsr(clip: torch.Tensor, g: torch.Generator) -> TaskPair:
    h, w = clip.shape[-2:]
    sigma = _uniform(g, 0.8, 1.6) * VSR_FACTOR / 2
    noise_std = _uniform(g, 0.0, 0.03)
    levels = int(round(_uniform(g, 32, 96)))
    frames = _frames_first(clip.float())
    low = F.interpolate(_gaussian_blur(frames, sigma), size=(h // VSR_FACTOR, w // VSR_FACTOR), mode="bilinear",
                        antialias=True, align_corners=False)
    noise = torch.randn(low.shape, generator=g).to(low.device) * noise_std
    low = ((low + noise).clamp(-1, 1) + 1) / 2
    low = torch.round(low * (levels - 1)) / (levels - 1) * 2 - 1
    up = F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False).clamp(-1, 1)
    return TaskPair(condition=_frames_first(up).to(clip.dtype).contiguous(), target=clip)


# ---------------------------------------------------------------------------
# inpaint
# ---------------------------------------------------------------------------

def _box_mask(g, frames, h, w, moving, device) -> torch.Tensor:
    bh, bw = int(h * _uniform(g, 0.25, 0.5)), int(w * _uniform(g, 0.25, 0.5))
    y0, x0 = _uniform(g, 0, h - bh), _uniform(g, 0, w - bw)
    vy, vx = (_uniform(g, -1.0, 1.0), _uniform(g, -1.0, 1.0)) if moving else (0.0, 0.0)
    yy = torch.arange(h, device=device).view(1, h, 1).float()
    xx = torch.arange(w, device=device).view(1, 1, w).float()
    t = torch.arange(frames, device=device).view(frames, 1, 1).float()
    top = (y0 + vy * t).clamp(0, h - bh)
    left = (x0 + vx * t).clamp(0, w - bw)
    inside = (yy >= top) & (yy < top + bh) & (xx >= left) & (xx < left + bw)
    return inside.float()


def _stroke_mask(g, frames, h, w, moving, device) -> torch.Tensor:
    """A thick random brush stroke: discs along a random walk, then shifted over time if moving."""
    s = min(h, w)
    radius = s * _uniform(g, 0.06, 0.12)
    points = []
    y, x = _uniform(g, 0, h), _uniform(g, 0, w)
    angle = _uniform(g, 0, 2 * math.pi)
    for _ in range(int(round(_uniform(g, 6, 12)))):
        points.append((y, x))
        angle += _uniform(g, -1.0, 1.0)
        step = s * _uniform(g, 0.05, 0.12)
        y = min(max(y + step * math.sin(angle), 0.0), h - 1.0)
        x = min(max(x + step * math.cos(angle), 0.0), w - 1.0)
    vy, vx = (_uniform(g, -1.0, 1.0), _uniform(g, -1.0, 1.0)) if moving else (0.0, 0.0)
    yy = torch.arange(h, device=device).view(1, h, 1).float()
    xx = torch.arange(w, device=device).view(1, 1, w).float()
    t = torch.arange(frames, device=device).view(frames, 1, 1).float()
    mask = torch.zeros(frames, h, w, device=device)
    for py, px in points:
        d2 = (yy - (py + vy * t)) ** 2 + (xx - (px + vx * t)) ** 2
        mask = torch.maximum(mask, (d2 <= radius ** 2).float())
    return mask


def _inpaint(clip: torch.Tensor, g: torch.Generator, *, hole_weight: float = 2.0) -> TaskPair:
    if not hole_weight > 0:
        raise ValueError(f"hole_weight must be > 0, got {hole_weight!r}")
    _, frames, h, w = clip.shape
    shape_maker = _box_mask if _uniform(g, 0, 1) < 0.5 else _stroke_mask
    moving = _uniform(g, 0, 1) < 0.5
    mask = shape_maker(g, frames, h, w, moving, clip.device).unsqueeze(0).to(clip.dtype)  # (1, F, H, W)
    condition = clip * (1 - mask)
    weights = 1 + (hole_weight - 1) * mask
    return TaskPair(condition=condition, target=clip, extra=mask, loss_weights=weights)


# ---------------------------------------------------------------------------
# enhance
# ---------------------------------------------------------------------------

def _smooth_field(g, h, w, device, cells: int = 4) -> torch.Tensor:
    """A smooth random field in [0, 1] of shape (1, 1, H, W): bicubic upsampling of a coarse grid."""
    coarse = torch.rand(1, 1, cells, cells, generator=g).to(device)
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True).clamp(0, 1)


def _enhance(clip: torch.Tensor, g: torch.Generator) -> TaskPair:
    _, frames, h, w = clip.shape
    s = min(h, w)
    device = clip.device
    images = _frames_first(clip.float())  # (F, 3, H, W)
    # spatially varying blur
    blurred = _gaussian_blur(images, _uniform(g, 1.0, 2.5) * s / 64)
    blend = _smooth_field(g, h, w, device) * _uniform(g, 0.5, 1.0)
    out = images * (1 - blend) + blurred * blend
    # ghosting: a faint copy shifted by a few pixels
    dy, dx = int(round(_uniform(g, -0.06, 0.06) * s)), int(round(_uniform(g, -0.06, 0.06) * s))
    ghost = _uniform(g, 0.1, 0.25)
    out = out * (1 - ghost) + torch.roll(images, shifts=(dy, dx), dims=(-2, -1)) * ghost
    # floaters: soft semi-transparent blobs drifting together with one velocity
    yy = torch.arange(h, device=device).view(1, h, 1).float()
    xx = torch.arange(w, device=device).view(1, 1, w).float()
    t = torch.arange(frames, device=device).view(frames, 1, 1).float()
    drift_y, drift_x = _uniform(g, -1.0, 1.0) * s / 64, _uniform(g, -1.0, 1.0) * s / 64
    for _ in range(int(round(_uniform(g, 2, 5)))):
        cy, cx = _uniform(g, 0, h), _uniform(g, 0, w)
        radius = s * _uniform(g, 0.05, 0.15)
        opacity = _uniform(g, 0.2, 0.5)
        colour = torch.rand(3, generator=g).to(device).view(1, 3, 1, 1) * 2 - 1
        d2 = (yy - torch.remainder(cy + drift_y * t, h)) ** 2 + (xx - torch.remainder(cx + drift_x * t, w)) ** 2
        alpha = (opacity * torch.exp(-d2 / (2 * radius ** 2))).unsqueeze(1)  # (F, 1, H, W)
        out = out * (1 - alpha) + colour * alpha
    # exposure and colour shift, then flicker
    gain = _uniform(g, 0.8, 1.2)
    offset = (torch.rand(3, generator=g) * 0.2 - 0.1).to(device).view(1, 3, 1, 1)
    flicker = (1 + (torch.rand(frames, generator=g) * 2 - 1) * _uniform(g, 0.0, 0.06)).to(device).view(frames, 1, 1, 1)
    out = ((out + 1) / 2 * gain * flicker + offset) * 2 - 1
    return TaskPair(condition=_frames_first(out.clamp(-1, 1)).to(clip.dtype).contiguous(), target=clip)


# ---------------------------------------------------------------------------
# driving
# ---------------------------------------------------------------------------

def _sobel_edges(clip: torch.Tensor) -> torch.Tensor:
    """Edge magnitude of the luma, (3, F, H, W) in [-1, 1] (grey), normalised per clip."""
    rgb = (clip.float() + 1) / 2
    luma = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]).unsqueeze(1)  # (F, 1, H, W)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=clip.device)
    padded = F.pad(luma, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, kx.view(1, 1, 3, 3))
    gy = F.conv2d(padded, kx.t().reshape(1, 1, 3, 3))
    magnitude = torch.sqrt(gx ** 2 + gy ** 2)
    peak = magnitude.max()
    edges = magnitude / peak if peak > 0 else magnitude
    return (edges * 2 - 1).transpose(0, 1).expand(3, -1, -1, -1)


def _semantic_map(labels: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """Object labels (1, F, H, W) -> a fixed colour per label, (3, F, H, W) in [-1, 1]."""
    if labels.dim() != 4 or labels.shape[0] != 1 or labels.shape[1:] != clip.shape[1:]:
        raise ValueError(f"layout must be a (1, F, H, W) label map matching the clip {tuple(clip.shape[1:])}, "
                         f"got {tuple(labels.shape)}")
    labels = labels.long()
    # Colours from the golden-ratio hue sequence: distinct for neighbouring labels, the same on every run.
    hues = torch.remainder(torch.arange(int(labels.max()) + 1, dtype=torch.float32) * 0.618034, 1.0)
    palette = torch.stack([torch.cos(2 * math.pi * (hues + k / 3)) for k in range(3)], dim=0)  # (3, L)
    palette[:, 0] = -1.0  # background black
    return palette.to(clip.device)[:, labels[0]].to(clip.dtype)


def _driving(clip: torch.Tensor, g: torch.Generator, *, layout: Optional[torch.Tensor] = None) -> TaskPair:
    control = _semantic_map(layout, clip) if layout is not None else _sobel_edges(clip).to(clip.dtype)
    return TaskPair(condition=control.contiguous(), target=clip, extra=clip[:, :1].clone())


TASKS: dict[str, Task] = {
    "vsr": Task("vsr", _vsr, extra="none", spatial_multiple=VSR_FACTOR),
    "inpaint": Task("inpaint", _inpaint, extra="mask"),
    "enhance": Task("enhance", _enhance, extra="none"),
    "driving": Task("driving", _driving, extra="first_frame"),
}


def get_task(name: str) -> Task:
    """The task called ``name``; a clear error lists the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks are {', '.join(TASKS)}")
    return TASKS[name]
