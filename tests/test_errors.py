"""Bad input raises a clear error naming the argument before any decoding,
and the model's own decode is unaffected afterwards."""
import pytest
import torch

import chopgrad
from tiny_models import tiny_wan21


@pytest.fixture(scope="module")
def wan():
    vae = tiny_wan21()
    latents = torch.randn(1, 4, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        video = vae.decode(latents).sample
    return vae, latents, video


@pytest.fixture
def counting_adapter(wan, monkeypatch):
    adapter = chopgrad.wrap(wan[0])
    calls = []
    original = adapter.step
    monkeypatch.setattr(adapter, "step", lambda i, z, s: (calls.append(i), original(i, z, s))[1])
    return adapter, calls


def _bad_cases(latents, video):
    b, c, f, h, w = video.shape
    nan_latents = latents.clone()
    nan_latents[0, 0, 1, 0, 0] = float("nan")
    inf_latents = latents.clone()
    inf_latents[0, 1, 0, 2, 3] = float("inf")
    ok = torch.zeros_like(video)
    return {
        "target frame count": (ValueError, "target", dict(latents=latents, target=torch.zeros(b, c, f - 1, h, w))),
        "target spatial size": (ValueError, "target", dict(latents=latents, target=torch.zeros(b, c, f, h, w + 8))),
        "target channels": (ValueError, "target", dict(latents=latents, target=torch.zeros(b, 1, f, h, w))),
        "target integer": (TypeError, "target", dict(latents=latents, target=ok.long())),
        "target type": (TypeError, "target", dict(latents=latents, target=[1, 2, 3])),
        "nan latents": (ValueError, "latents", dict(latents=nan_latents, target=ok)),
        "inf latents": (ValueError, "latents", dict(latents=inf_latents, target=ok)),
        "latent channels": (ValueError, "latents", dict(latents=latents[:, :3], target=ok)),
        "latent rank": (ValueError, "latents", dict(latents=latents[0], target=ok)),
        "integer latents": (TypeError, "latents", dict(latents=latents.long(), target=ok)),
        "negative d_trunc": (ValueError, "d_trunc", dict(latents=latents, target=ok, d_trunc=-1)),
        "float d_trunc": (TypeError, "d_trunc", dict(latents=latents, target=ok, d_trunc=1.5)),
        "unknown schedule": (ValueError, "schedule", dict(latents=latents, target=ok, schedule="zigzag")),
        "unknown loss": (ValueError, "loss", dict(latents=latents, target=ok, loss="lpipsx")),
        "bad loss weight": (TypeError, "loss", dict(latents=latents, target=ok, loss={"mse": "1"})),
        "unknown reduction": (ValueError, "reduction", dict(latents=latents, target=ok, reduction="max")),
        "mask shape": (ValueError, "mask", dict(latents=latents, target=ok, mask=torch.ones(b, 2, f, h, w))),
        "groups range": (ValueError, "groups", dict(latents=latents, target=ok, groups=[0, 3])),
        "groups empty": (ValueError, "groups", dict(latents=latents, target=ok, groups=[])),
    }


CASES = list(_bad_cases(torch.zeros(1, 4, 3, 4, 5), torch.zeros(1, 3, 9, 32, 40)))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_raises_before_decoding(wan, counting_adapter, case):
    vae, latents, video = wan
    adapter, calls = counting_adapter
    error, argument, kwargs = _bad_cases(latents, video)[case]
    kwargs = dict(kwargs)
    z = kwargs.pop("latents").clone()
    z.requires_grad_(z.is_floating_point())
    target = kwargs.pop("target")
    with pytest.raises(error, match=argument):
        chopgrad.pixel_loss(adapter, z, target, **kwargs)
    assert calls == []
    with torch.no_grad():
        assert torch.equal(vae.decode(latents).sample, video)


def test_unsupported_model_class_names_known_ones():
    with pytest.raises(TypeError, match="AutoencoderKLWan"):
        chopgrad.pixel_loss(torch.nn.Conv3d(4, 3, 1), torch.zeros(1, 4, 2, 2, 2), torch.zeros(1, 3, 2, 2, 2))
    with pytest.raises(TypeError, match="vae_or_decoder"):
        chopgrad.wrap(object())


def test_error_inside_a_step_leaves_model_usable(wan):
    vae, latents, video = wan
    b, c, f, h, w = video.shape

    def bad_target(frames):
        if frames.start > 0:
            return torch.zeros(b, c, 2, h, w)  # wrong frame count on step 1
        return torch.zeros(b, c, frames.stop - frames.start, h, w)

    z = latents.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="target"):
        chopgrad.pixel_loss(vae, z, bad_target, d_trunc=1)
    with torch.no_grad():
        assert torch.equal(vae.decode(latents).sample, video)
    # and chopgrad itself still works on the same model
    value = chopgrad.pixel_loss(vae, z, torch.zeros_like(video), d_trunc=1)
    assert float(value.detach()) == pytest.approx(float(video.square().mean()), rel=1e-5)


