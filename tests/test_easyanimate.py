"""EasyAnimate (diffusers AutoencoderKLMagvit) through EasyAnimateAdapter.

Exact cases against plain autograd through the model's own `vae.decode`;
truncated cases against an explicit-detach oracle that drives the model's own
decoder with its own cache attributes (no chopgrad code), detaching them at the
truncation point. Float64 copies of a tiny config keep the comparisons tight.
"""
import weakref

import pytest
import torch

import chopgrad
import vae_contract as contract
from chopgrad.adapters.wan_patch import lean_decoder
from chopgrad.tools.bench.memory import PeakMemory
from tiny_models import tiny_easyanimate
from vae_contract import grads_of, make_case, model_mse, mse_terms, pixel_mse, rel_err, truncated_gradient

# batch 2, 5 latent frames (odd): 5 steps, 1 + 4 * 4 = 17 pixel frames of 16x24
LATENT_SHAPE = (2, 4, 5, 2, 3)
TOL = 1e-10


@pytest.fixture(scope="module")
def case():
    return make_case(tiny_easyanimate().double(), LATENT_SHAPE)


@pytest.fixture(scope="module")
def trilinear_case():
    """Trilinear temporal upsampling and two latent frames per call: frames mix within a step."""
    vae = tiny_easyanimate(seed=2, spatial_group_norm=False).double()
    vae.num_latent_frames_batch_size = 2
    return make_case(vae, (2, 4, 6, 2, 2), seed=4)  # steps of 1, 2, 2, 1 latent frames


# ---------------------------------------------------------------------------------------------- the oracle


def native_groups(vae, num_latent_frames):
    """The latent frames of each decoder call of AutoencoderKLMagvit._decode."""
    k = vae.num_latent_frames_batch_size
    return [(0, 1)] + [(i, min(i + k, num_latent_frames)) for i in range(1, num_latent_frames, k)]


def native_step(vae, z_group):
    """One decoder call as _decode makes it; the causal caches stay in the model's modules."""
    return vae.decoder(vae.post_quant_conv(z_group))


def detach_module_caches(vae):
    for m in vae.decoder.modules():
        if isinstance(getattr(m, "prev_features", None), torch.Tensor):
            m.prev_features = m.prev_features.detach()


def oracle(vae, latents, loss_of_step, *, d_trunc, schedule):
    """sum_g d l_g / d(latents, params), the model's caches detached where step g's gradient stops.

    `loss_of_step(frame_slice, frames)` is step g's loss term. Returns (grad latents, {name: grad}).
    """
    groups = native_groups(vae, latents.shape[2])
    offset = 0

    def step_loss(g, start, z):
        nonlocal offset
        vae._clear_conv_cache()
        with torch.no_grad():
            for a, b in groups[:start]:
                native_step(vae, latents[:, :, a:b])
        detach_module_caches(vae)
        for a, b in groups[start:g + 1]:
            frames = native_step(vae, z[:, :, a:b])
        frame_slice = slice(offset, offset + frames.shape[2])
        offset = frame_slice.stop
        return loss_of_step(frame_slice, frames)

    named = [(n, p) for n, p in vae.named_parameters() if p.requires_grad]
    try:
        _, grad_z, grad_p = truncated_gradient(latents, named, len(groups), step_loss, d_trunc=d_trunc,
                                               schedule=schedule, zero_unreached=True)
    finally:
        vae._clear_conv_cache()
    return grad_z, grad_p


# ---------------------------------------------------------------------------------------------- helpers


def assert_grads_close(got, want, tol=TOL):
    """Each gradient within `tol` relative to itself: no allowance for rounding noise."""
    contract.assert_grads_close(got, want, tol, noise=0.0)


def assert_oracle_grads(got, ref_gz, ref_gp, tol=TOL):
    _, gz, gp = got
    assert rel_err(gz, ref_gz) <= tol
    for name, ref in ref_gp.items():
        if ref.abs().max() == 0:
            assert name not in gp or gp[name].abs().max() == 0, name
        else:
            assert rel_err(gp[name], ref) <= tol, name


