"""Models and inputs for benchmarks: the built-in default VAE, a tiny random
Wan 2.1 config, or a local diffusers VAE folder (`--model PATH`)."""
from __future__ import annotations

import os

import torch

#: A tiny Wan 2.1 decoder with random weights (memory-scaling measurements).
TINY_WAN21_CONFIG = dict(base_dim=16, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                         temperal_downsample=[False, True, True])

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_model(name: str, device="cpu", dtype=torch.float32):
    """`name`: "default" (shipped trained VAE), "tiny-wan21" (random weights), or a local folder."""
    if name == "default":
        from chopgrad.models import default_vae

        vae = default_vae()
    elif name == "tiny-wan21":
        from diffusers import AutoencoderKLWan

        torch.manual_seed(0)
        vae = AutoencoderKLWan(**TINY_WAN21_CONFIG)
    elif os.path.isdir(name):
        vae = _load_local(name)
    else:
        raise ValueError(f"model must be 'default', 'tiny-wan21' or a local diffusers VAE folder, got {name!r}")
    vae = vae.to(device=device)
    if dtype != next(vae.parameters()).dtype:
        vae = vae.to(dtype=dtype)
    return vae.eval()


def _load_local(path: str):
    """Loads a diffusers VAE folder (config.json + weights) without any network access."""
    import json

    import diffusers

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"model folder {path!r} has no config.json (expected a diffusers `save_pretrained` folder)")
    with open(config_path) as f:
        class_name = json.load(f).get("_class_name", "AutoencoderKLWan")
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ValueError(f"model folder {path!r}: unknown diffusers class {class_name!r}")
    return cls.from_pretrained(path, local_files_only=True)


def latent_shape(vae, frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
    """Latent shape that decodes to `frames` x `height` x `width` (Wan: frames = 1 + 4k)."""
    cfg = vae.config
    if hasattr(cfg, "z_dim"):  # Wan
        t_factor = 2 ** sum(bool(t) for t in cfg.temperal_downsample)
        s_factor = 2 ** (len(cfg.dim_mult) - 1) * (cfg.patch_size or 1)
        if (frames - 1) % t_factor:
            raise ValueError(f"frames must be 1 + {t_factor}k for this Wan VAE, got {frames}")
        return (1, cfg.z_dim, 1 + (frames - 1) // t_factor, height // s_factor, width // s_factor)
    t_factor = cfg.temporal_compression_ratio
    s_factor = 2 ** (len(cfg.block_out_channels) - 1)
    return (1, cfg.latent_channels, max(1, (frames - 1) // t_factor + 1), height // s_factor, width // s_factor)


def make_inputs(vae, frames: int, height: int, width: int, seed: int = 0, encode: bool = True):
    """(latents, target): a synthetic clip as target and its encoding (or random latents) as latents.

    Latents come from encoding the clip when `encode` (so a trained model
    decodes something close to the target); the target is the clip itself.
    """
    from chopgrad.data import make_batch

    shape = latent_shape(vae, frames, height, width)
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    clip = make_batch(seed, 1, frames, height, width).to(device=device, dtype=dtype)
    with torch.no_grad():
        if encode:
            latents = vae.encode(clip).latent_dist.mode()
        else:
            latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
        decoded_frames = clip.shape[2]
    if tuple(latents.shape) != shape:
        raise RuntimeError(f"encoded latents {tuple(latents.shape)} do not match the expected {shape}")
    return latents.contiguous(), clip[:, :, :decoded_frames].contiguous()
