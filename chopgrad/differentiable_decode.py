"""`decode` inside an autograd graph: the whole video out, the truncated gradient back.

Forward decodes step by step without a graph (one step's activations and one
state at a time) and records each step's random state. Backward receives the
video's cotangent c (what any loss on the whole video hands back) and runs the
engine on the linear loss sum_g <clamp(frames_g), c_g>: its truncated gradient
is exactly the truncated vector-Jacobian product of docs/design.md section 2
with the cotangent of step g's frames flowing back through steps
g-d_trunc .. g only. So backward decodes once more, as `pixel_loss` does, and
its memory does not grow with the frame count; only the video and its
cotangent do.

Backward restores what forward ran under: the autocast state, the fused-op
patch (`lean`) and each step's random numbers (dropout in train mode), and it
leaves the caller's random state as it found it.
"""
from __future__ import annotations

from contextlib import ExitStack, nullcontext
from typing import Optional

import torch

from .adapters import DecodePlan, DecoderAdapter
from .adapters.wan_patch import lean_decoder
from .decoder_steps import LATENT_TIME_DIM, ReplayedRandomness, build_engine, engine_step

DOUBLE_BACKWARD_ERROR = (
    "chopgrad.decode: double backward is not supported: the truncated gradient runs the decoder again without "
    "a graph of its own, so create_graph=True (e.g. a gradient penalty) would silently get zero second-order "
    "terms. Use create_graph=False.")


class CotangentLoss:
    """Engine loss callback: step g's term is <clamp(frames_g), c_g>, its gradient c_g through the clamp."""

    def __init__(self, adapter: DecoderAdapter, plan: DecodePlan, cotangent: torch.Tensor, clamp: bool):
        self.adapter, self.plan, self.cotangent, self.clamp = adapter, plan, cotangent, clamp

    def cotangent_of(self, step: int) -> torch.Tensor:
        return self.cotangent[:, :, self.plan.frame_slice(step)]

    def __call__(self, step: int, raw_frames: torch.Tensor, need_grad: bool):
        cot = self.cotangent_of(step).to(device=raw_frames.device, dtype=raw_frames.dtype)
        raw = raw_frames.detach()
        if self.clamp:
            # the model's own clamp, differentiated by autograd: its exact rule at the bounds, whatever the range
            with torch.enable_grad():
                leaf = raw.requires_grad_(True)
                clamped = self.adapter.clamp(leaf)
                (grad,) = torch.autograd.grad(clamped, leaf, cot)
            clamped = clamped.detach()
        else:
            clamped, grad = raw, cot
        value = (clamped.float() * cot.float()).sum()
        return (value, grad) if need_grad else value


class DecodeRun:
    """Everything a differentiable decode needs in forward and again in backward."""

    def __init__(self, adapter: DecoderAdapter, backward_adapter: DecoderAdapter, plan: DecodePlan, d_trunc: int,
                 schedule: str, clamp: bool, lean: bool, trainable: list[torch.Tensor], device: torch.device):
        self.adapter, self.backward_adapter, self.plan = adapter, backward_adapter, plan
        self.d_trunc, self.schedule, self.clamp, self.lean = d_trunc, schedule, clamp, lean
        self.trainable = trainable
        self.device = device
        # every step may run again in backward: keep the random state of each one's first run
        self.replay = ReplayedRandomness(device, plan.num_steps + 1)
        self.autocast: Optional[tuple[bool, torch.dtype]] = None

    def _lean(self):
        return lean_decoder(self.adapter.model) if self.lean else nullcontext()

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        device_type = self.device.type
        self.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        return decode_without_graph(self.adapter, self.plan, latents, clamp=self.clamp, lean=self.lean,
                                    replay=self.replay)

    def backward(self, latents: torch.Tensor, cotangent: torch.Tensor) -> tuple:
        """(grad latents or None, [grad of each trainable parameter or None])."""
        loss = CotangentLoss(self.backward_adapter, self.plan, cotangent, self.clamp)
        # steps whose frames the loss does not reach are only advanced, not differentiated
        supervised = [bool(loss.cotangent_of(g).any()) for g in range(self.plan.num_steps)]
        leaf = latents.detach().requires_grad_(latents.requires_grad)
        inputs = ([leaf] if leaf.requires_grad else []) + list(self.trainable)
        if not any(supervised):
            grads = [None] * len(inputs)
        else:
            enabled, dtype = self.autocast
            devices = [self.device] if self.device.type != "cpu" else []
            with ExitStack() as stack:
                stack.enter_context(torch.random.fork_rng(devices=devices, device_type=self.device.type))
                stack.enter_context(torch.autocast(self.device.type, dtype=dtype, enabled=enabled))
                stack.enter_context(self._lean())
                stack.enter_context(torch.enable_grad())
                engine = build_engine(self.backward_adapter, self.plan, loss, supervised, self.d_trunc,
                                      self.schedule, self.replay)
                total = engine.loss(leaf, list(self.trainable))
                grads = list(torch.autograd.grad(total, inputs, allow_unused=True))
        grad_latents = grads.pop(0) if leaf.requires_grad else None
        return grad_latents, grads


class DecodeFunction(torch.autograd.Function):
    """video = decode(latents); backward: the truncated vector-Jacobian product of `DecodeRun.backward`."""

    @staticmethod
    def forward(ctx, run: DecodeRun, latents: torch.Tensor, *trainable: torch.Tensor) -> torch.Tensor:
        ctx.run = run
        # saved so that changing the latents or a weight in place before backward is an error, not a wrong gradient
        ctx.save_for_backward(latents, *trainable)
        return run.forward(latents)

    @staticmethod
    def backward(ctx, cotangent: torch.Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        latents = ctx.saved_tensors[0]
        grad_latents, grad_params = ctx.run.backward(latents, cotangent)
        return (None, grad_latents, *grad_params)


def decode_without_graph(adapter: DecoderAdapter, plan: DecodePlan, latents: torch.Tensor, *, clamp: bool,
                         lean: bool, callback=None, replay: Optional[ReplayedRandomness] = None):
    """Step-by-step decode under no grad into one (B, C, F, H, W) video, or handed to `callback` step by step."""
    step = engine_step(adapter, plan, replay)
    video = None
    with torch.no_grad(), lean_decoder(adapter.model) if lean else nullcontext():
        state = adapter.initial_state()
        for g in range(plan.num_steps):
            z = latents.narrow(LATENT_TIME_DIM, plan.group_bounds[g], plan.group_bounds[g + 1] - plan.group_bounds[g])
            frames, state = step(g, z, state)
            if clamp:
                frames = adapter.clamp(frames)
            if callback is not None:
                callback(plan.frame_slice(g), frames)
                continue
            if video is None:
                video = torch.empty(plan.video_shape, device=frames.device, dtype=frames.dtype)
            video[:, :, plan.frame_slice(g)] = frames
    return video
