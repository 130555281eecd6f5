"""Forward values and gradients of pixel_loss against the models' own decode
(exact cases) and against an independent truncated oracle (truncated cases)."""
import pytest
import torch

import chopgrad
from tiny_models import MODELS, NativeDecoder, truncated_oracle

# Latent frame counts: 4 Wan steps; 7 CogVideoX latent frames = 3 steps (3+2+2).
LATENT_SHAPES = {"wan21": (1, 4, 4, 4, 5), "wan22": (1, 4, 4, 3, 2), "cogvideox": (1, 4, 7, 3, 5)}


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_case(request):
    vae = MODELS[request.param]()
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(LATENT_SHAPES[request.param], generator=generator)
    with torch.no_grad():
        video = vae.decode(latents).sample
    target = torch.rand(video.shape, generator=generator) * 2 - 1
    return request.param, vae, latents, video, target


@pytest.fixture(scope="module")
def full_backprop(model_case):
    """Plain autograd through vae.decode(z).sample: the exact-gradient oracle."""
    _, vae, latents, _, target = model_case
    z = latents.clone().requires_grad_(True)
    vae.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(vae.decode(z).sample, target)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}
    vae.zero_grad(set_to_none=True)
    return float(loss.detach()), z.grad.clone(), grads


def run_pixel_loss(vae, latents, target, **kw):
    z = latents.clone().requires_grad_(True)
    vae.zero_grad(set_to_none=True)
    loss = chopgrad.pixel_loss(vae, z, target, **kw)
    assert loss.shape == () and loss.dtype == torch.float32
    loss.backward()
    grads = {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}
    vae.zero_grad(set_to_none=True)
    return float(loss.detach()), z.grad.clone(), grads


def test_decode_matches_model_decode(model_case):
    _, vae, latents, video, _ = model_case
    assert torch.allclose(chopgrad.decode(vae, latents), video, rtol=1e-5, atol=1e-5)


def video_mse(video, target):
    return float(torch.nn.functional.mse_loss(video, target))


def test_streaming_decode_callback_sees_every_frame_once(model_case):
    _, vae, latents, video, _ = model_case
    seen = torch.full_like(video, float("nan"))

    def collect(frames_slice, frames):
        assert torch.isnan(seen[:, :, frames_slice]).all()
        seen[:, :, frames_slice] = frames

    with torch.no_grad():  # streaming carries no gradient; the model's parameters require grad here
        assert chopgrad.decode(vae, latents, callback=collect) is None
    assert torch.allclose(seen, video, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule", ["sliding", "chunked"])
@pytest.mark.parametrize("d_trunc", [None, "G-1"])
def test_untruncated_gradient_equals_full_backprop(model_case, full_backprop, schedule, d_trunc):
    _, vae, latents, video, target = model_case
    steps = chopgrad.wrap(vae).plan(latents).num_steps
    d = {None: None, "G-1": steps - 1}[d_trunc]
    ref_loss, ref_gz, ref_gp = full_backprop
    loss, gz, gp = run_pixel_loss(vae, latents, target, d_trunc=d, schedule=schedule)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert loss == pytest.approx(video_mse(video, target), rel=1e-5)
    assert rel_err(gz, ref_gz) <= 1e-5
    assert set(gp) == set(ref_gp)
    for name in ref_gp:
        assert rel_err(gp[name], ref_gp[name]) <= 1e-5, name


@pytest.mark.parametrize("schedule", ["sliding", "chunked"])
@pytest.mark.parametrize("d_trunc", [0, 1, 2])
def test_truncated_gradient_equals_detach_oracle(model_case, schedule, d_trunc):
    _, vae, latents, video, target = model_case
    ref_loss, ref_gz, ref_gp = truncated_oracle(vae, latents, target, d_trunc=d_trunc, schedule=schedule)
    loss, gz, gp = run_pixel_loss(vae, latents, target, d_trunc=d_trunc, schedule=schedule)
    # The forward value is the full-decode loss whatever the truncation.
    assert loss == pytest.approx(video_mse(video, target), rel=1e-5)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert rel_err(gz, ref_gz) <= 1e-5
    for name, ref in ref_gp.items():
        if ref.abs().max() == 0:
            assert name not in gp or gp[name].abs().max() == 0, name
        else:
            assert rel_err(gp[name], ref) <= 1e-5, name


def test_truncation_changes_the_gradient(model_case, full_backprop):
    """Guards the oracle comparison: truncation must actually cut something here."""
    _, vae, latents, _, target = model_case
    _, gz, _ = run_pixel_loss(vae, latents, target, d_trunc=0)
    assert rel_err(gz, full_backprop[1]) > 1e-3


def test_schedules_agree_at_zero_truncation(model_case):
    _, vae, latents, _, target = model_case
    _, gz_s, gp_s = run_pixel_loss(vae, latents, target, d_trunc=0, schedule="sliding")
    _, gz_c, gp_c = run_pixel_loss(vae, latents, target, d_trunc=0, schedule="chunked")
    assert rel_err(gz_s, gz_c) <= 1e-6
    for name in gp_s:
        assert rel_err(gp_s[name], gp_c[name]) <= 1e-6


def test_model_decode_still_works_afterwards(model_case):
    _, vae, latents, video, target = model_case
    z = latents.clone().requires_grad_(True)
    chopgrad.pixel_loss(vae, z, target, d_trunc=1).backward()
    with torch.no_grad():
        assert torch.equal(vae.decode(latents).sample, video)


def test_native_oracle_reproduces_model_decode(model_case):
    """The oracle's step loop must itself equal the model's decode."""
    _, vae, latents, video, _ = model_case
    native = NativeDecoder(vae)
    cache, parts = native.fresh_cache(), []
    with torch.no_grad():
        for g, (a, b) in enumerate(native.groups(latents.shape[2])):
            frames, cache = native.step(g, latents[:, :, a:b], cache)
            parts.append(frames)
    assert torch.allclose(torch.cat(parts, 2), video, rtol=1e-5, atol=1e-5)
