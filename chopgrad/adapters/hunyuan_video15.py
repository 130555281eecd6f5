"""Adapter for diffusers `AutoencoderKLHunyuanVideo15` (HunyuanVideo 1.5), on the causal-conv chunker.

`HunyuanVideo15Decoder3D` decodes the whole clip in one call. Across time it mixes through

- its `HunyuanVideo15CausalConv3d`s (kernel 3, stride 1, the first frame replicated in front, edges
  replicated in space): the chunker's causal convs;
- the attention block of its mid block, which runs at latent resolution with a mask that lets every
  position attend to every position of its own latent frame and of all earlier ones (no window): its
  keys and values of the earlier frames become state, a key/value cache that grows by one latent
  frame per step;
- its temporal upsamplers, which turn the clip's first frame into 1 frame and every later one into 2.
  Only step 0 holds the clip's first frame, so on later steps every frame takes the 2-frame path.

Its RMS norms normalise over channels (per position) and its other convs are 1x1x1. So one latent
frame per step decodes exactly the frames of the whole-clip decode: 1 frame on step 0 and
`temporal_compression_ratio` (4) on every later one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import is_diffusers_instance, refuse_diffusers_tiling
from .causal_conv_chunker import CausalConv, CausalConvChunker, StepModule

#: what `HunyuanVideo15CausalConv3d.pad_mode` puts before the first frame, as the chunker's first_pad
_FIRST_PADS = {"replicate": "replicate", "constant": "zeros"}


def _is_hunyuan_video15(model) -> bool:
    return is_diffusers_instance(model, "AutoencoderKLHunyuanVideo15")


def _padded_conv(conv, frames):
    """`HunyuanVideo15CausalConv3d.forward` on frames that carry their past already: spatial padding only."""
    pad_w0, pad_w1, pad_h0, pad_h1 = conv.time_causal_padding[:4]
    return conv.conv(F.pad(frames, (pad_w0, pad_w1, pad_h0, pad_h1, 0, 0), mode=conv.pad_mode))


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, h, w) -> (B, 1, T*h*w, C), the layout the attention block gives scaled_dot_product_attention."""
    return x.flatten(2).transpose(1, 2).unsqueeze(1)


class CachedCausalAttention(StepModule):
    """`HunyuanVideo15AttnBlock` with a key/value cache: the keys and values of all earlier latent frames.

    The state is the keys and the values, each (B, C, frames so far, h, w) (the
    layout of `to_k`'s output, so spatial tiling can crop it like any other
    slot). A step's queries attend to the cache and to the step's own frames up
    to their own, as the block's mask lets them in the whole-clip decode.
    """

    slots = 2

    def call(self, attn, state, index, x):
        past_keys, past_values = state
        identity = x
        x = attn.norm(x)
        query, key, value = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        b, c, frames, h, w = query.shape
        if past_keys is not None:
            key = torch.cat([past_keys, key], dim=2)
            value = torch.cat([past_values, value], dim=2)
        mask = None
        if frames > 1:
            # query frame i of this step sees the cache and this step's frames 0..i
            past = key.shape[2] - frames
            q_frame = torch.arange(frames, device=x.device).repeat_interleave(h * w)
            k_frame = torch.arange(-past, frames, device=x.device).repeat_interleave(h * w)
            mask = k_frame[None, :] <= q_frame[:, None]
        out = F.scaled_dot_product_attention(_tokens(query), _tokens(key), _tokens(value), attn_mask=mask)
        out = out.squeeze(1).reshape(b, frames, h, w, c).permute(0, 4, 1, 2, 3)
        return attn.proj_out(out) + identity, (key, value)


