"""Models and inputs for benchmarks: the built-in default VAE, a tiny random
Wan 2.1 config, the full Wan 2.1 architecture with random weights, or a local
diffusers VAE folder (`--model PATH`)."""
from __future__ import annotations

import json
import os

import torch

from chopgrad.adapters import WanAdapter, wrap

#: A tiny Wan 2.1 decoder with random weights (memory-scaling measurements).
TINY_WAN21_CONFIG = dict(base_dim=16, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                         temperal_downsample=[False, True, True])

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: diffusers' default AutoencoderKLWan config (the Wan 2.1 VAE) with random weights: real memory and time,
#: no download (its decoded frames mean nothing, so it suits memory and speed, not fidelity)
WAN21_RANDOM = "wan21-random"
#: built-in models whose weights are random
RANDOM_MODELS = ("tiny-wan21", WAN21_RANDOM)
BUILTIN_MODELS = ("default", *RANDOM_MODELS)
#: the diffusers classes chopgrad has adapters for (`chopgrad.wrap`)
SUPPORTED_CLASSES = ("AutoencoderKLWan", "AutoencoderKLCogVideoX")
CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_NAME = "diffusion_pytorch_model.bin"
#: the weight files diffusers' `from_pretrained` loads without a `variant`, in the order it looks for them
WEIGHT_NAMES = (SAFETENSORS_NAME + ".index.json", SAFETENSORS_NAME, PICKLE_NAME + ".index.json", PICKLE_NAME)
_FOLDER_LAYOUT = f"save_pretrained layout: {CONFIG_NAME} + {SAFETENSORS_NAME} or .bin"


def load_model(name: str, device="cpu", dtype=torch.float32):
    """`name`: "default" (shipped trained VAE), "tiny-wan21" or "wan21-random" (random weights), or a local folder."""
    check_model_source(name)
    if name == "default":
        from chopgrad.models import default_vae

        vae = default_vae()
    elif name == "tiny-wan21":
        from diffusers import AutoencoderKLWan

        torch.manual_seed(0)
        vae = AutoencoderKLWan(**TINY_WAN21_CONFIG)
    elif name == WAN21_RANDOM:
        from diffusers import AutoencoderKLWan

        torch.manual_seed(0)
        vae = AutoencoderKLWan()
    else:
        vae = _load_local(name)
    vae = vae.to(device=device)
    if dtype != next(vae.parameters()).dtype:
        vae = vae.to(dtype=dtype)
    return vae.eval()


