"""diffusers AutoencoderKLHunyuanVideo through chopgrad's windowed adapter.

Values against the model's own decode with its default settings (windows of 5
latent frames every 3, blended over 4 frames), gradients against autograd
through that decode and, truncated, against an explicit per-window oracle that
drives the model's own post_quant_conv, decoder and blend_t.
"""
from contextlib import nullcontext

import pytest
import torch

import chopgrad
import vae_contract as contract
from chopgrad.adapters import HunyuanVideoAdapter, Window, WindowedAdapter, strided_windows
from chopgrad.tools.bench.memory import PeakMemory
from tiny_models import tiny_hunyuan_video
from vae_contract import grads_of, mse_terms, rel_err, truncated_gradient

F64_TOL = 1e-10


def make_latents(num_latents, dtype=torch.float64, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, num_latents, 3, 5, generator=g).to(dtype)


def make_target(vae, latents, seed=2):
    with torch.no_grad():
        shape = vae.decode(latents).sample.shape
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) * 2 - 1).to(latents.dtype)


def contract_case(vae, num_latents):
    """(vae, latents, their decode, a target): a case of vae_contract."""
    z = make_latents(num_latents)
    with torch.no_grad():
        video = vae.decode(z).sample
    return vae, z, video, make_target(vae, z)


@pytest.fixture(scope="module")
def vae64():
    return tiny_hunyuan_video().double()


@pytest.fixture
def fresh_vae64():
    return tiny_hunyuan_video().double()


def windowed_decode(vae, z, no_grad_before_frame=0):
    """AutoencoderKLHunyuanVideo's own decode written out with its post_quant_conv, decoder and blend_t.

    Windows whose kept frames all lie before frame `no_grad_before_frame` run without grad.
    """
    ratio = vae.temporal_compression_ratio
    num_latents = z.shape[2]
    if not vae.use_framewise_decoding or num_latents <= vae.tile_sample_min_num_frames // ratio:
        return vae.decoder(vae.post_quant_conv(z))
    size = vae.tile_sample_min_num_frames // ratio + 1
    stride = vae.tile_sample_stride_num_frames // ratio
    keep = vae.tile_sample_stride_num_frames
    blend = vae.tile_sample_min_num_frames - keep
    row, kept_end = [], 0
    for k, i in enumerate(range(0, num_latents, stride)):
        n = min(size, num_latents - i)
        kept_end += min(keep + (k == 0), (n - 1) * ratio + 1 - (k > 0))
        with torch.no_grad() if kept_end <= no_grad_before_frame else nullcontext():
            decoded = vae.decoder(vae.post_quant_conv(z[:, :, i:i + size]))
        row.append(decoded[:, :, 1:] if k else decoded)
    result = [row[0][:, :, :keep + 1]]
    for k in range(1, len(row)):
        result.append(vae.blend_t(row[k - 1], row[k], blend)[:, :, :keep])
    return torch.cat(result, dim=2)[:, :, :(num_latents - 1) * ratio + 1]


def decoder_params(vae):
    return [(n, p) for n, p in vae.named_parameters()
            if n.startswith(("decoder.", "post_quant_conv.")) and p.requires_grad]


def full_backprop(vae, latents, target):
    z = latents.clone().requires_grad_(True)
    named = decoder_params(vae)
    loss = torch.nn.functional.mse_loss(vae.decode(z).sample, target)
    grads = torch.autograd.grad(loss, [z] + [p for _, p in named])
    return float(loss.detach()), grads[0], {n: g for (n, _), g in zip(named, grads[1:])}


def truncated_oracle(vae, latents, loss_of_step, *, d_trunc, schedule):
    """The truncated gradient of docs/design.md section 2 for the loss with terms `loss_of_step(frame_slice, frames)`,
    one backward per step.

    For step g with truncation point s (g - D, or its chunk start) the latents before step s's group are
    detached and the windows that end before step s's frames run without grad: what the state detached at
    step s holds (the carried latents, the previous window's blend tail) carries no gradient.
    """
    plan = chopgrad.wrap(vae).plan(latents)

    def step_loss(g, start, leaf):
        cut = plan.group_bounds[start]
        z = torch.cat([leaf[:, :, :cut].detach(), leaf[:, :, cut:]], dim=2)
        video = windowed_decode(vae, z, no_grad_before_frame=plan.frame_slice(start).start)
        frames = plan.frame_slice(g)
        return loss_of_step(frames, video[:, :, frames])

    return truncated_gradient(latents, decoder_params(vae), plan.num_steps, step_loss, d_trunc=d_trunc,
                              schedule=schedule, zero_unreached=True)


