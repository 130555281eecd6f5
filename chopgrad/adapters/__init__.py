"""Decoder adapters: explicit, detachable state and a pure step per model family."""
from __future__ import annotations

from .base import DecodePlan, DecoderAdapter, State
from .causal_conv_chunker import CausalConv, CausalConvChunker, StepModule
from .cogvideox import CogVideoXAdapter, _is_cogvideox
from .easyanimate import EasyAnimateAdapter, _is_easyanimate
from .functional import FunctionalAdapter
from .hunyuan_video import HunyuanVideoAdapter, _is_hunyuan_video
from .hunyuan_video15 import HunyuanVideo15Adapter, _is_hunyuan_video15
from .mochi import MochiAdapter, _is_mochi
from .unsupported import unsupported_reason
from .wan import WanAdapter, _is_wan
from .windowed import Window, WindowedAdapter, strided_windows

KNOWN_MODELS = ("diffusers.AutoencoderKLWan (Wan 2.1 / 2.2)", "diffusers.AutoencoderKLCogVideoX",
               "diffusers.AutoencoderKLMagvit (EasyAnimate)", "diffusers.AutoencoderKLMochi (Mochi 1)",
               "diffusers.AutoencoderKLHunyuanVideo (HunyuanVideo)",
               "diffusers.AutoencoderKLHunyuanVideo15 (HunyuanVideo 1.5)")


def wrap(vae_or_decoder) -> DecoderAdapter:
    """Returns the adapter for a known VAE class (an adapter is returned as is).

    Raises TypeError for anything else, with the reason for a diffusers VAE known to be unsupported
    (`chopgrad.adapters.unsupported`); wrap a custom decoder with `FunctionalAdapter(step, ...)`.
    """
    if isinstance(vae_or_decoder, DecoderAdapter):
        return vae_or_decoder
    if _is_wan(vae_or_decoder):
        return WanAdapter(vae_or_decoder)
    if _is_cogvideox(vae_or_decoder):
        return CogVideoXAdapter(vae_or_decoder)
    if _is_easyanimate(vae_or_decoder):
        return EasyAnimateAdapter(vae_or_decoder)
    if _is_mochi(vae_or_decoder):
        return MochiAdapter(vae_or_decoder)
    if _is_hunyuan_video(vae_or_decoder):
        return HunyuanVideoAdapter(vae_or_decoder)
    if _is_hunyuan_video15(vae_or_decoder):
        return HunyuanVideo15Adapter(vae_or_decoder)
    reason = unsupported_reason(vae_or_decoder)
    if reason is not None:
        raise TypeError(f"vae_or_decoder: {type(vae_or_decoder).__name__} is not supported: {reason}")
    raise TypeError(
        f"vae_or_decoder: unsupported model class {type(vae_or_decoder).__name__}; "
        f"known classes are {', '.join(KNOWN_MODELS)}, or pass a chopgrad.FunctionalAdapter wrapping your step function"
    )


__all__ = [
    "CausalConv", "CausalConvChunker", "CogVideoXAdapter", "DecodePlan", "DecoderAdapter", "EasyAnimateAdapter",
    "FunctionalAdapter", "HunyuanVideoAdapter", "HunyuanVideo15Adapter", "KNOWN_MODELS", "MochiAdapter", "State",
    "StepModule", "WanAdapter",
    "Window", "WindowedAdapter", "strided_windows", "wrap",
]
