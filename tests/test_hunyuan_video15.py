"""AutoencoderKLHunyuanVideo15 through the causal-conv chunker with a key/value cache.

Exact cases against the model's own `vae.decode(z).sample` (values) and plain autograd through it
(gradients), on a float64 copy of the tiny model. In diffusers 0.42.1 that decode raises for a batch
of two unless slicing is on (its attention mask broadcasts over the head dimension), so batch-2
references decode with `enable_slicing()`: each sample alone, as the decode does for a batch of one.

Truncated cases against an oracle that runs the model's own whole-clip decode on the latent prefix of
each supervised step, with hooks that detach what the steps before the truncation point hand on: the
input frames of every causal conv (pre-hooks) and the keys and values of the mid-block attention
(hooks on its `to_k` and `to_v`). That is the decode with the state at that point held constant, and
it shares no code with the chunker.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import chopgrad
import vae_contract as contract
from chopgrad.adapters.hunyuan_video15 import HunyuanVideo15Adapter
from tiny_models import tiny_hunyuan_video15
from vae_contract import assert_grads_close, grads_of, make_case, model_mse, rel_err

# batch 2, 5 latent frames: 5 steps, 1 + 4 * 4 = 17 frames
LATENTS = (2, 4, 5, 2, 3)
TOL = 1e-9


def model_decode(vae, z):
    """`vae.decode(z).sample`, each sample alone (diffusers' own decode raises for a batch of two)."""
    vae.enable_slicing()
    try:
        return vae.decode(z).sample
    finally:
        vae.disable_slicing()


@pytest.fixture(scope="module")
def case():
    return make_case(tiny_hunyuan_video15().double(), LATENTS, decode=model_decode)


# ---------------------------------------------------------------------------------------------- the oracle


def frames_before(start: int, frames: int, latent_frames: int) -> int:
    """Frames of latent steps before `start` at a level with `frames` frames (the first latent frame makes 1)."""
    if start == 0:
        return 0
    per_latent = (frames - 1) // (latent_frames - 1)
    return 1 + per_latent * (start - 1)


@contextlib.contextmanager
def past_detached(decoder, start: int, latent_frames: int):
    """Every causal conv sees its input frames of steps before `start` detached, and so does the mid-block
    attention its keys and values of those frames."""
    from diffusers.models.autoencoders.autoencoder_kl_hunyuanvideo15 import (HunyuanVideo15AttnBlock,
                                                                             HunyuanVideo15CausalConv3d)

    def detached(x):
        n = frames_before(start, x.shape[2], latent_frames)
        return torch.cat([x[:, :, :n].detach(), x[:, :, n:]], dim=2)

    handles = [m.register_forward_pre_hook(lambda module, args: (detached(args[0]), *args[1:]))
               for m in decoder.modules() if isinstance(m, HunyuanVideo15CausalConv3d)]
    attentions = [m for m in decoder.modules() if isinstance(m, HunyuanVideo15AttnBlock)]
    assert handles and attentions
    handles += [proj.register_forward_hook(lambda module, args, out: detached(out))
                for a in attentions for proj in (a.to_k, a.to_v)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def test_oracle_untruncated_is_full_backprop(case):
    contract.check_oracle_untruncated_is_full_backprop(case, past_detached=past_detached, decode=model_decode, tol=TOL)


# ---------------------------------------------------------------------------------------------- the model


def test_the_model_attends_to_all_earlier_frames():
    """The key/value cache holds every earlier frame because diffusers' mask is causal over all of them."""
    from diffusers.models.autoencoders.autoencoder_kl_hunyuanvideo15 import HunyuanVideo15AttnBlock

    frames, hw = 6, 2
    mask = HunyuanVideo15AttnBlock.prepare_causal_attention_mask(frames, hw, torch.float32, "cpu")
    frame = torch.arange(frames).repeat_interleave(hw)
    assert torch.equal(mask == 0, frame[None, :] <= frame[:, None])


def test_diffusers_batched_decode_matches_slicing_or_raises():
    """Why the batch-2 references slice: diffusers 0.42.1's batched decode raises; a fixed one must agree."""
    vae = tiny_hunyuan_video15()
    z = torch.randn(2, 4, 3, 2, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        sliced = model_decode(vae, z)
        try:
            batched = vae.decode(z).sample
        except RuntimeError as e:
            assert "broadcast" in str(e)
        else:
            torch.testing.assert_close(batched, sliced, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(chopgrad.decode(vae, z), sliced, rtol=1e-5, atol=1e-5)


def test_wrap_picks_the_hunyuan_video15_adapter():
    contract.check_wrap_picks_the_adapter(tiny_hunyuan_video15(), HunyuanVideo15Adapter)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("latent_frames", [1, 2, 5])
def test_decode_equals_the_model_decode(dtype, latent_frames):
    vae = tiny_hunyuan_video15().to(dtype)
    latents = torch.randn(2, 4, latent_frames, 2, 3, generator=torch.Generator().manual_seed(2), dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-13
    got = contract.check_decode_equals_the_model_decode(vae, latents, shape=(2, 3, 1 + 4 * (latent_frames - 1), 8, 12),
                                                        tol=tol, decode=model_decode)
    with torch.no_grad():
        single = vae.decode(latents[1:]).sample  # the default decode itself, on a batch of one
    torch.testing.assert_close(got[1:], single, rtol=tol, atol=tol)


@pytest.mark.parametrize("latents_per_step", [2, 3])
def test_several_latent_frames_per_step(case, latents_per_step):
    """More frames per step: the attention then masks the step's own later frames."""
    vae, latents, video, target = case
    adapter = HunyuanVideo15Adapter(vae, latents_per_step=latents_per_step)
    assert adapter.plan(latents).frames_per_step == ((5, 8, 4) if latents_per_step == 2 else (9, 8))
    with torch.no_grad():
        torch.testing.assert_close(chopgrad.decode(adapter, latents), video, rtol=1e-13, atol=1e-13)
    want = grads_of(vae, latents, model_mse(vae, target, model_decode))
    got = grads_of(vae, latents, lambda z: chopgrad.pixel_loss(adapter, z, target, d_trunc=None))
    assert_grads_close(got, want, TOL)


def test_the_default_decode_on_a_batch_of_one(case):
    """Value and gradient against the untouched default decode (no slicing) where diffusers can run it."""
    vae, latents, video, target = case
    z1, t1 = latents[:1], target[:1]
    want = grads_of(vae, z1, lambda z: F.mse_loss(vae.decode(z).sample, t1))
    got = grads_of(vae, z1, lambda z: chopgrad.pixel_loss(vae, z, t1, d_trunc=None))
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    assert_grads_close(got, want, TOL)


@pytest.mark.parametrize("schedule,d_trunc", [("sliding", None), ("chunked", None), ("sliding", "G-1"),
                                              ("chunked", "G-1")])
def test_untruncated_pixel_loss_is_the_model_loss_and_gradient(case, schedule, d_trunc):
    contract.check_untruncated_pixel_loss_is_the_model_loss_and_gradient(case, schedule, d_trunc, tol=TOL,
                                                                         decode=model_decode)


def test_decode_under_grad_is_the_model_decode_and_gradient(case):
    contract.check_decode_under_grad_is_the_model_decode_and_gradient(case, tol=TOL, decode=model_decode)


@pytest.mark.parametrize("schedule,d_trunc", [("sliding", 0), ("sliding", 1), ("sliding", 2), ("chunked", 0),
                                              ("chunked", 1), ("chunked", 2), ("sliding_recompute", 1)])
def test_truncated_gradient_equals_the_oracle(case, schedule, d_trunc):
    contract.check_truncated_gradient_equals_the_oracle(case, schedule, d_trunc, past_detached=past_detached, tol=TOL,
                                                        decode=model_decode)


def test_truncation_changes_the_gradient(case):
    """At d_trunc=0 something must be cut in the convs' caches and in the key/value cache (the attention's to_k
    gets gradient only from the step's own keys)."""
    got, want = contract.check_truncation_changes_the_gradient(case, decode=model_decode)
    key = "decoder.mid_block.attentions.0.to_k.weight"
    assert rel_err(got[2][key], want[2][key]) > 1e-3


def test_step_is_pure_and_leaves_the_model_as_it_was(case):
    adapter, state, next_state = contract.check_step_is_pure_and_leaves_the_model_as_it_was(
        case, fail_in="decoder.up_blocks.1")
    # 20 causal convs with 2 cached frames each, then the keys and values of every frame so far
    assert len(state) == adapter.num_slots == 22
    assert [s.shape[2] for s in state] == [2] * 20 + [2, 2] and [s.shape[2] for s in next_state][-2:] == [3, 3]
    assert next_state[-1].shape == (2, 16, 3, 2, 3)


def test_gradient_checkpointing_on_the_model_keeps_the_gradient_exact(case):
    contract.check_gradient_checkpointing_keeps_the_gradient_exact(
        case, checkpointed=["decoder", "decoder.up_blocks.0"], tol=TOL, decode=model_decode)


def test_lean_does_nothing_to_hunyuan_video15(case):
    contract.check_lean_does_nothing(case, reason="replicating edge pixels")


def test_tiling(case):
    # the tiles' gradient is approximate also because a tile's attention sees the keys and values of its crop only
    contract.check_truncated_tiling(case, frame=(8, 12), tile=(4, 4), halo=4, tol=TOL)


def test_bad_latents_are_named_before_any_decoding(case):
    contract.check_bad_latents_are_named_before_any_decoding(case, wrong_channels=32)


def test_a_changed_conv_padding_is_refused():
    vae = tiny_hunyuan_video15()
    adapter = chopgrad.wrap(vae)
    vae.decoder.up_blocks[0].resnets[0].conv1.pad_mode = "reflect"
    with pytest.raises(ValueError, match="pad_mode='reflect'"):
        chopgrad.decode(adapter, torch.randn(1, 4, 2, 2, 3))
    with pytest.raises(ValueError, match="up_blocks.0.resnets.0.conv1"):
        chopgrad.wrap(vae).plan(torch.randn(1, 4, 2, 2, 3))


def test_memory_grows_only_through_the_key_value_cache():
    """At d_trunc=1 the peak of live tensors at 4x the frames is at most 1.15x, but not constant.

    The mid-block attention's keys and values of all earlier frames are state, and each step attends to
    them: the peak grows by a few copies of one latent frame's keys, values and row of attention scores per
    latent frame. Without the attention block the peak does not grow. On this tiny config the growth is
    small next to a step's activations; docs/vaes.md gives it for the released configuration.
    """
    from chopgrad.tools.bench.memory import PeakLiveBytes

    h = w = 8
    channels = 16  # the mid block's width

    def peaks(vae, latent_frames):
        g = torch.Generator().manual_seed(4)
        out = []
        for t in latent_frames:
            z = torch.randn(1, 4, t, h, w, generator=g).requires_grad_(True)

            def target(frames):  # streamed: a whole target video would itself grow with the frames
                return torch.full((1, 3, frames.stop - frames.start, 4 * h, 4 * w), 0.5)

            with PeakLiveBytes() as live:
                chopgrad.pixel_loss(vae, z, target, d_trunc=1).backward()
            vae.zero_grad(set_to_none=True)
            out.append(live.peak)
        return out

    short, long = 4, 16
    with_attention = peaks(tiny_hunyuan_video15(), (short, long))
    plain = tiny_hunyuan_video15()
    plain.decoder.mid_block.attentions[0] = None
    without_attention = peaks(plain, (short, long))

    assert with_attention[1] <= 1.15 * with_attention[0]
    assert without_attention[1] <= 1.01 * without_attention[0]
    growth = (with_attention[1] - with_attention[0]) - (without_attention[1] - without_attention[0])
    per_frame = 4 * (2 * channels * h * w + (h * w) ** 2)  # float32 keys and values, and one row of scores
    assert per_frame * (long - short) < growth <= 6 * per_frame * (long - short)
