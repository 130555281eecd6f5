"""Shipped models.

``default_vae()`` returns a small **trained** diffusers ``AutoencoderKLWan``
(Wan 2.1 architecture: causal 3D convolutions with a 2-frame cache, 4x temporal
and 8x spatial compression, mid-block spatial attention) with reduced widths:
``base_dim=16``, ``z_dim=32``, ``dim_mult=[1, 2, 2, 2]``, ``num_res_blocks=1``,
``temperal_downsample=[False, True, True]`` (see :data:`DEFAULT_VAE_CONFIG`).
Its weights (fp32 safetensors, about 3.5 MB) live next to this file and load
with no network access.

It exists so chopgrad's gradient probes and benchmarks run on a decoder with
the temporal locality of a *trained* Wan decoder (a random decoder's gradient
through the cache is not representative) while staying cheap on a CPU.

It was trained with ``scripts/train_default_vae.py`` on procedural clips
from :mod:`chopgrad.data.synthetic` (MSE on the reconstruction through the
posterior mode plus a small latent L2 penalty); the recipe and its runs are in
that script and in ``benchmarks/RESULTS.md`` ("Default model").

Held-out reconstruction PSNR (seeds >= 10_000_000, 8 clips) is 22.6 dB at
17x64x64 (23.2 dB at 17x128x128, 22.6 dB at 33x64x64): it reconstructs
layout, colours and motion, blurred,
without the finest texture. Its decoder has the temporal locality of a
trained decoder: a latent perturbation's effect decays over later groups
(a random decoder amplifies it), and the backward influence measured by
``chopgrad probe`` decays as ``exp(-0.73 d)``. See ``benchmarks/RESULTS.md``
("Default model") and :data:`DEFAULT_VAE_PSNR`.

Usage::

    from chopgrad.models import default_vae
    from chopgrad.data import make_video
    vae = default_vae()                       # eval mode, fp32, CPU
    x = make_video(0, 17, 64, 64)[None]       # (1, 3, 17, 64, 64) in [-1, 1]
    z = vae.encode(x).latent_dist.mode()      # (1, 32, 5, 8, 8); raw latents
    y = vae.decode(z).sample                  # (1, 3, 17, 64, 64)

Latents are used raw: the config's ``latents_mean``/``latents_std`` are 0/1
placeholders, not a normalisation to apply.

This module does not import the rest of chopgrad.
"""

from __future__ import annotations

import json
import os

__all__ = [
    "default_vae",
    "DEFAULT_VAE_CONFIG",
    "DEFAULT_VAE_WEIGHTS",
    "DEFAULT_VAE_CONFIG_PATH",
    "DEFAULT_VAE_PSNR",
]

_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_VAE_WEIGHTS = os.path.join(_HERE, "default_vae.safetensors")
DEFAULT_VAE_CONFIG_PATH = os.path.join(_HERE, "default_vae_config.json")

with open(DEFAULT_VAE_CONFIG_PATH) as _f:
    #: keyword arguments of ``diffusers.AutoencoderKLWan`` for the default VAE
    DEFAULT_VAE_CONFIG: dict = json.load(_f)

#: measured held-out reconstruction PSNR in dB (mean over 8 clips, held-out
#: seeds 10_000_000..10_000_007), by frames x height x width
DEFAULT_VAE_PSNR: dict = {"17x64x64": 22.62, "17x128x128": 23.21, "33x64x64": 22.61}


def default_vae(device="cpu", dtype=None):
    """Return chopgrad's small trained Wan 2.1 ``AutoencoderKLWan`` in eval mode.

    Builds ``diffusers.AutoencoderKLWan(**DEFAULT_VAE_CONFIG)`` and loads the
    shipped safetensors weights (offline; never touches a model hub), then
    moves it to ``device``/``dtype`` (default ``torch.float32``). Parameters
    keep ``requires_grad=True``; freeze them yourself if you only need
    gradients with respect to latents.
    """
    import torch
    from diffusers import AutoencoderKLWan
    from safetensors.torch import load_file

    if dtype is None:
        dtype = torch.float32
    vae = AutoencoderKLWan(**DEFAULT_VAE_CONFIG)
    state = load_file(DEFAULT_VAE_WEIGHTS)
    vae.load_state_dict(state, strict=True)
    if dtype != torch.float32:
        # only cast when asked: diffusers' ModelMixin.to(dtype=...) logs a
        # "should be kept in float32" warning on every call, even a no-op one
        vae = vae.to(dtype=dtype)
    return vae.to(device=device).eval()