def whole_video_loss(video):
    """Mixes frames of different decoder steps; the last term keeps the output bias's gradient away from 0."""
    diff = video[:, :, 1:] - video[:, :, :-1]
    return diff.square().mean() + 0.1 * (video[:, :, -1] - video[:, :, 0]).abs().mean() + 0.1 * video.square().mean()


def decoder_attributes(vae):
    """The decoder's cache attributes (as objects) and its checkpointing flag."""
    return ([m.__dict__.get("prev_features") for m in vae.decoder.modules() if hasattr(m, "prev_features")],
            vae.decoder.gradient_checkpointing)


def assert_attributes_are(vae, expected):
    values, checkpointing = decoder_attributes(vae)
    assert checkpointing == expected[1]
    assert len(values) == len(expected[0])
    for v, e in zip(values, expected[0]):
        assert v is e


# ---------------------------------------------------------------------------------------------- plan and values


def test_wrap_picks_the_adapter_and_the_plan_matches_the_model_decode(case):
    vae, latents, video, _ = case
    adapter = chopgrad.wrap(vae)
    assert isinstance(adapter, chopgrad.EasyAnimateAdapter)
    plan = adapter.plan(latents)
    assert plan.group_bounds == (0, 1, 2, 3, 4, 5)
    assert plan.frames_per_step == (1, 4, 4, 4, 4)
    assert plan.video_shape == tuple(video.shape)
    with torch.no_grad():
        assert adapter.plan(latents[:, :, :1]).video_shape == tuple(vae.decode(latents[:, :, :1]).sample.shape)


