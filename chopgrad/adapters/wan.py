"""Adapter for diffusers `AutoencoderKLWan` (Wan 2.1 and Wan 2.2 configs)."""
from __future__ import annotations

import torch

from .base import DecodePlan, DecoderAdapter, State, check_latents

# diffusers marks an upsample slot whose first chunk had no temporal conv with
# this string; it only matters on the step after the first.
_REPEAT_SENTINEL = "Rep"


def _is_wan(model) -> bool:
    try:
        from diffusers import AutoencoderKLWan
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return False
    return isinstance(model, AutoencoderKLWan)


class WanAdapter(DecoderAdapter):
    """One latent frame per step, exactly as `AutoencoderKLWan._decode` does.

    The state is diffusers' `feat_cache` list with the "Rep" sentinel stored as
    None: on step 0 every slot is empty, and from step 1 on an empty slot can
    only be an upsample slot that diffusers marked "Rep", so the sentinel is
    restored from the step index. `post_quant_conv` (a 1x1x1 convolution) is
    applied per step, which equals applying it to the whole latent.
    """

    clamp_range = (-1.0, 1.0)
    # The frames are the decoder's conv_out output, referenced by nothing else:
    # a fused loss may overwrite them with their gradient.
    frames_are_private = True

    def __init__(self, vae):
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify

        if not _is_wan(vae):
            raise TypeError(f"WanAdapter needs a diffusers AutoencoderKLWan, got {type(vae).__name__}")
        self.model = vae
        self._unpatchify = unpatchify
        self.num_slots = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        cfg = vae.config
        self.patch_size = cfg.patch_size or 1
        self.z_dim = cfg.z_dim
        self.temporal_factor = 2 ** sum(bool(t) for t in cfg.temperal_downsample)
        self.spatial_factor = 2 ** (len(cfg.dim_mult) - 1) * self.patch_size
        self.out_channels = cfg.out_channels // (self.patch_size**2)

    def plan(self, latents: torch.Tensor) -> DecodePlan:
        check_latents(latents, channels=self.z_dim)
        b, _, t, h, w = latents.shape
        return DecodePlan(
            group_bounds=tuple(range(t + 1)),
            frames_per_step=(1,) + (self.temporal_factor,) * (t - 1),
            batch=b,
            channels=self.out_channels,
            height=h * self.spatial_factor,
            width=w * self.spatial_factor,
        )

    def initial_state(self) -> State:
        return [None] * self.num_slots

    def _to_feat_cache(self, state: State, index: int) -> list:
        if len(state) != self.num_slots:
            raise ValueError(f"Wan decoder state must have {self.num_slots} slots, got {len(state)}")
        if index == 0:
            return [None] * self.num_slots
        return [_REPEAT_SENTINEL if s is None else s for s in state]

    def step(self, index: int, latent_group: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        feat_cache = self._to_feat_cache(state, index)
        x = self.model.post_quant_conv(latent_group)
        # feat_idx is a fresh counter per call: nothing survives between calls
        # except what this function returns.
        out = self.model.decoder(x, feat_cache=feat_cache, feat_idx=[0], first_chunk=(index == 0))
        if self.patch_size > 1:
            out = self._unpatchify(out, patch_size=self.patch_size)
        next_state = [s if isinstance(s, torch.Tensor) else None for s in feat_cache]
        return out, next_state

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.post_quant_conv.parameters()) + list(self.model.decoder.parameters())
