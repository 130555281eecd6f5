"""pixel_loss features: upstream gradients, groups, masks, streaming targets,
no_grad evaluation, reductions, losses, clamp, autocast."""
import pytest
import torch
import torch.nn.functional as F

import chopgrad
from tiny_models import truncated_oracle, wan21_case


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def wan():
    return wan21_case(latent_frames=4, seed=3)


def full_grad(vae, latents, loss_of_video):
    z = latents.clone().requires_grad_(True)
    value = loss_of_video(vae.decode(z).sample)
    (grad,) = torch.autograd.grad(value, z)
    return float(value.detach()), grad


def chop_grad(vae, latents, target, **kw):
    z = latents.clone().requires_grad_(True)
    value = chopgrad.pixel_loss(vae, z, target, **kw)
    (grad,) = torch.autograd.grad(value, z)
    return float(value.detach()), grad


def test_upstream_module_gets_gradient_combined_with_other_loss(wan):
    vae, latents, _, target = wan
    torch.manual_seed(0)
    upstream = torch.nn.Conv3d(4, 4, kernel_size=1)
    noise = latents.clone()

    def total_loss(pixel_term):
        z = upstream(noise)
        return pixel_term(z) + 0.1 * z.square().mean()

    upstream.zero_grad()
    total_loss(lambda z: F.mse_loss(vae.decode(z).sample, target)).backward()
    expected = [p.grad.clone() for p in upstream.parameters()]
    upstream.zero_grad()
    vae.zero_grad(set_to_none=True)
    vae.requires_grad_(False)
    try:
        total_loss(lambda z: chopgrad.pixel_loss(vae, z, target, d_trunc=None)).backward()
    finally:
        vae.requires_grad_(True)
    for p, e in zip(upstream.parameters(), expected):
        assert rel_err(p.grad, e) <= 1e-5
    assert all(p.grad is None for p in vae.parameters())


def test_frozen_decoder_gets_no_parameter_gradients(wan):
    vae, latents, _, target = wan
    vae.requires_grad_(False)
    try:
        z = latents.clone().requires_grad_(True)
        chopgrad.pixel_loss(vae, z, target, d_trunc=1).backward()
        assert z.grad is not None and all(p.grad is None for p in vae.parameters())
    finally:
        vae.requires_grad_(True)


def test_decoder_only_training_without_latent_grad(wan):
    vae, latents, _, target = wan
    vae.zero_grad(set_to_none=True)
    chopgrad.pixel_loss(vae, latents, target, d_trunc=None).backward()
    got = {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}
    vae.zero_grad(set_to_none=True)
    F.mse_loss(vae.decode(latents).sample, target).backward()
    expected = {n: p.grad for n, p in vae.named_parameters() if p.grad is not None}
    assert set(got) == set(expected) and len(got) > 10
    for n in expected:
        assert rel_err(got[n], expected[n]) <= 1e-5, n
    vae.zero_grad(set_to_none=True)


def test_groups_supervise_a_subset_and_stop_after_the_last(wan, monkeypatch):
    vae, latents, _, target = wan
    adapter = chopgrad.wrap(vae)
    plan = adapter.plan(latents)
    sl1, sl2 = plan.frame_slice(1), plan.frame_slice(2)
    value, grad = full_grad(vae, latents, lambda v: (
        (v[:, :, sl1] - target[:, :, sl1]).square().sum() + (v[:, :, sl2] - target[:, :, sl2]).square().sum())
        / (target[:, :, sl1].numel() + target[:, :, sl2].numel()))
    calls = []
    original = adapter.step
    monkeypatch.setattr(adapter, "step", lambda i, z, s: (calls.append(i), original(i, z, s))[1])
    got_value, got_grad = chop_grad(adapter, latents, target, d_trunc=None, groups=[1, 2])
    assert got_value == pytest.approx(value, rel=1e-5)
    assert rel_err(got_grad, grad) <= 1e-5
    assert max(calls) == 2 and 3 not in calls  # decoding stopped after the last supervised step


@pytest.mark.parametrize("schedule", ["sliding", "chunked"])
def test_groups_with_truncation_match_oracle(wan, schedule):
    vae, latents, _, target = wan
    _, ref = truncated_oracle(vae, latents, target, d_trunc=1, schedule=schedule, supervised=[0, 2, 3])[:2]
    plan = chopgrad.wrap(vae).plan(latents)
    # The oracle normalises by the supervised frames too.
    _, got = chop_grad(vae, latents, target, d_trunc=1, schedule=schedule, groups=[0, 2, 3])
    assert rel_err(got, ref) <= 1e-5
    assert plan.num_steps == 4


