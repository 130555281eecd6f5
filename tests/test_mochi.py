"""AutoencoderKLMochi through the causal-conv chunker, and the chunker on a decoder written here.

Exact cases against the model's own `vae.decode(z).sample` (values) and plain autograd through it
(gradients), on a float64 copy of the tiny model. Truncated cases against an oracle that runs the
model's own whole-clip decode on the latent prefix of each supervised step, with forward pre-hooks
on its causal convs that detach every input frame of the steps before the truncation point: that is
the decode with the state at that point held constant, and it shares no code with the chunker.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import chopgrad
from chopgrad.adapters import KNOWN_MODELS
from chopgrad.adapters.causal_conv_chunker import CausalConv, CausalConvChunker, StepModule
from chopgrad.adapters.mochi import MochiAdapter
from tiny_models import tiny_mochi

# batch 2, 4 latent frames: 4 steps, 1 + 3 * 6 = 19 frames
LATENTS = (2, 4, 4, 2, 3)
TOL = 1e-9


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(scope="module")
def case():
    vae = tiny_mochi().double()
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(LATENTS, generator=g, dtype=torch.float64)
    with torch.no_grad():
        video = vae.decode(latents).sample
    target = torch.rand(video.shape, generator=g, dtype=torch.float64) * 2 - 1
    return vae, latents, video, target


def grads_of(vae, latents, loss_of_latents):
    z = latents.clone().requires_grad_(True)
    vae.zero_grad(set_to_none=True)
    loss = loss_of_latents(z)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}
    vae.zero_grad(set_to_none=True)
    return float(loss.detach()), z.grad.clone(), grads


def assert_grads_close(got, want, tol):
    assert rel_err(got[1], want[1]) <= tol
    assert set(got[2]) == set(want[2]) and got[2]
    # The biases of convs followed by a GroupNorm have a gradient of zero up to rounding (~1e-19): relative to
    # themselves they are noise, so each error may also be rounding noise of the largest gradient.
    noise = 1e-14 * max(float(g.norm()) for g in want[2].values())
    for name, ref in want[2].items():
        assert float((got[2][name] - ref).norm()) <= tol * float(ref.norm()) + noise, name


def model_mse(vae, target):
    return lambda z: F.mse_loss(vae.decode(z).sample, target)


# ---------------------------------------------------------------------------------------------- the oracle


@contextlib.contextmanager
def past_detached(decoder, start: int, latent_frames: int):
    """Every causal conv of `decoder` sees the input frames of latent steps before `start` detached."""
    from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXCausalConv3d

    def detach_past(module, args, kwargs):
        x = args[0]
        n = start * x.shape[2] // latent_frames  # frames per latent frame at this conv's level
        return (torch.cat([x[:, :, :n].detach(), x[:, :, n:]], dim=2), *args[1:]), kwargs

    handles = [m.register_forward_pre_hook(detach_past, with_kwargs=True)
               for m in decoder.modules() if isinstance(m, CogVideoXCausalConv3d)]
    assert handles
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def truncated_oracle(vae, latents, target, *, d_trunc, schedule):
    """(loss, grad latents, {name: grad}) of the MSE with step g's term truncated at g - d (sliding) or its chunk."""
    steps = latents.shape[2]
    r = vae.temporal_compression_ratio
    offsets = [0] + [1 + r * g for g in range(steps)]
    params = [p for p in vae.parameters() if p.requires_grad]
    names = [n for n, p in vae.named_parameters() if p.requires_grad]
    grad_z, grad_p, total = torch.zeros_like(latents), [torch.zeros_like(p) for p in params], 0.0
    used = set()
    for g in range(steps):
        if d_trunc is None:
            start = 0
        elif schedule == "sliding":
            start = max(0, g - d_trunc)
        else:
            start = g // (d_trunc + 1) * (d_trunc + 1)
        z = latents.detach().clone().requires_grad_(True)
        with past_detached(vae.decoder, start, g + 1):
            video = vae.decode(z[:, :, :g + 1]).sample
        frames = video[:, :, offsets[g]:offsets[g + 1]]
        assert frames.shape[2] == (1 if g == 0 else r)
        l_g = (frames - target[:, :, offsets[g]:offsets[g + 1]]).square().sum() / target.numel()
        grads = torch.autograd.grad(l_g, [z] + params, allow_unused=True)
        grad_z += grads[0]
        for i, gr in enumerate(grads[1:]):
            if gr is not None:
                grad_p[i] += gr
                used.add(i)
        total += float(l_g.detach())
    return total, grad_z, {names[i]: grad_p[i] for i in sorted(used)}


