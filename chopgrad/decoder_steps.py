"""The step function the engine calls: an adapter step made safe to run more than once.

The recomputed sliding schedule runs a decoder step again for every later
loss that reaches back to it, and every schedule backpropagates a step's graph
only after the step has returned (the sliding schedule keeps it alive for up
to d_trunc later steps). Two things must then hold that a single forward pass
never needs:

- Every run of a step draws the same random numbers (dropout in train mode):
  the random state before the step's first run is recorded and restored
  before each further run, as `torch.utils.checkpoint` does with
  `preserve_rng_state`, so the loss value equals the model's own decode
  under the same seed.
- Each saved leaf tensor (a weight, a state slot) is held as it was at
  forward time. Module hooks such as diffusers' layerwise casting and group
  offloading swap a parameter's data after its module ran (back to bf16 or
  fp8 storage, or to an offload placeholder); autograd would otherwise read
  the swapped data in backward. The cost: while a step's graph is alive it
  keeps the compute-dtype, onloaded weights it used.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from . import _ext
from .adapters import DecodePlan, DecoderAdapter

#: Latents are (B, C, T, h, w): decoder steps cut them along T.
LATENT_TIME_DIM = 2


class ReplayedRandomness:
    """Restores, before each run of a step after its first, the random state of its first run.

    Only the most recent `window` steps are remembered: the recomputed sliding
    schedule never re-runs a step further back than its truncation distance.
    """

    def __init__(self, device: torch.device, window: int):
        self.window = max(int(window), 1)
        self.device_module = None if device.type == "cpu" else torch.get_device_module(device.type)
        self.device = device
        self.states: dict[int, tuple] = {}

    def _capture(self) -> tuple:
        cpu = torch.get_rng_state()
        other = self.device_module.get_rng_state(self.device) if self.device_module is not None else None
        return cpu, other

    def _restore(self, state: tuple) -> None:
        cpu, other = state
        torch.set_rng_state(cpu)
        if other is not None:
            self.device_module.set_rng_state(other, self.device)

    def before_step(self, index: int) -> None:
        if index in self.states:
            self._restore(self.states[index])
            return
        self.states[index] = self._capture()
        for old in [k for k in self.states if k <= index - self.window]:
            del self.states[old]


def _hold_leaves_as_at_forward(tensor: torch.Tensor) -> torch.Tensor:
    # A leaf (parameter, buffer, detached state) is saved by reference; a
    # detached alias keeps today's data even if a hook later swaps `.data`.
    return tensor.detach() if tensor.grad_fn is None else tensor


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def saved_leaves_as_at_forward():
    """A context in which autograd saves each leaf tensor as it is now, not by reference."""
    return torch.autograd.graph.saved_tensors_hooks(_hold_leaves_as_at_forward, _unpack)


def engine_step(adapter: DecoderAdapter, plan: DecodePlan, replay: ReplayedRandomness | None = None) -> Callable:
    """The engine's step callback: runs `adapter.step`, checks the frames' shape against the plan."""

    def step(index: int, latent_group: torch.Tensor, state: list):
        if replay is not None:
            replay.before_step(index)
        if torch.is_grad_enabled():
            with saved_leaves_as_at_forward():
                frames, next_state = adapter.step(index, latent_group, state)
        else:
            frames, next_state = adapter.step(index, latent_group, state)
        b, c, _, h, w = plan.video_shape
        expected = (b, c, plan.frames_per_step[index], h, w)
        if not isinstance(frames, torch.Tensor) or tuple(frames.shape) != expected:
            got = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
            raise RuntimeError(f"decoder step {index} returned frames of shape {got}, "
                               f"but the adapter's plan expects {expected}")
        return frames, next_state

    return step


def build_engine(adapter: DecoderAdapter, plan: DecodePlan, loss: Callable, supervised: list[bool], d_trunc: int,
                 schedule: str, replay: Optional[ReplayedRandomness] = None):
    """The C++ engine for one run over `plan`: `loss(step, raw_frames, need_grad)` is the per-step loss callback."""
    return _ext.load_extension().Engine(
        step=engine_step(adapter, plan, replay), loss=loss, group_bounds=list(plan.group_bounds),
        supervised=supervised, d_trunc=d_trunc, schedule=schedule, initial_state=adapter.initial_state(),
        time_dim=LATENT_TIME_DIM)
