"""One training step (decode + loss + backward to the latents) by each method.

Pixel MSE against the target:

- "full": plain autograd through the model's own `vae.decode`.
- "checkpoint": correct per-step activation checkpointing. A naive
  `torch.utils.checkpoint` around a Wan decoder step breaks because the step
  mutates its cache list and counter, so recomputation sees another state;
  here the state is an explicit input and output of the checkpointed
  function (chopgrad's pure adapter step), so recomputation is exact.
- "pixel_loss": chopgrad's truncated backprop (schedule, d_trunc), on the fused decoder ops unless lean=False,
  optionally with a spatially tiled backward (tile, tile_grad, tile_halo).

A whole-video loss (`video_loss`: MSE plus a temporal-consistency term on frame differences, which couples
frames of different decoder steps and so cannot be written as per-step terms):

- "decode": `chopgrad.decode` (schedule, d_trunc, lean, tiling as for "pixel_loss") and the loss on its video;
- "full_video": plain autograd through the model's own `vae.decode` and the same loss.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from chopgrad.adapters import wrap
from chopgrad.api import decode, pixel_loss

from ..metrics import squared_errors_per_step


#: the methods that run chopgrad (lean by default); the others are baselines that run the model as it is
CHOPGRAD_METHODS = ("pixel_loss", "decode")
#: the methods whose loss is `video_loss` rather than pixel MSE
VIDEO_LOSS_METHODS = ("decode", "full_video")
#: weight of the temporal-consistency term of `video_loss`
TEMPORAL_WEIGHT = 1.0


def video_loss(video: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE to the target plus TEMPORAL_WEIGHT x the MSE of the frame differences (video[t+1] - video[t])
    against the target's: a loss on the whole video, in fp32."""
    video, target = video.float(), target.float()
    loss = F.mse_loss(video, target)
    if video.shape[2] > 1:
        loss = loss + TEMPORAL_WEIGHT * F.mse_loss(video.diff(dim=2), target.diff(dim=2))
    return loss


def full_backprop_loss(vae, latents: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(vae.decode(latents).sample.float(), target.float())


def full_backprop_video_loss(vae, latents: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return video_loss(vae.decode(latents).sample, target)


def checkpointed_loss(vae_or_adapter, latents: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Exact loss and gradient; stores only each step's inputs (latent group + state)."""
    adapter = wrap(vae_or_adapter)

    def checkpointed_step(g, z, state):
        # checkpoint() takes tensors only: empty state slots are left out and put back by position.
        present = [s is not None for s in state]
        next_layout: list = []

        def run(z, *tensors):
            slots = iter(tensors)
            frames, nxt = adapter.step(g, z, [next(slots) if p else None for p in present])
            next_layout[:] = [t is not None for t in nxt]
            return (adapter.clamp(frames), *[t for t in nxt if t is not None])

        outputs = checkpoint(run, z, *[s for s in state if s is not None], use_reentrant=False)
        slots = iter(outputs[1:])
        return outputs[0], [next(slots) if p else None for p in next_layout]

    errors = squared_errors_per_step(adapter.plan(latents), latents, target, checkpointed_step,
                                     adapter.initial_state())
    return sum(errors, latents.new_zeros((), dtype=torch.float32)) / target.numel()


def loss_fn(method: str, d_trunc: Optional[int] = None, schedule: str = "sliding", lean: bool = True,
            tile: Optional[int] = None, tile_grad: str = "exact", tile_halo: Optional[int] = None) -> Callable:
    """The step's loss; `lean` and the tiling arguments are pixel_loss's (the baselines run the model as it is)."""
    if method == "full":
        return full_backprop_loss
    if method == "full_video":
        return full_backprop_video_loss
    if method == "checkpoint":
        return checkpointed_loss
    tiling = {} if tile is None else dict(tile=tile, tile_grad=tile_grad, tile_halo=tile_halo)
    if method == "pixel_loss":
        return lambda vae, z, target: pixel_loss(vae, z, target, loss="mse", d_trunc=d_trunc, schedule=schedule,
                                                 lean=lean, **tiling)
    if method == "decode":
        return lambda vae, z, target: video_loss(decode(vae, z, d_trunc=d_trunc, schedule=schedule, lean=lean,
                                                        **tiling), target)
    raise ValueError(f"method must be 'full', 'checkpoint', 'pixel_loss', 'decode' or 'full_video', got {method!r}")


def method_label(method: str, d_trunc: Optional[int] = None, schedule: str = "sliding", lean: bool = True,
                 tile: Optional[int] = None, tile_grad: str = "exact", tile_halo: Optional[int] = None) -> str:
    if method in CHOPGRAD_METHODS:
        label = ("chopgrad " if method == "pixel_loss" else "chopgrad decode ") + f"{schedule} d={d_trunc}"
        label += "" if lean else " unfused"
        if tile is not None:
            label += f" tile {tile} {tile_grad}" + (f" halo {tile_halo}" if tile_grad == "truncated" else "")
        return label + (" + video loss" if method == "decode" else "")
    return {"full": "full backprop", "checkpoint": "checkpointed (per step)",
            "full_video": "full backprop + video loss"}[method]