def test_oracle_untruncated_is_full_backprop(case):
    vae, latents, _, target = case
    assert_grads_close(truncated_oracle(vae, latents, target, d_trunc=None, schedule="sliding"),
                       grads_of(vae, latents, model_mse(vae, target)), TOL)


# ---------------------------------------------------------------------------------------------- Mochi


def test_wrap_picks_the_mochi_adapter():
    vae = tiny_mochi()
    assert type(chopgrad.wrap(vae)) is MochiAdapter and chopgrad.MochiAdapter is MochiAdapter
    assert any("AutoencoderKLMochi" in m for m in KNOWN_MODELS)
    with pytest.raises(TypeError, match="AutoencoderKLMochi"):
        MochiAdapter(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("latent_frames", [1, 2, 5])
def test_decode_equals_the_model_decode(dtype, latent_frames):
    vae = tiny_mochi().to(dtype)
    latents = torch.randn(2, 4, latent_frames, 2, 3, generator=torch.Generator().manual_seed(2), dtype=dtype)
    with torch.no_grad():
        want = vae.decode(latents).sample
        got = chopgrad.decode(vae, latents)
    assert got.shape == want.shape == (2, 3, 1 + 6 * (latent_frames - 1), 4, 6)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_decode_keeps_all_frames_when_the_model_does(case):
    vae, latents, _, _ = case
    vae.drop_last_temporal_frames = False
    try:
        with torch.no_grad():
            want = vae.decode(latents).sample
            got = chopgrad.decode(vae, latents)
    finally:
        vae.drop_last_temporal_frames = True
    assert want.shape[2] == 6 * latents.shape[2]
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("schedule,d_trunc", [("sliding", None), ("chunked", None), ("sliding", "G-1"),
                                              ("chunked", "G-1")])
def test_untruncated_pixel_loss_is_the_model_loss_and_gradient(case, schedule, d_trunc):
    """pixel_loss returns its value in float32, so values compare to float32 precision."""
    vae, latents, video, target = case
    d = None if d_trunc is None else latents.shape[2] - 1
    want = grads_of(vae, latents, model_mse(vae, target))
    got = grads_of(vae, latents, lambda z: chopgrad.pixel_loss(vae, z, target, d_trunc=d, schedule=schedule))
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    assert want[0] == pytest.approx(float(F.mse_loss(video, target)), rel=1e-12)
    assert_grads_close(got, want, TOL)


def test_decode_under_grad_is_the_model_decode_and_gradient(case):
    vae, latents, video, _ = case
    loss_fn = lambda v: (v[:, :, 1:] - v[:, :, :-1]).square().mean() + v.sin().sum()  # noqa: E731
    want = grads_of(vae, latents, lambda z: loss_fn(vae.decode(z).sample))
    z = latents.clone().requires_grad_(True)
    out = chopgrad.decode(vae, z, d_trunc=None)
    assert out.requires_grad
    torch.testing.assert_close(out.detach(), video, rtol=1e-13, atol=1e-13)
    got = grads_of(vae, latents, lambda z: loss_fn(chopgrad.decode(vae, z, d_trunc=None)))
    assert got[0] == pytest.approx(want[0], rel=1e-12)
    assert_grads_close(got, want, TOL)


@pytest.mark.parametrize("schedule,d_trunc", [("sliding", 0), ("sliding", 1), ("sliding", 2), ("chunked", 0),
                                              ("chunked", 1), ("chunked", 2), ("sliding_recompute", 1)])
def test_truncated_gradient_equals_the_oracle(case, schedule, d_trunc):
    vae, latents, video, target = case
    oracle_schedule = "sliding" if schedule == "sliding_recompute" else schedule
    want = truncated_oracle(vae, latents, target, d_trunc=d_trunc, schedule=oracle_schedule)
    got = grads_of(vae, latents, lambda z: chopgrad.pixel_loss(vae, z, target, d_trunc=d_trunc, schedule=schedule))
    assert got[0] == pytest.approx(float(F.mse_loss(video, target)), rel=1e-6)
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    assert_grads_close(got, want, TOL)


def test_truncation_changes_the_gradient(case):
    """Guards the oracle comparison: at d_trunc=0 something must be cut."""
    vae, latents, _, target = case
    want = grads_of(vae, latents, model_mse(vae, target))
    got = grads_of(vae, latents, lambda z: chopgrad.pixel_loss(vae, z, target, d_trunc=0))
    assert rel_err(got[1], want[1]) > 1e-3


def test_step_is_pure_and_leaves_the_model_as_it_was(case):
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
    assert len(state) == adapter.num_slots == 10 and all(s.shape[2] == 2 for s in state)
    assert {n: m.__dict__.get("forward") for n, m in vae.named_modules()} == before

    def fail(*_):
        raise RuntimeError("boom")

    handle = vae.decoder.up_blocks[1].register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            adapter.step(2, latents[:, :, 2:3], state)
    finally:
        handle.remove()
    assert {n: m.__dict__.get("forward") for n, m in vae.named_modules()} == before


def test_gradient_checkpointing_on_the_model_keeps_the_gradient_exact(case):
    vae, latents, _, target = case
    want = grads_of(vae, latents, model_mse(vae, target))
    vae.enable_gradient_checkpointing()
    try:
        got = grads_of(vae, latents, lambda z: chopgrad.pixel_loss(vae, z, target, d_trunc=None))
        assert vae.decoder.gradient_checkpointing and vae.decoder.block_in.gradient_checkpointing
    finally:
        vae.disable_gradient_checkpointing()
    assert_grads_close(got, want, TOL)


def test_lean_does_nothing_to_mochi(case):
    vae, latents, _, target = case
    lean = grads_of(vae, latents, lambda z: chopgrad.pixel_loss(vae, z, target, d_trunc=1, lean=True))
    plain = grads_of(vae, latents, lambda z: chopgrad.pixel_loss(vae, z, target, d_trunc=1, lean=False))
    assert lean[0] == plain[0]
    assert_grads_close(lean, plain, 0.0)
    with pytest.raises(TypeError, match="AutoencoderKLWan"):
        chopgrad.patch_report(vae)


def test_tiling(case):
    vae, latents, _, target = case
    with pytest.raises(ValueError, match="tile_grad='truncated'"):
        chopgrad.pixel_loss(vae, latents.clone().requires_grad_(True), target, d_trunc=1, tile=(2, 2))
    untiled = grads_of(vae, latents, lambda z: chopgrad.pixel_loss(vae, z, target, d_trunc=1))
    # one tile holding the whole frame: the tiled backward is the whole step's
    whole = grads_of(vae, latents, lambda z: chopgrad.pixel_loss(vae, z, target, d_trunc=1, tile=(4, 6),
                                                                 tile_grad="truncated"))
    assert whole[0] == pytest.approx(untiled[0], rel=1e-12)
    assert_grads_close(whole, untiled, TOL)
    # 2x2 tiles of 1x1 latent pixels, widened by one: the value stays exact, the gradient is approximate
    tiled = grads_of(vae, latents, lambda z: chopgrad.pixel_loss(vae, z, target, d_trunc=1, tile=(2, 2),
                                                                 tile_grad="truncated", tile_halo=2))
    assert tiled[0] == pytest.approx(untiled[0], rel=1e-12)
    assert torch.isfinite(tiled[1]).all() and rel_err(tiled[1], untiled[1]) > 1e-6


def test_bad_latents_are_named_before_any_decoding(case):
    vae, latents, _, target = case
    calls = []
    handle = vae.decoder.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match="4 channels"):
            chopgrad.pixel_loss(vae, torch.randn(2, 12, 3, 2, 3, dtype=torch.float64), target)
        with pytest.raises(ValueError, match="shape"):
            chopgrad.decode(vae, latents[:, :, 0])
        with pytest.raises(TypeError, match="floating-point"):
            chopgrad.decode(vae, latents.long())
    finally:
        handle.remove()
    assert not calls