def run_pixel_loss(vae, latents, target, adapter=None, **kw):
    return grads_of(vae, latents, lambda z: chopgrad.pixel_loss(adapter or vae, z, target, **kw), decoder_params(vae))


def assert_grads_close(got, ref, tol):
    loss, gz, gp = got
    ref_loss, ref_gz, ref_gp = ref
    assert loss == pytest.approx(ref_loss, rel=1e-6)  # pixel_loss returns a float32 value
    assert rel_err(gz, ref_gz) <= tol
    # Some gradients are zero up to rounding (the attention's key bias shifts every logit alike), so each
    # parameter is compared relative to the largest parameter gradient as well.
    scale = max(float(r.norm()) for r in ref_gp.values())
    for name, r in ref_gp.items():
        g = gp.get(name, torch.zeros_like(r))
        assert float((g - r).norm()) <= tol * max(float(r.norm()), scale * 1e-3), name


# --- the layout -----------------------------------------------------------------------------------------------

def test_wrap_picks_the_adapter(vae64):
    contract.check_wrap_picks_the_adapter(vae64, HunyuanVideoAdapter)
    assert isinstance(chopgrad.wrap(vae64), WindowedAdapter)


@pytest.mark.parametrize("num_latents, bounds, frames", [
    (4, (0, 4), (13,)),  # <= 4 latent frames: one call
    (5, (0, 5), (17,)),  # the second window [3, 5) brings no latent frame: the first step decodes it
    (7, (0, 5, 7), (13, 12)),  # the third window [6, 7) contributes no frame: not decoded
    (10, (0, 5, 8, 10), (13, 12, 12)),
    (11, (0, 5, 8, 11), (13, 12, 16)),
])
def test_plan_follows_the_models_windows(vae64, num_latents, bounds, frames):
    plan = chopgrad.wrap(vae64).plan(make_latents(num_latents))
    assert plan.group_bounds == bounds and plan.frames_per_step == frames
    assert plan.num_frames == 4 * (num_latents - 1) + 1
    assert (plan.height, plan.width) == (12, 20)


def test_windowed_decode_differs_from_one_whole_clip_call(vae64):
    """What "exact" means here: the model's own windowed decode, which one call over the clip does not equal."""
    z = make_latents(7)
    with torch.no_grad():
        assert rel_err(vae64.decoder(vae64.post_quant_conv(z)), vae64.decode(z).sample) > 1e-3


def test_oracle_decode_reproduces_the_model_decode(vae64):
    for t in (4, 7, 10, 11):
        z = make_latents(t)
        with torch.no_grad():
            assert torch.equal(windowed_decode(vae64, z), vae64.decode(z).sample)


# --- values ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_latents", [1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 14])
def test_decode_equals_model_decode_float32(num_latents):
    vae = tiny_hunyuan_video()
    z = make_latents(num_latents, torch.float32)
    with torch.no_grad():
        assert torch.equal(chopgrad.decode(vae, z), vae.decode(z).sample)


@pytest.mark.parametrize("num_latents", [7, 10, 11])
def test_pixel_loss_value_equals_loss_on_model_decode(num_latents):
    vae = tiny_hunyuan_video()
    z = make_latents(num_latents, torch.float32)
    target = make_target(vae, z)
    with torch.no_grad():
        ref = torch.nn.functional.mse_loss(vae.decode(z).sample, target)
    for d in (0, 1, None):
        loss = chopgrad.pixel_loss(vae, z.clone().requires_grad_(True), target, d_trunc=d)
        assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-6)


# --- gradients ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["sliding", "chunked"])
@pytest.mark.parametrize("num_latents", [7, 10, 11])
def test_untruncated_gradient_equals_full_backprop(vae64, num_latents, schedule):
    z = make_latents(num_latents)
    target = make_target(vae64, z)
    ref = full_backprop(vae64, z, target)
    assert_grads_close(run_pixel_loss(vae64, z, target, d_trunc=None, schedule=schedule), ref, F64_TOL)


def test_two_steps_back_reach_every_latent_a_step_depends_on(vae64):
    """Step g's frames depend on windows g-1 and g, whose latents lie in steps g-2 .. g."""
    z = make_latents(14)
    target = make_target(vae64, z)
    ref = full_backprop(vae64, z, target)
    assert_grads_close(run_pixel_loss(vae64, z, target, d_trunc=2), ref, F64_TOL)
    for d in (0, 1):
        assert rel_err(run_pixel_loss(vae64, z, target, d_trunc=d)[1], ref[1]) > 1e-4


