"""Adapter for diffusers `AutoencoderKLMochi` (Mochi 1), on the causal-conv chunker.

`MochiDecoder3D` decodes the whole clip in one call. Across time it mixes only through the
`CogVideoXCausalConv3d`s of its residual blocks (kernel 3, stride 1, first frame replicated in front,
edges replicated in space); its GroupNorms run per frame, its `Linear`s per position, its upsampling
turns each frame into `temporal_expansion` frames, and its decoder has no attention. So one latent
frame per step, each conv fed the last two frames of its input from the step before, decodes
exactly the frames of the whole clip. `AutoencoderKLMochi._decode` drops the first
`temporal_compression_ratio - 1` frames: step 0 drops them too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import is_diffusers_instance, refuse_diffusers_tiling
from .causal_conv_chunker import CausalConv, CausalConvChunker


def _is_mochi(model) -> bool:
    return is_diffusers_instance(model, "AutoencoderKLMochi")


def _replicate_padded_conv(conv, frames, conv_cache=None):
    """`CogVideoXCausalConv3d.forward` in "replicate" mode on frames that carry their past already."""
    if conv_cache is not None:
        raise RuntimeError("the Mochi decoder passed a conv_cache to a causal conv; in replicate mode diffusers "
                           "ignores it, so this decoder is not the one the Mochi adapter was built for")
    w, h = conv.width_pad, conv.height_pad
    out = conv.conv(F.pad(frames, (w, w, h, h, 0, 0), mode="replicate"))
    return out, None  # the module returns no conv_cache in replicate mode


def _causal_conv_paths(decoder) -> list[str]:
    """The decoder's causal temporal convs: conv1 and conv2 of every residual block, in the order they run."""
    blocks = [("block_in", decoder.block_in)]
    blocks += [(f"up_blocks.{i}", block) for i, block in enumerate(decoder.up_blocks)]
    blocks += [("block_out", decoder.block_out)]
    return [f"decoder.{name}.resnets.{i}.{conv}" for name, block in blocks for i in range(len(block.resnets))
            for conv in ("conv1", "conv2")]


class MochiAdapter(CausalConvChunker):
    """One latent frame per step: 1 frame on step 0, `temporal_compression_ratio` (6) after it.

    Equals `AutoencoderKLMochi.decode(z).sample` with its default settings (the
    whole clip in one call). The state is the last two input frames of each
    causal conv. Mochi's decode does not clamp, so clamp_range is None.
    Decoded as the default untiled, whole-clip decode; a VAE with `use_tiling`
    or framewise decoding on is refused (chopgrad tiles with `tile=`).
    """

    fused_ops_unavailable = ("its resnet blocks normalise with a per-frame GroupNorm (statistics over channel "
                             "groups and the whole frame), not the per-position RMS norm the fused ops implement")

    def __init__(self, vae):
        if not _is_mochi(vae):
            raise TypeError(f"MochiAdapter needs a diffusers AutoencoderKLMochi, got {type(vae).__name__}")
        decoder = vae.decoder
        self._check_architecture(decoder)
        convs = {path: CausalConv(kernel_t=vae.get_submodule(path).time_kernel_size, run=_replicate_padded_conv,
                                  first_pad="replicate")
                 for path in _causal_conv_paths(decoder)}
        cfg = vae.config
        super().__init__(vae, self._decode_group, convs, latent_channels=cfg.latent_channels,
                         out_channels=cfg.out_channels, temporal_factor=vae.temporal_compression_ratio,
                         spatial_factor=vae.spatial_compression_ratio, latents_per_step=1,
                         parameters=decoder.parameters)

    def _decode_group(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decoder(z)[0]

    def first_step_drop(self) -> int:
        # _decode drops these frames when its output has at least that many, which every step 0 output has.
        return self.temporal_factor - 1 if self.model.drop_last_temporal_frames else 0

    def plan(self, latents: torch.Tensor):
        refuse_diffusers_tiling(self.model)
        self._check_convs()
        return super().plan(latents)

    @staticmethod
    def _check_architecture(decoder) -> None:
        from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXCausalConv3d

        for block in (decoder.block_in, decoder.block_out):
            if any(a is not None for a in block.attentions):
                raise ValueError("this Mochi decoder has attention in its mid blocks, which mixes frames without a "
                                 "cache; the Mochi adapter supports the decoder without attention (diffusers' "
                                 "MochiDecoder3D)")
        registered = set(_causal_conv_paths(decoder))
        for name, module in decoder.named_modules(prefix="decoder"):
            if isinstance(module, CogVideoXCausalConv3d):
                if name not in registered:
                    raise ValueError(f"this Mochi decoder has a causal conv at {name!r} outside its residual "
                                     f"blocks; the Mochi adapter does not know how it runs across steps")
            elif isinstance(module, torch.nn.Conv3d) and module.kernel_size[0] > 1 and \
                    name.rsplit(".", 1)[0] not in registered:
                raise ValueError(f"this Mochi decoder has a temporal conv at {name!r} that is not one of its "
                                 f"causal convs; the Mochi adapter cannot decode it step by step")

    def _check_convs(self) -> None:
        for path, conv, _, _ in self._entries:
            if conv.pad_mode != "replicate":
                raise ValueError(
                    f"vae: the Mochi decoder's causal conv {path!r} has pad_mode={conv.pad_mode!r}. "
                    f"AutoencoderKLMochi._enable_framewise_decoding sets that, and in diffusers 0.42.1 the VAE's "
                    f"own decode then fails with a shape error (the convs were built without spatial padding); "
                    f"chopgrad decodes like the default decode: use a VAE on which framewise decoding was never "
                    f"enabled (reload it)")
            if conv.conv.stride[0] != 1 or conv.conv.dilation[0] != 1 or any(conv.conv.padding):
                raise ValueError(f"vae: the Mochi decoder's causal conv {path!r} has stride {conv.conv.stride}, "
                                 f"dilation {conv.conv.dilation}, padding {conv.conv.padding}; the adapter needs "
                                 f"stride and dilation 1 in time and no built-in padding, as diffusers builds it")


__all__ = ["MochiAdapter"]
