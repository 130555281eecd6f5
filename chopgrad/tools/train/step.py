"""One training step of a task recipe: encode, predict latents, latent + pixel loss through chopgrad.

The model sees the condition latents plus the task's extra input at latent
resolution (see chopgrad.data.tasks): the hole mask pooled to the latent grid
(inpaint), or the latents of the first clean frame repeated over time
(driving). Its loss is ``latent_weight * MSE(latents, target latents)`` plus
``pixel_weight`` times a pixel loss of the decoded video, whose gradient
reaches the model through the latents (and the decoder, when it is trained
too). With a video loss (a whole-clip critic, see ``make_video_critic``) it adds
``video_weight * critic(decoded clip)``. The pixel and video terms are computed by one of three methods:

- ``"chopgrad"``: ``pixel_loss(vae, latents, target, ...)`` and ``critic(decode(vae, latents, ...))``, truncated
  backprop at ``d_trunc`` with ``schedule``;
- ``"full"``: the same losses on the model's own ``vae.decode`` (one decode for both), with plain autograd
  through the whole decode (the exact gradient, at memory linear in the frame count);
- ``"latent"``: no pixel term (the latent-only loss), and no video loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from chopgrad.api import decode, pixel_loss
from chopgrad.data.tasks import Task, TaskPair
from chopgrad.kernels import fused_ssim
from chopgrad.losses import ELEMENTWISE_LOSSES, LossSpec, resolve_loss

from ..bench.workloads import temporal_factor
from .model import resolve_factory

METHODS = ("chopgrad", "full", "latent")


def encode(vae, video: torch.Tensor) -> torch.Tensor:
    """Deterministic latents (the posterior mode) of a (B, 3, F, H, W) video, without a graph."""
    with torch.no_grad():
        return vae.encode(video).latent_dist.mode()


def pixel_frames_of_latent_frames(latent_frames: int, temporal_factor: int) -> list[slice]:
    """Pixel frames each latent frame stands for in a causal video VAE: frame 0 alone, then groups of the factor."""
    return [slice(0, 1)] + [slice(1 + temporal_factor * (j - 1), 1 + temporal_factor * j)
                            for j in range(1, latent_frames)]


def mask_at_latent_resolution(mask: torch.Tensor, latent_shape: tuple, temporal_factor: int) -> torch.Tensor:
    """(B, 1, F, H, W) pixel mask -> (B, 1, T, h, w): the hole fraction of the pixels each latent stands for.

    `temporal_factor` pixel frames make one latent frame: frame 0 alone first when F = 1 + factor (T - 1) (the
    causal layout), groups from frame 0 when F = factor T (CogVideoX's encoder on such clips).
    """
    b, _, t, h, w = latent_shape
    frames = mask.shape[2]
    if frames == temporal_factor * t:
        slices = [slice(temporal_factor * j, temporal_factor * (j + 1)) for j in range(t)]
    elif frames == 1 + temporal_factor * (t - 1):
        slices = pixel_frames_of_latent_frames(t, temporal_factor)
    else:
        raise ValueError(f"a mask of {frames} frames does not map onto {t} latent frames of {temporal_factor} frames")
    groups = [mask[:, :, s].mean(dim=2) for s in slices]
    per_latent_frame = torch.stack(groups, dim=2)  # (B, 1, T, H, W)
    return F.adaptive_avg_pool3d(per_latent_frame, (t, h, w))


@dataclass
class Batch:
    """A batch of task pairs, stacked: every video (B, C, F, H, W)."""

    condition: torch.Tensor
    target: torch.Tensor
    extra: Optional[torch.Tensor] = None
    loss_weights: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, pairs: list[TaskPair], device=None) -> "Batch":
        def stack(name):
            values = [getattr(p, name) for p in pairs]
            return None if values[0] is None else torch.stack(values).to(device)

        return cls(stack("condition"), stack("target"), stack("extra"), stack("loss_weights"))


def model_inputs(task: Task, vae, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(model inputs, target latents) of a batch: condition latents plus the task's extra channels."""
    condition = encode(vae, batch.condition)
    target_latents = encode(vae, batch.target)
    if task.extra == "mask":
        inputs = torch.cat([condition, mask_at_latent_resolution(batch.extra, condition.shape, temporal_factor(vae))],
                           dim=1)
    elif task.extra == "first_frame":
        first = encode(vae, batch.extra).expand(-1, -1, condition.shape[2], -1, -1)
        inputs = torch.cat([condition, first], dim=1)
    else:
        inputs = condition
    return inputs, target_latents


def extra_channels(task: Task, z_dim: int) -> int:
    """Channels the model sees beyond the z_dim condition latents."""
    return {"none": 0, "mask": 1, "first_frame": z_dim}[task.extra]


class VideoCritic:
    """The whole-clip loss of ``--video-loss``: (B, 3, F, H, W) clips in [-1, 1] -> a scalar tensor.

    Every value is checked: a one-element tensor that, while the clip carries a gradient, has a graph back to
    it. A value without one would add to the reported loss and nothing to the gradient, so the run would train
    without the term and not say so.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], spec: str):
        self.fn, self.spec = fn, spec

    def to(self, device) -> "VideoCritic":
        """Moves a module critic to `device` in fp32, the trainer's weight dtype (--dtype bf16 autocasts it)."""
        if isinstance(self.fn, nn.Module):
            self.fn.to(device=device, dtype=torch.float32)
        return self

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        value = self.fn(video)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            shape = f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else ""
            raise ValueError(f"--video-loss {self.spec}: the callable must return a scalar tensor (reduce over the "
                             f"clips, e.g. with .mean()), got {type(value).__name__}{shape}")
        if video.requires_grad and not value.requires_grad:
            raise ValueError(f"--video-loss {self.spec}: the callable returned a value with no graph "
                             f"(requires_grad=False), so it would add nothing to the gradient: compute it from the "
                             f"clip with differentiable torch ops (no torch.no_grad(), .detach(), .item() or numpy "
                             f"round trip)")
        return value.reshape(()).float()


def make_video_critic(spec: str, seed: int = 0) -> VideoCritic:
    """`spec`'s ``function()``, frozen: a module's parameters stop requiring grad and it is put in eval mode.

    ``function()`` runs with torch's CPU generator seeded by `seed` and leaves the global random state as it was,
    so a randomly initialized critic is the same on every run with that seed (and on --resume) and the model's
    initialization does not depend on whether there is a critic. ValueError names --video-loss if `spec` does
    not resolve or ``function()`` returns no callable.
    """
    factory = resolve_factory(spec, "--video-loss")
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        try:
            fn = factory()
        except Exception as exc:  # the user's code: one line naming the option, not a traceback
            raise ValueError(f"--video-loss {spec}: calling it as function() failed: {type(exc).__name__}: "
                             f"{exc}") from None
    if not callable(fn):
        raise ValueError(f"--video-loss {spec}: function() must return a callable on (B, 3, F, H, W) clips, got "
                         f"{type(fn).__name__}")
    if isinstance(fn, nn.Module):
        fn.eval().requires_grad_(False)
    return VideoCritic(fn, spec)


@dataclass
class LossSettings:
    """What the loss of a step is made of (the pixel terms go to chopgrad.pixel_loss as they are).

    method: how the pixel and video terms are computed (see the module docstring); "latent" has neither.
    video_loss: a whole-clip loss of the decoded clip (a VideoCritic, or any callable clip -> scalar), weighted
        by video_weight; None: no video term.
    """

    latent_weight: float = 1.0
    pixel_loss: LossSpec = field(default_factory=lambda: {"mse": 1.0})
    pixel_weight: float = 1.0
    d_trunc: Optional[int] = 1
    schedule: str = "sliding"
    method: str = "chopgrad"
    video_loss: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    video_weight: float = 1.0
    #: what the trained model is, for errors about what it returns
    model_name: str = "the model"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("latent_weight", "pixel_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        resolve_loss(self.pixel_loss)  # a bad loss spec fails here, not at the first step
        if self.video_loss is not None:
            if not callable(self.video_loss):
                raise ValueError(f"video_loss must be a callable clip -> scalar, got {type(self.video_loss).__name__}")
            if self.method == "latent":
                raise ValueError("video_loss: method 'latent' decodes no video for it to score; use 'chopgrad' or "
                                 "'full'")
            w = self.video_weight
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not (w > 0 and math.isfinite(w)):
                raise ValueError(f"video_weight must be a finite number > 0, got {w!r}")

    @property
    def has_pixel_term(self) -> bool:
        return self.method != "latent" and self.pixel_weight > 0


def full_decode_pixel_loss(vae, latents: torch.Tensor, target: torch.Tensor, loss: LossSpec = "mse",
                           mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``pixel_loss(..., reduction="mean")``'s loss, computed on the model's own ``vae.decode(latents).sample``.

    Plain autograd through the whole decode: the exact gradient, with the activations of every decoder step
    alive until backward. See ``pixel_loss_of_video`` for how the terms are computed.
    """
    return pixel_loss_of_video(vae.decode(latents).sample, target, loss, mask)


def pixel_loss_of_video(video: torch.Tensor, target: torch.Tensor, loss: LossSpec = "mse",
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``pixel_loss(..., reduction="mean")``'s loss of a decoded (B, C, F, H, W) video, by plain autograd.

    Elementwise terms are means over the (mask-weighted) elements, "ssim" is 1 - SSIM averaged over frames, and a
    callable sees the whole clip, as ``pixel_loss`` hands it to a callable that is a mean over frames. As in
    ``pixel_loss``, the mask's weights scale the elementwise terms only; for a callable the mask selects pixels: it
    sees the prediction where ``mask != 0`` and the target where ``mask == 0``.
    """
    pred = video.float()
    target = target.to(pred.device, torch.float32)
    total = torch.zeros((), device=pred.device, dtype=torch.float32)
    terms = resolve_loss(loss)
    weights = {t.name: t.weight for t in terms if t.elementwise}
    if weights:
        per_element = sum(w * ELEMENTWISE_LOSSES[name](pred, target) for name, w in weights.items())
        if mask is None:
            total = total + per_element.mean()
        else:
            m = mask.to(pred.device, torch.float32).expand_as(pred)
            denominator = float(m.sum())
            total = total + (per_element * m).sum() / (denominator if denominator > 0 else 1.0)
    ssim_weight = sum(t.weight for t in terms if t.is_ssim)
    if ssim_weight:
        if mask is not None:
            raise ValueError("mask is not supported with the 'ssim' loss (SSIM windows straddle masked pixels)")
        total = total + ssim_weight * (1.0 - fused_ssim(pred, target, reduction="mean"))
    callables = [t for t in terms if t.is_callable]
    if callables:
        seen = pred if mask is None else torch.where(mask.to(pred.device) != 0, pred, target)
        for term in callables:
            total = total + term.weight * term.call(seen, target).float()
    return total


def predicted_latents(model, task: Task, vae, batch: Batch, model_name: str = "the model"):
    """(the model's latents, the target latents) of a batch; ValueError naming the model if their shapes differ."""
    inputs, target_latents = model_inputs(task, vae, batch)
    latents = model(inputs)
    if not isinstance(latents, torch.Tensor) or latents.shape != target_latents.shape:
        raise ValueError(f"{model_name} returns latents of shape {tuple(getattr(latents, 'shape', ()))}, but the "
                         f"VAE's latents of this task's clips have shape {tuple(target_latents.shape)}")
    return latents, target_latents


def training_loss(model, vae, task: Task, batch: Batch, settings: LossSettings) -> tuple[torch.Tensor, dict]:
    """The step's loss (with its graph) and its parts as floats (each term unweighted)."""
    latents, target_latents = predicted_latents(model, task, vae, batch, settings.model_name)
    latent_term = F.mse_loss(latents.float(), target_latents.float())
    total = settings.latent_weight * latent_term
    parts = {"latent_mse": float(latent_term.detach())}
    has_video_term = settings.video_loss is not None
    # full backprop decodes once for both terms: a second decode would hold a second set of activations
    decoded = (vae.decode(latents).sample if settings.method == "full" and (settings.has_pixel_term or has_video_term)
               else None)
    if settings.has_pixel_term:
        if settings.method == "full":
            pixel_term = pixel_loss_of_video(decoded, batch.target, settings.pixel_loss, batch.loss_weights)
        else:
            pixel_term = pixel_loss(vae, latents, batch.target, loss=settings.pixel_loss, d_trunc=settings.d_trunc,
                                    schedule=settings.schedule, mask=batch.loss_weights)
        total = total + settings.pixel_weight * pixel_term
        parts["pixel"] = float(pixel_term.detach())
    if has_video_term:
        if decoded is None:
            decoded = decode(vae, latents, d_trunc=settings.d_trunc, schedule=settings.schedule)
        video_term = settings.video_loss(decoded.float())
        total = total + settings.video_weight * video_term
        parts["video"] = float(video_term.detach())
    return total, parts
