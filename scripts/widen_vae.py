#!/usr/bin/env python
"""Widen a trained default VAE (larger ``base_dim`` and/or ``z_dim``) while keeping what it computes.

Training a wider ``AutoencoderKLWan`` from scratch costs hours to climb back to
where the shipped model is; this starts the wider model *at* the trained one so
that every training step goes to the new capacity (Net2Net-style growth)::

    python scripts/widen_vae.py chopgrad/models /tmp/wide --base-dim 24
    python scripts/train_default_vae.py --init-from /tmp/wide --base-dim 24 ...

Every widened channel dimension keeps the old channels at their old indices
(per block, for tensors that hold several blocks of channels: an attention
``to_qkv`` holds q, k and v, a decoder ``time_conv`` the two output frames of
its temporal upsampling, the encoder's ``conv_out`` and ``quant_conv`` the
posterior's mean and log-variance). With a larger ``z_dim`` the encoder's
latents keep their old channels first and the decoder starts out ignoring the
new ones. New channels get small random incoming weights
and zero outgoing weights, so the old channels compute what they did, while
every new weight still receives a gradient (all-zero new channels would get
none). Two things do change with the width and are compensated:

* ``WanRMS_norm`` multiplies by ``sqrt(channels)``: old gains are scaled by
  ``sqrt(old / new)``;
* attention divides q.k by ``sqrt(channels)``: old q rows are scaled by
  ``sqrt(new / old)`` and the new q rows are zero, so the new k channels do
  not enter the scores.

The new channels' small activations enter the RMS norms' denominators, so the
widened model matches the old one closely but not bit for bit (``--noise``
sets their size; see ``tests/test_train_script.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch


def _blocks(name: str, dim: int) -> int:
    """How many equal blocks of channels dimension ``dim`` of parameter ``name`` holds."""
    if dim == 0 and ".to_qkv." in name:
        return 3
    # the posterior's mean and log-variance, z_dim channels each
    if name.startswith("quant_conv.") or (dim == 0 and name.startswith("encoder.conv_out.")):
        return 2
    if dim == 0 and name.startswith("decoder.") and ".upsamplers." in name and ".time_conv." in name:
        return 2
    return 1


def _old_positions(name: str, dim: int, old_size: int, new_size: int) -> torch.Tensor:
    """Indices in the new dimension that the old channels move to."""
    k = _blocks(name, dim)
    if old_size % k or new_size % k:
        raise ValueError(f"{name}: dimension {dim} ({old_size} -> {new_size}) is not {k} blocks")
    c_old, c_new = old_size // k, new_size // k
    return torch.cat([torch.arange(c_old) + j * c_new for j in range(k)])


def widen_state_dict(
    old: dict[str, torch.Tensor], new_shapes: dict[str, torch.Size], *, noise: float = 0.1, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Map a state dict onto a wider model's parameter shapes (see the module docstring).

    ``new_shapes`` maps every parameter name to its shape in the wider model;
    the names must be the same as in ``old``. New incoming weights are drawn
    with ``noise`` times the std of the old tensor.
    """
    if old.keys() != new_shapes.keys():
        missing, extra = sorted(new_shapes.keys() - old.keys()), sorted(old.keys() - new_shapes.keys())
        raise ValueError(f"parameter names differ: missing {missing[:3]}, unexpected {extra[:3]}")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, a in old.items():
        shape = tuple(new_shapes[name])
        if a.dim() != len(shape):
            raise ValueError(f"{name}: rank {a.dim()} -> {len(shape)}")
        if tuple(a.shape) == shape:
            out[name] = a.clone()
            continue
        for d in range(min(2, a.dim()), a.dim()):
            if a.shape[d] != shape[d]:
                raise ValueError(f"{name}: only channel dimensions may grow, got {tuple(a.shape)} -> {shape}")
        if any(s < o for s, o in zip(shape, a.shape)):
            raise ValueError(f"{name}: cannot shrink {tuple(a.shape)} -> {shape}")
        pos = [_old_positions(name, d, a.shape[d], shape[d]) for d in range(min(2, a.dim()))]
        is_gain = name.endswith(".gamma")
        if is_gain:
            gain = math.sqrt(a.shape[0] / shape[0])
            w = torch.full(shape, float(a.mean()) * gain, dtype=a.dtype)
            w[pos[0]] = a * gain
        elif name.endswith(".bias"):
            w = torch.zeros(shape, dtype=a.dtype)
            w[pos[0]] = a
        else:
            std = float(a.std()) if a.numel() > 1 else 1.0
            w = torch.randn(shape, generator=g, dtype=torch.float64).to(a.dtype) * (noise * std)
            if len(pos) > 1:
                # old output channels must not read the new input channels
                keep = torch.ones(shape[1], dtype=torch.bool)
                keep[pos[1]] = False
                w[pos[0][:, None], keep.nonzero().flatten()[None, :]] = 0
                w[pos[0][:, None], pos[1][None, :]] = a
            else:
                w[pos[0]] = a
        if ".to_qkv." in name:
            c_old, c_new = a.shape[0] // 3, shape[0] // 3
            old_q = w[:c_old].clone() * math.sqrt(c_new / c_old)
            w[:c_new] = 0
            w[:c_old] = old_q
        out[name] = w.contiguous()
    return out


