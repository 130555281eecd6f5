"""What every VAE adapter's tests check, shared by test_mochi.py, test_hunyuan_video15.py, test_easyanimate.py and
test_hunyuan_video.py.

The helpers compute gradients and compare them; the `check_*` functions are whole contract tests, which each test
file calls from its own test functions with what differs between the models: how the reference decode runs (`decode`,
default the model's own `vae.decode(z).sample`), the oracle's hooks, channel counts, tile sizes, the submodules that
checkpoint, tolerances. A case is (vae, latents, video, target): a float64 tiny model, latents, the model's own
decode of them and a random target in [-1, 1].
"""
import re

import pytest
import torch
import torch.nn.functional as F

import chopgrad
from chopgrad.adapters import KNOWN_MODELS

# ---------------------------------------------------------------------------------------------- helpers


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def plain_decode(vae, z):
    """The model's own decode."""
    return vae.decode(z).sample


def make_case(vae, shape, seed=1, decode=plain_decode):
    """(vae, float64 latents of `shape`, their decode, a random target of the video's shape in [-1, 1])."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        video = decode(vae, latents)
    target = torch.rand(video.shape, generator=g, dtype=torch.float64) * 2 - 1
    return vae, latents, video, target


def grads_of(vae, latents, loss_of_latents, params=None):
    """(loss value, d loss / d latents, {name: d loss / d param}) for `loss_of_latents(z)`, over the parameters that
    get a gradient among `params` ((name, parameter) pairs; all of the model's by default)."""
    z = latents.clone().requires_grad_(True)
    vae.zero_grad(set_to_none=True)
    loss = loss_of_latents(z)
    loss.backward()
    named = vae.named_parameters() if params is None else params
    grads = {n: p.grad.clone() for n, p in named if p.grad is not None}
    vae.zero_grad(set_to_none=True)
    return float(loss.detach()), z.grad.clone(), grads


def model_mse(vae, target, decode=plain_decode):
    """The MSE of the reference decode to `target`, as a function of the latents."""
    return lambda z: F.mse_loss(decode(vae, z), target)


def pixel_mse(vae, target, **kw):
    """`chopgrad.pixel_loss` (MSE) with options `kw`, as a function of the latents."""
    return lambda z: chopgrad.pixel_loss(vae, z, target, **kw)


def assert_grads_close(got, want, tol, noise=1e-14):
    """The latent gradients and each parameter's within `tol` relative to the reference, over the same parameters.

    A gradient that is zero up to rounding (the bias of a conv followed by a GroupNorm: ~1e-19) is noise relative
    to itself, so each parameter's error may also be `noise` times the largest parameter gradient; `noise=0` allows
    none of that.
    """
    assert rel_err(got[1], want[1]) <= tol
    assert set(got[2]) == set(want[2]) and got[2]
    floor = noise * max(float(g.norm()) for g in want[2].values())
    for name, ref in want[2].items():
        assert float((got[2][name] - ref).norm()) <= tol * float(ref.norm()) + floor, name


# ---------------------------------------------------------------------------------------------- oracles


def truncation_start(g, d_trunc, schedule):
    """The first step whose state step g's gradient reaches: 0 untruncated, g - d_trunc sliding, the start of
    g's chunk of d_trunc + 1 steps chunked."""
    if d_trunc is None:
        return 0
    if schedule.startswith("sliding"):
        return max(0, g - d_trunc)
    return g // (d_trunc + 1) * (d_trunc + 1)


def mse_terms(target):
    """Step terms of the MSE to `target`: `(frame_slice, frames) -> l_g`, summing to the whole video's MSE."""
    return lambda frame_slice, frames: (frames - target[:, :, frame_slice]).square().sum() / target.numel()


def truncated_gradient(latents, named_params, steps, loss_of_step, *, d_trunc, schedule, zero_unreached=False):
    """The truncated gradient of docs/design.md section 2, one backward per step.

    `loss_of_step(g, start, z)` computes step g's term l_g from the latents `z` with the state that the steps
    before `start` (`truncation_start`) hand on held constant; no chopgrad code should be involved. Returns (the
    sum of the l_g, the sum of their gradients for the latents, {name: the sum for the parameter}) over
    `named_params` ((name, parameter) pairs), leaving out the parameters no step reaches unless `zero_unreached`.
    """
    names = [n for n, _ in named_params]
    params = [p for _, p in named_params]
    grad_z, grad_p, total = torch.zeros_like(latents), [torch.zeros_like(p) for p in params], 0.0
    reached = set()
    for g in range(steps):
        z = latents.detach().clone().requires_grad_(True)
        l_g = loss_of_step(g, truncation_start(g, d_trunc, schedule), z)
        grads = torch.autograd.grad(l_g, [z] + params, allow_unused=True)
        grad_z += grads[0]
        for i, gr in enumerate(grads[1:]):
            if gr is not None:
                grad_p[i] += gr
                reached.add(i)
        total += float(l_g.detach())
    return total, grad_z, {names[i]: grad_p[i] for i in range(len(names)) if zero_unreached or i in reached}


def causal_prefix_oracle(vae, latents, target, *, d_trunc, schedule, past_detached, decode=plain_decode):
    """The truncated gradient of the MSE for a causal decoder of one latent frame per step (1, then
    `vae.temporal_compression_ratio` frames each): step g's term from the reference decode of the latent prefix
    0..g, inside `past_detached(vae.decoder, start, g + 1)`, hooks that detach what the steps before `start` hand
    on. Returns (loss, grad latents, {name: grad}) over the parameters some step reaches."""
    steps = latents.shape[2]
    r = vae.temporal_compression_ratio
    offsets = [0] + [1 + r * g for g in range(steps)]
    mse = mse_terms(target)

    def loss_of_step(g, start, z):
        with past_detached(vae.decoder, start, g + 1):
            video = decode(vae, z[:, :, :g + 1])
        frames = video[:, :, offsets[g]:offsets[g + 1]]
        assert frames.shape[2] == (1 if g == 0 else r)
        return mse(slice(offsets[g], offsets[g + 1]), frames)

    named = [(n, p) for n, p in vae.named_parameters() if p.requires_grad]
    return truncated_gradient(latents, named, steps, loss_of_step, d_trunc=d_trunc, schedule=schedule)


# ---------------------------------------------------------------------------------------------- contract tests


def check_wrap_picks_the_adapter(vae, adapter):
    """`chopgrad.wrap` picks `adapter`, which chopgrad exports, KNOWN_MODELS lists the class, and the adapter
    refuses another model naming the class."""
    class_name = type(vae).__name__
    assert type(chopgrad.wrap(vae)) is adapter and getattr(chopgrad, adapter.__name__) is adapter
    assert any(class_name in m for m in KNOWN_MODELS)
    with pytest.raises(TypeError, match=class_name):
        adapter(torch.nn.Linear(2, 2))


def check_decode_equals_the_model_decode(vae, latents, *, shape, tol, decode=plain_decode):
    """`chopgrad.decode` gives the reference decode's video of `shape`; returns it."""
    with torch.no_grad():
        want = decode(vae, latents)
        got = chopgrad.decode(vae, latents)
    assert got.shape == want.shape == shape
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    return got


def check_oracle_untruncated_is_full_backprop(case, *, past_detached, tol, decode=plain_decode):
    vae, latents, _, target = case
    oracle = causal_prefix_oracle(vae, latents, target, d_trunc=None, schedule="sliding", past_detached=past_detached,
                                  decode=decode)
    assert_grads_close(oracle, grads_of(vae, latents, model_mse(vae, target, decode)), tol)


def check_untruncated_pixel_loss_is_the_model_loss_and_gradient(case, schedule, d_trunc, *, tol, decode=plain_decode):
    """d_trunc None or "G-1" (the number of latent frames less one); pixel_loss returns its value in float32, so
    values compare to float32 precision."""
    vae, latents, video, target = case
    d = None if d_trunc is None else latents.shape[2] - 1
    want = grads_of(vae, latents, model_mse(vae, target, decode))
    got = grads_of(vae, latents, pixel_mse(vae, target, d_trunc=d, schedule=schedule))
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    assert want[0] == pytest.approx(float(F.mse_loss(video, target)), rel=1e-12)
    assert_grads_close(got, want, tol)


def check_decode_under_grad_is_the_model_decode_and_gradient(case, *, tol, decode=plain_decode):
    vae, latents, video, _ = case
    loss_fn = lambda v: (v[:, :, 1:] - v[:, :, :-1]).square().mean() + v.sin().sum()  # noqa: E731
    want = grads_of(vae, latents, lambda z: loss_fn(decode(vae, z)))
    z = latents.clone().requires_grad_(True)
    out = chopgrad.decode(vae, z, d_trunc=None)
    assert out.requires_grad
    torch.testing.assert_close(out.detach(), video, rtol=1e-13, atol=1e-13)
    got = grads_of(vae, latents, lambda z: loss_fn(chopgrad.decode(vae, z, d_trunc=None)))
    assert got[0] == pytest.approx(want[0], rel=1e-12)
    assert_grads_close(got, want, tol)


def check_truncated_gradient_equals_the_oracle(case, schedule, d_trunc, *, past_detached, tol, decode=plain_decode):
    vae, latents, video, target = case
    oracle_schedule = "sliding" if schedule == "sliding_recompute" else schedule
    want = causal_prefix_oracle(vae, latents, target, d_trunc=d_trunc, schedule=oracle_schedule,
                                past_detached=past_detached, decode=decode)
    got = grads_of(vae, latents, pixel_mse(vae, target, d_trunc=d_trunc, schedule=schedule))
    assert got[0] == pytest.approx(float(F.mse_loss(video, target)), rel=1e-6)
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    assert_grads_close(got, want, tol)


def check_truncation_changes_the_gradient(case, *, decode=plain_decode):
    """Guards the oracle comparison: at d_trunc=0 something must be cut. Returns (truncated, full) gradients."""
    vae, latents, _, target = case
    want = grads_of(vae, latents, model_mse(vae, target, decode))
    got = grads_of(vae, latents, pixel_mse(vae, target, d_trunc=0))
    assert rel_err(got[1], want[1]) > 1e-3
    return got, want


def check_step_is_pure_and_leaves_the_model_as_it_was(case, *, fail_in):
    """Step 2 twice from the same state: the same result, the state untouched, no module's forward left replaced,
    also when the submodule `fail_in` raises. Returns (adapter, step 2's state, step 3's) for the model's checks."""
    vae, latents, _, _ = case
    adapter = chopgrad.wrap(vae)
    before = {n: m.__dict__.get("forward") for n, m in vae.named_modules()}
    with torch.no_grad():
        _, state = adapter.step(0, latents[:, :, :1], adapter.initial_state())
        _, state = adapter.step(1, latents[:, :, 1:2], state)
        copies = [s.clone() for s in state]
        frames_a, next_a = adapter.step(2, latents[:, :, 2:3], state)
        frames_b, next_b = adapter.step(2, latents[:, :, 2:3], state)
    assert all(torch.equal(s, c) for s, c in zip(state, copies))
    assert torch.equal(frames_a, frames_b) and all(torch.equal(a, b) for a, b in zip(next_a, next_b))
    assert {n: m.__dict__.get("forward") for n, m in vae.named_modules()} == before

    def fail(*_):
        raise RuntimeError("boom")

    handle = vae.get_submodule(fail_in).register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            adapter.step(2, latents[:, :, 2:3], state)
    finally:
        handle.remove()
    assert {n: m.__dict__.get("forward") for n, m in vae.named_modules()} == before
    return adapter, state, next_a


def check_gradient_checkpointing_keeps_the_gradient_exact(case, *, checkpointed, tol, noise=1e-14,
                                                          decode=plain_decode):
    """With the model's gradient checkpointing on (the submodules named in `checkpointed` have it), the untruncated
    gradient is the model's."""
    vae, latents, _, target = case
    want = grads_of(vae, latents, model_mse(vae, target, decode))
    vae.enable_gradient_checkpointing()
    try:
        got = grads_of(vae, latents, pixel_mse(vae, target, d_trunc=None))
        assert all(vae.get_submodule(name).gradient_checkpointing for name in checkpointed)
    finally:
        vae.disable_gradient_checkpointing()
    assert_grads_close(got, want, tol, noise)


def check_lean_does_nothing(case, *, reason, noise=1e-14):
    """`lean=True` leaves the loss and every gradient as they are (the fused ops are Wan's), and patch_report
    says why: nothing patched, one skipped entry for the decoder whose reason matches `reason`."""
    vae, latents, _, target = case
    lean = grads_of(vae, latents, pixel_mse(vae, target, d_trunc=1, lean=True))
    plain = grads_of(vae, latents, pixel_mse(vae, target, d_trunc=1, lean=False))
    assert lean[0] == plain[0]
    assert_grads_close(lean, plain, 0.0, noise)
    report = chopgrad.patch_report(vae)
    assert report.patched == () and len(report.skipped) == 1
    name, why = report.skipped[0]
    assert name == "<decoder>" and why.startswith("lean=True does nothing: ")
    assert re.search(reason, why), why
    assert "lean=True does nothing" in str(report)
    assert chopgrad.patch_report(chopgrad.wrap(vae)) == report


def check_truncated_tiling(case, *, frame, tile, halo, tol):
    """Tiles need tile_grad='truncated'; one tile of the `frame` size is the untiled step; tiles of size `tile`
    widened by `halo` keep the value exact and make the gradient approximate."""
    vae, latents, _, target = case
    with pytest.raises(ValueError, match="tile_grad='truncated'"):
        chopgrad.pixel_loss(vae, latents.clone().requires_grad_(True), target, d_trunc=1, tile=tile)
    untiled = grads_of(vae, latents, pixel_mse(vae, target, d_trunc=1))
    whole = grads_of(vae, latents, pixel_mse(vae, target, d_trunc=1, tile=frame, tile_grad="truncated"))
    assert whole[0] == pytest.approx(untiled[0], rel=1e-12)
    assert_grads_close(whole, untiled, tol)
    tiled = grads_of(vae, latents, pixel_mse(vae, target, d_trunc=1, tile=tile, tile_grad="truncated",
                                             tile_halo=halo))
    assert tiled[0] == pytest.approx(untiled[0], rel=1e-12)
    assert torch.isfinite(tiled[1]).all() and rel_err(tiled[1], untiled[1]) > 1e-6


def check_bad_latents_are_named_before_any_decoding(case, *, wrong_channels):
    """Latents of `wrong_channels` channels, of the wrong rank or of an integer dtype are named before the decoder
    runs."""
    vae, latents, _, target = case
    channels = latents.shape[1]
    wrong = torch.randn(latents.shape[0], wrong_channels, 3, *latents.shape[3:], dtype=torch.float64)
    calls = []
    handle = vae.decoder.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match=f"{channels} channels"):
            chopgrad.pixel_loss(vae, wrong, target)
        with pytest.raises(ValueError, match=rf"shape \(B, {channels}, T, h, w\)"):
            chopgrad.decode(vae, latents[:, :, 0])
        with pytest.raises(TypeError, match="floating-point"):
            chopgrad.decode(vae, latents.long())
    finally:
        handle.remove()
    assert not calls
