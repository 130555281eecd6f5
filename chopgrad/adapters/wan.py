"""Adapter for diffusers `AutoencoderKLWan` (Wan 2.1 and Wan 2.2 configs)."""
from __future__ import annotations

import torch

from functools import partial

from .base import DecodePlan, DecoderAdapter, State, check_latents, is_diffusers_instance, refuse_diffusers_tiling
from .tiling import LocalStage

# diffusers marks an upsample slot whose first chunk had no temporal conv with
# this string; it only matters on the step after the first.
_REPEAT_SENTINEL = "Rep"


def _is_wan(model) -> bool:
    return is_diffusers_instance(model, "AutoencoderKLWan")


class WanAdapter(DecoderAdapter):
    """One latent frame per step, exactly as `AutoencoderKLWan._decode` does.

    The state is diffusers' `feat_cache` list with the "Rep" sentinel stored as
    None: on step 0 every slot is empty, and from step 1 on an empty slot can
    only be an upsample slot that diffusers marked "Rep", so the sentinel is
    restored from the step index. `post_quant_conv` (a 1x1x1 convolution) is
    applied per step, which equals applying it to the whole latent.
    """

    fused_ops_unavailable = None

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
        refuse_diffusers_tiling(self.model)
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

    # ------------------------------------------------------------------ spatial tiling
    # Everything after the mid block (the up blocks and the head) is spatially local: causal 3D convs,
    # RMS norms over channels, SiLU, nearest upsampling, 2D convs, and (Wan 2.2) duplicating shortcuts.
    # Each up block is one stage; the head joins the last. Every cache slot a stage uses lies at the
    # stage's input resolution.

    def tiled_parts(self, index: int, latent_group: torch.Tensor, state: State):
        """The step split for exact tiling: (stage-0 input, slots, stages, modules of the stages, finish).

        The global part (post_quant_conv, conv_in, the mid block with its attention) runs here with
        autograd. `slots` holds its new slot values and, for the local stages' slots, the values this
        step received; `finish` maps the last stage's output to the step's frames.
        """
        decoder = self.model.decoder
        feat_cache = self._to_feat_cache(state, index)
        x = self.model.post_quant_conv(latent_group)
        feat_idx = [0]
        x = _cached_conv(decoder.conv_in, x, feat_cache, feat_idx)
        x = decoder.mid_block(x, feat_cache=feat_cache, feat_idx=feat_idx)
        stages, scale = [], self.spatial_factor // self.patch_size
        blocks = list(decoder.up_blocks)
        for i, block in enumerate(blocks):
            last = i == len(blocks) - 1
            count = _slots_of_up_block(block) + (1 if last else 0)
            slots = tuple(range(feat_idx[0], feat_idx[0] + count))
            feat_idx[0] += count
            upscale = 2 if _spatial_upsampler(block) is not None else 1
            run = partial(_run_stage, decoder, block, slots, len(feat_cache), last, index == 0)
            stages.append(LocalStage(run=run, slots=slots, halo=_stage_halo(decoder, block, last), upscale=upscale,
                                     scale=scale * self.patch_size))
            scale //= upscale
        modules = [*blocks, decoder.norm_out, decoder.conv_out]

        def finish(out):
            return self._unpatchify(out, patch_size=self.patch_size) if self.patch_size > 1 else out

        return x, feat_cache, stages, modules, finish


def _cached_conv(conv, x, feat_cache, feat_idx):
    """A decoder-level causal conv with its cache slot, as WanDecoder3d.forward runs conv_in and conv_out."""
    idx = feat_idx[0]
    cache_x = x[:, :, -2:].clone()
    if cache_x.shape[2] < 2 and isinstance(feat_cache[idx], torch.Tensor):
        cache_x = torch.cat([feat_cache[idx][:, :, -1:].to(cache_x.device), cache_x], dim=2)
    x = conv(x, feat_cache[idx])
    feat_cache[idx] = cache_x
    feat_idx[0] += 1
    return x


def _spatial_upsampler(block):
    upsampler = getattr(block, "upsampler", None)  # Wan 2.2's WanResidualUpBlock
    if upsampler is None and getattr(block, "upsamplers", None) is not None:
        upsampler = block.upsamplers[0]
    if upsampler is None or not upsampler.mode.startswith("upsample"):
        return None
    return upsampler


def _slots_of_up_block(block) -> int:
    # two cached convs per residual block; an upsample3d resampler caches its time_conv
    upsampler = _spatial_upsampler(block)
    return 2 * len(block.resnets) + (1 if upsampler is not None and upsampler.mode == "upsample3d" else 0)


def _radius(conv) -> int:
    k = conv.kernel_size
    return max(k[-1] // 2, k[-2] // 2)


def _stage_halo(decoder, block, last: bool) -> int:
    """Stage-input pixels that cover the stage's receptive field (the spatial radii of its convs)."""
    halo = sum(_radius(r.conv1) + _radius(r.conv2) for r in block.resnets)
    upsampler = _spatial_upsampler(block)
    if upsampler is not None:
        conv2d = upsampler.resample[1]
        halo += -(-_radius(conv2d) // 2)  # it runs at twice the stage-input resolution
    if last:
        halo += _radius(decoder.conv_out)
    return halo


def _run_stage(decoder, block, slots, num_slots, last, first_chunk, x, slot_values):
    feat_cache = [None] * num_slots
    for j, v in zip(slots, slot_values):
        feat_cache[j] = v
    feat_idx = [slots[0]] if slots else [0]
    x = block(x, feat_cache=feat_cache, feat_idx=feat_idx, first_chunk=first_chunk)
    if last:
        x = decoder.norm_out(x)
        x = decoder.nonlinearity(x)
        x = _cached_conv(decoder.conv_out, x, feat_cache, feat_idx)
    if slots and feat_idx[0] != slots[-1] + 1:
        raise RuntimeError(f"Wan decoder stage used cache slots up to {feat_idx[0]}, expected {slots[-1] + 1}: "
                           f"this decoder layout is not the one exact tiling was built for")
    return x, [feat_cache[j] for j in slots]
