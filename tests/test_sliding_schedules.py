"""The sliding schedule (each step forward once, a chain of one-step VJPs) against its recompute variant.

Both give the truncated gradient of docs/design.md section 2; the independent oracles of test_equivalence.py
check each against an explicit-detach re-implementation. Here the two are compared directly, on all three
model classes, to fp32 rounding.
"""
import pytest
import torch

import chopgrad
from tiny_models import MODELS


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("d_trunc", [0, 1, 2, 3])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_sliding_equals_sliding_recompute(model, d_trunc):
    vae = MODELS[model]()
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    latent_frames = 5 if model == "cogvideox" else 7
    g = torch.Generator().manual_seed(d_trunc)
    z0 = torch.randn(1, 4, latent_frames, 3, 5, generator=g)
    with torch.no_grad():
        target = torch.rand_like(vae.decode(z0).sample) * 2 - 1
    mask = torch.rand(target.shape[0], 1, *target.shape[2:], generator=g)
    results = {}
    for schedule in ("sliding", "sliding_recompute"):
        z = z0.clone().requires_grad_(True)
        vae.zero_grad(set_to_none=True)
        loss = chopgrad.pixel_loss(vae, z, target, d_trunc=d_trunc, schedule=schedule, mask=mask,
                                   loss={"mse": 1.0, "l1": 0.5})
        loss.backward()
        results[schedule] = (loss.detach(), z.grad, [p.grad.clone() for p in vae.decoder.parameters()])
    (value, grad, params), (ref_value, ref_grad, ref_params) = results["sliding"], results["sliding_recompute"]
    assert float(value) == float(ref_value)
    assert _relative(grad, ref_grad) <= 1e-6
    assert _relative(torch.cat([p.flatten() for p in params]), torch.cat([p.flatten() for p in ref_params])) <= 1e-6
    for p, r in zip(params, ref_params):
        assert _relative(p, r) <= 1e-5 or float(r.norm()) == 0.0
