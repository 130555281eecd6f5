"""pixel_loss and decode run Wan decoders on the fused ops by default, for the call only."""
import pytest
import torch

import chopgrad
from chopgrad.adapters.wan_patch import lean_decoder
from tiny_models import tiny_cogvideox, tiny_wan21, tiny_wan22, truncated_oracle

#: the fused decoder ops against the model's own modules in fp32 (tests/test_patch.py)
FUSED_RTOL, FUSED_ATOL = 1e-5, 2e-5
GRAD_RTOL = 1e-4


def forwards(vae):
    """Every decoder module's instance forward (absent unless something installed one)."""
    return {name: m.__dict__.get("forward") for name, m in vae.decoder.named_modules()}


def inputs(vae, seed=0, latent_frames=3):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, latent_frames, 4, 5, generator=g)
    with torch.no_grad():
        shape = vae.decode(latents).sample.shape
    return latents, torch.rand(shape, generator=g) * 2 - 1


def fused_during_call(vae, **kwargs):
    """(whether the fused ops were installed while the loss ran, the loss)."""
    seen = []

    def probe(pred, target):
        seen.append(bool(chopgrad.patch_report(vae).patched))
        return (pred - target).square().mean()

    latents, target = inputs(vae)
    loss = chopgrad.pixel_loss(vae, latents.requires_grad_(True), target, loss={probe: 1.0}, **kwargs)
    return all(seen) and bool(seen), loss


@pytest.mark.parametrize("make", [tiny_wan21, tiny_wan22])
def test_fused_ops_during_the_call_and_the_model_as_it_was_after(make):
    vae = make().requires_grad_(False)
    before = forwards(vae)
    fused, loss = fused_during_call(vae)
    loss.backward()
    assert fused
    assert forwards(vae) == before and not chopgrad.patch_report(vae).patched
    fused, _ = fused_during_call(vae, lean=False)
    assert not fused


def test_the_model_is_restored_after_an_error_inside_the_call():
    vae = tiny_wan21().requires_grad_(False)
    before = forwards(vae)

    def failing(pred, target):
        raise RuntimeError("the user's loss failed")

    latents, target = inputs(vae)
    with pytest.raises(RuntimeError, match="the user's loss failed"):
        chopgrad.pixel_loss(vae, latents.requires_grad_(True), target, loss=failing)
    assert forwards(vae) == before and not chopgrad.patch_report(vae).patched
    with pytest.raises(RuntimeError, match="inside"):
        with lean_decoder(vae):
            raise RuntimeError("inside")
    assert forwards(vae) == before


def test_a_model_the_user_patched_keeps_its_patch():
    vae = tiny_wan21().requires_grad_(False)
    chopgrad.patch(vae, recompute_conv_input=False)
    patched = forwards(vae)
    fused, _ = fused_during_call(vae)
    assert fused and forwards(vae) == patched
    assert all(v.get("_chopgrad_recompute") in (None, False) for v in (m.__dict__ for m in vae.decoder.modules()))
    chopgrad.unpatch(vae)


@pytest.mark.parametrize("make", [tiny_wan21, tiny_wan22])
@pytest.mark.parametrize("schedule,d_trunc", [("sliding", 1), ("chunked", 1), ("sliding", None)])
def test_lean_and_unfused_agree_to_the_fused_ops_tolerance(make, schedule, d_trunc):
    vae = make().requires_grad_(False)
    vae.decoder.conv_out.requires_grad_(True)
    latents, target = inputs(vae, seed=3, latent_frames=4)
    results = {}
    for lean in (True, False):
        z = latents.clone().requires_grad_(True)
        vae.zero_grad(set_to_none=True)
        value = chopgrad.pixel_loss(vae, z, target, d_trunc=d_trunc, schedule=schedule, lean=lean)
        value.backward()
        results[lean] = (value.detach(), z.grad, vae.decoder.conv_out.weight.grad.clone())
    torch.testing.assert_close(results[True][0], results[False][0], rtol=FUSED_RTOL, atol=FUSED_ATOL)
    for got, ref in zip(results[True][1:], results[False][1:]):
        torch.testing.assert_close(got, ref, rtol=GRAD_RTOL, atol=1e-5 * max(float(ref.abs().max()), 1e-3))
    video = chopgrad.decode(vae, latents)
    torch.testing.assert_close(video, chopgrad.decode(vae, latents, lean=False), rtol=FUSED_RTOL, atol=FUSED_ATOL)