class FirstFrameUpsample(StepModule):
    """A temporal `HunyuanVideo15Upsample`: its own forward on step 0, which holds the clip's first frame;
    on later steps every frame is a "next" frame, upsampled 2x in time as the forward does for frames 1.."""

    def call(self, up, state, index, x):
        if index == 0:
            return type(up).forward(up, x), ()
        h = up._dcae_upsample_rearrange(up.conv(x), r1=2, r2=2, r3=2)
        shortcut = up._dcae_upsample_rearrange(x, r1=2, r2=2, r3=2).repeat_interleave(repeats=up.repeats, dim=1)
        return h + shortcut, ()


def _causal_conv_paths(decoder) -> list[str]:
    """The decoder's causal temporal convs, in the order they run."""
    paths = ["decoder.conv_in"]
    blocks = [("mid_block", decoder.mid_block)] + [(f"up_blocks.{i}", b) for i, b in enumerate(decoder.up_blocks)]
    for name, block in blocks:
        paths += [f"decoder.{name}.resnets.{i}.{conv}" for i in range(len(block.resnets))
                  for conv in ("conv1", "conv2")]
        for i in range(len(getattr(block, "upsamplers", None) or ())):
            paths.append(f"decoder.{name}.upsamplers.{i}.conv")
    return paths + ["decoder.conv_out"]


def _attention_paths(decoder) -> list[str]:
    return [f"decoder.mid_block.attentions.{i}" for i, a in enumerate(decoder.mid_block.attentions) if a is not None]


def _temporal_upsampler_paths(decoder) -> list[str]:
    return [f"decoder.up_blocks.{i}.upsamplers.{j}" for i, block in enumerate(decoder.up_blocks)
            for j, up in enumerate(block.upsamplers or ()) if up.add_temporal_upsample]


