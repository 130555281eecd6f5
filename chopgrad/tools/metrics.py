"""Measures the tools share: gradient fidelity, the per-step squared error of a decode, and video quality.

Video quality is measured on clips in [-1, 1] (peak-to-peak 2), shaped (B, 3, F, H, W) or (3, F, H, W).
"""
from __future__ import annotations

import math

import torch

from chopgrad.kernels import ssim_frames


def gradient_fidelity(grad: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(cosine similarity, relative error ||grad - ref|| / ||ref||) in float64; NaN where a norm is 0."""
    g, r = grad.double().flatten(), ref.double().flatten()
    denom = float(g.norm() * r.norm())
    cosine = float(g @ r) / denom if denom > 0 else float("nan")
    ref_norm = float(r.norm())
    rel_error = float((g - r).norm()) / ref_norm if ref_norm > 0 else float("nan")
    return cosine, rel_error


def squared_errors_per_step(plan, latents: torch.Tensor, target: torch.Tensor, run_step, state):
    """Sum of squared errors of each decoder step's frames against `target`, step by step (a generator).

    `run_step(g, z_g, state) -> (frames, next state)` runs step g; the caller decides what graph it keeps
    (the whole chain, per-step checkpoints).
    """
    for g in range(plan.num_steps):
        z = latents[:, :, plan.group_bounds[g]:plan.group_bounds[g + 1]]
        frames, state = run_step(g, z, state)
        y = target[:, :, plan.frame_slice(g)].to(frames.device)
        yield (frames.float() - y.float()).square().sum()


def _batched(video: torch.Tensor) -> torch.Tensor:
    return video.unsqueeze(0) if video.dim() == 4 else video


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB over the whole clip (or batch): 10 log10(2^2 / MSE)."""
    mse = float((pred.double() - target.double()).square().mean())
    return 10.0 * math.log10(4.0 / max(mse, 1e-20))


def ssim(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean per-frame SSIM (11x11 Gaussian window, data range 2), as the 'ssim' loss uses it."""
    return float(ssim_frames(_batched(pred).float(), _batched(target).float()).mean())


def temporal_error(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean absolute difference between the output's and the target's frame-to-frame changes (0 for one frame).

    A flickering or lagging output scores high even when every frame alone is close to the target.
    """
    pred, target = _batched(pred).double(), _batched(target).double()
    if pred.shape[2] < 2:
        return 0.0
    return float(((pred[:, :, 1:] - pred[:, :, :-1]) - (target[:, :, 1:] - target[:, :, :-1])).abs().mean())