def widen(
    src: str, dst: str, *, base_dim: int | None = None, z_dim: int | None = None, noise: float = 0.1, seed: int = 0
) -> dict:
    """Write a widened copy of the model folder ``src`` (``default_vae.safetensors`` +
    ``default_vae_config.json``) to ``dst``; returns the new config. ``None``
    keeps the model's ``base_dim`` / ``z_dim``."""
    from diffusers import AutoencoderKLWan
    from safetensors.torch import load_file, save_file

    with open(os.path.join(src, "default_vae_config.json")) as f:
        config = json.load(f)
    base_dim = config["base_dim"] if base_dim is None else base_dim
    z_dim = config["z_dim"] if z_dim is None else z_dim
    if base_dim < config["base_dim"]:
        raise ValueError(f"--base-dim must be at least the model's {config['base_dim']}, got {base_dim}")
    if z_dim < config["z_dim"]:
        raise ValueError(f"--z-dim must be at least the model's {config['z_dim']}, got {z_dim}")
    # new latent channels are used raw, like the old ones: mean 0, std 1
    extra = z_dim - config["z_dim"]
    config = dict(config, base_dim=base_dim, z_dim=z_dim,
                  latents_mean=list(config["latents_mean"]) + [0.0] * extra,
                  latents_std=list(config["latents_std"]) + [1.0] * extra)
    shapes = {k: v.shape for k, v in AutoencoderKLWan(**config).state_dict().items()}
    wide = widen_state_dict(load_file(os.path.join(src, "default_vae.safetensors")), shapes, noise=noise, seed=seed)
    os.makedirs(dst, exist_ok=True)
    save_file(wide, os.path.join(dst, "default_vae.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "default_vae_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", help="folder with default_vae.safetensors and default_vae_config.json")
    p.add_argument("dst", help="output folder (same two files)")
    p.add_argument("--base-dim", type=int, default=None, help="new base_dim (every width scales with it)")
    p.add_argument("--z-dim", type=int, default=None, help="new number of latent channels")
    p.add_argument("--noise", type=float, default=0.1, help="new incoming weights' std, relative to the old tensor's")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.base_dim is None and args.z_dim is None:
        p.error("give --base-dim and/or --z-dim")
    config = widen(args.src, args.dst, base_dim=args.base_dim, z_dim=args.z_dim, noise=args.noise, seed=args.seed)
    print(f"wrote {args.dst} (base_dim {config['base_dim']}, z_dim {config['z_dim']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
