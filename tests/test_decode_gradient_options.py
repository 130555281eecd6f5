"""`chopgrad.decode` under autograd with its options and with what a decoder may carry: tiles, the fused ops,
dropout in train mode, bf16 autocast, diffusers' memory hooks, a functional adapter; and its errors."""
import pytest
import torch

import chopgrad
from test_decode_gradient import frame_difference_loss, grads_of, model_decode, rel_err
from test_diffusers_memory_hooks import configure, plain_equivalent
from test_train_mode_randomness import wan_with_dropout
from test_engine import ToyDecoder, toy_adapter
from tiny_models import tiny_cogvideox, tiny_wan21, tiny_wan22, truncated_oracle


def wan21_case(seed=0, shape=(1, 4, 3, 4, 5)):
    vae = tiny_wan21().requires_grad_(True)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return vae, latents


def decode_with(**kwargs):
    return lambda vae, z: chopgrad.decode(vae, z, **kwargs)


@pytest.mark.parametrize("make,stride", [(tiny_wan21, 8), (tiny_wan22, 16)])
@pytest.mark.parametrize("schedule,d_trunc", [("sliding", 1), ("chunked", 1), ("sliding", None)])
def test_exact_tiles_give_the_untiled_gradient(make, stride, schedule, d_trunc):
    vae = make().requires_grad_(True)
    latents = torch.randn(1, 4, 3, 3, 5, generator=torch.Generator().manual_seed(1))
    untiled = grads_of(vae, latents, decode_with(d_trunc=d_trunc, schedule=schedule), frame_difference_loss)
    tiled = grads_of(vae, latents, decode_with(d_trunc=d_trunc, schedule=schedule, tile=(2 * stride, 3 * stride)),
                     frame_difference_loss)
    assert torch.equal(tiled[1], untiled[1])  # tiles shape the backward only
    assert rel_err(tiled[2], untiled[2]) <= 1e-5
    for name, ref in untiled[3].items():
        assert ref.norm() == 0 or rel_err(tiled[3][name], ref) <= 1e-4, name


def test_truncated_tiles_on_cogvideox_run_and_keep_the_video():
    vae = tiny_cogvideox().requires_grad_(True)
    latents = torch.randn(1, 4, 7, 4, 6, generator=torch.Generator().manual_seed(2))
    plain = grads_of(vae, latents, decode_with(d_trunc=1), frame_difference_loss)
    tiled = grads_of(vae, latents, decode_with(d_trunc=1, tile=16, tile_grad="truncated"), frame_difference_loss)
    assert torch.equal(tiled[1], plain[1])
    assert torch.isfinite(tiled[2]).all() and tiled[2].abs().max() > 0
    # a halo covering the whole frame cuts nothing
    covered = grads_of(vae, latents, decode_with(d_trunc=1, tile=16, tile_grad="truncated", tile_halo=64),
                       frame_difference_loss)
    assert rel_err(covered[2], plain[2]) <= 1e-5


def test_lean_and_unfused_decoders_give_the_same_gradient():
    vae, latents = wan21_case()
    lean = grads_of(vae, latents, decode_with(d_trunc=1, lean=True), frame_difference_loss)
    unfused = grads_of(vae, latents, decode_with(d_trunc=1, lean=False), frame_difference_loss)
    torch.testing.assert_close(lean[1], unfused[1], rtol=1e-5, atol=2e-5)
    assert rel_err(lean[2], unfused[2]) <= 1e-4
    for name, ref in unfused[3].items():
        assert ref.norm() == 0 or rel_err(lean[3][name], ref) <= 1e-3, name


