"""Models and inputs for benchmarks: the built-in default VAE, tiny random configs
of every supported family, their full architectures with random weights, or a
local diffusers VAE folder (`--model PATH`)."""
from __future__ import annotations

import json
import logging
import os

import torch

from chopgrad.adapters import CogVideoXAdapter, wrap
from chopgrad.adapters.unsupported import unsupported_class_reason

#: A tiny Wan 2.1 decoder with random weights (memory-scaling measurements).
# latent statistics for its 4 channels (diffusers' defaults list 16): what a Wan pipeline, or a transformer
# trained on top of it, normalises the latents with
TINY_WAN21_CONFIG = dict(base_dim=16, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                         temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.05, 0.3],
                         latents_std=[1.5, 0.8, 1.2, 2.0])

#: Tiny configs of each supported family with random weights, each keeping its family's layout in time (and so
#: its frame counts and decoder steps): quick CPU runs of the tools and their tests. Name -> (diffusers class,
#: config).
TINY_MODELS = {
    "tiny-wan21": ("AutoencoderKLWan", TINY_WAN21_CONFIG),
    # time x4 in the first two up blocks, space x4, the mid-block attention, framewise (windowed) decoding
    "tiny-hunyuanvideo": ("AutoencoderKLHunyuanVideo", dict(
        latent_channels=4, block_out_channels=(8, 8, 16), layers_per_block=1, norm_num_groups=4,
        spatial_compression_ratio=4, down_block_types=("HunyuanVideoDownBlock3D",) * 3,
        up_block_types=("HunyuanVideoUpBlock3D",) * 3)),
    # time x4 and space x4 in two up blocks, the causal mid-block attention
    "tiny-hunyuanvideo15": ("AutoencoderKLHunyuanVideo15", dict(
        latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1, spatial_compression_ratio=4,
        temporal_compression_ratio=4)),
    # time x6 (as 1, 2, 3) and space x2, at width 32: the least its GroupNorm's 32 groups allow
    "tiny-mochi": ("AutoencoderKLMochi", dict(
        encoder_block_out_channels=(32,) * 4, decoder_block_out_channels=(32,) * 4, latent_channels=4,
        layers_per_block=(1,) * 5, spatial_expansions=(1, 1, 2), add_attention_block=(False,) * 5)),
    # a spatial up block, then temporal ones: time x4, space x8
    "tiny-easyanimate": ("AutoencoderKLMagvit", dict(
        latent_channels=4, block_out_channels=(8, 8, 8, 16), layers_per_block=1, norm_num_groups=4)),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: diffusers' default AutoencoderKLWan config (the Wan 2.1 VAE) with random weights: real memory and time,
#: no download (its decoded frames mean nothing, so it suits memory and speed, not fidelity)
WAN21_RANDOM = "wan21-random"
#: Each family's full architecture (diffusers' default config of the class, that of the released VAE) with random
#: weights, as WAN21_RANDOM: for memory and speed on a GPU. Name -> diffusers class.
FULL_RANDOM_MODELS = {
    WAN21_RANDOM: "AutoencoderKLWan",
    "hunyuanvideo-random": "AutoencoderKLHunyuanVideo",
    "hunyuanvideo15-random": "AutoencoderKLHunyuanVideo15",
    "mochi-random": "AutoencoderKLMochi",
    "easyanimate-random": "AutoencoderKLMagvit",
}
#: built-in models whose weights are random
RANDOM_MODELS = (*TINY_MODELS, *FULL_RANDOM_MODELS)
BUILTIN_MODELS = ("default", *RANDOM_MODELS)
#: the frame counts each family decodes (`check_frames` checks them with the model's adapter)
FRAME_RULES = "Wan, HunyuanVideo, HunyuanVideo 1.5, EasyAnimate: 1 + 4k; Mochi: 1 + 6k; CogVideoX: 1, 8k or 8k + 1"
#: the diffusers classes chopgrad has adapters for (`chopgrad.wrap`)
SUPPORTED_CLASSES = ("AutoencoderKLWan", "AutoencoderKLCogVideoX", "AutoencoderKLHunyuanVideo",
                     "AutoencoderKLHunyuanVideo15", "AutoencoderKLMochi", "AutoencoderKLMagvit")
CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_NAME = "diffusion_pytorch_model.bin"
#: the weight files diffusers' `from_pretrained` loads without a `variant`, in the order it looks for them
WEIGHT_NAMES = (SAFETENSORS_NAME + ".index.json", SAFETENSORS_NAME, PICKLE_NAME + ".index.json", PICKLE_NAME)
_FOLDER_LAYOUT = f"save_pretrained layout: {CONFIG_NAME} + {SAFETENSORS_NAME} or .bin"


def load_model(name: str, device="cpu", dtype=torch.float32):
    """`name`: "default" (shipped trained VAE), one of TINY_MODELS or FULL_RANDOM_MODELS (random weights), or a
    local folder.

    A full architecture is built on `device` itself, so a GPU worker does not first initialise GBs of weights on
    the CPU (and `device="meta"` builds it without memory); the others are built on the CPU and moved.
    """
    check_model_source(name)
    if name == "default":
        from chopgrad.models import default_vae

        vae = default_vae()
    elif name in TINY_MODELS:
        class_name, config = TINY_MODELS[name]
        torch.manual_seed(0)
        vae = _diffusers_class(class_name)(**config)
    elif name in FULL_RANDOM_MODELS:
        cls = _diffusers_class(FULL_RANDOM_MODELS[name])
        torch.manual_seed(0)
        with torch.device(device):
            vae = cls()
    else:
        vae = _load_local(name)
    if type(vae).__name__ == "AutoencoderKLHunyuanVideo15":
        # In diffusers 0.42.1 its attention fails on a batch of more than one (a (B, L, L) mask against a
        # (B, 1, L, C) query); sliced, encode and decode take one sample at a time, as chopgrad's decode does.
        vae.enable_slicing()
    vae = vae.to(device=device)
    if dtype != next(vae.parameters()).dtype:
        vae = cast_model(vae, dtype)
    return vae.eval()


class _EmptyFloat32Warning(logging.Filter):
    """Drops diffusers' "There are modules in X that should be kept in float32: []": ModelMixin.to logs it on
    every dtype cast, even when the list is empty, i.e. when no module of the model needs float32. A list that
    names modules is a real warning and still shown."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("should be kept in float32: []" in message and message.startswith("There are modules in "))


def cast_model(vae, dtype):
    """`vae.to(dtype=dtype)` without diffusers' empty "should be kept in float32" warning."""
    # the logger of the module that defines ModelMixin.to (its __module__ is torch's: it is functools.wraps'ed)
    defined_in = getattr(type(vae).to, "__globals__", {}).get("__name__", "diffusers.models.modeling_utils")
    logger = logging.getLogger(defined_in)
    quiet = _EmptyFloat32Warning()
    logger.addFilter(quiet)
    try:
        return vae.to(dtype=dtype)
    finally:
        logger.removeFilter(quiet)


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
        reason = unsupported_class_reason(class_name, _read_config(config_path))
        why = f" ({reason})" if reason else ""
        raise ValueError(f"the {CONFIG_NAME} of folder {name!r} is for class {class_name} (`_class_name`), which "
                         f"chopgrad has no adapter for{why}; supported: {', '.join(SUPPORTED_CLASSES)}")
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


def _read_config(config_path: str) -> dict:
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{config_path!r} is not a readable JSON config ({type(exc).__name__}: {exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path!r} is not a diffusers config (a JSON object)")
    return config


def _config_class_name(config_path: str) -> str:
    # save_pretrained always writes `_class_name`; a hand-written Wan config may lack it
    return str(_read_config(config_path).get("_class_name", "AutoencoderKLWan"))


def _diffusers_class(class_name: str):
    import diffusers

    return getattr(diffusers, class_name)


def _load_local(path: str):
    """Loads a diffusers VAE folder that passed `check_model_source`, without any network access."""
    cls = _diffusers_class(_config_class_name(os.path.join(path, CONFIG_NAME)))
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


def _is_cogvideox(vae) -> bool:
    return isinstance(wrap(vae), CogVideoXAdapter)


def _temporal_factor(vae) -> int:
    """Pixel frames of every latent frame after the first, which decodes to 1 (all supported models but CogVideoX)."""
    return decoded_frames(vae, 2) - decoded_frames(vae, 1)


def temporal_factor(vae) -> int:
    """Pixel frames each latent frame stands for (after the first, which is alone in a causal layout)."""
    if _is_cogvideox(vae):
        return vae.config.temporal_compression_ratio
    return _temporal_factor(vae)


def _latent_frames(vae, frames: int) -> int:
    """Latent frames the model's encoder turns `frames` pixel frames into (rounding down an invalid count)."""
    if _is_cogvideox(vae):
        return max(1, (frames - 1) // vae.config.temporal_compression_ratio + 1)
    return 1 + (frames - 1) // _temporal_factor(vae)


def decoded_frames(vae, latent_frames: int) -> int:
    """Pixel frames the model's own decode yields for `latent_frames` latent frames."""
    return _decode_plan(vae, latent_frames).num_frames


def decoder_steps(vae, frames: int) -> int:
    """Steps of chopgrad's decode (the groups whose cache carries over) for a clip of `frames` pixel frames."""
    return _decode_plan(vae, _latent_frames(vae, frames)).num_steps


def is_decodable(vae, frames: int) -> bool:
    """Whether a clip of `frames` pixel frames encodes to latents that decode back to exactly `frames` frames."""
    return frames >= 1 and decoded_frames(vae, _latent_frames(vae, frames)) == frames


def _frame_rule(vae) -> str:
    if not _is_cogvideox(vae):
        t = _temporal_factor(vae)
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
    """Latent shape that decodes to `frames` x `height` x `width` (Wan: frames = 1 + 4k; `check_frames` says
    which counts a model decodes)."""
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
