"""Spatial tiling: a decoder step whose backward (its vector-Jacobian product) runs tile by tile.

One decoder step's activations grow with the frame area. A tiled step keeps
its forward values and bounds what its backward holds by a tile plus a few
full-frame tensors. Tiling wraps an adapter (``tiled(adapter, ...)``); the
engine sees an ordinary step whose outputs come from an autograd Function, so
both schedules and every ``d_trunc`` work unchanged.

``exact``: for adapters that split a step into a global part and spatially
local stages (``adapter.tiled_parts``; the Wan family). The global part runs
at full frame with autograd. Each local stage runs tile by tile without a
graph, storing only its full-frame input; its backward recomputes each tile
from that input, widened by a halo that covers the stage's receptive field,
backpropagates the cotangent of the tile's interior and scatter-adds the
input cotangents into full-frame buffers. The causal-cache slots a stage
reads and writes are cropped with the same geometry. Zero padding at a crop's
edge only disturbs pixels within the halo, so interiors, and the gradient,
are exact (up to floating-point summation order).

``truncated`` (the paper's spatial truncation): for any adapter. The step
runs at full frame without a graph, so values are exact; its backward
recomputes the whole step on each latent tile's crop (widened by ``halo``) of
the latents and state and backpropagates the cotangent of the tile's
interior through that crop only. The gradient is approximate: influence from
beyond the halo is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import contextlib

import torch

from .base import DecodePlan, DecoderAdapter, State

TILE_GRADS = ("exact", "truncated")
#: a stage's tile interior is at least this many halos wide, so its recompute overhead stays bounded
#: ((1 + 2/4)^2 = 2.25x area at worst) on low-resolution stages where the tile would be small
MIN_CORE_HALOS = 4


@dataclass(frozen=True)
class Span:
    """One tile along one axis: `core` is the part it owns, `crop` the core widened by the halo, clipped."""

    core: slice
    crop: slice

    def core_in_crop(self, scale: int = 1) -> slice:
        """The core's position inside the crop, at `scale` times the resolution."""
        start = (self.core.start - self.crop.start) * scale
        return slice(start, start + (self.core.stop - self.core.start) * scale)


def spans(length: int, core: int, halo: int) -> list[Span]:
    """Tiles of `core` pixels covering [0, length) (the last one may be partial), each widened by `halo`."""
    out = []
    for start in range(0, length, core):
        stop = min(start + core, length)
        out.append(Span(slice(start, stop), slice(max(0, start - halo), min(length, stop + halo))))
    return out


def scaled(s: slice, scale: int) -> slice:
    return slice(s.start * scale, s.stop * scale)


@dataclass
class LocalStage:
    """A spatially local part of a decoder step.

    `run(x_crop, slot_values)` maps a crop of the stage input and the crops (same window, same
    resolution) of the cache slots it uses to the output crop (`upscale` times larger) and the new slot
    values. A slot value that is not a tensor (an empty slot or an adapter's marker) passes through as
    is. `halo` (stage-input pixels) covers the stage's receptive field; `scale` is decoded pixels per
    stage-input pixel.
    """

    run: Callable
    slots: tuple[int, ...]
    halo: int
    upscale: int
    scale: int


@dataclass
class _ExactSpec:
    stages: list[LocalStage]
    cores: list[tuple[int, int]]
    slot_inputs: list  # per state slot: a tensor position in the Function's inputs, or the non-tensor value
    num_params: int
    out_slots: list = field(default_factory=list)  # filled by forward: the slots whose new value is a tensor
    markers: dict = field(default_factory=dict)  # filled by forward: new non-tensor slot values


def _crop(t, rows: slice, cols: slice):
    return t[..., rows, cols] if isinstance(t, torch.Tensor) else t


def _autocast_state(device_type: str):
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (AttributeError, RuntimeError, TypeError):  # a device type without autocast
        return False, None


