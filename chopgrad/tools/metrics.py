"""Measures the bench and the probe share: gradient fidelity, and the per-step squared error of a decode."""
from __future__ import annotations

import torch


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