def test_framewise_decoding_is_refused_with_the_reason():
    vae = tiny_mochi()
    vae._enable_framewise_decoding()
    latents = torch.randn(1, 4, 3, 2, 3)
    with pytest.raises(RuntimeError):  # diffusers 0.42.1's own decode is broken in this mode
        with torch.no_grad():
            vae.decode(latents)
    with pytest.raises(ValueError, match="framewise"):
        chopgrad.decode(vae, latents)


def test_memory_is_constant_in_frames():
    """At d_trunc=1 the peak of live tensors at 4x the frames is at most 1.15x (full backprop's grows)."""
    from chopgrad.tools.bench.memory import PeakLiveBytes

    vae = tiny_mochi()
    g = torch.Generator().manual_seed(4)

    def peak(latent_frames, loss_of_latents):
        latents = torch.randn(1, 4, latent_frames, 8, 8, generator=g)
        target = torch.rand(1, 3, 1 + 6 * (latent_frames - 1), 16, 16, generator=g)
        z = latents.requires_grad_(True)
        with PeakLiveBytes() as live:
            loss_of_latents(z, target).backward()
        vae.zero_grad(set_to_none=True)
        return live.peak

    def chopped(z, target):
        return chopgrad.pixel_loss(vae, z, target, d_trunc=1)

    def full(z, target):
        return F.mse_loss(vae.decode(z).sample, target)

    assert peak(12, chopped) <= 1.15 * peak(3, chopped)
    assert peak(12, full) > 3 * peak(3, full)