@pytest.fixture(scope="module")
def truncated_case(vae64):
    z = make_latents(14)  # 4 steps, the last one decoding two windows
    return z, make_target(vae64, z)


@pytest.mark.parametrize("d_trunc, schedule", [(0, "sliding"), (1, "sliding"), (2, "sliding"), (0, "chunked"),
                                               (1, "chunked"), (2, "chunked"), (1, "sliding_recompute")])
def test_truncated_gradient_equals_per_window_oracle(vae64, truncated_case, d_trunc, schedule):
    z, target = truncated_case
    ref = truncated_oracle(vae64, z, mse_terms(target), d_trunc=d_trunc, schedule=schedule)
    with torch.no_grad():
        assert ref[0] == pytest.approx(float(torch.nn.functional.mse_loss(vae64.decode(z).sample, target)), rel=1e-12)
    assert_grads_close(run_pixel_loss(vae64, z, target, d_trunc=d_trunc, schedule=schedule), ref, F64_TOL)


def test_truncated_gradient_odd_count_with_a_short_last_window(vae64):
    z = make_latents(10)
    target = make_target(vae64, z)
    for d in (0, 1):
        ref = truncated_oracle(vae64, z, mse_terms(target), d_trunc=d, schedule="sliding")
        assert_grads_close(run_pixel_loss(vae64, z, target, d_trunc=d), ref, F64_TOL)


@pytest.mark.parametrize("d_trunc", [None, 1])
def test_decode_under_grad(vae64, d_trunc):
    z = make_latents(11)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        video_ref = vae64.decode(z).sample
    cot = torch.randn(video_ref.shape, generator=g, dtype=torch.float64)
    leaf = z.clone().requires_grad_(True)
    video = chopgrad.decode(vae64, leaf, d_trunc=d_trunc)
    assert torch.equal(video.detach(), video_ref)
    (video * cot).sum().backward()
    # the linear loss <video, cot> has the same truncated gradient through pixel_loss with loss=<x, c> per step
    if d_trunc is None:
        ref_leaf = z.clone().requires_grad_(True)
        (vae64.decode(ref_leaf).sample * cot).sum().backward()
        ref = ref_leaf.grad
    else:
        ref = truncated_oracle(vae64, z, lambda sl, frames: (frames * cot[:, :, sl]).sum(), d_trunc=d_trunc,
                               schedule="sliding")[1]
    vae64.zero_grad(set_to_none=True)
    assert rel_err(leaf.grad, ref) <= F64_TOL


# --- the model's other settings ---------------------------------------------------------------------------------

def _framewise_off(vae):
    vae.use_framewise_decoding = False


def _spatial_tiling(vae):
    vae.enable_tiling(tile_sample_min_height=12, tile_sample_min_width=12, tile_sample_stride_height=8,
                      tile_sample_stride_width=8)


def _slicing(vae):
    vae.enable_slicing()


def _gradient_checkpointing(vae):
    vae.enable_gradient_checkpointing()


def _blend_over_blended_frames(vae):
    # windows of 4 latent frames every one, blended over 8 of their 12 frames: a window's blend tail
    # includes frames it blended with its own predecessor
    vae.tile_sample_min_num_frames, vae.tile_sample_stride_num_frames = 12, 4


@pytest.mark.parametrize("settings", [_framewise_off, _spatial_tiling, _slicing, _gradient_checkpointing,
                                      _blend_over_blended_frames])
def test_non_default_settings_follow_the_model(fresh_vae64, settings):
    settings(fresh_vae64)
    z = make_latents(7)
    target = make_target(fresh_vae64, z)
    with torch.no_grad():
        assert torch.allclose(chopgrad.decode(fresh_vae64, z), fresh_vae64.decode(z).sample, rtol=0, atol=1e-12)
    ref = full_backprop(fresh_vae64, z, target)
    assert_grads_close(run_pixel_loss(fresh_vae64, z, target, d_trunc=None), ref, F64_TOL)


# --- memory ---------------------------------------------------------------------------------------------------

def test_memory_is_constant_in_frames():
    vae = tiny_hunyuan_video()

    def peak(num_latents, d_trunc=1):
        z = make_latents(num_latents, torch.float32, batch=1).requires_grad_(True)
        target = make_target(vae, z.detach())
        with PeakMemory(torch.device("cpu"), cpu="live_tensors") as mem:
            chopgrad.pixel_loss(vae, z, target, d_trunc=d_trunc).backward()
        return mem.peak_bytes

    short, long = peak(8), peak(30)  # 29 and 117 frames
    assert 0 < long <= 1.15 * short, (short, long)
    # the measure sees the step graphs: without truncation they pile up
    assert peak(30, None) > 2 * long


