"""One training step of a task recipe: encode, predict latents, latent + pixel loss through chopgrad.

The model sees the condition latents plus the task's extra input at latent
resolution (see chopgrad.data.tasks): the hole mask pooled to the latent grid
(inpaint), or the latents of the first clean frame repeated over time
(driving). Its loss is ``latent_weight * MSE(latents, target latents)`` plus
``pixel_loss(vae, latents, target, ...)``, whose gradient reaches the model
through the latents (and the decoder, when it is trained too).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from chopgrad.api import pixel_loss
from chopgrad.data.tasks import Task, TaskPair


def encode(vae, video: torch.Tensor) -> torch.Tensor:
    """Deterministic latents (the posterior mode) of a (B, 3, F, H, W) video, without a graph."""
    with torch.no_grad():
        return vae.encode(video).latent_dist.mode()


def pixel_frames_of_latent_frames(latent_frames: int, temporal_factor: int) -> list[slice]:
    """Pixel frames each latent frame stands for in a causal video VAE: frame 0 alone, then groups of the factor."""
    return [slice(0, 1)] + [slice(1 + temporal_factor * (j - 1), 1 + temporal_factor * j)
                            for j in range(1, latent_frames)]


def mask_at_latent_resolution(mask: torch.Tensor, latent_shape: tuple) -> torch.Tensor:
    """(B, 1, F, H, W) pixel mask -> (B, 1, T, h, w): the hole fraction of the pixels each latent stands for."""
    b, _, t, h, w = latent_shape
    frames = mask.shape[2]
    temporal_factor = (frames - 1) // max(t - 1, 1) if t > 1 else 1
    groups = [mask[:, :, s].mean(dim=2) for s in pixel_frames_of_latent_frames(t, temporal_factor)]
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
        inputs = torch.cat([condition, mask_at_latent_resolution(batch.extra, condition.shape)], dim=1)
    elif task.extra == "first_frame":
        first = encode(vae, batch.extra).expand(-1, -1, condition.shape[2], -1, -1)
        inputs = torch.cat([condition, first], dim=1)
    else:
        inputs = condition
    return inputs, target_latents


def extra_channels(task: Task, z_dim: int) -> int:
    """Channels the model sees beyond the z_dim condition latents."""
    return {"none": 0, "mask": 1, "first_frame": z_dim}[task.extra]


@dataclass
class LossSettings:
    """What the loss of a step is made of (the pixel terms go to chopgrad.pixel_loss as they are)."""

    latent_weight: float = 1.0
    pixel_loss: dict = field(default_factory=lambda: {"mse": 1.0})
    pixel_weight: float = 1.0
    d_trunc: Optional[int] = 1
    schedule: str = "sliding"


def training_loss(model, vae, task: Task, batch: Batch, settings: LossSettings) -> tuple[torch.Tensor, dict]:
    """The step's loss (with its graph) and its parts as floats."""
    inputs, target_latents = model_inputs(task, vae, batch)
    latents = model(inputs)
    latent_term = F.mse_loss(latents.float(), target_latents.float())
    total = settings.latent_weight * latent_term
    parts = {"latent_mse": float(latent_term.detach())}
    if settings.pixel_weight:
        pixel_term = pixel_loss(vae, latents, batch.target, loss=settings.pixel_loss, d_trunc=settings.d_trunc,
                                schedule=settings.schedule, mask=batch.loss_weights)
        total = total + settings.pixel_weight * pixel_term
        parts["pixel"] = float(pixel_term.detach())
    return total, parts
