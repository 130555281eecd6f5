"""Adapter for diffusers `AutoencoderKLCogVideoX`."""
from __future__ import annotations

import math

import torch

from .base import DecodePlan, DecoderAdapter, State, check_latents, is_diffusers_instance, refuse_diffusers_tiling


def _is_cogvideox(model) -> bool:
    return is_diffusers_instance(model, "AutoencoderKLCogVideoX")


def _flatten(tree, leaves: list, prefix: tuple = ()) -> list:
    """Depth-first (key path, leaf) pairs of a nested dict, in insertion order."""
    paths = []
    for key, value in tree.items():
        if isinstance(value, dict):
            paths.extend(_flatten(value, leaves, prefix + (key,)))
        else:
            paths.append(prefix + (key,))
            leaves.append(value)
    return paths


def _unflatten(paths, leaves) -> dict:
    tree: dict = {}
    for path, leaf in zip(paths, leaves):
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


class CogVideoXAdapter(DecoderAdapter):
    """Chunks of `num_latent_frames_batch_size` (2) latent frames; the first takes 3 when the count is odd.

    The state is the decoder's nested `conv_cache` dict flattened to a list.
    Its key layout is a fixed property of the decoder that diffusers does not
    expose, so the adapter learns it from the cache step 0 returns (the one
    thing a step records) and checks every later cache against it. The
    model's own decode does not clamp, so clamp_range is None.
    """

    fused_ops_unavailable = ("its resnet blocks normalise with a latent-conditioned GroupNorm (statistics over "
                             "channel groups and the whole frame), not the per-position RMS norm the fused ops "
                             "implement")

    clamp_range = None
    # The frames are the decoder's conv_out output, referenced by nothing else:
    # a fused loss may overwrite them with their gradient.
    frames_are_private = True

    def __init__(self, vae):
        if not _is_cogvideox(vae):
            raise TypeError(f"CogVideoXAdapter needs a diffusers AutoencoderKLCogVideoX, got {type(vae).__name__}")
        self.model = vae
        cfg = vae.config
        self.z_dim = cfg.latent_channels
        self.chunk = vae.num_latent_frames_batch_size
        upsamplers = len(cfg.block_out_channels) - 1  # the last up block has none
        # CogVideoXDecoder3D compresses time in its first log2(ratio) up blocks.
        self.temporal_levels = min(int(math.log2(cfg.temporal_compression_ratio)), upsamplers)
        self.spatial_factor = 2**upsamplers
        self.out_channels = cfg.out_channels
        self._cache_layout = None  # key paths of the flattened conv_cache, learnt on step 0

    def _frames_out(self, latent_frames: int) -> int:
        n = latent_frames
        for _ in range(self.temporal_levels):  # CogVideoXUpsample3D(compress_time=True)
            n = n if n == 1 else (1 + 2 * (n - 1) if n % 2 == 1 else 2 * n)
        return n

    def plan(self, latents: torch.Tensor) -> DecodePlan:
        refuse_diffusers_tiling(self.model)
        check_latents(latents, channels=self.z_dim)
        b, _, t, h, w = latents.shape
        # Mirrors AutoencoderKLCogVideoX._decode's slicing.
        num_batches = max(t // self.chunk, 1)
        rem = t % self.chunk
        bounds = [0] + [min(self.chunk * (i + 1) + rem, t) for i in range(num_batches)]
        frames = tuple(self._frames_out(bounds[i + 1] - bounds[i]) for i in range(num_batches))
        return DecodePlan(tuple(bounds), frames, b, self.out_channels, h * self.spatial_factor, w * self.spatial_factor)

    def initial_state(self) -> State:
        return []

    def step(self, index: int, latent_group: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if index == 0 or not state:
            conv_cache = None
        else:
            if self._cache_layout is None or len(self._cache_layout) != len(state):
                raise ValueError("CogVideoX decoder state does not match this decoder's cache layout "
                                 "(run step 0 first: it returns the state the later steps take)")
            conv_cache = _unflatten(self._cache_layout, state)
        z = latent_group
        if self.model.post_quant_conv is not None:
            z = self.model.post_quant_conv(z)
        out, new_cache = self.model.decoder(z, conv_cache=conv_cache)
        leaves: list = []
        self._learn_cache_layout(_flatten(new_cache, leaves))
        return out, leaves

    def _learn_cache_layout(self, paths: list) -> None:
        if self._cache_layout is None:
            self._cache_layout = paths
        elif paths != self._cache_layout:
            raise RuntimeError("the CogVideoX decoder returned a conv_cache with another key layout than on step 0; "
                               "chopgrad assumes the layout is fixed by the decoder's architecture")

    def parameters(self) -> list[torch.nn.Parameter]:
        params = list(self.model.decoder.parameters())
        if self.model.post_quant_conv is not None:
            params = list(self.model.post_quant_conv.parameters()) + params
        return params
