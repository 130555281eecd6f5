"""The causal-conv chunker: an all-causal video decoder, decoded a few latent frames per step, exactly.

A decoder that decodes the whole clip in one call gives each causal temporal conv its input with
`kernel_t - 1` padding frames in front. Cut the latents into groups and run the decoder once per
group: the frames are the same if every such conv puts, instead of that padding, the last
`kernel_t - 1` frames of its input from the previous group in front of its input (its cache), and
on the first group the padding the model itself uses. This holds only when

- every mix across time goes through such convs (causal, stride 1 in time);
- norms are per frame or per position (no statistics over time);
- there is no attention across frames, or it is causal and carries a key/value cache.

Which modules are causal temporal convs comes from an explicit per-model registry: a mapping from
module paths (as in `model.named_modules()`) to what the module needs (a `StepModule`). Class names
cannot be trusted: LTX-Video's "CausalConv3d" pads symmetrically in its released configs.

The model's own code runs each step. While a step runs, each registered module's `forward` is
routed to its `StepModule`, which reads the module's part of the step's input state and records its
part of the next state; both are explicit (the adapter's state list), so the step is pure. The
routing is undone before the step returns, also when it raises. A `StepModule` other than
`CausalConv` gives a module its own state (a key/value cache) or a first-step special case.

    from chopgrad.adapters.causal_conv_chunker import CausalConv, CausalConvChunker

    # each MyCausalConv pads 2 zero frames in front of its input, then runs self.conv (padding (0, 1, 1))
    convs = {name: CausalConv(kernel_t=3, run=lambda conv, x: conv.conv(x), first_pad="zeros")
             for name, m in vae.named_modules() if isinstance(m, MyCausalConv)}
    adapter = CausalConvChunker(vae, lambda z: vae.decoder(z), convs, latent_channels=16, out_channels=3,
                                temporal_factor=4, spatial_factor=8, first_step_drop=3,
                                parameters=vae.decoder.parameters)
    loss = chopgrad.pixel_loss(adapter, latents, target, d_trunc=1)

docs/vaes.md describes it further.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable, Mapping, Optional, Union

import torch

from .base import DecodePlan, DecoderAdapter, State, check_latents

#: what a causal conv puts before the first frame: copies of the first frame, or zeros
FIRST_PADS = ("replicate", "zeros")


class StepModule:
    """How one registered module runs inside a chunker step.

    `slots` state entries belong to the module; before step 0 each is None.
    While a step runs, the module's forward is `call(module, state, index,
    *args, **kwargs)`, which returns what the module's forward returns and the
    module's next state (a sequence of `slots` tensors). `state` is the
    module's part of the step's input state and must not be modified, nor may
    `call` change the module: the engine re-runs steps from saved states. A
    module with slots must run exactly once per step; a module without slots
    (one that only needs the step index) may run any number of times.
    """

    slots: ClassVar[int] = 0

    def call(self, module: torch.nn.Module, state: tuple, index: int, *args, **kwargs):
        raise NotImplementedError


@dataclass(frozen=True)
class CausalConv(StepModule):
    """A causal, stride-1 temporal convolution, fed its past from the cache.

    `run(module, frames, *args, **kwargs)` computes what the module's forward
    returns for input frames that already carry their `kernel_t - 1` frames of
    past in front: the convolution without temporal padding (with the model's
    spatial padding). `first_pad` is what the model puts before its first frame:
    "replicate" (copies of the first frame) or "zeros". For a conv with temporal
    dilation d, `kernel_t` is its temporal extent (k - 1) * d + 1.
    """

    kernel_t: int
    run: Callable
    first_pad: str = "replicate"

    slots: ClassVar[int] = 1

    def __post_init__(self):
        if not isinstance(self.kernel_t, int) or self.kernel_t < 2:
            raise ValueError(f"CausalConv: kernel_t must be an int >= 2 (a temporal kernel of 1 has no past and "
                             f"needs no cache: leave that module out of the registry), got {self.kernel_t!r}")
        if self.first_pad not in FIRST_PADS:
            raise ValueError(f"CausalConv: first_pad must be one of {FIRST_PADS}, got {self.first_pad!r}")
        if not callable(self.run):
            raise TypeError(f"CausalConv: run must be callable (module, frames) -> output, got {self.run!r}")

    def call(self, module, state, index, x, *args, **kwargs):
        (cache,) = state
        past = self.kernel_t - 1
        if cache is None:
            first = x[:, :, :1]
            cache = first.expand(-1, -1, past, -1, -1) if self.first_pad == "replicate" else \
                torch.zeros_like(first).expand(-1, -1, past, -1, -1)
        frames = torch.cat([cache, x], dim=2)
        # A copy, not a view: the state must not keep this step's whole input alive.
        next_cache = frames[:, :, -past:].clone()
        return self.run(module, frames, *args, **kwargs), (next_cache,)


class CausalConvChunker(DecoderAdapter):
    """An all-causal decoder as a pure step function, `latents_per_step` latent frames per step.

    Args:
        model: the module the registry's paths are relative to (the VAE).
        decode: `decode(latent_group) -> frames`, the model's own decoder on
            one group of latent frames, e.g. `lambda z: vae.decoder(z)`.
        modules: the registry, {module path: StepModule}: every causal temporal
            conv of the decoder (as `CausalConv`), and any module that carries
            its own state. Its order fixes the state layout.
        latent_channels, out_channels: channels of latents and of frames.
        temporal_factor, spatial_factor: frames per latent frame and pixels per
            latent pixel of the decoder's output.
        latents_per_step: latent frames per step (the last step may take fewer).
        first_frame_expansion: frames the decoder makes of the clip's first
            latent frame, when that differs from `temporal_factor` (an upsampler
            that leaves the first frame alone makes 1); `temporal_factor` by default.
        first_step_drop: frames the model's decode drops from the start of
            its output (they belong to step 0).
        parameters: the parameters `decode` uses (an iterable, or a callable
            returning one); all of `model`'s by default.
        clamp_range: the model's own output clamp, if it clamps.

    While a step runs, modules' `gradient_checkpointing` flags are off: a
    checkpointed block would be re-run in backward without the cache routing.
    """

    def __init__(self, model: torch.nn.Module, decode: Callable[[torch.Tensor], torch.Tensor],
                 modules: Mapping[str, StepModule], *, latent_channels: int, out_channels: int,
                 temporal_factor: int, spatial_factor: int, latents_per_step: int = 1, first_step_drop: int = 0,
                 first_frame_expansion: Optional[int] = None,
                 parameters: Union[None, Iterable, Callable[[], Iterable]] = None,
                 clamp_range: Optional[tuple[float, float]] = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"CausalConvChunker: model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(decode):
            raise TypeError(f"CausalConvChunker: decode must be callable (latent_group) -> frames, got {decode!r}")
        if first_frame_expansion is None:
            first_frame_expansion = temporal_factor
        for what, value, least in (("latent_channels", latent_channels, 1), ("out_channels", out_channels, 1),
                                   ("temporal_factor", temporal_factor, 1), ("spatial_factor", spatial_factor, 1),
                                   ("latents_per_step", latents_per_step, 1), ("first_step_drop", first_step_drop, 0),
                                   ("first_frame_expansion", first_frame_expansion, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"CausalConvChunker: {what} must be an int >= {least}, got {value!r}")
        self.model = model
        self.decode_group = decode
        self.latent_channels, self.out_channels = latent_channels, out_channels
        self.temporal_factor, self.spatial_factor = temporal_factor, spatial_factor
        self.latents_per_step = latents_per_step
        self.first_frame_expansion = first_frame_expansion
        self._first_step_drop = first_step_drop
        self._parameters = parameters
        self.clamp_range = clamp_range
        self._entries = []  # (path, module, StepModule, first slot)
        slot = 0
        for path, spec in modules.items():
            if not isinstance(spec, StepModule):
                raise TypeError(f"CausalConvChunker: registry entry {path!r} must be a CausalConv or another "
                                f"StepModule, got {type(spec).__name__}")
            try:
                module = model.get_submodule(path)
            except AttributeError as e:
                raise ValueError(f"CausalConvChunker: registry path {path!r} names no submodule of "
                                 f"{type(model).__name__} ({e})") from None
            self._entries.append((path, module, spec, slot))
            slot += spec.slots
        if len({id(m) for _, m, _, _ in self._entries}) != len(self._entries):
            raise ValueError("CausalConvChunker: the registry names one module twice")
        self.num_slots = slot

    # ------------------------------------------------------------------ the adapter contract

    def first_step_drop(self) -> int:
        """Frames the model's decode drops from the start of step 0's output."""
        return self._first_step_drop

    def plan(self, latents: torch.Tensor) -> DecodePlan:
        check_latents(latents, channels=self.latent_channels)
        b, _, t, h, w = latents.shape
        bounds = tuple(range(0, t, self.latents_per_step)) + (t,)
        frames = [self._decoded_frames(i, bounds[i + 1] - bounds[i]) for i in range(len(bounds) - 1)]
        drop = self.first_step_drop()
        if frames[0] <= drop:
            raise ValueError(f"latents: the first step decodes {frames[0]} frames and the model drops the first "
                             f"{drop}, so it would emit none; give more latent frames")
        frames[0] -= drop
        return DecodePlan(bounds, tuple(frames), b, self.out_channels, h * self.spatial_factor,
                          w * self.spatial_factor)

    def initial_state(self) -> State:
        return [None] * self.num_slots

    def step(self, index: int, latent_group: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if len(state) != self.num_slots:
            raise ValueError(f"{type(self).__name__}: the state must have {self.num_slots} entries, got {len(state)}")
        run = _StepRun(self._entries, index, state)
        with self._routed(run):
            frames = self.decode_group(latent_group)
        next_state = run.next_state(self.num_slots)
        expected = self._decoded_frames(index, latent_group.shape[2])
        if not isinstance(frames, torch.Tensor) or frames.dim() != 5 or frames.shape[2] != expected:
            got = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
            raise RuntimeError(f"{type(self).__name__}: decode gave {got} for {latent_group.shape[2]} latent frames "
                               f"of step {index}; temporal_factor={self.temporal_factor}, first_frame_expansion="
                               f"{self.first_frame_expansion} expect (B, C, {expected}, H, W)")
        if index == 0 and self.first_step_drop():
            frames = frames[:, :, self.first_step_drop():]
        return frames, next_state

    def _decoded_frames(self, index: int, latent_frames: int) -> int:
        """Frames the decoder makes of step `index`'s latent frames, before the first step's drop."""
        if index == 0:
            return self.first_frame_expansion + (latent_frames - 1) * self.temporal_factor
        return latent_frames * self.temporal_factor

    def parameters(self) -> list[torch.nn.Parameter]:
        params = self._parameters
        if params is None:
            return list(self.model.parameters())
        return list(params() if callable(params) else params)

    # ------------------------------------------------------------------ routing

    @contextlib.contextmanager
    def _routed(self, run: "_StepRun"):
        routed, unchecked = [], []
        try:
            for path, module, spec, _ in self._entries:
                own = module.__dict__.get("forward")
                if isinstance(own, _Routed):
                    raise RuntimeError(f"{type(self).__name__}: {path!r} is already routed: a chunker step runs "
                                       f"inside another step")
                if own is not None:
                    raise RuntimeError(
                        f"{type(self).__name__}: module {path!r} has its forward wrapped ("
                        f"{_wrapper_name(module)}); a chunker step replaces that module's forward and would skip "
                        f"the wrapper: put the hook on its submodules or on a parent module")
                module.__dict__["forward"] = _Routed(run, path, module, spec)
                routed.append(module)
            for module in self.model.modules():
                if getattr(module, "gradient_checkpointing", False) is True:
                    module.gradient_checkpointing = False
                    unchecked.append(module)
            yield
        finally:
            for module in routed:
                module.__dict__.pop("forward", None)
            for module in unchecked:
                module.gradient_checkpointing = True


class _Routed:
    """A registered module's forward during one step."""

    def __init__(self, run: "_StepRun", path: str, module: torch.nn.Module, spec: StepModule):
        self.run, self.path, self.module, self.spec = run, path, module, spec

    def __call__(self, *args, **kwargs):
        return self.run.call(self.path, self.module, self.spec, args, kwargs)


class _StepRun:
    """The input state one step reads and the next state it records, per registered module."""

    def __init__(self, entries, index: int, state: State):
        self.index = index
        self.entries = entries
        self.inputs = {path: tuple(state[first:first + spec.slots]) for path, _, spec, first in entries}
        self.outputs: dict[str, tuple] = {}

    def call(self, path, module, spec, args, kwargs):
        if spec.slots and path in self.outputs:
            raise RuntimeError(f"the decoder ran {path!r} twice in one step; a module with a cache must run once "
                               f"per step (its second call would read the same cache)")
        out, new = spec.call(module, self.inputs[path], self.index, *args, **kwargs)
        new = tuple(new)
        if len(new) != spec.slots:
            raise RuntimeError(f"{type(spec).__name__} for {path!r} returned {len(new)} state entries, "
                               f"its slots are {spec.slots}")
        self.outputs[path] = new
        return out

    def next_state(self, num_slots: int) -> State:
        state: State = [None] * num_slots
        for path, _, spec, first in self.entries:
            if not spec.slots:
                continue
            if path not in self.outputs:
                raise RuntimeError(f"the decoder did not run {path!r} in this step; every registered module with a "
                                   f"cache must run once per step (is the registry this decoder's?)")
            state[first:first + spec.slots] = self.outputs[path]
        return state


def _wrapper_name(module: torch.nn.Module) -> str:
    if getattr(module, "_diffusers_hook", None) is not None:
        return "a diffusers hook"
    if getattr(module, "_hf_hook", None) is not None:
        return "an accelerate hook"
    return "an instance attribute 'forward'"


__all__ = ["CausalConv", "CausalConvChunker", "FIRST_PADS", "StepModule"]
