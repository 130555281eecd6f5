"""The loss keeps the precision of its inputs: PyTorch's type promotion between the decoded frames and the target.

Oracle: the loss written with torch.nn.functional on the model's own `vae.decode(latents).sample`, and plain
autograd through it (`lean=False`, so both run the same decoder modules).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import chopgrad
from chopgrad.losses import CHARBONNIER_EPS
from tiny_models import tiny_cogvideox, tiny_wan21

pytest.importorskip("diffusers")


def _near_target(pred: torch.Tensor, seed: int) -> torch.Tensor:
    """An fp32 target a few 1e-3 from the prediction (late in training), so bf16 rounding of it would show."""
    noise = torch.randn(pred.shape, generator=torch.Generator().manual_seed(seed))
    return (pred.float() + 0.004 * noise).clamp(-1, 1)


def _value_and_latent_grad(loss_of_latents, latents: torch.Tensor):
    z = latents.clone().requires_grad_(True)
    value = loss_of_latents(z)
    value.backward()
    return value.detach().double(), z.grad.double()


def _value_and_all_grads(vae, loss_of_latents, latents: torch.Tensor):
    """The value, and the gradients of the latents and of every decoder parameter, concatenated."""
    vae.zero_grad(set_to_none=True)
    value, latent_grad = _value_and_latent_grad(loss_of_latents, latents)
    params = [p.grad.double().flatten() if p.grad is not None else torch.zeros(p.numel(), dtype=torch.float64)
              for p in vae.parameters()]
    return value, latent_grad, torch.cat(params)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("loss", ["mse", "l1", {"mse": 1.0, "charbonnier": 0.5}])
def test_an_fp32_target_is_not_rounded_to_a_bf16_decoder(loss):
    vae = tiny_wan21(seed=0).to(torch.bfloat16)  # the decoder is trained too: its gradients are compared
    latents = torch.randn(1, 4, 3, 4, 6, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        target = _near_target(vae.decode(latents).sample, seed=2)
    terms = {loss: 1.0} if isinstance(loss, str) else loss
    eps = CHARBONNIER_EPS
    functional = {"mse": F.mse_loss, "l1": F.l1_loss,
                  "charbonnier": lambda p, t: ((p.float() - t) ** 2 + eps ** 2).sqrt().mean()}

    def reference(z):
        pred = vae.decode(z).sample.clamp(-1, 1)
        return sum(w * functional[name](pred, target) for name, w in terms.items())

    want_value, want_grad, want_params = _value_and_all_grads(vae, reference, latents)
    got_value, got_grad, got_params = _value_and_all_grads(
        vae, lambda z: chopgrad.pixel_loss(vae, z, target, loss=loss, d_trunc=None, lean=False), latents)
    # Rounding the target to bf16 moves this value by about 1% and the latent gradient by about 13%.
    assert _relative(got_value, want_value) < 1e-4
    assert _relative(got_grad, want_grad) < 2e-2
    assert _relative(got_params, want_params) < 2e-2


def test_the_fused_and_the_autograd_paths_agree_on_a_bf16_decoder():
    """A callable term (even of weight 0) moves the loss to the autograd path; the built-in terms stay the same."""
    vae = tiny_wan21(seed=3).to(torch.bfloat16).requires_grad_(False)
    latents = torch.randn(1, 4, 3, 4, 6, generator=torch.Generator().manual_seed(4)).bfloat16()
    with torch.no_grad():
        target = _near_target(vae.decode(latents).sample, seed=5)

    def nothing(pred, tgt):
        return (pred * 0).sum()

    for loss in ("mse", "ssim"):
        fused, fused_grad = _value_and_latent_grad(
            lambda z: chopgrad.pixel_loss(vae, z, target, loss=loss, lean=False), latents)
        mixed, mixed_grad = _value_and_latent_grad(
            lambda z: chopgrad.pixel_loss(vae, z, target, loss={loss: 1.0, nothing: 0.0}, lean=False), latents)
        assert _relative(mixed, fused) < 1e-5, loss
        assert _relative(mixed_grad, fused_grad) < 1e-2, loss


def test_autocast_losses_use_the_fp32_target():
    vae = tiny_wan21(seed=6).requires_grad_(False)
    latents = torch.randn(1, 4, 3, 4, 6, generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        target = _near_target(vae.decode(latents).sample, seed=8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.mse_loss(vae.decode(latents).sample.clamp(-1, 1).float(), target)
        got = chopgrad.pixel_loss(vae, latents, target, lean=False)
    assert abs(float(got) - float(want)) <= 1e-5 * float(want)


def test_float64_masked_and_callable_means_stay_float64():
    vae = tiny_cogvideox(seed=0).double()  # trainable: the decoder's gradients are compared too
    latents = torch.randn(1, 4, 3, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        shape = vae.decode(latents).sample.shape
    g = torch.Generator().manual_seed(10)
    target = torch.rand(shape, dtype=torch.float64, generator=g) * 2 - 1
    mask = torch.rand(shape, dtype=torch.float64, generator=g) / 3  # no weight is a power of two

    def masked_mean(z):
        pred = vae.decode(z).sample  # CogVideoX's decode does not clamp
        return ((pred - target) ** 2 * mask).sum() / mask.sum()

    want, want_grad, want_params = _value_and_all_grads(vae, masked_mean, latents)
    got, got_grad, got_params = _value_and_all_grads(
        vae, lambda z: chopgrad.pixel_loss(vae, z, target, mask=mask, d_trunc=None, lean=False), latents)
    assert _relative(got, want) < 1e-12
    assert _relative(got_grad, want_grad) < 1e-10
    assert _relative(got_params, want_params) < 1e-10

    def smooth_l1(pred, tgt):
        return F.smooth_l1_loss(pred, tgt)

    want, want_grad, want_params = _value_and_all_grads(vae, lambda z: smooth_l1(vae.decode(z).sample, target),
                                                        latents)
    got, got_grad, got_params = _value_and_all_grads(
        vae, lambda z: chopgrad.pixel_loss(vae, z, target, loss=smooth_l1, d_trunc=None, lean=False), latents)
    assert _relative(got, want) < 1e-12
    assert _relative(got_grad, want_grad) < 1e-10
    assert _relative(got_params, want_params) < 1e-10
