"""The one-step latent model of the training recipes and the --generator factory resolution."""
import pytest
import torch

from chopgrad.tools.train.model import OneStepLatentModel, resolve_factory


def test_shapes_and_the_latent_copy_start():
    model = OneStepLatentModel(z_dim=4, extra_channels=1, width=8, blocks=2)
    inputs = torch.randn(2, 5, 3, 4, 6)
    out = model(inputs)
    assert out.shape == (2, 4, 3, 4, 6)
    assert torch.equal(out, inputs[:, :4])  # zero last conv: starts as the condition latents


def test_output_frame_depends_on_earlier_input_frames_only():
    torch.manual_seed(0)
    model = OneStepLatentModel(z_dim=3, width=8, blocks=2)
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)  # leave the copy start, so the network matters
    inputs = torch.randn(1, 3, 5, 4, 4, requires_grad=True)
    out = model(inputs)
    (grad,) = torch.autograd.grad(out[:, :, 2].sum(), inputs)
    per_frame = grad.abs().sum(dim=(0, 1, 3, 4))
    assert torch.all(per_frame[3:] == 0) and torch.all(per_frame[:3] > 0)


def test_bad_inputs_and_arguments_are_clear_errors():
    model = OneStepLatentModel(z_dim=4, extra_channels=1, width=8, blocks=1)
    with pytest.raises(ValueError, match=r"\(B, 5, T, h, w\)"):
        model(torch.randn(1, 4, 2, 3, 3))
    with pytest.raises(ValueError, match="width"):
        OneStepLatentModel(z_dim=4, width=0)


def test_resolve_factory():
    assert resolve_factory("chopgrad.tools.train.model:OneStepLatentModel") is OneStepLatentModel
    for spec, message in (("nomodule", "module:function"), ("no_such_module_x:f", "cannot import"),
                          ("chopgrad.tools.train.model:missing", "no callable 'missing'")):
        with pytest.raises(ValueError, match=f"--generator.*{message}"):
            resolve_factory(spec)


def test_video_quality_metrics():
    from chopgrad.tools.metrics import psnr, ssim, temporal_error

    torch.manual_seed(0)
    clip = torch.rand(3, 5, 16, 16) * 2 - 1
    assert psnr(clip + 0.02, clip) == pytest.approx(10 * torch.log10(torch.tensor(4 / 0.0004)).item(), rel=1e-6)
    assert ssim(clip, clip) == pytest.approx(1.0, abs=1e-5) and ssim(torch.rand_like(clip) * 2 - 1, clip) < 0.5
    assert temporal_error(clip + 0.3, clip) == pytest.approx(0.0, abs=1e-6)  # a constant offset does not flicker
    flicker = clip + 0.1 * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0]).view(1, 5, 1, 1)
    assert temporal_error(flicker, clip) == pytest.approx(0.2, rel=1e-6)
    assert temporal_error(clip[:, :1], clip[:, :1]) == 0.0