class _ExactTiles(torch.autograd.Function):
    """Inputs: the stage-0 input, the slot tensors the stages read, the trainable parameters they use.
    Outputs: the last stage's output, then the new slot tensors (`spec.out_slots` order)."""

    @staticmethod
    def forward(ctx, spec: _ExactSpec, x0, *tensors):
        slot_tensors = tensors[: len(tensors) - spec.num_params]
        value_of = lambda j: (slot_tensors[spec.slot_inputs[j][1]] if isinstance(spec.slot_inputs[j], tuple)
                              else spec.slot_inputs[j])
        stage_inputs, new_slots = [], {}
        x = x0
        for stage, (core_h, core_w) in zip(spec.stages, spec.cores):
            stage_inputs.append(x)
            b, _, _, h, w = x.shape
            u = stage.upscale
            out = None
            for rows in spans(h, core_h, stage.halo):
                for cols in spans(w, core_w, stage.halo):
                    y, values = stage.run(x[..., rows.crop, cols.crop],
                                          [_crop(value_of(j), rows.crop, cols.crop) for j in stage.slots])
                    if out is None:
                        out = y.new_empty((*y.shape[:-2], h * u, w * u))
                    out[..., scaled(rows.core, u), scaled(cols.core, u)] = \
                        y[..., rows.core_in_crop(u), cols.core_in_crop(u)]
                    for j, v in zip(stage.slots, values):
                        if not isinstance(v, torch.Tensor):
                            spec.markers[j] = v
                            continue
                        if j not in new_slots:
                            new_slots[j] = v.new_empty((*v.shape[:-2], h, w))
                        new_slots[j][..., rows.core, cols.core] = v[..., rows.core_in_crop(), cols.core_in_crop()]
            x = out
        spec.out_slots = sorted(new_slots)
        ctx.spec = spec
        ctx.device_type = x0.device.type
        ctx.autocast = _autocast_state(x0.device.type)
        ctx.save_for_backward(*stage_inputs, *tensors)
        ctx.set_materialize_grads(False)
        return (x, *[new_slots[j] for j in spec.out_slots])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, *grad_new_slots):
        spec = ctx.spec
        saved = ctx.saved_tensors
        stage_inputs = saved[: len(spec.stages)]
        tensors = saved[len(spec.stages):]
        slot_tensors = tensors[: len(tensors) - spec.num_params]
        params = tensors[len(tensors) - spec.num_params:]
        needs = ctx.needs_input_grad  # (spec, x0, *slot tensors, *params)
        slot_needs = needs[2: 2 + len(slot_tensors)]
        param_needs = needs[2 + len(slot_tensors):]
        out_grad_of = dict(zip(spec.out_slots, grad_new_slots))
        trainable = [p for p, n in zip(params, param_needs) if n]
        slot_grads: list[Optional[torch.Tensor]] = [None] * len(slot_tensors)
        param_grads: list[Optional[torch.Tensor]] = [None] * len(params)
        for s in reversed(range(len(spec.stages))):
            stage, (core_h, core_w), x_s = spec.stages[s], spec.cores[s], stage_inputs[s]
            need_x = s > 0 or needs[1]
            # one stage at a time: its slot and parameter gradients carry over to the earlier stages
            acc = _TileGradients(x_s if need_x else None, slot_tensors, param_needs)
            acc.tensor_grads, acc.param_grads = slot_grads, param_grads
            u = stage.upscale
            h, w = x_s.shape[-2:]
            for rows in spans(h, core_h, stage.halo):
                for cols in spans(w, core_w, stage.halo):
                    cot_out = None if grad_out is None else grad_out[..., scaled(rows.core, u), scaled(cols.core, u)]
                    cot_slots = [None if out_grad_of.get(j) is None else
                                 out_grad_of[j][..., rows.core, cols.core] for j in stage.slots]
                    if cot_out is None and all(c is None for c in cot_slots):
                        continue
                    with _recompute_context(ctx):
                        x_leaf = x_s[..., rows.crop, cols.crop].detach().requires_grad_(need_x)
                        leaves, wrt_slots = [], []
                        for j in stage.slots:
                            entry = spec.slot_inputs[j]
                            if not isinstance(entry, tuple):
                                leaves.append(entry)
                                continue
                            k = entry[1]
                            leaf = slot_tensors[k][..., rows.crop, cols.crop].detach().requires_grad_(slot_needs[k])
                            if slot_needs[k]:
                                wrt_slots.append((k, leaf))
                            leaves.append(leaf)
                        y, values = stage.run(x_leaf, leaves)
                        outputs, cotangents = [], []
                        if cot_out is not None:
                            outputs.append(y[..., rows.core_in_crop(u), cols.core_in_crop(u)])
                            cotangents.append(cot_out)
                        for v, c in zip(values, cot_slots):
                            if c is not None and isinstance(v, torch.Tensor) and v.requires_grad:
                                outputs.append(v[..., rows.core_in_crop(), cols.core_in_crop()])
                                cotangents.append(c)
                        wrt = ([x_leaf] if need_x else []) + [leaf for _, leaf in wrt_slots] + trainable
                        if not outputs or not wrt:
                            continue
                        grads = torch.autograd.grad(outputs, wrt, cotangents, allow_unused=True)
                    window = (rows.crop, cols.crop)
                    acc.add(grads, window, [(k, window) for k, _ in wrt_slots])
            grad_out = acc.main
        return (None, grad_out, *slot_grads, *param_grads)