def test_mask_weights_pixels_and_normalises_by_mask_sum(wan):
    vae, latents, video, target = wan
    g = torch.Generator().manual_seed(5)
    mask = (torch.rand(video.shape[0], 1, *video.shape[2:], generator=g) > 0.5).float()
    mask[:, :, 3] = 0  # an all-zero frame
    expected = lambda v: ((v - target).square() * mask).sum() / (mask.sum() * video.shape[1])
    value, grad = full_grad(vae, latents, expected)
    got_value, got_grad = chop_grad(vae, latents, target, mask=mask, d_trunc=None)
    assert got_value == pytest.approx(value, rel=1e-5)
    assert rel_err(got_grad, grad) <= 1e-5


def test_all_zero_mask_gives_zero_loss_and_gradient(wan):
    vae, latents, video, target = wan
    mask = torch.zeros(video.shape[0], 1, *video.shape[2:])
    value, grad = chop_grad(vae, latents, target, mask=mask, d_trunc=1)
    assert value == 0.0 and grad.abs().max() == 0


def test_callable_target_and_mask_stream_per_step(wan):
    vae, latents, video, target = wan
    mask = torch.rand(video.shape[0], 3, *video.shape[2:], generator=torch.Generator().manual_seed(2))
    requested = []

    def target_fn(frames):
        requested.append((frames.start, frames.stop))
        return target[:, :, frames]

    value, grad = chop_grad(vae, latents, target, mask=mask, d_trunc=1)
    got_value, got_grad = chop_grad(vae, latents, target_fn, mask=lambda s: mask[:, :, s], d_trunc=1)
    assert got_value == pytest.approx(value, rel=1e-6)
    assert torch.allclose(got_grad, grad, rtol=1e-6, atol=1e-9)
    assert requested[:4] == [(0, 1), (1, 5), (5, 9), (9, 13)]


def test_target_on_another_device_or_dtype_is_moved_per_step(wan):
    vae, latents, _, target = wan
    value, _ = chop_grad(vae, latents, target, d_trunc=0)
    got, _ = chop_grad(vae, latents, target.double(), d_trunc=0)
    assert got == pytest.approx(value, rel=1e-6)


def test_no_grad_only_evaluates(wan):
    vae, latents, video, target = wan
    z = latents.clone().requires_grad_(True)
    vae.zero_grad(set_to_none=True)
    with torch.no_grad():
        value = chopgrad.pixel_loss(vae, z, target, d_trunc=1)
    assert not value.requires_grad
    assert float(value) == pytest.approx(float(F.mse_loss(video, target)), rel=1e-5)
    assert z.grad is None and all(p.grad is None for p in vae.parameters())


def test_reduction_sum(wan):
    vae, latents, _, target = wan
    value, grad = full_grad(vae, latents, lambda v: (v - target).square().sum())
    got_value, got_grad = chop_grad(vae, latents, target, reduction="sum", d_trunc=None)
    assert got_value == pytest.approx(value, rel=1e-5)
    assert rel_err(got_grad, grad) <= 1e-5


@pytest.mark.parametrize("name,reference", [
    ("l1", lambda v, t: (v - t).abs().mean()),
    ("charbonnier", lambda v, t: ((v - t).square() + 1e-6).sqrt().mean()),
    ("huber", lambda v, t: F.huber_loss(v, t, delta=1.0)),
])
def test_named_losses(wan, name, reference):
    vae, latents, _, target = wan
    value, grad = full_grad(vae, latents, lambda v: reference(v, target))
    got_value, got_grad = chop_grad(vae, latents, target, loss=name, d_trunc=None)
    assert got_value == pytest.approx(value, rel=1e-5)
    assert rel_err(got_grad, grad) <= 1e-5


def test_weighted_dict_with_callable_term(wan):
    vae, latents, _, target = wan

    def frame_mean_abs(pred, tgt):  # a mean over the frames it sees
        return (pred - tgt).abs().mean()

    expected = lambda v: F.mse_loss(v, target) + 0.5 * (v - target).abs().mean() + 2.0 * frame_mean_abs(v, target)
    value, grad = full_grad(vae, latents, expected)
    got_value, got_grad = chop_grad(vae, latents, target, loss={"mse": 1.0, "l1": 0.5, frame_mean_abs: 2.0},
                                    d_trunc=None)
    assert got_value == pytest.approx(value, rel=1e-5)
    assert rel_err(got_grad, grad) <= 1e-5


