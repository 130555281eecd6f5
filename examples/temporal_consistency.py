"""A temporal-consistency loss on the whole decoded video, trained through `chopgrad.decode`.

A small latent-space model (a residual 1x1x1 convolution, standing in for a diffusion model or a one-step
generator) refines noisy latents of a clip. Its loss is taken on the decoded video: the MSE to the clean clip
plus the MSE of the frame differences `video[t+1] - video[t]` against the clip's, which penalises flicker.
A frame difference across two decoder steps couples their frames, so this loss is not a sum of per-step terms
and `pixel_loss` cannot take it; `chopgrad.decode` returns the video inside the autograd graph, and the
backward of any loss on it delivers the truncated gradient (the cotangent of decoder step g's frames flows
back through steps g-d_trunc .. g).

    python examples/temporal_consistency.py [--steps 8] [--frames 17] [--size 32]

Runs in seconds on a CPU with the built-in default model.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import chopgrad
from chopgrad.data import make_video
from chopgrad.models import default_vae


def temporal_loss(video: torch.Tensor, target: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """MSE to the target plus `weight` x the MSE of the frame differences against the target's."""
    return F.mse_loss(video, target) + weight * F.mse_loss(video.diff(dim=2), target.diff(dim=2))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--frames", type=int, default=17, help="1 + 4k")
    parser.add_argument("--size", type=int, default=32, help="a multiple of 8")
    parser.add_argument("--d-trunc", type=int, default=1)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    vae = default_vae().requires_grad_(False)  # frozen decoder; the model upstream of it trains
    clip = make_video(0, args.frames, args.size, args.size)[None]  # (1, 3, F, H, W) in [-1, 1]
    with torch.no_grad():
        clean = vae.encode(clip).latent_dist.mode()
    noisy = clean + 0.5 * torch.randn_like(clean)

    model = torch.nn.Conv3d(clean.shape[1], clean.shape[1], 1)  # latents -> latents, a residual refiner
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    # The truncated gradient next to the exact one (d_trunc=None), for the model's parameters.
    def parameter_grad(d_trunc):
        model.zero_grad()
        temporal_loss(chopgrad.decode(vae, noisy + model(noisy), d_trunc=d_trunc), clip).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    exact, truncated = parameter_grad(None), parameter_grad(args.d_trunc)
    cosine = float(F.cosine_similarity(exact, truncated, dim=0))
    print(f"d_trunc={args.d_trunc}: cosine of the truncated to the exact parameter gradient {cosine:.4f}")

    losses = []
    for step in range(args.steps):
        video = chopgrad.decode(vae, noisy + model(noisy), d_trunc=args.d_trunc)  # (1, 3, F, H, W), with a graph
        loss = temporal_loss(video, clip)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        print(f"step {step}: loss {losses[-1]:.5f}")
    return {"losses": losses, "cosine": cosine}


if __name__ == "__main__":
    main()