# --- options and errors ----------------------------------------------------------------------------------------

def test_wrong_latents_are_named_before_any_decoding(vae64):
    contract.check_bad_latents_are_named_before_any_decoding(contract_case(vae64, 7), wrong_channels=3)


def test_lean_does_nothing_and_patch_report_says_why(vae64):
    contract.check_lean_does_nothing(contract_case(vae64, 7), reason="GroupNorm", noise=0.0)


def test_truncated_tiling_runs_and_exact_tiling_is_refused(vae64):
    z = make_latents(7)
    target = make_target(vae64, z)
    untiled = run_pixel_loss(vae64, z, target, d_trunc=1)
    tiled = run_pixel_loss(vae64, z, target, d_trunc=1, tile=8, tile_grad="truncated")
    assert tiled[0] == pytest.approx(untiled[0], rel=1e-6)
    assert torch.isfinite(tiled[1]).all() and tiled[1].abs().max() > 0
    # a halo as wide as the frame crops nothing (state included), so the tiles add up to the untiled gradient
    whole = run_pixel_loss(vae64, z, target, d_trunc=1, tile=8, tile_grad="truncated", tile_halo=20)
    assert_grads_close(whole, untiled, F64_TOL)
    with pytest.raises(ValueError, match="tile_grad='exact'"):
        chopgrad.pixel_loss(vae64, z, target, tile=8, tile_grad="exact")


# --- the generic windowed adapter -------------------------------------------------------------------------------

def docs_example_adapter(vae):
    """The example of docs/vaes.md: HunyuanVideo's default layout, spelled out."""
    return WindowedAdapter(
        lambda z: vae.decoder(vae.post_quant_conv(z)),
        lambda t: strided_windows(t, size=5, stride=3, window_frames=lambda n: 4 * (n - 1) + 1, keep_first=13,
                                  keep=12, blend=4, trim_front=1, num_frames=4 * (t - 1) + 1),
        latent_channels=4, spatial_scale=4, model=vae,
        parameters=[*vae.post_quant_conv.parameters(), *vae.decoder.parameters()])


def test_docs_example_equals_the_model(vae64):
    z = make_latents(11)
    target = make_target(vae64, z)
    adapter = docs_example_adapter(vae64)
    with torch.no_grad():
        for t in (1, 3, 4, 5, 11):  # up to 4 latent frames the pattern is one window: the model's single call
            assert torch.equal(chopgrad.decode(adapter, z[:, :, :t]), vae64.decode(z[:, :, :t]).sample)
    assert_grads_close(run_pixel_loss(vae64, z, target, adapter, d_trunc=None), full_backprop(vae64, z, target),
                       F64_TOL)


def test_window_layout_errors(vae64):
    decode = lambda z: vae64.decoder(vae64.post_quant_conv(z))
    z = make_latents(7)
    bad = {
        "must start at latent frame 0": [Window(1, 7, 5)],
        "latent frames 3:4 are in no window": [Window(0, 3, 9), Window(4, 7, 8)],
        "latent frames 5:7 are in no window": [Window(0, 5, 17)],
        "starts must not decrease": [Window(0, 5, 13), Window(4, 7, 4), Window(3, 7, 4)],
        "contributes no frames": [Window(0, 7, 0)],
        "non-negative int": [Window(0, 7, -1)],
    }
    for message, windows in bad.items():
        adapter = WindowedAdapter(decode, lambda t, w=windows: w, latent_channels=4, spatial_scale=4)
        with pytest.raises(ValueError, match=message):
            adapter.plan(z)
    too_many = WindowedAdapter(decode, lambda t: [Window(0, t, 30)], latent_channels=4, spatial_scale=4)
    with pytest.raises(RuntimeError, match="decoded 25 frames"):
        chopgrad.decode(too_many, z)


def test_a_step_follows_the_last_plan(vae64):
    adapter = chopgrad.wrap(vae64)
    z = make_latents(11)
    plan = adapter.plan(z)
    with pytest.raises(RuntimeError, match="call plan"):
        chopgrad.wrap(vae64).step(0, z[:, :, :5], [None, None])
    adapter.plan(make_latents(7))
    _, state = adapter.step(0, z[:, :, :5], adapter.initial_state())
    with pytest.raises(ValueError, match="clip of 7 latent frames"):
        adapter.step(2, z[:, :, plan.group_bounds[2]:], state)
