"""Maximise a video critic's reward through `chopgrad.decode`.

A small 3D-convolutional network scores the whole decoded clip (a stand-in for a learned video reward model:
its receptive field spans frames of several decoder steps, so its score is no sum of per-step terms). The
latents are optimised to raise the score while a latent penalty keeps them near where they started. The
critic's gradient reaches the latents through `chopgrad.decode`'s truncated backward: the cotangent of decoder
step g's frames flows back through steps g-d_trunc .. g, with memory that does not grow with the frame count.

    python examples/video_critic.py [--steps 8] [--frames 17] [--size 32]

Runs in seconds on a CPU with the built-in default model.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import chopgrad
from chopgrad.data import make_video
from chopgrad.models import default_vae


class VideoCritic(torch.nn.Module):
    """(B, 3, F, H, W) video in [-1, 1] -> (B,) score: two 3D convs (the second strided in time) and a mean."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv1 = torch.nn.Conv3d(3, width, 3, padding=1)
        self.conv2 = torch.nn.Conv3d(width, width, 3, stride=(2, 2, 2), padding=1)
        self.head = torch.nn.Linear(width, 1)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv1(video))
        h = F.silu(self.conv2(h))
        return self.head(h.mean(dim=(2, 3, 4))).squeeze(-1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--frames", type=int, default=17, help="1 + 4k")
    parser.add_argument("--size", type=int, default=32, help="a multiple of 8")
    parser.add_argument("--d-trunc", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--keep-close", type=float, default=0.1, help="weight of the latent penalty")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    vae = default_vae().requires_grad_(False)
    critic = VideoCritic().eval().requires_grad_(False)  # a frozen reward model
    clip = make_video(1, args.frames, args.size, args.size)[None]
    with torch.no_grad():
        start = vae.encode(clip).latent_dist.mode()
    latents = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([latents], lr=args.lr)

    rewards = []
    for step in range(args.steps):
        video = chopgrad.decode(vae, latents, d_trunc=args.d_trunc)
        reward = critic(video).mean()
        loss = -reward + args.keep_close * (latents - start).square().mean()  # maximise the reward
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rewards.append(reward.item())
        print(f"step {step}: reward {rewards[-1]:.5f}")
    with torch.no_grad():
        final = float(critic(chopgrad.decode(vae, latents)).mean())
    print(f"reward {rewards[0]:.5f} -> {final:.5f}")
    return {"rewards": rewards, "final_reward": final}


if __name__ == "__main__":
    main()