def test_native_oracle_reproduces_the_model_decode(case, trilinear_case):
    for vae, latents, video, _ in (case, trilinear_case):
        with torch.no_grad():
            parts = [native_step(vae, latents[:, :, a:b]) for a, b in native_groups(vae, latents.shape[2])]
        vae._clear_conv_cache()
        torch.testing.assert_close(torch.cat(parts, 2), video, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("frames", [1, 2, 5])
def test_decode_equals_the_model_decode_in_float32(frames):
    vae = tiny_easyanimate()
    latents = torch.randn(2, 4, frames, 2, 3, generator=torch.Generator().manual_seed(frames))
    with torch.no_grad():
        video = vae.decode(latents).sample
    got = chopgrad.decode(vae, latents)
    assert got.shape == video.shape
    # post_quant_conv (1x1x1) runs per step, not on the whole latent video: rounding differs by an ulp there,
    # and this random decoder amplifies it to a few 1e-6
    torch.testing.assert_close(got, video, rtol=1e-5, atol=1e-5)


def test_decode_equals_the_model_decode_with_trilinear_time_and_two_latents_per_call(trilinear_case):
    vae, latents, video, _ = trilinear_case
    plan = chopgrad.wrap(vae).plan(latents)
    assert plan.group_bounds == (0, 1, 3, 5, 6) and plan.frames_per_step == (1, 8, 8, 4)
    torch.testing.assert_close(chopgrad.decode(vae, latents), video, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- gradients


@pytest.fixture(scope="module")
def full_backprop(case):
    vae, latents, _, target = case
    return grads_of(vae, latents, model_mse(vae, target))


@pytest.mark.parametrize("schedule,d_trunc", [("sliding", None), ("chunked", None), ("sliding", "G-1"),
                                              ("chunked", "G-1"), ("sliding_recompute", "G-1")])
def test_untruncated_pixel_loss_gradient_equals_full_backprop(case, full_backprop, schedule, d_trunc):
    vae, latents, video, target = case
    d = None if d_trunc is None else chopgrad.wrap(vae).plan(latents).num_steps - 1
    got = grads_of(vae, latents, pixel_mse(vae, target, d_trunc=d, schedule=schedule))
    assert got[0] == pytest.approx(full_backprop[0], rel=1e-6)
    assert_grads_close(got, full_backprop)


@pytest.mark.parametrize("schedule,d_trunc", [("sliding", 0), ("sliding", 1), ("sliding", 2), ("chunked", 1),
                                              ("chunked", 2), ("sliding_recompute", 1)])
def test_truncated_pixel_loss_gradient_equals_the_detach_oracle(case, schedule, d_trunc):
    vae, latents, video, target = case
    oracle_schedule = "sliding" if schedule == "sliding_recompute" else schedule
    ref_gz, ref_gp = oracle(vae, latents, mse_terms(target), d_trunc=d_trunc, schedule=oracle_schedule)
    got = grads_of(vae, latents, pixel_mse(vae, target, d_trunc=d_trunc, schedule=schedule))
    assert got[0] == pytest.approx(float(torch.nn.functional.mse_loss(video, target)), rel=1e-6)
    assert_oracle_grads(got, ref_gz, ref_gp)


def test_truncation_changes_the_gradient(case, full_backprop):
    """Guards the oracle comparisons: at d_trunc=0 the cache gradient is cut, and that matters here."""
    vae, latents, _, target = case
    got = grads_of(vae, latents, pixel_mse(vae, target, d_trunc=0))
    assert rel_err(got[1], full_backprop[1]) > 1e-3


def test_decode_under_grad_gives_the_exact_gradient_of_a_whole_video_loss(case):
    vae, latents, video, _ = case
    want = grads_of(vae, latents, lambda z: whole_video_loss(vae.decode(z).sample))
    got = grads_of(vae, latents, lambda z: whole_video_loss(chopgrad.decode(vae, z, d_trunc=None)))
    assert got[0] == pytest.approx(want[0], rel=1e-12)
    assert_grads_close(got, want)


@pytest.mark.parametrize("schedule", ["sliding", "chunked"])
def test_decode_under_grad_gives_the_truncated_gradient_of_the_oracle(case, schedule):
    vae, latents, video, _ = case
    video = video.clone().requires_grad_(True)
    (cotangent,) = torch.autograd.grad(whole_video_loss(video), video)
    ref_gz, ref_gp = oracle(vae, latents, lambda sl, frames: (frames * cotangent[:, :, sl]).sum(), d_trunc=1,
                            schedule=schedule)
    got = grads_of(vae, latents,
                   lambda z: whole_video_loss(chopgrad.decode(vae, z, d_trunc=1, schedule=schedule)))
    assert_oracle_grads(got, ref_gz, ref_gp, tol=1e-8)


def test_trilinear_time_and_two_latents_per_call_exact_and_truncated(trilinear_case):
    vae, latents, video, target = trilinear_case
    want = grads_of(vae, latents, model_mse(vae, target))
    assert_grads_close(grads_of(vae, latents, pixel_mse(vae, target, d_trunc=None)), want)
    ref_gz, ref_gp = oracle(vae, latents, mse_terms(target), d_trunc=1, schedule="sliding")
    got = grads_of(vae, latents, pixel_mse(vae, target, d_trunc=1))
    assert_oracle_grads(got, ref_gz, ref_gp)
    assert rel_err(got[1], want[1]) > 1e-3


# ---------------------------------------------------------------------------------------------- purity


def test_a_step_leaves_its_state_and_the_model_as_they_were(case):
    vae, latents, _, _ = case
    adapter = chopgrad.wrap(vae)
    before = decoder_attributes(vae)
    plan = adapter.plan(latents)
    z = [latents[:, :, a:b] for a, b in zip(plan.group_bounds[:-1], plan.group_bounds[1:])]
    _, s1 = adapter.step(0, z[0], adapter.initial_state())
    assert_attributes_are(vae, before)
    s1_leaves = [s.detach().requires_grad_(True) for s in s1]
    s1_copies = [s.detach().clone() for s in s1]
    frames1, s2 = adapter.step(1, z[1], s1_leaves)
    assert_attributes_are(vae, before)
    # other steps run in between, and the first step's graph is still alive
    adapter.step(2, z[2], [s.detach() for s in s2])
    adapter.step(0, z[0], adapter.initial_state())
    again, s2_again = adapter.step(1, z[1], s1_leaves)
    assert torch.equal(again, frames1)
    assert all(torch.equal(a, b) for a, b in zip(s2_again, s2))
    assert all(torch.equal(a, b) for a, b in zip(s1_leaves, s1_copies))
    grads = torch.autograd.grad(frames1.square().sum(), s1_leaves, allow_unused=True)
    grads_again = torch.autograd.grad(again.square().sum(), s1_leaves, allow_unused=True)
    assert sum(g is not None for g in grads) > 0
    for g, h in zip(grads, grads_again):
        assert (g is None and h is None) or torch.equal(g, h)
    with torch.no_grad():
        assert torch.equal(vae.decode(latents).sample, case[2])


def test_the_upsampler_flag_keeps_no_activation_alive(case):
    """The model keeps its upsamplers' first output as a flag; a step drops it when it returns and later
    steps run with a plain boolean."""
    vae, latents, _, _ = case
    adapter = chopgrad.wrap(vae)
    upsamplers = [m for m in vae.decoder.modules() if type(m).__name__ == "EasyAnimateUpsampler3D"]
    assert upsamplers
    seen = []

    def record(module, args, output):
        flag = module.prev_features
        seen.append(weakref.ref(flag) if isinstance(flag, torch.Tensor) else flag)

    hooks = [m.register_forward_hook(record) for m in upsamplers]
    try:
        z = latents.clone().requires_grad_(True)
        frames, state = adapter.step(0, z[:, :, :1], adapter.initial_state())
        first = [ref for ref in seen if ref is not None]  # the temporal upsamplers keep their output
        assert first and all(ref() is not None for ref in first)
        seen.clear()
        adapter.step(1, z[:, :, 1:2], state)
        assert seen == [True] * len(upsamplers)
        assert all(m.prev_features is None for m in upsamplers)
        del frames, state
        assert all(ref() is None for ref in first)  # step 0's activations were freed with its outputs
    finally:
        for h in hooks:
            h.remove()


def test_a_failing_step_restores_the_model_attributes(case):
    vae, latents, _, _ = case
    adapter = chopgrad.wrap(vae)
    _, state = adapter.step(0, latents[:, :, :1], adapter.initial_state())
    modules = [m for m in vae.decoder.modules() if hasattr(m, "prev_features")]
    leftovers = [torch.zeros(1) for _ in modules]  # what a user's own interrupted decode could leave
    for m, v in zip(modules, leftovers):
        m.prev_features = v
    vae.decoder.gradient_checkpointing = True
    try:
        expected = decoder_attributes(vae)
        with pytest.raises(RuntimeError):  # latents of another spatial size than the cache
            adapter.step(1, latents[:, :, 1:2, :, :2], state)
        assert_attributes_are(vae, expected)
        adapter.step(1, latents[:, :, 1:2], state)
        assert_attributes_are(vae, expected)
    finally:
        vae._clear_conv_cache()
        vae.decoder.gradient_checkpointing = False


def test_gradient_checkpointing_on_the_decoder_gives_the_same_gradient(case):
    contract.check_gradient_checkpointing_keeps_the_gradient_exact(case, checkpointed=["decoder"], tol=TOL, noise=0.0)


def test_a_state_that_does_not_fit_the_step_is_named(case):
    vae, latents, _, _ = case
    adapter = chopgrad.wrap(vae)
    z = latents[:, :, :1]
    with pytest.raises(ValueError, match="slots"):
        adapter.step(0, z, [])
    with pytest.raises(ValueError, match="step 1 got an empty state"):
        adapter.step(1, z, adapter.initial_state())
    _, state = adapter.step(0, z, adapter.initial_state())
    with pytest.raises(ValueError, match="partly empty"):
        adapter.step(1, z, [None] + state[1:])
    with pytest.raises(ValueError, match="step 0 got a filled state"):
        adapter.step(0, z, state)


# ---------------------------------------------------------------------------------------------- memory


def test_memory_is_constant_in_frames_at_d_trunc_1():
    vae = tiny_easyanimate().double().requires_grad_(False)

    def peak(latent_frames, method):
        g = torch.Generator().manual_seed(latent_frames)
        latents = torch.randn(1, 4, latent_frames, 1, 1, generator=g, dtype=torch.float64)
        target = torch.zeros(1, 3, 1 + 4 * (latent_frames - 1), 8, 8, dtype=torch.float64)
        z = latents.requires_grad_(True)
        with PeakMemory("cpu", cpu="live_tensors") as memory:
            if method == "full":
                torch.nn.functional.mse_loss(vae.decode(z).sample, target).backward()
            else:
                chopgrad.pixel_loss(vae, z, target, d_trunc=1).backward()
        # The measure counts a storage allocated before the block once an op inside views it: the
        # caller's target, which grows with the frames whatever the method, is not the call's memory.
        return memory.peak_bytes - target.untyped_storage().nbytes()

    short, long = 4, 14  # 13 and 53 pixel frames: from step 2 on every step holds the same
    assert peak(long, "pixel_loss") <= 1.15 * peak(short, "pixel_loss")
    assert peak(long, "full") >= 2.5 * peak(short, "full")  # the same measure sees full backprop grow


# ---------------------------------------------------------------------------------------------- errors, lean, tiling


def test_bad_latents_are_named_before_any_step(case, monkeypatch):
    vae, latents, _, target = case
    adapter = chopgrad.wrap(vae)
    calls = []
    original = adapter.step
    monkeypatch.setattr(adapter, "step", lambda i, z, s: (calls.append(i), original(i, z, s))[1])
    with pytest.raises(ValueError, match="latents must have 4 channels"):
        chopgrad.pixel_loss(adapter, latents[:, :3].clone().requires_grad_(True), target)
    with pytest.raises(ValueError, match="latents must have shape"):
        chopgrad.decode(adapter, latents[0])
    vae.num_latent_frames_batch_size = 0
    try:
        with pytest.raises(ValueError, match="num_latent_frames_batch_size"):
            chopgrad.decode(adapter, latents)
    finally:
        vae.num_latent_frames_batch_size = 1
    assert calls == []


def test_unsupported_model_error_names_easyanimate():
    with pytest.raises(TypeError, match="AutoencoderKLMagvit"):
        chopgrad.wrap(torch.nn.Conv3d(4, 3, 1))


def short_case(case):
    """The first 3 latent frames of `case` (9 pixel frames): for the tests that run the step many times."""
    vae, latents, video, target = case
    return vae, latents[:, :, :3], video[:, :, :9], target[:, :, :9]


def test_lean_leaves_the_model_alone(case):
    with lean_decoder(case[0]) as fused:
        assert fused is False
    contract.check_lean_does_nothing(short_case(case), reason="GroupNorm", noise=0.0)


def test_exact_tiles_are_refused_with_the_reason(case):
    vae, latents, _, target = short_case(case)
    with pytest.raises(ValueError, match="tile_grad='exact'.*AutoencoderKLMagvit"):
        chopgrad.pixel_loss(vae, latents.clone().requires_grad_(True), target, tile=8, tile_grad="exact")


def test_truncated_tiles_run_and_one_tile_covering_the_frame_is_exact(case):
    vae, latents, _, target = short_case(case)
    untiled = grads_of(vae, latents, pixel_mse(vae, target, d_trunc=1))
    whole = grads_of(vae, latents, pixel_mse(vae, target, d_trunc=1, tile=(16, 24), tile_grad="truncated"))
    assert_grads_close(whole, untiled)
    tiled = grads_of(vae, latents, pixel_mse(vae, target, d_trunc=1, tile=8, tile_grad="truncated"))
    assert tiled[0] == pytest.approx(untiled[0], rel=1e-12)
    assert torch.isfinite(tiled[1]).all() and 0 < rel_err(tiled[1], untiled[1]) < 1
