"""Targets and masks: whole-video tensors on any device, or callables that stream frames."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

FrameInput = Union[torch.Tensor, Callable[[slice], torch.Tensor]]


class FrameSource:
    """Serves frames `[:, :, frame_slice]` of a (B, C, F, H, W) video, one decoder step at a time.

    A tensor is validated once, up front, and sliced then moved to the
    prediction's device per step (so a video on the CPU never has to fit on
    the GPU). A callable `frame_slice -> tensor` is validated on every call.
    With `allow_single_channel`, a channel dim of 1 broadcasts (masks).
    With `constant`, a tensor that requires grad is an error: no gradient is
    delivered to it, and dropping one silently would be wrong. With
    `weights`, values must be finite and non-negative.
    """

    def __init__(self, source: FrameInput, name: str, video_shape: tuple, *, allow_single_channel: bool = False,
                 constant: bool = False, weights: bool = False):
        self.name = name
        self.video_shape = tuple(video_shape)
        self.allow_single_channel = allow_single_channel
        self.constant = constant
        self.weights = weights
        if isinstance(source, torch.Tensor):
            self._check(source, self.video_shape, whole_video=True)
            self.tensor, self.fn = source, None
        elif callable(source):
            self.tensor, self.fn = None, source
        else:
            raise TypeError(f"{name} must be a tensor of shape {self.video_shape} or a callable frame_slice -> tensor, "
                            f"got {type(source).__name__}")

    def _expected(self, frames: int) -> str:
        b, c, _, h, w = self.video_shape
        channels = f"1 or {c}" if self.allow_single_channel else str(c)
        return f"(B={b}, C={channels}, F={frames}, H={h}, W={w})"

    def _check(self, t: torch.Tensor, shape: tuple, *, whole_video: bool) -> None:
        what = "the decoded video" if whole_video else "the frames of this decoder step"
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{self.name} must return a tensor, got {type(t).__name__}")
        if not (t.is_floating_point() or t.dtype == torch.bool):
            raise TypeError(f"{self.name} must be a floating-point tensor, got dtype {t.dtype}")
        ok = t.dim() == 5 and t.shape[0] == shape[0] and tuple(t.shape[2:]) == tuple(shape[2:]) and (
            t.shape[1] == shape[1] or (self.allow_single_channel and t.shape[1] == 1))
        if not ok:
            raise ValueError(f"{self.name} must match {what}: expected shape {self._expected(shape[2])}, "
                             f"got {tuple(t.shape)}")
        if self.constant and t.requires_grad:
            raise ValueError(f"{self.name} requires grad, but pixel_loss delivers no gradient to the {self.name} "
                             f"(only to the latents and decoder parameters): pass {self.name}.detach(), or compute "
                             f"a loss on a learned {self.name} yourself")
        if self.weights and t.dtype != torch.bool:
            with torch.no_grad():
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{self.name} contains NaN or Inf values; weights must be finite and >= 0")
                if bool((t < 0).any()):
                    raise ValueError(f"{self.name} has negative values (min {float(t.min()):g}); "
                                     f"weights must be >= 0")

    def get(self, frames: slice, like: torch.Tensor) -> torch.Tensor:
        if self.fn is None:
            part = self.tensor[:, :, frames]
        else:
            part = self.fn(frames)
            shape = list(self.video_shape)
            shape[2] = frames.stop - frames.start
            self._check(part, tuple(shape), whole_video=False)
        # Asynchronous only towards an accelerator, whose stream orders the copy before its use; a copy to the
        # CPU must be complete before the CPU reads it.
        return part.to(device=like.device, non_blocking=like.device.type != "cpu")


def optional_source(source: Optional[FrameInput], name: str, video_shape: tuple, **kw) -> Optional[FrameSource]:
    return None if source is None else FrameSource(source, name, video_shape, **kw)