# ---------------------------------------------------------------------------------------------- the chunker


class ZeroPaddedCausalConv(torch.nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = torch.nn.Conv3d(c_in, c_out, 3, padding=(0, 1, 1))

    def forward(self, x):
        return self.conv(F.pad(x, (0, 0, 0, 0, 2, 0)))


class RunningMean(torch.nn.Module):
    """Mixes time causally without a conv: frame t becomes the mean of frames 0..t."""

    def forward(self, x):
        counts = torch.arange(1, x.shape[2] + 1, dtype=x.dtype).view(1, 1, -1, 1, 1)
        return x.cumsum(2) / counts


class RunningMeanState(StepModule):
    """RunningMean across steps: the state is the sum of the frames so far and their count."""

    slots = 2

    def call(self, module, state, index, x):
        total, count = state
        if total is None:
            total, count = torch.zeros_like(x[:, :, :1]), x.new_zeros(())
        sums = total + x.cumsum(2)
        counts = count + torch.arange(1, x.shape[2] + 1, dtype=x.dtype).view(1, 1, -1, 1, 1)
        return sums / counts, (sums[:, :, -1:].clone(), counts.flatten()[-1].clone())


class TinyCausalDecoder(torch.nn.Module):
    """A causal decoder: zero-padded causal convs, a running mean over time, time doubled, 2x space."""

    def __init__(self):
        super().__init__()
        self.conv_in = ZeroPaddedCausalConv(4, 8)
        self.mix = RunningMean()
        self.conv_out = ZeroPaddedCausalConv(8, 3)

    def forward(self, z):
        h = F.silu(self.conv_in(z))
        h = h + self.mix(h)
        h = h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
        return self.conv_out(h)


def chunked_tiny_decoder(model, latents_per_step=1):
    convs = {name: CausalConv(kernel_t=3, run=lambda conv, x: conv.conv(x), first_pad="zeros")
             for name, m in model.named_modules() if isinstance(m, ZeroPaddedCausalConv)}
    return CausalConvChunker(model, model, {**convs, "mix": RunningMeanState()}, latent_channels=4, out_channels=3,
                             temporal_factor=2, spatial_factor=2, latents_per_step=latents_per_step,
                             first_step_drop=1)


@pytest.mark.parametrize("latents_per_step", [1, 2])
def test_chunker_on_a_decoder_written_here(latents_per_step):
    torch.manual_seed(0)
    model = TinyCausalDecoder().double()
    adapter = chunked_tiny_decoder(model, latents_per_step)
    latents = torch.randn(2, 4, 5, 3, 2, dtype=torch.float64)
    with torch.no_grad():
        want = model(latents)[:, :, 1:]
        assert torch.allclose(chopgrad.decode(adapter, latents), want, rtol=1e-13, atol=1e-13)
    plan = adapter.plan(latents)
    assert plan.frames_per_step == ((1, 2, 2, 2, 2) if latents_per_step == 1 else (3, 4, 2))
    target = torch.rand(want.shape, dtype=torch.float64)
    z = latents.clone().requires_grad_(True)
    F.mse_loss(model(z)[:, :, 1:], target).backward()
    want_z, want_p = z.grad.clone(), [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    z = latents.clone().requires_grad_(True)
    chopgrad.pixel_loss(adapter, z, target, d_trunc=None).backward()
    assert rel_err(z.grad, want_z) <= 1e-12
    for p, want in zip(model.parameters(), want_p):
        assert rel_err(p.grad, want) <= 1e-12
    z = latents.clone().requires_grad_(True)
    chopgrad.pixel_loss(adapter, z, target, d_trunc=0).backward()
    assert rel_err(z.grad, want_z) > 1e-3


def test_chunker_refuses_a_broken_registry():
    model = TinyCausalDecoder()
    conv = CausalConv(kernel_t=3, run=lambda m, x: m.conv(x))
    common = dict(latent_channels=4, out_channels=3, temporal_factor=2, spatial_factor=2)
    with pytest.raises(ValueError, match="names no submodule"):
        CausalConvChunker(model, model, {"conv_in": conv, "conv_mid": conv}, **common)
    with pytest.raises(ValueError, match="kernel_t"):
        CausalConv(kernel_t=1, run=lambda m, x: m.conv(x))
    with pytest.raises(ValueError, match="first_pad"):
        CausalConv(kernel_t=3, run=lambda m, x: m.conv(x), first_pad="reflect")
    latents = torch.randn(1, 4, 2, 3, 2)

    with pytest.raises(ValueError, match="4 channels"):
        CausalConvChunker(model, model, {"conv_in": conv}, **common).plan(torch.randn(1, 3, 2, 3, 2))
    twice = CausalConvChunker(model, lambda z: model.conv_in(model.conv_in(z)), {"conv_in": conv}, **common)
    with pytest.raises(RuntimeError, match="twice"):
        twice.step(0, latents, twice.initial_state())
    registry = {"conv_in": conv, "conv_out": conv, "mix": RunningMeanState()}
    skipping = CausalConvChunker(model, lambda z: model.conv_out(F.silu(model.conv_in(z))), registry, **common)
    assert skipping.num_slots == 4
    with pytest.raises(RuntimeError, match="did not run 'mix'"):
        skipping.step(0, latents, skipping.initial_state())
    whole = CausalConvChunker(model, model, registry, **common)
    model.conv_in.forward = model.conv_in.forward  # an instance forward, as a hook that wraps it leaves
    try:
        with pytest.raises(RuntimeError, match="forward wrapped"):
            whole.step(0, latents, whole.initial_state())
    finally:
        del model.conv_in.forward
    assert all("forward" not in m.__dict__ for m in model.modules())
    frames, state = whole.step(0, latents, whole.initial_state())
    assert frames.shape == (1, 3, 4, 6, 4) and len(state) == 4
