#!/usr/bin/env python
"""Reference PSNRs on the default VAE's held-out clips: how hard is the data?

Puts the default VAE's held-out PSNR (``train_default_vae.py --eval-only``)
next to simple codecs on the same clips (``make_video(10_000_000 + i, 17, 64,
64)``, i < ``--clips``; PSNR on the [-1, 1] range, as there):

* the clip's mean colour;
* per-frame average pooling by 2 / 4 / 8 and bilinear upsampling;
* a *linear* code of the VAE's own shape: PCA of 8x8-pixel x 4-frame x RGB
  patches (the 768 values one latent position of the VAE stands for), keeping
  k components per patch, fitted on ``--fit-clips`` training clips. k = 32 is
  the default VAE's latent size (``z_dim``), i.e. the same compression;
* with ``--latent-opt-steps N``: the shipped decoder fed the best latents
  Adam finds in N steps (lr 0.02, from the encoder's) for held-out clip 0, which
  tells whether the encoder or the decoder limits the VAE (needs diffusers).

The codecs use frames 1..16 (4 whole groups of 4 frames; Wan encodes frame 0
on its own); the VAE numbers use all 17 frames.

Usage::

    python scripts/psnr_references.py            # about 30 s on 2 CPU cores
    python scripts/psnr_references.py --latent-opt-steps 300   # + about 4 min
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# the same held-out clips, generator and PSNR as the training script's evaluation
from train_default_vae import HELDOUT_SEED0, REPO, psnr, syn  # noqa: E402

FIT_SEED0 = 900_000  # below the held-out range, like the training clips


def patches(clip: torch.Tensor, frames: int = 4, size: int = 8) -> torch.Tensor:
    """(3, T, H, W) -> (patches, 3 * frames * size * size), frames 1.. in whole groups."""
    c, t, h, w = clip.shape
    x = clip[:, 1 : 1 + (t - 1) // frames * frames, : h // size * size, : w // size * size]
    c, t, h, w = x.shape
    x = x.reshape(c, t // frames, frames, h // size, size, w // size, size)
    return x.permute(1, 3, 5, 0, 2, 4, 6).reshape(-1, c * frames * size * size)


def references(clips: int = 8, fit_clips: int = 200, components=(16, 32, 64, 128)) -> dict:
    held = [syn.make_video(HELDOUT_SEED0 + i, 17, 64, 64) for i in range(clips)]
    frames = [v[:, 1:17] for v in held]
    out = {"mean_colour": sum(psnr(v.mean(dim=(1, 2, 3), keepdim=True).expand_as(v), v) for v in frames) / clips}
    for k in (2, 4, 8):
        total = 0.0
        for v in frames:
            pooled = F.avg_pool2d(v.transpose(0, 1), k)
            up = F.interpolate(pooled, scale_factor=k, mode="bilinear", align_corners=False).transpose(0, 1)
            total += psnr(up.clamp(-1, 1), v)
        out[f"avg_pool_{k}x{k}"] = total / clips
    fit = torch.cat([patches(syn.make_video(FIT_SEED0 + i, 17, 64, 64)) for i in range(fit_clips)]).double()
    mean = fit.mean(0)
    basis = torch.linalg.svd(fit - mean, full_matrices=False).Vh
    test = [patches(v).double() for v in held]
    for n in components:
        b = basis[:n]
        out[f"pca_8x8x4_k{n}"] = sum(psnr(((p - mean) @ b.T @ b + mean).clamp(-1, 1), p) for p in test) / clips
    return {k: round(v, 2) for k, v in out.items()}


def decoder_with_optimised_latents(steps: int, lr: float = 0.02) -> dict:
    """PSNR of the default VAE on held-out clip 0 with the encoder's latents, and
    after ``steps`` Adam steps on the latents alone (decoder frozen)."""
    sys.path.insert(0, REPO)
    from chopgrad.models import default_vae

    vae = default_vae().requires_grad_(False)
    x = syn.make_video(HELDOUT_SEED0, 17, 64, 64).unsqueeze(0)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        start = psnr(vae.decode(z).sample, x)
    z = z.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        loss = F.mse_loss(vae.decode(z).sample, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = psnr(vae.decode(z).sample, x)
    return {"vae_clip0_encoder_latents": round(start, 2), f"vae_clip0_latents_optimised_{steps}_steps": round(end, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=8, help="held-out clips (17 frames, 64x64)")
    p.add_argument("--fit-clips", type=int, default=200, help="training clips the PCA is fitted on")
    p.add_argument("--latent-opt-steps", type=int, default=0, help="also fit clip 0's latents (see above)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = references(args.clips, args.fit_clips)
    if args.latent_opt_steps > 0:
        out.update(decoder_with_optimised_latents(args.latent_opt_steps))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
