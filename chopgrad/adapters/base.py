"""The adapter contract: a causal-cache decoder seen as a pure step function.

A decoder step g consumes latent group z_g and state s_g and returns pixel
frames x_g and state s_{g+1}. The state is a flat list whose entries are
tensors or None (an empty slot); it is explicit, so the engine can detach it,
buffer it and re-run steps from it. Steps never read or write hidden state of
the wrapped model between calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

State = list  # list[torch.Tensor | None]


@dataclass(frozen=True)
class DecodePlan:
    """How a latent video of a given shape is decoded, known before any decoding.

    group_bounds[g]:group_bounds[g+1] are the latent frames of step g along dim 2;
    frames_per_step[g] is the number of pixel frames step g emits.
    """

    group_bounds: tuple[int, ...]
    frames_per_step: tuple[int, ...]
    batch: int
    channels: int
    height: int
    width: int

    @property
    def num_steps(self) -> int:
        return len(self.frames_per_step)

    @property
    def num_frames(self) -> int:
        return sum(self.frames_per_step)

    @property
    def video_shape(self) -> tuple[int, int, int, int, int]:
        return (self.batch, self.channels, self.num_frames, self.height, self.width)

    def frame_slice(self, step: int) -> slice:
        start = sum(self.frames_per_step[:step])
        return slice(start, start + self.frames_per_step[step])


class DecoderAdapter:
    """Base class of the adapters. Subclasses implement the four methods below."""

    #: (low, high) of the model's own output clamp, or None if it does not clamp.
    clamp_range: Optional[tuple[float, float]] = None
    #: True when the frames a step returns share storage with nothing else
    #: (not the state, not a parameter): the loss may then overwrite them in place.
    frames_are_private: bool = False
    #: the wrapped model (or None for a functional adapter)
    model: Optional[torch.nn.Module] = None
    #: why `lean=True` cannot run this decoder on chopgrad's fused ops, or None when it can
    fused_ops_unavailable: Optional[str] = (
        "chopgrad's fused ops implement the Wan decoder's blocks (RMS norm + SiLU + a zero-padded causal conv); "
        "this adapter's decoder is not known to be built from them"
    )

    def plan(self, latents: torch.Tensor) -> DecodePlan:
        """Validates `latents` (raising ValueError/TypeError naming it) and returns the plan."""
        raise NotImplementedError

    def initial_state(self) -> State:
        raise NotImplementedError

    def step(self, index: int, latent_group: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Runs decoder step `index`; returns raw (unclamped) frames and the next state.

        Pure: `state` is not modified; the returned state is a new list.
        """
        raise NotImplementedError

    def parameters(self) -> list[torch.nn.Parameter]:
        """Every parameter the step uses (the engine differentiates those with requires_grad)."""
        raise NotImplementedError

    def clamp(self, frames: torch.Tensor) -> torch.Tensor:
        if self.clamp_range is None:
            return frames
        return frames.clamp(*self.clamp_range)

    def compute_device(self) -> Optional[torch.device]:
        """The device the step computes on (latents must be there), or None when unknown.

        Offloaded weights rest elsewhere between calls, so the onload device
        of diffusers' group offloading or accelerate's execution device wins
        over where the parameters happen to lie.
        """
        if self.model is not None:
            hooked = _hooked_execution_device(self.model)
            if hooked is not None:
                return _with_index(hooked)
        for p in self.parameters():
            return _with_index(p.device)
        return None

    def compute_dtypes(self) -> Optional[set]:
        """The floating dtypes the wrapped model's layers compute in (latents must have one), or None when unknown.

        That is its parameters' dtypes, plus the compute dtype of diffusers' layerwise casting (whose weights
        rest in a storage dtype such as fp8). A functional adapter's step may cast as it likes: None.
        """
        if self.model is None:
            return None
        dtypes = {p.dtype for p in self.parameters() if p.is_floating_point()}
        for module in self.model.modules():
            registry = getattr(module, "_diffusers_hook", None)
            hook = None if registry is None else registry.get_hook("layerwise_casting")
            if hook is not None:
                dtypes.add(hook.compute_dtype)
        return dtypes or None


def is_diffusers_instance(model, class_name: str) -> bool:
    """Whether `model` is an instance of diffusers' `class_name` (False where diffusers has no such class)."""
    try:
        import diffusers
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return False
    cls = getattr(diffusers, class_name, None)
    return cls is not None and isinstance(model, cls)


def layerwise_cast_trainable_parameters(model: Optional[torch.nn.Module]) -> list[str]:
    """Names of parameters that require grad in modules with diffusers' layerwise casting.

    Such a weight is stored in a low-precision dtype and only cast up while
    its module runs, so no gradient of the stored weight is defined.
    """
    if model is None:
        return []
    names = []
    for module_name, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None or registry.get_hook("layerwise_casting") is None:
            continue
        names += [f"{module_name}.{n}".lstrip(".") for n, p in module.named_parameters(recurse=False)
                  if p.requires_grad]
    return names


def _with_index(device) -> torch.device:
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:
        module = torch.get_device_module(device.type)
        device = torch.device(device.type, module.current_device())
    return device


def _hooked_execution_device(model: torch.nn.Module):
    try:
        from diffusers.hooks.group_offloading import _get_top_level_group_offload_hook
    except ImportError:  # pragma: no cover - older diffusers
        _get_top_level_group_offload_hook = None
    if _get_top_level_group_offload_hook is not None:
        hook = _get_top_level_group_offload_hook(model)
        if hook is not None:
            return hook.config.onload_device
    for module in model.modules():
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return device
    return None


def refuse_diffusers_tiling(vae) -> None:
    """Refuses a VAE whose diffusers tiling is on, for adapters that decode untiled.

    With `enable_tiling()`, `vae.decode` blends overlapping tiles on large frames, so its frames near the seams
    are not those of the step-by-step decode; returning the untiled frames instead would be silently wrong.
    """
    if getattr(vae, "use_tiling", False):
        raise ValueError(
            f"vae: {type(vae).__name__} has diffusers' spatial tiling on (vae.enable_tiling()), whose decode blends "
            f"overlapping tiles; chopgrad decodes untiled, so its frames would differ from vae.decode near the "
            f"seams. Call vae.disable_tiling() first; chopgrad's own tile= argument bounds the memory of backward "
            f"and keeps the untiled frames")


def check_latents(latents, *, channels: int, name: str = "latents") -> None:
    """Shared validation of a (B, C, T, h, w) latent tensor."""
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, {channels}, T, h, w), got {type(latents).__name__}")
    if latents.dim() != 5:
        raise ValueError(f"{name} must have shape (B, {channels}, T, h, w), got {tuple(latents.shape)}")
    if not latents.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {latents.dtype}")
    if latents.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels (dim 1) for this decoder, got shape {tuple(latents.shape)}")
    if min(latents.shape) == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(latents.shape)}")
    if not bool(torch.isfinite(latents).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