class HunyuanVideo15Adapter(CausalConvChunker):
    """`latents_per_step` latent frames per step (1 by default): step 0 emits 1 frame for the clip's first
    latent frame, every other latent frame gives `temporal_compression_ratio` (4).

    Equals `AutoencoderKLHunyuanVideo15.decode(z).sample` with its default
    settings (the whole clip in one call, no tiling); a batch is decoded as
    `decode` decodes each of its samples (in diffusers 0.42.1 `decode` itself
    raises for a batch of more than one unless `enable_slicing()` is on: its
    attention mask is broadcast over the wrong dimension). The state is the last
    two input frames of each causal conv and the mid-block attention's
    key/value cache, which grows with the frames decoded so far. The decode
    does not clamp, so clamp_range is None.
    """

    fused_ops_unavailable = ("its resnet blocks are RMS norm + SiLU + causal conv as in Wan, but its convs "
                             "pad by replicating edge pixels and the first frame, while the fused ops pad with "
                             "zeros as Wan's convs do")

    def __init__(self, vae, latents_per_step: int = 1):
        if not _is_hunyuan_video15(vae):
            raise TypeError(f"HunyuanVideo15Adapter needs a diffusers AutoencoderKLHunyuanVideo15, got "
                            f"{type(vae).__name__}")
        decoder = vae.decoder
        self._check_architecture(decoder)
        registry = {path: CausalConv(kernel_t=vae.get_submodule(path).conv.kernel_size[0], run=_padded_conv,
                                     first_pad=_FIRST_PADS.get(vae.get_submodule(path).pad_mode, "replicate"))
                    for path in _causal_conv_paths(decoder)}
        registry.update({path: CachedCausalAttention() for path in _attention_paths(decoder)})
        registry.update({path: FirstFrameUpsample() for path in _temporal_upsampler_paths(decoder)})
        temporal_factor = 2 ** len(_temporal_upsampler_paths(decoder))
        spatial_factor = 2 ** sum(len(block.upsamplers or ()) for block in decoder.up_blocks)
        cfg = vae.config
        if temporal_factor != vae.temporal_compression_ratio or spatial_factor != vae.spatial_compression_ratio:
            raise ValueError(f"this HunyuanVideo 1.5 decoder upsamples {temporal_factor}x in time and "
                             f"{spatial_factor}x in space, its config says {vae.temporal_compression_ratio}x and "
                             f"{vae.spatial_compression_ratio}x (the ratios must be powers of 2)")
        super().__init__(vae, self._decode_group, registry, latent_channels=cfg.latent_channels,
                         out_channels=cfg.out_channels, temporal_factor=temporal_factor,
                         spatial_factor=spatial_factor, latents_per_step=latents_per_step,
                         first_frame_expansion=1,
                         parameters=decoder.parameters)

    def _decode_group(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decoder(z)

    def plan(self, latents: torch.Tensor):
        refuse_diffusers_tiling(self.model)
        self._check_convs()
        return super().plan(latents)

    @staticmethod
    def _check_architecture(decoder) -> None:
        from diffusers.models.autoencoders.autoencoder_kl_hunyuanvideo15 import (
            HunyuanVideo15AttnBlock, HunyuanVideo15CausalConv3d, HunyuanVideo15Upsample)

        convs, attentions = set(_causal_conv_paths(decoder)), set(_attention_paths(decoder))
        for name, module in decoder.named_modules(prefix="decoder"):
            parent = name.rsplit(".", 1)[0]
            if isinstance(module, HunyuanVideo15CausalConv3d):
                if name not in convs:
                    raise ValueError(f"this HunyuanVideo 1.5 decoder has a causal conv at {name!r} where the "
                                     f"adapter expects none; it does not know how it runs across steps")
            elif isinstance(module, HunyuanVideo15AttnBlock):
                if name not in attentions:
                    raise ValueError(f"this HunyuanVideo 1.5 decoder has an attention block at {name!r} outside "
                                     f"its mid block; the adapter has no key/value cache for it")
            elif isinstance(module, HunyuanVideo15Upsample):
                if type(module).forward is not HunyuanVideo15Upsample.forward:
                    raise ValueError(f"the upsampler {name!r} has a forward of its own; the adapter reproduces "
                                     f"diffusers' HunyuanVideo15Upsample only")
            elif isinstance(module, torch.nn.Conv3d) and module.kernel_size[0] > 1 and parent not in convs:
                raise ValueError(f"this HunyuanVideo 1.5 decoder has a temporal conv at {name!r} that is not one "
                                 f"of its causal convs; the adapter cannot decode it step by step")

    def _check_convs(self) -> None:
        for path, module, spec, _ in self._entries:
            if not isinstance(spec, CausalConv):
                continue
            conv = module.conv
            if module.pad_mode not in _FIRST_PADS:
                raise ValueError(f"vae: the HunyuanVideo 1.5 decoder's causal conv {path!r} has pad_mode="
                                 f"{module.pad_mode!r}; the adapter supports {tuple(_FIRST_PADS)} (diffusers "
                                 f"builds 'replicate')")
            if _FIRST_PADS[module.pad_mode] != spec.first_pad:
                raise ValueError(f"vae: the HunyuanVideo 1.5 decoder's causal conv {path!r} has pad_mode="
                                 f"{module.pad_mode!r}, but the adapter was built when it padded with "
                                 f"{spec.first_pad!r}: wrap the VAE again after changing its pad modes")
            if tuple(module.time_causal_padding[4:]) != (spec.kernel_t - 1, 0) or conv.stride[0] != 1 or \
                    conv.dilation[0] != 1 or any(conv.padding):
                raise ValueError(f"vae: the HunyuanVideo 1.5 decoder's causal conv {path!r} has temporal padding "
                                 f"{tuple(module.time_causal_padding[4:])}, stride {conv.stride}, dilation "
                                 f"{conv.dilation}, padding {conv.padding}; the adapter needs kernel_t - 1 frames "
                                 f"of padding in front only, stride and dilation 1 in time and no built-in padding, "
                                 f"as diffusers builds it")


__all__ = ["CachedCausalAttention", "FirstFrameUpsample", "HunyuanVideo15Adapter"]
