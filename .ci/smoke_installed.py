"""Checks an installed chopgrad from outside the source tree: chopgrad and chopgrad._C come from
the running venv (the fused kernels as chopgrad.kernels too), and one truncated pixel-loss step on the shipped default model runs through the
C++ engine with a finite, non-zero latent gradient."""
import sys
from pathlib import Path

import torch

import chopgrad
import chopgrad._C
import chopgrad.kernels
from chopgrad.models import default_vae

prefix = Path(sys.prefix).resolve()
for module in (chopgrad, chopgrad._C, chopgrad.kernels):
    path = Path(module.__file__).resolve()
    if prefix not in path.parents:
        sys.exit(f"{module.__name__} was imported from {path}, not from the venv {prefix}")

torch.manual_seed(0)
vae = default_vae()
latents = torch.randn(1, vae.config.z_dim, 3, 4, 4)
with torch.no_grad():
    target = vae.decode(latents).sample + 0.1
latents.requires_grad_(True)
loss = chopgrad.pixel_loss(vae, latents, target, loss="mse", d_trunc=1)
loss.backward()
if not (torch.isfinite(latents.grad).all() and latents.grad.abs().sum() > 0):
    sys.exit("the latent gradient of the pixel loss is not finite and non-zero")
print(f"installed chopgrad works: torch {torch.__version__}, loss {loss.item():.4f}, engine {chopgrad._C.__file__}")