def check_model_source(name: str) -> None:
    """Raises ValueError, naming the folder and what is wrong with it, unless `load_model(name)` can load it.

    Looks only at file names and config.json, so it is instant; a folder that
    passes can still fail to load if its weights do not match its config.
    """
    if name == "default":
        from chopgrad.models import DEFAULT_VAE_WEIGHTS

        if not os.path.isfile(DEFAULT_VAE_WEIGHTS):
            raise ValueError(f"the built-in default model's weights {DEFAULT_VAE_WEIGHTS!r} are missing "
                             "from this installation of chopgrad")
        return
    if name in BUILTIN_MODELS:
        return
    if not os.path.exists(name):
        raise ValueError(f"{name!r} does not exist; expected {', '.join(map(repr, BUILTIN_MODELS))} or a local "
                         f"diffusers VAE folder ({_FOLDER_LAYOUT})")
    if not os.path.isdir(name):
        hint = ""
        if os.path.basename(name) in (CONFIG_NAME, *WEIGHT_NAMES):
            hint = f"; pass the folder that holds it, {os.path.dirname(name) or '.'!r}"
        raise ValueError(f"{name!r} is a file; expected a diffusers VAE folder ({_FOLDER_LAYOUT}){hint}")
    config_path = os.path.join(name, CONFIG_NAME)
    weights = [w for w in WEIGHT_NAMES if os.path.isfile(os.path.join(name, w))]
    if not os.path.isfile(config_path):
        missing = (f"has weights but no {CONFIG_NAME}" if weights else
                   f"has no {CONFIG_NAME} and no weights ({SAFETENSORS_NAME} or .bin)")
        hint = f"; a diffusers VAE folder holds both ({_FOLDER_LAYOUT})"
        if os.path.isfile(os.path.join(name, "vae", CONFIG_NAME)):
            hint = f"; it looks like a pipeline folder: pass its VAE, {os.path.join(name, 'vae')!r}"
        raise ValueError(f"folder {name!r} {missing}{hint}")
    class_name = _config_class_name(config_path)
    if class_name not in SUPPORTED_CLASSES:
        raise ValueError(f"the {CONFIG_NAME} of folder {name!r} is for class {class_name} (`_class_name`), which "
                         f"chopgrad has no adapter for; supported: {', '.join(SUPPORTED_CLASSES)}")
    if not weights:
        variants = sorted(f for f in os.listdir(name) if f.startswith("diffusion_pytorch_model.")
                          and f.endswith((".safetensors", ".bin")))
        hint = (f"; it has only weight variants ({', '.join(variants)}), which are loaded under the plain name "
                f"only: rename or link one to {SAFETENSORS_NAME}") if variants else ""
        raise ValueError(f"folder {name!r} has {CONFIG_NAME} but no weights: expected {SAFETENSORS_NAME} or "
                         f"{PICKLE_NAME} (or a sharded *.index.json with its shards){hint}")
    if weights[0].endswith(".index.json"):
        index_path = os.path.join(name, weights[0])
        try:
            with open(index_path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{index_path!r} is not a readable shard index ({type(exc).__name__}: {exc})") from None
        missing_shards = [s for s in shards if not os.path.isfile(os.path.join(name, s))]
        if missing_shards:
            raise ValueError(f"folder {name!r} is missing {len(missing_shards)} of the {len(shards)} weight shards "
                             f"listed in {weights[0]}: {', '.join(missing_shards)}")


def _config_class_name(config_path: str) -> str:
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{config_path!r} is not a readable JSON config ({type(exc).__name__}: {exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path!r} is not a diffusers config (a JSON object)")
    # save_pretrained always writes `_class_name`; a hand-written Wan config may lack it
    return str(config.get("_class_name", "AutoencoderKLWan"))


def _load_local(path: str):
    """Loads a diffusers VAE folder that passed `check_model_source`, without any network access."""
    import diffusers

    cls = getattr(diffusers, _config_class_name(os.path.join(path, CONFIG_NAME)))
    # Name the format: left to guess, diffusers logs an error for a .bin-only
    # folder before it falls back to the pickle file.
    use_safetensors = any(os.path.isfile(os.path.join(path, w)) for w in WEIGHT_NAMES[:2])
    return cls.from_pretrained(path, local_files_only=True, use_safetensors=use_safetensors)


def _latent_channels(vae) -> int:
    cfg = vae.config
    return cfg.z_dim if hasattr(cfg, "z_dim") else cfg.latent_channels


def _decode_plan(vae, latent_frames: int):
    """The adapter's plan for `latent_frames` latent frames of 1x1 pixels, which gives the model's factors."""
    return wrap(vae).plan(torch.zeros(1, _latent_channels(vae), latent_frames, 1, 1))


def _is_wan(vae) -> bool:
    return isinstance(wrap(vae), WanAdapter)


def _wan_temporal_factor(vae) -> int:
    """Pixel frames of every Wan decoder step after the first."""
    return _decode_plan(vae, 2).frames_per_step[1]


def _latent_frames(vae, frames: int) -> int:
    """Latent frames the model's encoder turns `frames` pixel frames into (rounding down an invalid count)."""
    if _is_wan(vae):
        return 1 + (frames - 1) // _wan_temporal_factor(vae)
    return max(1, (frames - 1) // vae.config.temporal_compression_ratio + 1)


def decoded_frames(vae, latent_frames: int) -> int:
    """Pixel frames the model's own decode yields for `latent_frames` latent frames."""
    return _decode_plan(vae, latent_frames).num_frames


def is_decodable(vae, frames: int) -> bool:
    """Whether a clip of `frames` pixel frames encodes to latents that decode back to exactly `frames` frames."""
    return frames >= 1 and decoded_frames(vae, _latent_frames(vae, frames)) == frames


def _frame_rule(vae) -> str:
    if _is_wan(vae):
        t = _wan_temporal_factor(vae)
        return f"1 + {t}k; the first latent frame decodes to 1 frame, every further one to {t}"
    chunk = vae.num_latent_frames_batch_size
    per_chunk = decoded_frames(vae, chunk)
    return (f"1, {per_chunk}k or {per_chunk}k + 1; it decodes chunks of {chunk} latent frames to {per_chunk} frames "
            f"each, and with an odd number of latent frames the first chunk holds {chunk + 1}, decoding to "
            f"{decoded_frames(vae, chunk + 1)}")


def nearest_decodable(vae, frames: int) -> tuple:
    """(largest decodable count below `frames` or None, smallest one above it)."""
    t = _latent_frames(vae, max(frames, 1))
    counts = [decoded_frames(vae, n) for n in range(max(1, t - 3), t + 4)]
    valid = [c for c in counts if is_decodable(vae, c)]
    below = [c for c in valid if c < frames]
    above = [c for c in valid if c > frames]
    return (max(below) if below else None, min(above) if above else None)


def check_frames(vae, frames) -> None:
    """Raises ValueError, with the valid counts nearest to it, for a frame count the model cannot decode."""
    for f in frames:
        if is_decodable(vae, f):
            continue
        below, above = nearest_decodable(vae, f)
        nearest = " and ".join(str(c) for c in (below, above) if c is not None)
        raise ValueError(f"this {type(vae).__name__} cannot decode {f} frames; nearest valid counts: {nearest} "
                         f"(valid: {_frame_rule(vae)})")


def spatial_factor(vae) -> int:
    """Pixels per latent pixel along height and width."""
    return _decode_plan(vae, 1).height


def check_sizes(vae, sizes) -> None:
    """Raises ValueError, with the nearest valid sizes, for a size that is not a multiple of the spatial factor."""
    factor = spatial_factor(vae)
    for size in sizes:
        if size <= 0 or size % factor:
            below, above = size // factor * factor, (size // factor + 1) * factor
            nearest = " and ".join(str(s) for s in (below, above) if s > 0)
            raise ValueError(f"size {size} is not a positive multiple of the model's spatial factor {factor}; "
                             f"nearest valid: {nearest}")


def latent_shape(vae, frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
    """Latent shape that decodes to `frames` x `height` x `width` (Wan: frames = 1 + 4k)."""
    check_frames(vae, [frames])
    factor = spatial_factor(vae)
    return (1, _latent_channels(vae), _latent_frames(vae, frames), height // factor, width // factor)


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
    if tuple(latents.shape) != shape:
        raise RuntimeError(f"encoded latents {tuple(latents.shape)} do not match the expected {shape}")
    return latents.contiguous(), clip.contiguous()