def _recompute_context(ctx):
    """Autograd on, and the autocast state the forward ran under."""
    enabled, dtype = ctx.autocast
    autocast = torch.autocast(ctx.device_type, dtype=dtype, enabled=True) if enabled else contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.enable_grad())
    stack.enter_context(autocast)
    return stack


class _TileGradients:
    """Full-frame gradient buffers that each tile's gradients are added into: the main input (latents or stage
    input), the tensor inputs (state slots, allocated on first use) and the trainable parameters."""

    def __init__(self, main: Optional[torch.Tensor], tensors: Sequence[torch.Tensor], param_needs: Sequence[bool]):
        self.main = None if main is None else torch.zeros_like(main)
        self.tensors = tensors
        self.tensor_grads: list[Optional[torch.Tensor]] = [None] * len(tensors)
        self.param_needs = param_needs
        self.param_grads: list[Optional[torch.Tensor]] = [None] * len(param_needs)

    def add(self, grads: Sequence, main_window: tuple, tensor_windows: Sequence[tuple[int, tuple]]) -> None:
        """`grads` in the order (main if tracked, the tensors of `tensor_windows`, the trainable parameters)."""
        grads = list(grads)
        if self.main is not None:
            g = grads.pop(0)
            if g is not None:
                self.main[(..., *main_window)] += g
        for (k, window), g in zip(tensor_windows, grads):
            if g is None:
                continue
            if self.tensor_grads[k] is None:
                self.tensor_grads[k] = torch.zeros_like(self.tensors[k])
            self.tensor_grads[k][(..., *window)] += g
        it = iter(grads[len(tensor_windows):])
        for i, need in enumerate(self.param_needs):
            g = next(it) if need else None
            if g is not None:
                self.param_grads[i] = g if self.param_grads[i] is None else self.param_grads[i] + g


@dataclass
class _TruncatedSpec:
    adapter: DecoderAdapter
    index: int
    state: list  # per slot: a tensor position in the Function's inputs, or the non-tensor value
    core: tuple[int, int]  # latent pixels
    halo: int  # latent pixels
    spatial_factor: int
    num_params: int
    out_slots: list = field(default_factory=list)  # filled by forward: the new state's tensor slots
    next_values: list = field(default_factory=list)  # filled by forward: the new state, None where a tensor


def _slot_scale(slot: torch.Tensor, latent: torch.Tensor, what: str) -> int:
    """Pixels of a state slot per latent pixel; the crop geometry needs it to be the same integer on both axes."""
    h, w = slot.shape[-2:]
    lh, lw = latent.shape[-2:]
    if h % lh or w % lw or h // lh != w // lw:
        raise ValueError(f"tile_grad='truncated': {what} has spatial size {(h, w)}, not an integer multiple of the "
                         f"latent size {(lh, lw)}, so it cannot be cropped with the latents")
    return h // lh


