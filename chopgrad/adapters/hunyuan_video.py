"""Adapter for diffusers `AutoencoderKLHunyuanVideo` (HunyuanVideo, SkyReels-V1, FramePack, Kandinsky 5)."""
from __future__ import annotations

import torch

from .base import is_diffusers_instance
from .windowed import Window, WindowedAdapter, strided_windows


def _is_hunyuan_video(model) -> bool:
    return is_diffusers_instance(model, "AutoencoderKLHunyuanVideo")


class HunyuanVideoAdapter(WindowedAdapter):
    """The model's own windowed decode (`_temporal_tiled_decode`), one window per step.

    With framewise decoding on (diffusers' default), a clip of more than
    `tile_sample_min_num_frames / 4` (4) latent frames is decoded in windows
    of 5 latent frames starting every 3; every window after the first drops
    its first decoded frame and fades in over 4 frames from the previous one.
    A window decodes 17 frames and the video keeps 12 of them (13 of the
    first). Shorter clips, or framewise decoding off, are one call over the
    whole clip, so one step. Inside a window the model's spatial tiling
    (`enable_tiling`, off by default) and batch slicing (`enable_slicing`)
    run as in its own decode. The window layout is read from the model's
    settings when a clip is planned.

    The frames of step g depend on the latents of windows g-1 and g, which lie in
    steps g-2 .. g, so `d_trunc >= 2` already gives the exact gradient. The
    model's own decode does not clamp, so clamp_range is None.
    """

    fused_ops_unavailable = ("its resnet blocks normalise with GroupNorm (statistics over channel groups and "
                             "the whole frame), not the per-position RMS norm the fused ops implement")

    def __init__(self, vae):
        if not _is_hunyuan_video(vae):
            raise TypeError(f"HunyuanVideoAdapter needs a diffusers AutoencoderKLHunyuanVideo, "
                            f"got {type(vae).__name__}")
        upsamplers = [u for block in vae.decoder.up_blocks for u in (block.upsamplers or ())]
        self.temporal_factor = 1
        spatial_factor = 1
        for u in upsamplers:
            self.temporal_factor *= int(u.upsample_factor[0])
            spatial_factor *= int(u.upsample_factor[1])
        super().__init__(self._decode_window, self._windows, latent_channels=vae.config.latent_channels,
                         out_channels=vae.config.out_channels, spatial_scale=spatial_factor,
                         parameters=list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters()), model=vae)

    def _frames_of(self, latent_frames: int) -> int:
        # causal: the first latent frame decodes to one frame, every later one to temporal_factor
        return (latent_frames - 1) * self.temporal_factor + 1

    def _windows(self, num_latents: int) -> list[Window]:
        vae = self.model
        ratio = vae.temporal_compression_ratio
        min_latents = vae.tile_sample_min_num_frames // ratio
        if not (vae.use_framewise_decoding and num_latents > min_latents):
            return [Window(0, num_latents, self._frames_of(num_latents))]
        stride = vae.tile_sample_stride_num_frames
        return strided_windows(num_latents, size=min_latents + 1, stride=stride // ratio, window_frames=self._frames_of,
                               keep=stride, keep_first=stride + 1, blend=vae.tile_sample_min_num_frames - stride,
                               trim_front=1, num_frames=(num_latents - 1) * ratio + 1)

    def _decode_window(self, z: torch.Tensor) -> torch.Tensor:
        vae = self.model
        if vae.use_slicing and z.shape[0] > 1:
            return torch.cat([self._decode_one(part) for part in z.split(1)])
        return self._decode_one(z)

    def _decode_one(self, z: torch.Tensor) -> torch.Tensor:
        vae = self.model
        height, width = z.shape[-2:]
        ratio = vae.spatial_compression_ratio
        tiles = width > vae.tile_sample_min_width // ratio or height > vae.tile_sample_min_height // ratio
        if vae.use_tiling and tiles:
            return vae.tiled_decode(z, return_dict=True).sample
        return vae.decoder(vae.post_quant_conv(z))
