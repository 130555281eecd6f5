"""The public API: `pixel_loss` (truncated backprop through the decoder) and `decode`."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from . import _ext
from .adapters import DecodePlan, DecoderAdapter, wrap
from .frames import FrameInput, FrameSource, optional_source
from .losses import LossSpec, resolve_loss
from .video_loss import VideoLoss

SCHEDULES = ("sliding", "chunked")
REDUCTIONS = ("mean", "sum")


def _check_d_trunc(d_trunc) -> int:
    if d_trunc is None:
        return -1
    if isinstance(d_trunc, bool) or not isinstance(d_trunc, int):
        raise TypeError(f"d_trunc must be a non-negative int or None (no truncation), got {d_trunc!r}")
    if d_trunc < 0:
        raise ValueError(f"d_trunc must be >= 0 or None (no truncation), got {d_trunc}")
    return d_trunc


def _supervised_steps(groups: Optional[Iterable[int]], num_steps: int) -> list[bool]:
    if groups is None:
        return [True] * num_steps
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Iterable):
        raise TypeError(f"groups must be an iterable of decoder step indices or None, got {type(groups).__name__}")
    chosen = list(groups)
    if not chosen:
        raise ValueError("groups must name at least one decoder step (or be None for all)")
    for g in chosen:
        if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < num_steps:
            raise ValueError(f"groups: every entry must be a decoder step index in [0, {num_steps}), got {g!r}")
    mask = [False] * num_steps
    for g in chosen:
        mask[g] = True
    return mask


def _prepare(vae_or_decoder, latents) -> tuple[DecoderAdapter, DecodePlan]:
    adapter = wrap(vae_or_decoder)
    return adapter, adapter.plan(latents)


def _checked_step(adapter: DecoderAdapter, plan: DecodePlan) -> Callable:
    def step(index: int, latent_group: torch.Tensor, state: list):
        frames, next_state = adapter.step(index, latent_group, state)
        b, c, _, h, w = plan.video_shape
        expected = (b, c, plan.frames_per_step[index], h, w)
        if tuple(frames.shape) != expected:
            raise RuntimeError(f"decoder step {index} returned frames of shape {tuple(frames.shape)}, "
                               f"but the adapter's plan expects {expected}")
        return frames, next_state

    return step


def pixel_loss(
    vae_or_decoder,
    latents: torch.Tensor,
    target: FrameInput,
    *,
    loss: LossSpec = "mse",
    d_trunc: Optional[int] = 1,
    schedule: str = "sliding",
    mask: Optional[FrameInput] = None,
    reduction: str = "mean",
    groups: Optional[Iterable[int]] = None,
    clamp: bool = True,
) -> torch.Tensor:
    """Pixel-space loss of the decoded video with a truncated gradient through the decoder cache.

    Returns a 0-dim float32 tensor equal to `loss(vae.decode(latents).sample, target)`
    (over the supervised frames). Its backward delivers the gradient of
    DESIGN.md section 2 to `latents` (so to whatever produced them) and to
    every decoder parameter with requires_grad: the loss of decoder step g
    reaches steps g-d_trunc .. g only. `d_trunc=None` gives the exact gradient.

    Args:
        vae_or_decoder: a diffusers AutoencoderKLWan / AutoencoderKLCogVideoX, or an adapter.
        latents: (B, z_dim, T, h, w) latents.
        target: the (B, C, F, H, W) target video on any device, or a callable
            `frame_slice -> (B, C, f, H, W) tensor` (streaming).
        loss: "mse", "l1", "charbonnier", "huber", "ssim" (1 - SSIM), a callable
            (pred, target) -> scalar applied per decoder step to (B, C, f, H, W)
            frames, or a dict {name_or_callable: weight}. Named losses run
            through chopgrad.kernels' fused value-and-grad ops.
        d_trunc: truncation distance in decoder steps (>= 0), or None for none.
        schedule: "sliding" (exact truncated gradient, (d_trunc+1)x compute) or
            "chunked" (1x compute, truncation distance 0..d_trunc).
        mask: optional (B, 1 or C, F, H, W) weights (tensor or callable like target).
        reduction: "mean" (over supervised elements, or the mask sum) or "sum".
        groups: decoder step indices to supervise (None: all). Decoding stops
            after the last supervised step; unsupervised steps only advance the state.
        clamp: apply the model's own output clamp (and its zero gradient where saturated).
    """
    d = _check_d_trunc(d_trunc)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(clamp, bool):
        raise TypeError(f"clamp must be a bool, got {clamp!r}")
    terms = resolve_loss(loss)
    adapter, plan = _prepare(vae_or_decoder, latents)
    supervised = _supervised_steps(groups, plan.num_steps)
    target_source = FrameSource(target, "target", plan.video_shape)
    mask_source = optional_source(mask, "mask", plan.video_shape, allow_single_channel=True)
    video_loss = VideoLoss(adapter, plan, terms, target_source, mask_source, reduction, clamp, supervised)
    engine = _ext.load_extension().Engine(
        _checked_step(adapter, plan), video_loss, list(plan.group_bounds), supervised, d, schedule,
        adapter.initial_state(), 2)
    if torch.is_grad_enabled():
        return engine.loss(latents, adapter.parameters())
    return engine.evaluate(latents)


def decode(
    vae_or_decoder,
    latents: torch.Tensor,
    *,
    clamp: bool = True,
    callback: Optional[Callable[[slice, torch.Tensor], None]] = None,
) -> Optional[torch.Tensor]:
    """Decodes `latents` step by step without building a graph; equals the model's own decode.

    Memory holds one step's activations and one state. Without `callback` the
    frames are written into one preallocated (B, C, F, H, W) video that is
    returned; with `callback(frame_slice, frames)` each step's frames are
    handed over as they are made and nothing is returned (streaming).
    """
    adapter, plan = _prepare(vae_or_decoder, latents)
    step = _checked_step(adapter, plan)
    video = None
    with torch.no_grad():
        state = adapter.initial_state()
        for g in range(plan.num_steps):
            z = latents[:, :, plan.group_bounds[g]:plan.group_bounds[g + 1]]
            frames, state = step(g, z, state)
            if clamp:
                frames = adapter.clamp(frames)
            if callback is not None:
                callback(plan.frame_slice(g), frames)
                continue
            if video is None:
                video = torch.empty(plan.video_shape, device=frames.device, dtype=frames.dtype)
            video[:, :, plan.frame_slice(g)] = frames
    return video
