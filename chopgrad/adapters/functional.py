"""Adapter for any user-written decoder step function."""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Union

import torch

from .base import DecodePlan, DecoderAdapter, State, check_latents

StepFn = Callable[[int, torch.Tensor, State], "tuple[torch.Tensor, State]"]


class FunctionalAdapter(DecoderAdapter):
    """Wraps `step(index, latent_group, state) -> (frames, next_state)`.

    Args:
        step: a pure function; `state` is a list of tensors or None, and the
            returned next state must be a new list of the same kind.
        latent_channels: channel count (dim 1) of the latents.
        latents_per_step: latent frames consumed per step (the last step may take fewer).
        frames_out: pixel frames each step emits: an int, or a callable
            `(index, latent_frames_in_step) -> int`.
        out_channels: channel count of the frames.
        spatial_scale: pixel height/width per latent height/width.
        initial_state: the state before step 0 (default: an empty list).
        parameters: the parameters the step uses (those with requires_grad get gradients).
        clamp_range: (low, high) if the model's own decode clamps its output.
    """

    def __init__(
        self,
        step: StepFn,
        *,
        latent_channels: int,
        frames_out: Union[int, Callable[[int, int], int]],
        out_channels: int = 3,
        latents_per_step: int = 1,
        spatial_scale: int = 1,
        initial_state: Optional[Sequence[Optional[torch.Tensor]]] = None,
        parameters: Iterable[torch.nn.Parameter] = (),
        clamp_range: Optional[tuple[float, float]] = None,
    ):
        if not callable(step):
            raise TypeError(f"step must be callable, got {type(step).__name__}")
        for name, value in (("latent_channels", latent_channels), ("out_channels", out_channels),
                            ("latents_per_step", latents_per_step), ("spatial_scale", spatial_scale)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (callable(frames_out) or (isinstance(frames_out, int) and frames_out >= 1)):
            raise ValueError(f"frames_out must be a positive int or a callable, got {frames_out!r}")
        self._step = step
        self.latent_channels = latent_channels
        self.latents_per_step = latents_per_step
        self.frames_out = frames_out
        self.out_channels = out_channels
        self.spatial_scale = spatial_scale
        self._initial_state = list(initial_state or [])
        self._parameters = list(parameters)
        self.clamp_range = clamp_range

    def plan(self, latents: torch.Tensor) -> DecodePlan:
        check_latents(latents, channels=self.latent_channels)
        b, _, t, h, w = latents.shape
        bounds = list(range(0, t, self.latents_per_step)) + [t]
        frames = []
        for i in range(len(bounds) - 1):
            n = self.frames_out(i, bounds[i + 1] - bounds[i]) if callable(self.frames_out) else self.frames_out
            frames.append(int(n))
        return DecodePlan(tuple(bounds), tuple(frames), b, self.out_channels, h * self.spatial_scale, w * self.spatial_scale)

    def initial_state(self) -> State:
        return list(self._initial_state)

    def step(self, index: int, latent_group: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        result = self._step(index, latent_group, list(state))
        name = getattr(self._step, "__qualname__", None) or type(self._step).__name__
        expected = ("must return (frames, next_state): frames a (B, C, f, H, W) tensor, next_state a list of "
                    "tensors or None")
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            got = f"a {len(result)}-tuple" if isinstance(result, (tuple, list)) else type(result).__name__
            raise TypeError(f"FunctionalAdapter: the step function {name!r} {expected}; step {index} returned {got}")
        frames, next_state = result
        if not isinstance(frames, torch.Tensor):
            raise TypeError(f"FunctionalAdapter: the step function {name!r} {expected}; step {index} returned "
                            f"frames of type {type(frames).__name__}")
        if not isinstance(next_state, (list, tuple)) or not all(
                s is None or isinstance(s, torch.Tensor) for s in next_state):
            raise TypeError(f"FunctionalAdapter: the step function {name!r} {expected}; step {index} returned "
                            f"next_state of type {type(next_state).__name__}")
        return frames, list(next_state)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self._parameters)
