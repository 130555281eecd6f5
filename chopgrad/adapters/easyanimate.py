"""Adapter for diffusers `AutoencoderKLMagvit` (EasyAnimate).

`AutoencoderKLMagvit._decode` already decodes step by step: the first latent
frame alone, then `num_latent_frames_batch_size` (1) latent frames per call.
Between calls the decoder keeps its causal cache in module attributes:

- each `EasyAnimateCausalConv3d` keeps the last `temporal_padding` frames of
  its (padded) input in `prev_features`; `None` means "first call", on which
  it pads its input by replicating the first frame instead;
- each `EasyAnimateUpsampler3D` keeps its first call's output activation in
  `prev_features`, used only as a "has run" flag: a temporal upsampler does not
  upsample time on its first call and doubles the frames on every later one.

The adapter makes those attributes explicit state. The state is the list of
the causal convs' `prev_features`, in module order. The upsamplers' flag is not
stored: an upsampler has run exactly when the causal conv inside it has a
cache, so the flag is a function of the state. A step sets the attributes from
its state (a plain `True` for the upsampler flag, so no activation of an
earlier step is referenced), runs the model's own `post_quant_conv` and
decoder, reads the new caches back, and restores every attribute it touched,
also when the decoder raises. Nothing of a step stays in the model, so the
engine may re-run steps, run them from detached states, and backpropagate a
step's graph after later steps ran.
"""
from __future__ import annotations

import torch

from .base import DecodePlan, DecoderAdapter, State, check_latents, is_diffusers_instance, refuse_diffusers_tiling


def _is_easyanimate(model) -> bool:
    return is_diffusers_instance(model, "AutoencoderKLMagvit")


class EasyAnimateAdapter(DecoderAdapter):
    """The first latent frame alone, then `vae.num_latent_frames_batch_size` (1) latent frames per step.

    Step 0 emits 1 pixel frame (the temporal upsamplers do not upsample on
    their first call); every later step emits `temporal_factor` (4) pixel frames
    per latent frame. The model's own decode does not clamp, so clamp_range is
    None. The adapter decodes as `vae.decode` does with diffusers' default
    settings. A VAE with diffusers' own spatial tiling on (`enable_tiling`) is
    refused (chopgrad's `tile=` replaces it); batch slicing is not reproduced
    (it only changes floating-point summation order).
    """

    fused_ops_unavailable = ("its resnet blocks normalise with GroupNorm (statistics over channel groups and "
                             "the whole frame), not the per-position RMS norm the fused ops implement")

    clamp_range = None
    # The frames are the output of the decoder's conv_out (a concat of its windows),
    # referenced by nothing else: a fused loss may overwrite them with their gradient.
    frames_are_private = True

    def __init__(self, vae):
        from diffusers.models.autoencoders.autoencoder_kl_magvit import (
            EasyAnimateCausalConv3d,
            EasyAnimateUpsampler3D,
        )

        if not _is_easyanimate(vae):
            raise TypeError(f"EasyAnimateAdapter needs a diffusers AutoencoderKLMagvit, got {type(vae).__name__}")
        self.model = vae
        decoder = vae.decoder
        self._convs = [m for m in decoder.modules() if isinstance(m, EasyAnimateCausalConv3d)]
        self._upsamplers = [m for m in decoder.modules() if isinstance(m, EasyAnimateUpsampler3D)]
        conv_slot = {id(conv): i for i, conv in enumerate(self._convs)}
        # The slot whose cache tells whether an upsampler has run: the causal conv it calls first.
        self._upsampler_slots = [conv_slot[id(up.conv)] for up in self._upsamplers]
        self.temporal_factor = 2 ** sum(bool(up.temporal_upsample) for up in self._upsamplers)
        self.spatial_factor = 2 ** len(self._upsamplers)
        cfg = vae.config
        self.z_dim = cfg.latent_channels
        self.out_channels = cfg.out_channels

    @property
    def num_slots(self) -> int:
        return len(self._convs)

    def plan(self, latents: torch.Tensor) -> DecodePlan:
        refuse_diffusers_tiling(self.model)
        check_latents(latents, channels=self.z_dim)
        chunk = self.model.num_latent_frames_batch_size
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"vae.num_latent_frames_batch_size must be a positive int, got {chunk!r}")
        b, _, t, h, w = latents.shape
        # Mirrors AutoencoderKLMagvit._decode: frame 0 alone, then chunks of `chunk`.
        bounds = (0, *range(1, t, chunk), t)
        frames = (1,) + tuple((bounds[i + 1] - bounds[i]) * self.temporal_factor for i in range(1, len(bounds) - 1))
        return DecodePlan(bounds, frames, b, self.out_channels, h * self.spatial_factor, w * self.spatial_factor)

    def initial_state(self) -> State:
        return [None] * self.num_slots

    def _check_state(self, index: int, state: State) -> None:
        if len(state) != self.num_slots:
            raise ValueError(f"EasyAnimate decoder state must have {self.num_slots} slots (one per causal conv), "
                             f"got {len(state)}")
        if any(s is not None and not isinstance(s, torch.Tensor) for s in state):
            raise TypeError("EasyAnimate decoder state entries must be tensors or None")
        filled = [isinstance(s, torch.Tensor) for s in state]
        if not all(filled) and any(filled):
            raise ValueError("EasyAnimate decoder state is partly empty: every causal conv has a cache after "
                             "step 0 and none before it")
        first = not any(filled)
        if first != (index == 0):
            raise ValueError(f"EasyAnimate decoder step {index} got "
                             f"{'an empty state' if first else 'a filled state'}: step 0 takes the initial state "
                             f"and every later step the state of the step before")

    def step(self, index: int, latent_group: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        self._check_state(index, state)
        decoder = self.model.decoder
        touched = [*self._convs, *self._upsamplers]
        saved = [m.__dict__.get("prev_features") for m in touched]
        # Checkpointed up blocks would be recomputed in backward, after this step restored the caches.
        saved_checkpointing = decoder.gradient_checkpointing
        try:
            decoder.gradient_checkpointing = False
            for conv, cache in zip(self._convs, state):
                conv.prev_features = cache
            for up, slot in zip(self._upsamplers, self._upsampler_slots):
                up.prev_features = None if state[slot] is None else True
            out = decoder(self.model.post_quant_conv(latent_group))
            next_state = [conv.prev_features for conv in self._convs]
        finally:
            for m, value in zip(touched, saved):
                m.prev_features = value
            decoder.gradient_checkpointing = saved_checkpointing
        if not all(isinstance(s, torch.Tensor) for s in next_state):
            raise RuntimeError("an EasyAnimate causal conv returned no cache: this decoder layout is not the one "
                               "EasyAnimateAdapter was built for")
        return out, next_state

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.post_quant_conv.parameters()) + list(self.model.decoder.parameters())