def test_train_mode_dropout_replays_its_random_numbers_in_backward():
    vae = wan_with_dropout()
    latents = torch.randn(1, 4, 4, 4, 5, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(4)
    want = grads_of(vae, latents, model_decode, frame_difference_loss)
    for schedule in ("sliding", "sliding_recompute"):
        torch.manual_seed(4)
        got = grads_of(vae, latents, decode_with(d_trunc=None, schedule=schedule), frame_difference_loss)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
        assert rel_err(got[2], want[2]) <= 1e-4
    torch.manual_seed(5)
    other = grads_of(vae, latents, model_decode, frame_difference_loss)
    assert rel_err(other[2], want[2]) > 1e-2  # the dropout masks matter


def test_backward_leaves_the_callers_random_state_alone():
    vae = wan_with_dropout()
    latents = torch.randn(1, 4, 3, 4, 5, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    video = chopgrad.decode(vae, latents, d_trunc=1)
    before = torch.get_rng_state()
    frame_difference_loss(video).backward()
    assert torch.equal(torch.get_rng_state(), before)


def test_bf16_autocast_is_as_accurate_as_the_models_own_decode():
    """Against an fp32 copy of the same weights; the errors are pooled over the latents and all parameters."""
    vae, latents = wan21_case(seed=3)
    reference = grads_of(vae, latents, model_decode, frame_difference_loss)

    def under_autocast(video_fn):
        def run(model, z):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return video_fn(model, z).float()
        return run

    own = grads_of(vae, latents, under_autocast(model_decode), frame_difference_loss)
    ours = grads_of(vae, latents, under_autocast(decode_with(d_trunc=None)), frame_difference_loss)

    def pooled_error(got):
        err = (got[2] - reference[2]).norm() ** 2 + sum((got[3][n] - r).norm() ** 2 for n, r in reference[3].items())
        size = reference[2].norm() ** 2 + sum(r.norm() ** 2 for r in reference[3].values())
        return float((err / size).sqrt())

    assert ours[1].dtype == torch.float32
    assert pooled_error(ours) <= 1.1 * pooled_error(own) + 1e-3
    assert pooled_error(ours) < 0.1  # a gradient computed in fp32 outside autocast would be ~0 here, not this


def test_backward_runs_under_the_forwards_autocast():
    vae, latents = wan21_case(seed=3)
    seen = []
    handle = vae.decoder.conv_out.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    try:
        z = latents.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            video = chopgrad.decode(vae, z, d_trunc=1, lean=False)
        forward_dtypes = list(seen)
        seen.clear()
        frame_difference_loss(video.float()).backward()
    finally:
        handle.remove()
    assert set(forward_dtypes) == {torch.bfloat16} and set(seen) == {torch.bfloat16}


@pytest.mark.parametrize("d_trunc", [None, 1])
def test_a_functional_adapter_on_a_toy_recurrence(d_trunc):
    """A user's step function: exact against plain autograd over its steps; truncated against explicit detach."""
    toy = ToyDecoder()
    adapter = toy_adapter(toy)
    z = torch.randn(2, 3, 6, 1, 1, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def loss_fn(video):  # frames of different steps mixed
        return (video[:, :, 1:] * video[:, :, :-1]).sum() + video[:, 0].square().sum()

    loss_fn(chopgrad.decode(adapter, z, d_trunc=d_trunc)).backward()
    got = [z.grad] + [p.grad for p in toy.parameters()]

    frames, state = [], [None]
    with torch.no_grad():
        for g in range(6):
            f, state = toy.step(g, z[:, :, g:g + 1], state)
            frames.append(f)
    video = torch.cat(frames, 2).requires_grad_(True)
    (cotangent,) = torch.autograd.grad(loss_fn(video), video)
    want = [torch.zeros_like(z)] + [torch.zeros_like(p) for p in toy.parameters()]
    for g in range(6):  # step g's term reaches steps max(0, g - d) .. g only
        start = 0 if d_trunc is None else max(0, g - d_trunc)
        state = [None]
        with torch.no_grad():
            for k in range(start):
                _, state = toy.step(k, z[:, :, k:k + 1], state)
        leaf = z.detach().requires_grad_(True)
        for k in range(start, g + 1):
            f, state = toy.step(k, leaf[:, :, k:k + 1], state)
        grads = torch.autograd.grad((f * cotangent[:, :, g:g + 1]).sum(), [leaf] + list(toy.parameters()))
        for acc, gr in zip(want, grads):
            acc += gr
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", ["cast-bf16", "offload-leaf-memory", "offload-block-disk"])
def test_memory_hooks_give_the_gradient_of_the_plain_model(config, tmp_path):
    vae = configure(tiny_wan21().requires_grad_(False), config, tmp_path)
    plain = plain_equivalent(vae, config)
    latents = torch.randn(1, 4, 3, 4, 5, generator=torch.Generator().manual_seed(8))
    video = model_decode(plain, latents).detach().requires_grad_(True)
    (cotangent,) = torch.autograd.grad(frame_difference_loss(video), video)
    scale = video.numel()
    _, ref_grad, _ = truncated_oracle(plain, latents, cotangent, d_trunc=1, schedule="sliding",
                                      loss_fn=lambda frames, c: (frames * c).sum() * scale)
    z = latents.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(frame_difference_loss(chopgrad.decode(vae, z, d_trunc=1)), z)
    assert torch.isfinite(grad).all()
    assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-8)


def test_trainable_layerwise_cast_weights_are_an_error_before_any_work(tmp_path):
    vae = configure(tiny_wan21(), "cast-bf16", tmp_path)
    calls = []
    handle = vae.decoder.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="layerwise casting"):
            chopgrad.decode(vae, torch.randn(1, 4, 2, 4, 5))
        assert calls == []
    finally:
        handle.remove()


def counting_decoder_calls(vae):
    calls = []
    return calls, vae.decoder.register_forward_pre_hook(lambda m, a: calls.append(1))


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(callback=lambda s, f: None), ValueError, "callback streams frames out without a graph"),
    (dict(d_trunc=-1), ValueError, "d_trunc must be >= 0"),
    (dict(d_trunc=1.5), TypeError, "d_trunc"),
    (dict(schedule="zigzag"), ValueError, "schedule must be one of"),
    (dict(clamp=1), TypeError, "clamp must be a bool"),
    (dict(lean="yes"), TypeError, "lean must be a bool"),
    (dict(tile_grad="approx"), ValueError, "tile_grad must be one of"),
    (dict(tile=12), ValueError, "tile must be a positive multiple of the decoder's spatial stride"),
    (dict(tile_halo=8), ValueError, "tile_halo is given but tile is None"),
    (dict(callback="print"), TypeError, "callback must be callable"),
])
def test_bad_arguments_are_named_before_any_decoding(kwargs, error, message):
    vae, latents = wan21_case()
    calls, handle = counting_decoder_calls(vae)
    try:
        with pytest.raises(error, match=message):
            chopgrad.decode(vae, latents.requires_grad_(True), **kwargs)
    finally:
        handle.remove()
    assert calls == []