def test_per_frame_wraps_image_losses(wan):
    vae, latents, _, target = wan
    image_loss = lambda p, t: (p - t).square().flatten(1).mean(1)  # (N,) per image, like LPIPS
    value, grad = full_grad(vae, latents, lambda v: F.mse_loss(v, target))
    got_value, got_grad = chop_grad(vae, latents, target, loss=chopgrad.per_frame(image_loss), d_trunc=None)
    assert got_value == pytest.approx(value, rel=1e-5)
    assert rel_err(got_grad, grad) <= 1e-5


def test_clamp_false_differentiates_the_raw_output(wan):
    vae, latents, _, _ = wan
    adapter = chopgrad.wrap(vae)
    with torch.no_grad():
        raw = chopgrad.decode(vae, latents, clamp=False)
    target = raw.detach() * 0.5  # raw values beyond [-1, 1] make the clamp matter
    z = latents.clone().requires_grad_(True)
    state, parts = adapter.initial_state(), []
    for g in range(4):
        frames, state = adapter.step(g, z[:, :, g:g + 1], state)
        parts.append(frames)
    (grad,) = torch.autograd.grad(F.mse_loss(torch.cat(parts, 2), target), z)
    _, got = chop_grad(vae, latents, target, clamp=False, d_trunc=None)
    assert rel_err(got, grad) <= 1e-5
    if raw.abs().max() > 1:
        _, clamped = chop_grad(vae, latents, target, clamp=True, d_trunc=None)
        assert rel_err(clamped, grad) > 1e-6


def test_autocast_reaches_decoder_steps(wan):
    vae, latents, _, target = wan
    seen = []
    handle = vae.decoder.conv_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        z = latents.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = chopgrad.pixel_loss(vae, z, target, d_trunc=1)
            with torch.no_grad():
                reference = F.mse_loss(vae.decode(latents).sample.float(), target)
        value.backward()
    finally:
        handle.remove()
    assert torch.bfloat16 in seen
    assert float(value.detach()) == pytest.approx(float(reference), rel=2e-2)
    assert z.grad is not None and torch.isfinite(z.grad).all()


def autograd_ssim_per_frame(pred, target):
    """Plain-autograd SSIM (11x11 Gaussian, sigma 1.5, data range 2, valid windows): (B, F)."""
    b, c, f, h, w = pred.shape
    x = torch.arange(11, dtype=torch.float64) - 5
    g1 = torch.exp(-x.square() / (2 * 1.5**2))
    g1 = (g1 / g1.sum()).float()
    window = (g1[:, None] * g1[None, :]).expand(c, 1, 11, 11)
    as_images = lambda v: v.transpose(1, 2).reshape(b * f, c, h, w)
    p, t = as_images(pred), as_images(target)
    blur = lambda v: F.conv2d(v, window, groups=c)
    mu_p, mu_t = blur(p), blur(t)
    s_pp, s_tt, s_pt = blur(p * p) - mu_p**2, blur(t * t) - mu_t**2, blur(p * t) - mu_p * mu_t
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    ssim_map = ((2 * mu_p * mu_t + c1) * (2 * s_pt + c2)) / ((mu_p**2 + mu_t**2 + c1) * (s_pp + s_tt + c2))
    return ssim_map.flatten(1).mean(1).view(b, f)


def test_ssim_loss_matches_autograd_ssim(wan):
    vae, latents, _, target = wan
    value, grad = full_grad(vae, latents, lambda v: 1 - autograd_ssim_per_frame(v, target).mean())
    got_value, got_grad = chop_grad(vae, latents, target, loss="ssim", d_trunc=None)
    assert got_value == pytest.approx(value, rel=1e-4)
    assert rel_err(got_grad, grad) <= 1e-4


def test_ssim_in_a_dict_with_a_callable_uses_the_autograd_path(wan):
    vae, latents, _, target = wan
    mean_abs = lambda p, t: (p - t).abs().mean()
    expected = lambda v: (F.mse_loss(v, target) + 0.3 * (1 - autograd_ssim_per_frame(v, target).mean())
                          + 0.5 * (v - target).abs().mean())
    value, grad = full_grad(vae, latents, expected)
    got_value, got_grad = chop_grad(vae, latents, target, loss={"mse": 1.0, "ssim": 0.3, mean_abs: 0.5},
                                    d_trunc=None)
    assert got_value == pytest.approx(value, rel=1e-4)
    assert rel_err(got_grad, grad) <= 1e-4