class _TruncatedTiles(torch.autograd.Function):
    """Inputs: latents, the state's tensors, the trainable parameters. Outputs: frames, the new state's tensors."""

    @staticmethod
    def forward(ctx, spec: _TruncatedSpec, z, *tensors):
        state_tensors = tensors[: len(tensors) - spec.num_params]
        state = [state_tensors[e[1]] if isinstance(e, tuple) else e for e in spec.state]
        frames, next_state = spec.adapter.step(spec.index, z, state)
        if frames._base is not None:  # a view (unpatchify's reshape): the loss may overwrite the frames in place
            frames = frames.clone()
        spec.out_slots = [j for j, s in enumerate(next_state) if isinstance(s, torch.Tensor)]
        spec.next_values = [None if isinstance(s, torch.Tensor) else s for s in next_state]
        ctx.spec = spec
        ctx.device_type = z.device.type
        ctx.autocast = _autocast_state(z.device.type)
        ctx.save_for_backward(z, *tensors)
        ctx.set_materialize_grads(False)
        return (frames, *[next_state[j] for j in spec.out_slots])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_frames, *grad_next):
        spec = ctx.spec
        z, *tensors = ctx.saved_tensors
        state_tensors = tensors[: len(tensors) - spec.num_params]
        params = tensors[len(tensors) - spec.num_params:]
        needs = ctx.needs_input_grad
        state_needs = needs[2: 2 + len(state_tensors)]
        param_needs = needs[2 + len(state_tensors):]
        trainable = [p for p, n in zip(params, param_needs) if n]
        scales = [_slot_scale(t, z, f"state slot {k}") for k, t in enumerate(state_tensors)]
        next_grads = dict(zip(spec.out_slots, grad_next))
        acc = _TileGradients(z if needs[1] else None, state_tensors, param_needs)
        f = spec.spatial_factor
        h, w = z.shape[-2:]
        for rows in spans(h, spec.core[0], spec.halo):
            for cols in spans(w, spec.core[1], spec.halo):
                with _recompute_context(ctx):
                    z_leaf = z[..., rows.crop, cols.crop].detach().requires_grad_(needs[1])
                    windows = [(scaled(rows.crop, r), scaled(cols.crop, r)) for r in scales]
                    leaves = [t[(..., *window)].detach().requires_grad_(need)
                              for t, window, need in zip(state_tensors, windows, state_needs)]
                    state = [leaves[e[1]] if isinstance(e, tuple) else e for e in spec.state]
                    frames, next_state = spec.adapter.step(spec.index, z_leaf, state)
                    outputs, cotangents = [], []
                    if grad_frames is not None:
                        outputs.append(frames[..., rows.core_in_crop(f), cols.core_in_crop(f)])
                        cotangents.append(grad_frames[..., scaled(rows.core, f), scaled(cols.core, f)])
                    for j, s in enumerate(next_state):
                        g = next_grads.get(j)
                        if g is None or not isinstance(s, torch.Tensor) or not s.requires_grad:
                            continue
                        r = _slot_scale(s, z_leaf, f"new state slot {j}")
                        outputs.append(s[..., rows.core_in_crop(r), cols.core_in_crop(r)])
                        cotangents.append(g[..., scaled(rows.core, r), scaled(cols.core, r)])
                    tracked = [k for k, need in enumerate(state_needs) if need]
                    wrt = ([z_leaf] if needs[1] else []) + [leaves[k] for k in tracked] + trainable
                    if not outputs or not wrt:
                        continue
                    grads = torch.autograd.grad(outputs, wrt, cotangents, allow_unused=True)
                acc.add(grads, (rows.crop, cols.crop), [(k, windows[k]) for k in tracked])
        return (None, acc.main, *acc.tensor_grads, *acc.param_grads)


def _split_state(state: State) -> tuple[list, list]:
    """(per slot: ("tensor", k) or the value itself, the tensors in order)."""
    entries, tensors = [], []
    for s in state:
        if isinstance(s, torch.Tensor):
            entries.append(("tensor", len(tensors)))
            tensors.append(s)
        else:
            entries.append(s)
    return entries, tensors