def test_exact_tiles_are_refused_for_cogvideox_before_any_decoding():
    vae = tiny_cogvideox().requires_grad_(True)
    calls, handle = counting_decoder_calls(vae)
    try:
        with pytest.raises(ValueError, match="tile_grad='exact' needs a decoder"):
            chopgrad.decode(vae, torch.randn(1, 4, 3, 4, 6, requires_grad=True), tile=16)
    finally:
        handle.remove()
    assert calls == []


def test_streaming_still_works_without_gradients():
    vae, latents = wan21_case()
    seen = []
    with torch.no_grad():
        assert chopgrad.decode(vae, latents, callback=lambda s, f: seen.append(s)) is None
    assert len(seen) == chopgrad.wrap(vae).plan(latents).num_steps


def test_double_backward_is_an_error():
    vae, latents = wan21_case()
    z = latents.clone().requires_grad_(True)
    loss = frame_difference_loss(chopgrad.decode(vae, z))
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(loss, z, create_graph=True)


def test_changing_the_latents_before_backward_is_an_error_and_the_model_stays_usable():
    vae, latents = wan21_case()
    z = latents.clone().requires_grad_(True)
    w = z * 1.0
    video = chopgrad.decode(vae, w)
    with torch.no_grad():
        w.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        frame_difference_loss(video).backward()
    assert chopgrad.patch_report(vae).patched == ()  # the fused ops of this call are gone
    with torch.no_grad():
        torch.testing.assert_close(chopgrad.decode(vae, latents, lean=False), model_decode(vae, latents))


def test_gradients_accumulate_over_two_decodes_of_one_graph():
    """Two videos from the same latents in one loss: each backward adds its share, as autograd does."""
    vae, latents = wan21_case(seed=6)
    want = grads_of(vae, latents, lambda m, z: torch.cat([model_decode(m, z), model_decode(m, 2 * z)], 2),
                    frame_difference_loss)
    got = grads_of(vae, latents, lambda m, z: torch.cat([chopgrad.decode(m, z, d_trunc=None),
                                                         chopgrad.decode(m, 2 * z, d_trunc=None)], 2),
                   frame_difference_loss)
    assert rel_err(got[2], want[2]) <= 1e-5
    for name, ref in want[3].items():
        assert ref.norm() == 0 or rel_err(got[3][name], ref) <= 1e-4, name