def test_ssim_rejects_masks_and_tiny_frames(wan):
    vae, latents, video, target = wan
    with pytest.raises(ValueError, match="mask"):
        chopgrad.pixel_loss(vae, latents, target, loss="ssim", mask=torch.ones_like(video[:, :1]))
    small = latents[:, :, :, :1, :1]
    with pytest.raises(ValueError, match="ssim"):
        chopgrad.pixel_loss(vae, small, torch.zeros(1, 3, video.shape[2], 8, 8), loss="ssim")


def test_every_fused_pixel_loss_has_an_autograd_version_with_the_same_constants():
    from chopgrad import kernels
    from chopgrad.losses import ELEMENTWISE_LOSSES, LOSS_NAMES

    assert set(ELEMENTWISE_LOSSES) == set(kernels.LOSS_KINDS) and set(kernels.LOSS_KINDS) < set(LOSS_NAMES)
    g = torch.Generator().manual_seed(0)
    pred, target = (torch.randn(1, 3, 2, 4, 5, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    for name, fn in ELEMENTWISE_LOSSES.items():
        sums = kernels.pixel_loss_frames(pred, target, None, kind=name, clamp=False)
        assert torch.allclose(sums.sum(), fn(pred, target).sum(), rtol=1e-10), name


# A callable loss with a mask: the mask selects pixels (prediction where mask != 0, target where mask == 0) and its
# weight values reach only the elementwise terms.
def per_frame_mean_abs():
    return chopgrad.per_frame(lambda p, t: (p - t).abs().mean(dim=(1, 2, 3)))


def test_uniform_mask_weights_leave_a_callable_loss_unchanged(wan):
    vae, latents, video, target = wan
    fn = per_frame_mean_abs()
    plain_value, plain_grad = chop_grad(vae, latents, target, loss=fn, d_trunc=None)
    uniform = torch.full((video.shape[0], 1, *video.shape[2:]), 2.0)
    value, grad = chop_grad(vae, latents, target, loss=fn, d_trunc=None, mask=uniform)
    assert value == pytest.approx(plain_value, rel=1e-6)
    assert rel_err(grad, plain_grad) <= 1e-6
    # The weights still scale an elementwise term next to the callable: twice its mask-weighted sum over twice the
    # element count is the plain mean.
    mixed_plain, _ = chop_grad(vae, latents, target, loss={fn: 1.0, "l1": 1.0}, d_trunc=None)
    mixed, _ = chop_grad(vae, latents, target, loss={fn: 1.0, "l1": 1.0}, d_trunc=None, mask=uniform)
    assert mixed == pytest.approx(mixed_plain, rel=1e-6)


def inpaint_hole_weights(target: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The trainer's inpaint loss weights for a (1, 3, F, H, W) target: hole 2x the rest, scaled to a mean of 1."""
    from chopgrad.data.tasks import get_task

    weights = get_task("inpaint").pair(target[0], seed=seed, hole_weight=2.0).loss_weights
    return (weights / weights.mean())[None]


def test_a_callable_sees_the_plain_prediction_under_inpaint_hole_weights(wan):
    vae, latents, video, target = wan
    weights = inpaint_hole_weights(target)
    levels = sorted(weights.unique().tolist())
    assert len(levels) == 2 and 0 < levels[0] < 1 < levels[1]  # about 0.8 outside the hole, 1.7 inside
    seen = []

    def recording(pred, tgt):
        seen.append(pred.detach().clone())
        return (pred - tgt).abs().mean()

    chop_grad(vae, latents, target, loss=recording, d_trunc=1, mask=weights)
    given = torch.cat(seen, dim=2)
    assert given.shape == video.shape
    assert float(video.min()) - 1e-5 <= float(given.min()) and float(given.max()) <= float(video.max()) + 1e-5
    torch.testing.assert_close(given, video, rtol=0, atol=1e-5)  # every weight is > 0: all of it is prediction


def test_a_binary_mask_hands_a_callable_the_target_where_it_is_zero(wan):
    vae, latents, video, target = wan
    fn = per_frame_mean_abs()
    mask = (torch.rand(video.shape[0], 1, *video.shape[2:], generator=torch.Generator().manual_seed(7)) > 0.4)
    mask = mask.float()
    # The oracle: plain autograd through the model's own decode, unselected pixels replaced by the target.
    value, grad = full_grad(vae, latents, lambda v: fn(torch.where(mask != 0, v, target), target))
    got_value, got_grad = chop_grad(vae, latents, target, loss=fn, d_trunc=None, mask=mask)
    assert got_value == pytest.approx(value, rel=1e-5)
    assert rel_err(got_grad, grad) <= 1e-5
    everywhere_value, _ = chop_grad(vae, latents, target, loss=fn, d_trunc=None)
    assert got_value < everywhere_value  # the unselected pixels really were replaced
