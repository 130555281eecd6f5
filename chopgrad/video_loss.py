"""The per-step loss callback of the engine, normalised so that the sum over
decoder steps is the loss of the whole decoded video.

Two paths:
- fused: every term is a built-in pixel loss or SSIM. One value-and-grad
  kernel pass per step returns the value and d loss / d raw frames (the
  model's output clamp is applied inside, with torch.clamp's exact gradient);
  for adapters whose frames are private buffers the gradient overwrites the
  frames (they are dead after the loss), so no second frame-sized tensor lives.
- autograd: any term is a user callable; the value keeps its graph (SSIM joins
  through a surrogate carrying its fused gradient). A mask weights the
  elementwise terms and, for a callable, only selects: the callable sees the
  prediction where the mask is non-zero and the target elsewhere.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import kernels
from .adapters import DecodePlan, DecoderAdapter
from .frames import FrameSource
from .losses import CHARBONNIER_EPS, ELEMENTWISE_LOSSES, HUBER_DELTA, LossTerm


class VideoLoss:
    def __init__(self, adapter: DecoderAdapter, plan: DecodePlan, terms: list[LossTerm], target: FrameSource,
                 mask: Optional[FrameSource], reduction: str, clamp: bool, supervised: list[bool]):
        self.adapter, self.plan, self.terms = adapter, plan, terms
        self.target, self.mask = target, mask
        self.reduction, self.clamp = reduction, clamp
        if any(t.is_ssim and t.weight != 0 for t in terms):
            if mask is not None:
                raise ValueError("mask is not supported with the 'ssim' loss (SSIM windows straddle masked pixels)")
            try:
                kernels.ssim.check_frame_size(plan.height, plan.width, what="decoded frames")
            except ValueError as exc:
                raise ValueError(f"loss: 'ssim': {exc}") from None
        self.supervised_frames = sum(f for f, s in zip(plan.frames_per_step, supervised) if s)
        self.element_denominator = 1.0
        if reduction == "mean" and any(t.elementwise for t in terms):
            self.element_denominator = self._element_count(supervised)
        self.pixel_weights = {t.name: t.weight for t in terms if t.elementwise}
        self.ssim_weight = sum(t.weight for t in terms if t.is_ssim)
        self.callables = [t for t in terms if t.is_callable]
        unit_clamp = clamp and adapter.clamp_range == (-1.0, 1.0)
        # The fused ops know one clamp, [-1, 1]; other ranges take the autograd path.
        self.fused = not self.callables and (not clamp or adapter.clamp_range is None or unit_clamp)
        self.fused_clamp = "pre" if unit_clamp else False

    def _element_count(self, supervised: list[bool]) -> float:
        b, c, _, h, w = self.plan.video_shape
        if self.mask is None:
            return float(b * c * h * w * self.supervised_frames)
        total = 0.0
        with torch.no_grad():
            for g, sup in enumerate(supervised):
                if sup:
                    device = self.mask.tensor.device if self.mask.tensor is not None else "cpu"
                    m = self.mask.get(self.plan.frame_slice(g), like=torch.empty(0, device=device))
                    total += float(m.sum(dtype=torch.float64)) * (c if m.shape[1] == 1 else 1)
        # An all-zero mask supervises no pixel: the elementwise terms and their gradient are 0, not 0/0.
        return total if total > 0 else 1.0

    def _ssim_scale(self) -> float:
        """d loss / d (sum of per-frame SSIM) is minus this."""
        if self.reduction == "mean":
            return self.ssim_weight / (self.plan.batch * self.supervised_frames)
        return self.ssim_weight

    def __call__(self, step: int, raw_frames: torch.Tensor, need_grad: bool):
        frames = self.plan.frame_slice(step)
        target = self.target.get(frames, like=raw_frames)
        mask = None if self.mask is None else self.mask.get(frames, like=raw_frames)
        if self.fused:
            return self._fused(raw_frames, target, mask, need_grad)
        return self._autograd(step, raw_frames, target, mask, need_grad)

    def _fused(self, raw, target, mask, need_grad):
        # The loss is that of the frames against the target as given (PyTorch's type promotion, as in
        # F.mse_loss(pred, target)): an fp32 target is not rounded to a bf16 decoder's frames, the frames are
        # lifted to fp32 for the loss instead, and the gradient goes back in the frames' dtype.
        dtype = torch.promote_types(raw.dtype, target.dtype)
        private_raw = need_grad and getattr(self.adapter, "frames_are_private", False) and raw.is_contiguous()
        frames = raw if raw.dtype == dtype else raw.to(dtype, memory_format=torch.contiguous_format)
        target = target.to(dtype)
        in_place = need_grad and (private_raw or frames is not raw)
        value = torch.zeros((), device=raw.device, dtype=torch.float32)
        ssim_grad = None
        if self.ssim_weight:
            scale = self._ssim_scale()
            if need_grad:
                # SSIM reads its inputs twice; when a pixel loss follows, it may not overwrite them.
                out = "inplace" if in_place and not self.pixel_weights else None
                ssim, ssim_grad = kernels.ssim_value_and_grad(frames, target, clamp=self.fused_clamp,
                                                              grad_scale=-scale, out_grad=out)
            else:
                ssim = kernels.ssim_frames(frames, target, clamp=self.fused_clamp)
            value = value + scale * (ssim.numel() - ssim.sum())
        if not self.pixel_weights:
            return (value, self._in_frames_dtype(ssim_grad, raw, private_raw)) if need_grad else value
        options = dict(kind=self.pixel_weights, clamp=self.fused_clamp, delta=HUBER_DELTA, eps=CHARBONNIER_EPS)
        if not need_grad:
            sums = kernels.pixel_loss_frames(frames, target, mask, **options)
            return value + sums.sum() / self.element_denominator
        sums, grad = kernels.pixel_loss_value_and_grad(frames, target, mask, grad_scale=1.0 / self.element_denominator,
                                                       out_grad="inplace" if in_place else None, **options)
        if ssim_grad is not None:
            grad = grad.add_(ssim_grad)
        return value + sums.sum() / self.element_denominator, self._in_frames_dtype(grad, raw, private_raw)

    @staticmethod
    def _in_frames_dtype(grad: torch.Tensor, raw: torch.Tensor, private_raw: bool) -> torch.Tensor:
        """The gradient in the dtype of the decoder's frames (autograd needs it so); in their storage if private."""
        if grad.dtype == raw.dtype:
            return grad
        return raw.copy_(grad) if private_raw else grad.to(raw.dtype)

    def _autograd(self, step, raw, target, mask, need_grad):
        pred = self.adapter.clamp(raw) if self.clamp else raw
        # Sums in at least fp32; a float64 decoder keeps float64 throughout.
        loss_dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
        total = torch.zeros((), device=pred.device, dtype=loss_dtype)
        if self.pixel_weights:
            p_loss, t_loss = pred.to(loss_dtype), target.to(loss_dtype)
            per_element = sum(w * ELEMENTWISE_LOSSES[name](p_loss, t_loss) for name, w in self.pixel_weights.items())
            if mask is not None:
                per_element = per_element * mask.to(loss_dtype)
            total = total + per_element.sum() / self.element_denominator
        if self.ssim_weight:
            scale = self._ssim_scale()
            ssim_dtype = torch.promote_types(pred.dtype, target.dtype)
            ssim, grad = kernels.ssim_value_and_grad(pred.detach().to(ssim_dtype), target.to(ssim_dtype),
                                                     grad_scale=-scale)
            # Its gradient w.r.t. pred is the fused SSIM gradient.
            surrogate = (pred * grad.to(pred.dtype)).sum().to(loss_dtype)
            total = total + scale * (ssim.numel() - ssim.sum()) + surrogate - surrogate.detach()
        if mask is not None:
            # For a callable the mask selects pixels; its weights scale only the elementwise terms. A weighted
            # blend would hand the callable images outside the prediction's and the target's range.
            pred = torch.where(mask != 0, pred, target.to(pred.dtype))
        share = self.plan.frames_per_step[step] / self.supervised_frames if self.reduction == "mean" else 1.0
        for term in self.callables:
            value = term.call(pred, target, need_grad)
            total = total + term.weight * share * value.to(torch.promote_types(value.dtype, torch.float32))
        return total