@pytest.mark.parametrize("config", ["cast-bf16", "offload-leaf-disk", "offload-block-memory"])
def test_lean_with_diffusers_memory_features_equals_the_oracle(config, tmp_path):
    from test_diffusers_memory_hooks import configure, plain_equivalent

    vae = configure(tiny_wan21().requires_grad_(False), config, tmp_path)
    plain = plain_equivalent(vae, config)
    latents, target = inputs(vae, seed=5)
    ref_value, ref_grad, _ = truncated_oracle(plain, latents, target, d_trunc=1, schedule="sliding")
    z = latents.clone().requires_grad_(True)
    fused, _ = fused_during_call(vae)
    assert fused
    value = chopgrad.pixel_loss(vae, z, target, d_trunc=1)
    (grad,) = torch.autograd.grad(value, z)
    assert float(value.detach()) == pytest.approx(ref_value, rel=FUSED_RTOL)
    torch.testing.assert_close(grad, ref_grad, rtol=GRAD_RTOL, atol=1e-5 * float(ref_grad.abs().max()))
    assert not chopgrad.patch_report(vae).patched


def test_user_hooks_run_inside_the_lean_call():
    vae = tiny_wan21().requires_grad_(False)
    conv = vae.decoder.mid_block.resnets[0].conv1
    calls = []
    handle = conv.register_forward_hook(lambda m, a, o: calls.append(1))
    fused, _ = fused_during_call(vae)
    handle.remove()
    # three decoder steps in the plain decode that sizes the target, then three in the lean call (each once)
    assert fused and len(calls) == 6


def test_other_models_and_bad_arguments():
    vae = tiny_cogvideox().requires_grad_(False)
    latents = torch.randn(1, 4, 3, 4, 5)
    video = chopgrad.decode(vae, latents)
    torch.testing.assert_close(chopgrad.decode(vae, latents, lean=False), video, rtol=0, atol=0)
    with pytest.raises(TypeError, match="lean must be a bool"):
        chopgrad.pixel_loss(vae, latents, video, lean="yes")
    with pytest.raises(TypeError, match="lean must be a bool"):
        chopgrad.decode(vae, latents, lean=1)


def test_patch_report_says_why_a_decoder_is_not_fused():
    report = chopgrad.patch_report(tiny_cogvideox())
    assert report.patched == ()
    reason = chopgrad.CogVideoXAdapter.fused_ops_unavailable
    assert report.skipped == (("<decoder>", "lean=True does nothing: " + reason),)
    assert "GroupNorm" in report.skipped[0][1]
    functional = chopgrad.FunctionalAdapter(lambda index, group, state: (group, state), latent_channels=4,
                                            frames_out=1)
    (entry,) = chopgrad.patch_report(functional).skipped
    assert "Wan decoder's blocks" in entry[1]
    with pytest.raises(TypeError, match="unsupported model class Linear"):
        chopgrad.patch_report(torch.nn.Linear(2, 2))


def test_patch_report_of_a_wan_vae_its_decoder_and_its_adapter_agree():
    vae = tiny_wan21().requires_grad_(False)
    assert chopgrad.patch_report(vae).patched == ()
    with lean_decoder(vae):
        report = chopgrad.patch_report(vae)
        assert report.patched
        assert chopgrad.patch_report(vae.decoder) == report
        assert chopgrad.patch_report(chopgrad.wrap(vae)) == report
