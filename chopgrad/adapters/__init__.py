"""Decoder adapters: explicit, detachable state and a pure step per model family."""
from __future__ import annotations

from .base import DecodePlan, DecoderAdapter, State
from .cogvideox import CogVideoXAdapter, _is_cogvideox
from .functional import FunctionalAdapter
from .wan import WanAdapter, _is_wan

KNOWN_MODELS = ("diffusers.AutoencoderKLWan (Wan 2.1 / 2.2)", "diffusers.AutoencoderKLCogVideoX")


def wrap(vae_or_decoder) -> DecoderAdapter:
    """Returns the adapter for a known VAE class (an adapter is returned as is).

    Raises TypeError for anything else; wrap a custom decoder with
    `FunctionalAdapter(step, ...)`.
    """
    if isinstance(vae_or_decoder, DecoderAdapter):
        return vae_or_decoder
    if _is_wan(vae_or_decoder):
        return WanAdapter(vae_or_decoder)
    if _is_cogvideox(vae_or_decoder):
        return CogVideoXAdapter(vae_or_decoder)
    raise TypeError(
        f"vae_or_decoder: unsupported model class {type(vae_or_decoder).__name__}; "
        f"known classes are {', '.join(KNOWN_MODELS)}, or pass a chopgrad.FunctionalAdapter wrapping your step function"
    )


__all__ = [
    "CogVideoXAdapter", "DecodePlan", "DecoderAdapter", "FunctionalAdapter", "KNOWN_MODELS", "State",
    "WanAdapter", "wrap",
]