class TiledAdapter(DecoderAdapter):
    """An adapter whose step computes its backward tile by tile (see the module docstring).

    `tile` is the tile size (h, w) in decoded pixels; `halo` (truncated mode only) the crop's widening in
    decoded pixels. Both are multiples of the decoder's spatial stride. Without grad the step is the
    wrapped adapter's own.
    """

    def __init__(self, base: DecoderAdapter, tile: tuple[int, int], mode: str, spatial_factor: int,
                 halo: int = 0):
        self.base, self.tile, self.mode = base, tile, mode
        self.spatial_factor, self.halo = spatial_factor, halo
        self.model = base.model
        self.clamp_range = base.clamp_range
        self.frames_are_private = base.frames_are_private

    def plan(self, latents: torch.Tensor) -> DecodePlan:
        return self.base.plan(latents)

    def initial_state(self) -> State:
        return self.base.initial_state()

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.base.parameters()

    def clamp(self, frames: torch.Tensor) -> torch.Tensor:
        return self.base.clamp(frames)

    def compute_device(self):
        return self.base.compute_device()

    def step(self, index: int, latent_group: torch.Tensor, state: State):
        if not torch.is_grad_enabled():
            return self.base.step(index, latent_group, state)
        if self.mode == "exact":
            return self._exact_step(index, latent_group, state)
        return self._truncated_step(index, latent_group, state)

    def _trainable(self, modules) -> list[torch.nn.Parameter]:
        seen, out = set(), []
        for m in modules:
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def _exact_step(self, index, latent_group, state):
        # `slots`: the global part's new slot values, and the local stages' slots as the step received them
        x0, slots, stages, modules, finish = self.base.tiled_parts(index, latent_group, state)
        slot_inputs, slot_tensors = [], []
        used = {j for stage in stages for j in stage.slots}
        for j, value in enumerate(slots):
            if j in used and isinstance(value, torch.Tensor):
                slot_inputs.append(("tensor", len(slot_tensors)))
                slot_tensors.append(value)
            else:
                slot_inputs.append(value)
        params = self._trainable(modules)
        cores = []
        for stage in stages:
            cores.append(tuple(max(-(-t // stage.scale), MIN_CORE_HALOS * stage.halo, 1) for t in self.tile))
        spec = _ExactSpec(stages=stages, cores=cores, slot_inputs=slot_inputs, num_params=len(params))
        out, *new_tensors = _ExactTiles.apply(spec, x0, *slot_tensors, *params)
        result = list(slots)
        for j in used:
            result[j] = spec.markers.get(j)
        for j, t in zip(spec.out_slots, new_tensors):
            result[j] = t
        return finish(out), [s if isinstance(s, torch.Tensor) else None for s in result]

    def _truncated_step(self, index, latent_group, state):
        entries, tensors = _split_state(state)
        params = [p for p in self.base.parameters() if p.requires_grad]
        f = self.spatial_factor
        spec = _TruncatedSpec(adapter=self.base, index=index, state=entries,
                              core=(max(1, self.tile[0] // f), max(1, self.tile[1] // f)), halo=self.halo // f,
                              spatial_factor=f, num_params=len(params))
        frames, *new_tensors = _TruncatedTiles.apply(spec, latent_group, *tensors, *params)
        next_state = list(spec.next_values)
        for j, t in zip(spec.out_slots, new_tensors):
            next_state[j] = t
        return frames, next_state


def supports_exact_tiling(adapter: DecoderAdapter) -> bool:
    return callable(getattr(adapter, "tiled_parts", None))


def tiled(adapter: DecoderAdapter, tile: tuple[int, int], mode: str, spatial_factor: int,
          halo: int = 0) -> TiledAdapter:
    """`adapter` with a tiled backward; arguments checked by the caller (see `chopgrad.pixel_loss`)."""
    return TiledAdapter(adapter, tile, mode, spatial_factor, halo)


__all__ = ["LocalStage", "MIN_CORE_HALOS", "Span", "TILE_GRADS", "TiledAdapter", "spans", "supports_exact_tiling",
           "tiled"]
