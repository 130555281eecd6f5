"""pixel_loss and decode on decoders configured with diffusers' memory
features (layerwise casting, group offloading) and with user hooks: values
and gradients equal autograd through an equivalent plain model's own decode
(exact) and the truncated oracle (sliding), and every hook runs."""
import warnings

import pytest
import torch

import chopgrad
from tiny_models import tiny_wan21, truncated_oracle

CPU = torch.device("cpu")


def configure(vae, config, tmp_path):
    if config.startswith("cast"):
        storage = {"cast-bf16": torch.bfloat16, "cast-fp8": torch.float8_e4m3fn}[config]
        vae.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)
    else:
        level, where = config.split("-")[1:]
        kwargs = {"offload_to_disk_path": str(tmp_path / "offload")} if where == "disk" else {}
        vae.enable_group_offload(CPU, offload_device=CPU, offload_type=f"{level}_level", num_blocks_per_group=1,
                                 **kwargs)
    return vae


def plain_equivalent(vae, config):
    """An unhooked model computing what the configured one computes (cast weights rounded to storage)."""
    plain = tiny_wan21().requires_grad_(False)
    if config.startswith("cast"):
        for p, q in zip(vae.parameters(), plain.parameters()):
            q.data = p.data.float()
    return plain


CONFIGS = ["cast-bf16", "cast-fp8", "offload-leaf-memory", "offload-leaf-disk", "offload-block-memory",
           "offload-block-disk"]


@pytest.fixture(params=CONFIGS)
def configured(request, tmp_path):
    vae = configure(tiny_wan21().requires_grad_(False), request.param, tmp_path)
    g = torch.Generator().manual_seed(8)
    latents = torch.randn(1, 4, 3, 4, 5, generator=g)
    target = torch.rand(1, 3, 9, 32, 40, generator=g) * 2 - 1
    return request.param, vae, plain_equivalent(vae, request.param), latents, target


#: the fused decoder ops against the model's own modules in fp32 (tests/test_patch.py)
FUSED_RTOL, FUSED_ATOL = 1e-5, 2e-5


@pytest.mark.parametrize("lean", [False, True])
def test_decode_equals_the_plain_model(configured, lean):
    _, vae, plain, latents, _ = configured
    with torch.no_grad():
        expected = plain.decode(latents).sample
    video = chopgrad.decode(vae, latents, lean=lean)
    assert torch.isfinite(video).all()
    if lean:  # the fused ops, run inside the hooks: equal up to their fp32 rounding
        torch.testing.assert_close(video, expected, rtol=FUSED_RTOL, atol=FUSED_ATOL)
    else:  # the model's own modules: equal to fp32 rounding of the same ops
        assert torch.allclose(video, expected, rtol=1e-5, atol=1e-6)


def test_exact_gradient_equals_autograd_through_the_plain_model(configured):
    _, vae, plain, latents, target = configured
    z = latents.clone().requires_grad_(True)
    expected = torch.nn.functional.mse_loss(plain.decode(z).sample, target)
    (ref,) = torch.autograd.grad(expected, z)
    value = chopgrad.pixel_loss(vae, z, target, d_trunc=None)
    (grad,) = torch.autograd.grad(value, z)
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert torch.isfinite(grad).all()
    assert torch.allclose(grad, ref, rtol=1e-4, atol=1e-8)


def test_sliding_gradient_equals_the_oracle_on_the_plain_model(configured):
    # Sliding re-runs steps and backpropagates each window after later modules ran: the hardest case.
    _, vae, plain, latents, target = configured
    ref_value, ref_grad, _ = truncated_oracle(plain, latents, target, d_trunc=1, schedule="sliding")
    z = latents.clone().requires_grad_(True)
    value = chopgrad.pixel_loss(vae, z, target, d_trunc=1)
    (grad,) = torch.autograd.grad(value, z)
    assert float(value.detach()) == pytest.approx(ref_value, rel=1e-5)
    assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-8)


def test_trainable_layerwise_cast_weights_are_an_error_before_any_work(tmp_path):
    vae = configure(tiny_wan21(), "cast-bf16", tmp_path)
    calls = []
    handle = vae.decoder.register_forward_pre_hook(lambda m, a: calls.append(1))
    latents = torch.randn(1, 4, 2, 4, 5)
    with pytest.raises(ValueError, match="layerwise casting"):
        chopgrad.pixel_loss(vae, latents.requires_grad_(True), torch.zeros(1, 3, 5, 32, 40))
    assert calls == []
    handle.remove()
    vae.requires_grad_(False)
    assert torch.isfinite(chopgrad.pixel_loss(vae, latents, torch.zeros(1, 3, 5, 32, 40))).all()


@pytest.mark.parametrize("schedule,runs", [("sliding", 4), ("sliding_recompute", 7)])
def test_user_hooks_on_decoder_modules_run_on_every_step_run(schedule, runs):
    vae = tiny_wan21().requires_grad_(False)
    conv = vae.decoder.mid_block.resnets[0].conv1
    seen = {"pre": 0, "post": 0}
    handles = [conv.register_forward_pre_hook(lambda m, a: seen.__setitem__("pre", seen["pre"] + 1)),
               conv.register_forward_hook(lambda m, a, o: seen.__setitem__("post", seen["post"] + 1))]
    latents = torch.randn(1, 4, 4, 4, 5).requires_grad_(True)
    target = torch.zeros(1, 3, 13, 32, 40)
    chopgrad.pixel_loss(vae, latents, target, d_trunc=1, schedule=schedule).backward()
    # 4 steps: sliding runs each once; recomputed sliding at d=1 runs them 1 + 2 + 2 + 2 times
    assert seen == {"pre": runs, "post": runs}
    for h in handles:
        h.remove()


def test_patched_decoder_with_hooks_gives_the_same_sliding_gradient(configured):
    _, vae, plain, latents, target = configured
    ref_value, ref_grad, _ = truncated_oracle(plain, latents, target, d_trunc=1, schedule="sliding")
    with warnings.catch_warnings():  # hooked leaf convs stay outside the fused ops, and patch says so
        warnings.simplefilter("ignore", chopgrad.PatchWarning)
        chopgrad.patch(vae)
    try:
        z = latents.clone().requires_grad_(True)
        value = chopgrad.pixel_loss(vae, z, target, d_trunc=1)
        (grad,) = torch.autograd.grad(value, z)
    finally:
        chopgrad.unpatch(vae)
    assert float(value.detach()) == pytest.approx(ref_value, rel=1e-5)
    assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)
