"""How much PSNR a pixel loss can add over a latent loss through this decoder, with no model in the way.

For held-out clips of a task (the same clips `chopgrad train` evaluates on), the latents are optimised directly
with Adam, starting from the condition latents: once against the target latents (the latent loss; its optimum
decodes to decode(encode(target))) and once against the target video through the exact pixel MSE. The gap
between the two is the most any pixel-loss training can gain over latent-only training at this size on this
model; a trained model gets less.

    python benchmarks/latent_headroom.py [--tasks vsr enhance] [--frames 33] [--size 32] [--steps 60]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from chopgrad.api import decode, pixel_loss
from chopgrad.data.tasks import get_task
from chopgrad.tools.bench.workloads import load_model
from chopgrad.tools.metrics import psnr
from chopgrad.tools.train.data import task_datasets
from chopgrad.tools.train.step import Batch, encode


def optimised_psnr(vae, start, target_latents, target, kind: str, steps: int, lr: float) -> float:
    z = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        loss = F.mse_loss(z, target_latents) if kind == "latent" else pixel_loss(vae, z, target, d_trunc=None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return psnr(decode(vae, z), target)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["vsr", "enhance"])
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    vae = load_model("default").requires_grad_(False)
    print(f"default model, {args.clips} held-out clips of {args.frames} frames {args.size}x{args.size}, "
          f"{args.steps} Adam steps on the latents\n")
    print("| task | condition (dB) | decode(encode(target)) | latent loss optimum | pixel loss optimum | gap |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.tasks:
        _, held_out = task_datasets(get_task(name), data=None, frames=args.frames, height=args.size,
                                    width=args.size, frame_stride=1, seed=0, train_clips=1, eval_clips=args.clips,
                                    hole_weight=2.0)
        batch = Batch.of([held_out[j] for j in range(len(held_out))])
        start, target_latents = encode(vae, batch.condition), encode(vae, batch.target)
        with torch.no_grad():
            condition = psnr(decode(vae, start), batch.target)
            reconstruction = psnr(decode(vae, target_latents), batch.target)
        latent = optimised_psnr(vae, start, target_latents, batch.target, "latent", args.steps, args.lr)
        pixel = optimised_psnr(vae, start, target_latents, batch.target, "pixel", args.steps, args.lr)
        print(f"| {name} | {condition:.2f} | {reconstruction:.2f} | {latent:.2f} | {pixel:.2f} | "
              f"{pixel - latent:+.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
