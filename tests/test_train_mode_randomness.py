"""A decoder in train mode with dropout: every re-run of a step by the sliding
schedule replays the random numbers of its first run, so values equal the
model's own decode under the same seed and the gradient equals an oracle that
replays them explicitly."""
import pytest
import torch

import chopgrad
from tiny_models import NativeDecoder


def wan_with_dropout():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                            temperal_downsample=[False, True, True], dropout=0.5).train()


@pytest.fixture(scope="module")
def case():
    vae = wan_with_dropout()
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 4, 5, 4, 5, generator=g)
    target = torch.rand(1, 3, 17, 32, 40, generator=g) * 2 - 1
    return vae, latents, target


def own_decode_loss(vae, latents, target, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(vae.decode(latents).sample, target))


def test_dropout_is_active(case):
    vae, latents, target = case
    assert own_decode_loss(vae, latents, target, 1) != own_decode_loss(vae, latents, target, 2)


@pytest.mark.parametrize("schedule, d_trunc", [("sliding", 1), ("sliding", 2), ("chunked", 1), ("sliding", None)])
def test_loss_value_equals_own_decode_under_the_same_seed(case, schedule, d_trunc):
    vae, latents, target = case
    expected = own_decode_loss(vae, latents, target, seed=7)
    z = latents.clone().requires_grad_(True)
    torch.manual_seed(7)
    value = chopgrad.pixel_loss(vae, z, target, d_trunc=d_trunc, schedule=schedule)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5)


def test_groups_with_unsupervised_steps_replay_too(case):
    vae, latents, target = case
    torch.manual_seed(11)
    with torch.no_grad():
        video = vae.decode(latents).sample
    expected = float(torch.nn.functional.mse_loss(video[:, :, 5:13], target[:, :, 5:13]))
    torch.manual_seed(11)
    z = latents.clone().requires_grad_(True)
    value = chopgrad.pixel_loss(vae, z, target, d_trunc=1, groups=[2, 3])
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5)


def replaying_sliding_oracle(vae, latents, target, d_trunc, seed):
    """The sliding truncated gradient with explicit detach and explicit random-state replay."""
    native = NativeDecoder(vae)
    steps = latents.shape[2]
    torch.manual_seed(seed)
    rng_before, frame_counts = [], []
    with torch.no_grad():
        cache = native.fresh_cache()
        for g in range(steps):
            rng_before.append(torch.get_rng_state())
            frames, cache = native.step(g, latents[:, :, g:g + 1], cache)
            frame_counts.append(frames.shape[2])
    offsets = [sum(frame_counts[:g]) for g in range(steps + 1)]
    denom = target.numel()
    grad = torch.zeros_like(latents)
    total = 0.0
    for g in range(steps):
        start = max(0, g - d_trunc)
        cache = native.fresh_cache()
        with torch.no_grad():
            for k in range(start):
                torch.set_rng_state(rng_before[k])
                _, cache = native.step(k, latents[:, :, k:k + 1], cache)
        cache = native.detach_cache(cache)
        z = latents.detach().clone().requires_grad_(True)
        for k in range(start, g + 1):
            torch.set_rng_state(rng_before[k])
            frames, cache = native.step(k, z[:, :, k:k + 1], cache)
        l_g = (frames - target[:, :, offsets[g]:offsets[g + 1]]).square().sum() / denom
        grad += torch.autograd.grad(l_g, z)[0]
        total += float(l_g.detach())
    return total, grad


@pytest.mark.parametrize("d_trunc", [1, 2])
def test_sliding_gradient_equals_replaying_oracle(case, d_trunc):
    vae, latents, target = case
    ref_value, ref_grad = replaying_sliding_oracle(vae, latents, target, d_trunc, seed=3)
    torch.manual_seed(3)
    z = latents.clone().requires_grad_(True)
    value = chopgrad.pixel_loss(vae, z, target, d_trunc=d_trunc)
    (grad,) = torch.autograd.grad(value, z)
    assert float(value.detach()) == pytest.approx(ref_value, rel=1e-5)
    assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_exact_gradient_in_train_mode_equals_autograd_through_own_decode(case):
    vae, latents, target = case
    z = latents.clone().requires_grad_(True)
    torch.manual_seed(4)
    (ref,) = torch.autograd.grad(torch.nn.functional.mse_loss(vae.decode(z).sample, target), z)
    torch.manual_seed(4)
    (grad,) = torch.autograd.grad(chopgrad.pixel_loss(vae, z, target, d_trunc=None), z)
    assert torch.allclose(grad, ref, rtol=1e-4, atol=1e-7)
