"""Why the video VAEs of diffusers that chopgrad has no adapter for are not supported (docs/vaes.md has the table).

`wrap` names the reason in its TypeError, and the tools name it for a model folder of such a class.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

_WINDOWED = "chopgrad.adapters.windowed.WindowedAdapter"


def _ltx(config: Mapping[str, Any]) -> str:
    reach = ("so a decoded frame depends on latent frames ahead of it as well as behind it (13 to 30 latent frames "
             "each way in the released layouts): no step-by-step decode can equal the model's own decode")
    if config.get("decoder_causal") is True:
        return (f"the released LTX-Video and LTX-2 configurations set decoder_causal=False, whose temporal "
                f"convolutions pad symmetrically, {reach}; this instance has decoder_causal=True, which the released "
                f"configurations do not use, and chopgrad has no adapter for that either")
    return (f"its decoder's temporal convolutions pad symmetrically (decoder_causal=False, as in the released "
            f"configurations), {reach}")


_REASONS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "AutoencoderKLLTXVideo": _ltx,
    "AutoencoderKLLTX2Video": _ltx,
    "AutoencoderKLAllegro": lambda config: (
        "its decode (only with enable_tiling(); without it diffusers raises NotImplementedError) decodes "
        "overlapping tiles of 24 frames (6 latent frames, one every 4) with non-causal temporal convolutions and "
        f"sums them with linear weights; no adapter yet: {_WINDOWED} could serve it, one row of tiles per step"),
    "AutoencoderKLMiniMaxH3": lambda config: (
        "its decoder is a non-causal ViT (full self-attention over every latent frame of a clip), run on "
        "overlapping clips of latent frames whose decoded frames are cross-faded; no adapter yet: "
        f"{_WINDOWED} could serve it, one clip per step"),
    "AutoencoderKLCosmos": lambda config: (
        "no adapter yet; its decoder is causal (causal convolutions, GroupNorm per frame, temporal attention "
        "with a causal mask over all earlier frames), so chopgrad.adapters.causal_conv_chunker.CausalConvChunker "
        "with a key/value cache, as HunyuanVideo 1.5's adapter has, could serve it"),
    "AutoencoderKLKVAEVideo": lambda config: (
        "no adapter yet; its decode already steps through segments (5 latent frames, then 4) with the causal "
        "convolutions' caches in an explicit dict, and its GroupNorms take statistics over a whole segment, so an "
        "adapter could step by segments with that cache as its state"),
    "AutoencoderVidTok": lambda config: (
        "its temporal upsamplers interpolate trilinearly, so in its whole-clip decode (the default) a decoded "
        "frame depends on the next latent frame too, and its caches live in module attributes; no adapter"),
    "AutoencoderKLTemporalDecoder": lambda config: (
        "it decodes per-frame image latents with temporal convolutions padded on both sides, so every frame "
        "depends on its neighbours ahead and behind across the whole call: no step-by-step decode can equal it"),
}


def unsupported_class_reason(class_name: str, config: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """Why diffusers' `class_name` has no adapter (None for a class not known to be unsupported)."""
    reason = _REASONS.get(class_name)
    return None if reason is None else reason(config or {})


def unsupported_reason(model) -> Optional[str]:
    """`unsupported_class_reason` for a model instance: of its class, or of the diffusers class it derives from."""
    for cls in type(model).__mro__:
        if cls.__name__ in _REASONS and cls.__module__.startswith("diffusers."):
            return unsupported_class_reason(cls.__name__, getattr(model, "config", None))
    return None
