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
import vae_contract as contract
from chopgrad.adapters.causal_conv_chunker import CausalConv, CausalConvChunker, StepModule
from chopgrad.adapters.mochi import MochiAdapter
from tiny_models import tiny_mochi
from vae_contract import make_case, rel_err

# batch 2, 4 latent frames: 4 steps, 1 + 3 * 6 = 19 frames
LATENTS = (2, 4, 4, 2, 3)
TOL = 1e-9


@pytest.fixture(scope="module")
def case():
    return make_case(tiny_mochi().double(), LATENTS)


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


def test_oracle_untruncated_is_full_backprop(case):
    contract.check_oracle_untruncated_is_full_backprop(case, past_detached=past_detached, tol=TOL)


# ---------------------------------------------------------------------------------------------- Mochi


def test_wrap_picks_the_mochi_adapter():
    contract.check_wrap_picks_the_adapter(tiny_mochi(), MochiAdapter)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("latent_frames", [1, 2, 5])
def test_decode_equals_the_model_decode(dtype, latent_frames):
    latents = torch.randn(2, 4, latent_frames, 2, 3, generator=torch.Generator().manual_seed(2), dtype=dtype)
    contract.check_decode_equals_the_model_decode(tiny_mochi().to(dtype), latents,
                                                  shape=(2, 3, 1 + 6 * (latent_frames - 1), 4, 6),
                                                  tol=1e-6 if dtype == torch.float32 else 1e-13)


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
    contract.check_untruncated_pixel_loss_is_the_model_loss_and_gradient(case, schedule, d_trunc, tol=TOL)


def test_decode_under_grad_is_the_model_decode_and_gradient(case):
    contract.check_decode_under_grad_is_the_model_decode_and_gradient(case, tol=TOL)


@pytest.mark.parametrize("schedule,d_trunc", [("sliding", 0), ("sliding", 1), ("sliding", 2), ("chunked", 0),
                                              ("chunked", 1), ("chunked", 2), ("sliding_recompute", 1)])
def test_truncated_gradient_equals_the_oracle(case, schedule, d_trunc):
    contract.check_truncated_gradient_equals_the_oracle(case, schedule, d_trunc, past_detached=past_detached, tol=TOL)


def test_truncation_changes_the_gradient(case):
    contract.check_truncation_changes_the_gradient(case)


def test_step_is_pure_and_leaves_the_model_as_it_was(case):
    adapter, state, _ = contract.check_step_is_pure_and_leaves_the_model_as_it_was(case, fail_in="decoder.up_blocks.1")
    assert len(state) == adapter.num_slots == 10 and all(s.shape[2] == 2 for s in state)


def test_gradient_checkpointing_on_the_model_keeps_the_gradient_exact(case):
    contract.check_gradient_checkpointing_keeps_the_gradient_exact(case, checkpointed=["decoder", "decoder.block_in"],
                                                                   tol=TOL)


def test_lean_does_nothing_to_mochi(case):
    contract.check_lean_does_nothing(case, reason="per-frame GroupNorm")


def test_tiling(case):
    contract.check_truncated_tiling(case, frame=(4, 6), tile=(2, 2), halo=2, tol=TOL)


def test_bad_latents_are_named_before_any_decoding(case):
    contract.check_bad_latents_are_named_before_any_decoding(case, wrong_channels=12)


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