def test_loss_callable_must_return_a_scalar(wan):
    vae, latents, video = wan
    with pytest.raises(ValueError, match="scalar"):
        chopgrad.pixel_loss(vae, latents, torch.zeros_like(video), loss=lambda p, t: p - t)


def test_missing_extension_says_how_to_build(monkeypatch):
    import importlib

    from chopgrad import _ext

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "chopgrad._C":
            raise ImportError("No module named 'chopgrad._C'")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(ImportError, match="pip install --no-build-isolation -e ."):
        _ext.load_extension()
    assert _ext.extension_status()[0] is False


@pytest.mark.parametrize("family", ["wan21", "cogvideox", "mochi", "easyanimate", "hunyuan_video15"])
def test_diffusers_tiling_is_refused_where_chopgrad_decodes_untiled(family):
    """With enable_tiling() the model's decode blends tiles; chopgrad's untiled frames would silently differ."""
    import tiny_models

    vae = getattr(tiny_models, f"tiny_{family}")()
    latents = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        untiled = chopgrad.decode(vae, latents)
    vae.enable_tiling()
    with torch.no_grad(), pytest.raises(ValueError, match=r"vae\.disable_tiling\(\)"):
        chopgrad.decode(vae, latents)
    with pytest.raises(ValueError, match="enable_tiling"):
        chopgrad.pixel_loss(vae, latents.clone().requires_grad_(True), torch.zeros_like(untiled))
    vae.disable_tiling()
    with torch.no_grad():
        assert torch.equal(chopgrad.decode(vae, latents), untiled)


def test_hunyuan_video_follows_diffusers_tiling():
    from tiny_models import tiny_hunyuan_video

    vae = tiny_hunyuan_video()
    vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16, tile_sample_stride_height=8,
                      tile_sample_stride_width=8)
    latents = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(chopgrad.decode(vae, latents), vae.decode(latents).sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_latents_in_another_dtype_than_the_decoder_are_named(wan, counting_adapter, dtype):
    vae, latents, video = wan
    adapter, calls = counting_adapter
    z = latents.to(dtype)
    with pytest.raises(TypeError, match=rf"latents have dtype {dtype}, but the decoder computes in torch\.float32"):
        chopgrad.pixel_loss(adapter, z, video)
    with torch.no_grad(), pytest.raises(TypeError, match=r"latents\.to\(torch\.float32\)"):
        chopgrad.decode(adapter, z)
    assert calls == []
    if dtype == torch.bfloat16:  # under autocast the decoder casts the latents itself, as vae.decode does
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            want = vae.decode(z).sample
            got = chopgrad.decode(vae, z, lean=False)
        assert torch.equal(got, want)


def test_a_refused_callback_says_why_a_gradient_is_wanted(wan):
    vae, latents, video = wan
    trainable = sum(1 for p in chopgrad.wrap(vae).parameters() if p.requires_grad)
    assert trainable > 0  # diffusers' default
    with pytest.raises(ValueError, match=rf"{trainable} decoder parameters require grad .*requires_grad_\(False\)"):
        chopgrad.decode(vae, latents, callback=lambda frames, x: None)
    with pytest.raises(ValueError, match="the latents require grad"):
        chopgrad.decode(vae.requires_grad_(False), latents.clone().requires_grad_(True), callback=lambda f, x: None)
    vae.requires_grad_(True)


@pytest.mark.cuda
def test_a_cuda_mask_callable_with_a_cpu_decoder_is_summed_after_its_copy(wan):
    """The copy of a streamed mask to the CPU completes before the "mean" denominator reads it."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    vae, latents, video = wan
    mask = torch.rand(video.shape, generator=torch.Generator().manual_seed(2)).cuda()
    target = torch.zeros_like(video)
    with torch.no_grad():
        got = chopgrad.pixel_loss(vae, latents, target, mask=lambda frames: mask[:, :, frames] * 1.0, lean=False)
    want = (video.clamp(-1, 1).square() * mask.cpu()).sum() / mask.cpu().sum()
    assert float(got) == pytest.approx(float(want), rel=1e-5)
