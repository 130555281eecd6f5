"""Inputs that would give a silently wrong result are errors, and integer-like
arguments are accepted as integers."""
import numpy as np
import pytest
import torch

import chopgrad
from tiny_models import truncated_oracle, wan21_case


@pytest.fixture(scope="module")
def wan():
    return wan21_case(latent_frames=3, seed=5)


def test_double_backward_is_an_error(wan):
    vae, latents, _, target = wan
    z = latents.clone().requires_grad_(True)
    value = chopgrad.pixel_loss(vae, z, target, d_trunc=1)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(value, z, create_graph=True)
    # the first-order gradient of a fresh call still works
    (grad,) = torch.autograd.grad(chopgrad.pixel_loss(vae, z, target, d_trunc=1), z)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("bad", ["negative", "nan"])
def test_mask_weights_must_be_finite_and_non_negative(wan, bad):
    vae, latents, video, target = wan
    mask = torch.ones_like(video[:, :1])
    mask[0, 0, 1, 2, 3] = -1.0 if bad == "negative" else float("nan")
    z = latents.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="mask"):
        chopgrad.pixel_loss(vae, z, target, mask=mask)
    with pytest.raises(ValueError, match="mask"):
        chopgrad.pixel_loss(vae, z, target, mask=lambda frames: mask[:, :, frames], reduction="sum")


def test_all_negative_mask_is_rejected_not_a_negative_loss(wan):
    vae, latents, video, target = wan
    with pytest.raises(ValueError, match="negative"):
        chopgrad.pixel_loss(vae, latents, target, mask=-torch.ones_like(video))


def test_all_zero_mask_supervises_nothing_under_both_reductions(wan):
    vae, latents, video, target = wan
    for reduction in ("mean", "sum"):
        z = latents.clone().requires_grad_(True)
        value = chopgrad.pixel_loss(vae, z, target, mask=torch.zeros_like(video), reduction=reduction)
        (grad,) = torch.autograd.grad(value, z)
        assert float(value.detach()) == 0.0 and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("which", ["target", "mask"])
@pytest.mark.parametrize("kind", ["tensor", "callable"])
def test_target_or_mask_requiring_grad_is_an_error(wan, which, kind):
    vae, latents, video, target = wan
    learned = (target if which == "target" else torch.ones_like(video)).clone().requires_grad_(True)
    source = learned if kind == "tensor" else (lambda frames: learned[:, :, frames])
    kwargs = {"target": source} if which == "target" else {"target": target, "mask": source}
    z = latents.clone().requires_grad_(True)
    with pytest.raises(ValueError, match=f"{which} requires grad"):
        chopgrad.pixel_loss(vae, z, **kwargs)
    # Without gradients nothing is dropped, so evaluation accepts it.
    with torch.no_grad():
        chopgrad.pixel_loss(vae, z, **kwargs)


def test_callable_loss_without_a_graph_is_an_error(wan):
    vae, latents, _, target = wan

    def detached_mse(pred, tgt):
        return (pred.detach() - tgt).square().mean()

    z = latents.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="detached_mse.*no graph"):
        chopgrad.pixel_loss(vae, z, target, loss=detached_mse)
    with pytest.raises(ValueError, match="no graph"):
        chopgrad.pixel_loss(vae, z, target, loss={"mse": 1.0, detached_mse: 0.5})
    with torch.no_grad():
        assert float(chopgrad.pixel_loss(vae, z, target, loss=detached_mse)) > 0


@pytest.mark.parametrize("groups", [np.array([0, 2]), [np.int64(0), np.int32(2)], torch.tensor([0, 2]),
                                    [torch.tensor(0), 2]], ids=["numpy array", "numpy ints", "tensor", "0-dim"])
def test_groups_accept_integer_like_values(wan, groups):
    vae, latents, _, target = wan
    ref_value, ref_grad, _ = truncated_oracle(vae, latents, target, d_trunc=1, schedule="sliding", supervised=[0, 2])
    z = latents.clone().requires_grad_(True)
    value = chopgrad.pixel_loss(vae, z, target, groups=groups)
    (grad,) = torch.autograd.grad(value, z)
    assert float(value.detach()) == pytest.approx(ref_value, rel=1e-5)
    assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("groups", [[0.0, 2.0], torch.tensor([0.0]), [True], torch.tensor([[0, 1]])])
def test_groups_of_non_integers_say_what_is_expected(wan, groups):
    vae, latents, _, target = wan
    with pytest.raises(TypeError, match="groups"):
        chopgrad.pixel_loss(vae, latents, target, groups=groups)


@pytest.mark.parametrize("d_trunc", [2**63, 10**30, np.int64(2), 3])
def test_large_or_numpy_d_trunc(wan, d_trunc):
    vae, latents, _, target = wan
    z = latents.clone().requires_grad_(True)
    value = chopgrad.pixel_loss(vae, z, target, d_trunc=d_trunc)
    (grad,) = torch.autograd.grad(value, z)
    ref_value, ref, _ = truncated_oracle(vae, latents, target, d_trunc=int(d_trunc), schedule="sliding")
    assert float(value.detach()) == pytest.approx(ref_value, rel=1e-5)
    assert torch.allclose(grad, ref, rtol=1e-4, atol=1e-7)


def test_latents_on_another_device_name_both_devices(wan):
    vae, latents, _, target = wan
    z = torch.empty(latents.shape, device="meta")
    for fn in (lambda: chopgrad.pixel_loss(vae, z, target), lambda: chopgrad.decode(vae, z)):
        with pytest.raises(ValueError, match="meta.*cpu"):
            fn()


def _identity_adapter(step):
    return chopgrad.FunctionalAdapter(step, latent_channels=3, frames_out=1)


@pytest.mark.parametrize("returned, what", [
    (lambda z, s: (None, s), "frames of type NoneType"),
    (lambda z, s: (z, s, 0), "3-tuple"),
    (lambda z, s: z, "returned Tensor"),
    (lambda z, s: (z, 5), "next_state of type int"),
], ids=["None frames", "3-tuple", "bare tensor", "bad state"])
def test_functional_step_with_a_bad_return_names_the_function(returned, what):
    def my_step(index, z, state):
        return returned(z, state)

    adapter = _identity_adapter(my_step)
    latents = torch.zeros(1, 3, 2, 2, 2)
    for fn in (lambda: chopgrad.pixel_loss(adapter, latents, torch.zeros(1, 3, 2, 2, 2)),
               lambda: chopgrad.decode(adapter, latents)):
        with pytest.raises(TypeError, match=f"my_step.*must return \\(frames, next_state\\).*{what}"):
            fn()
