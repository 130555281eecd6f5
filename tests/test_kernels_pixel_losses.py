"""Fused pixel losses (value-and-grad) against autograd oracles, on the reference and Triton paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chopgrad.kernels import ENV_FORCE_TRITON, fused_pixel_loss, pixel_loss_frames, pixel_loss_value_and_grad

pytestmark = pytest.mark.usefixtures("poison_empty")

SHAPE = (1, 3, 5, 37, 53)  # odd sizes, C not a power of two


def _data(device, shape=SHAPE, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    pred = (torch.randn(shape, generator=g) * 0.8).to(device=device, dtype=dtype)
    target = (torch.rand(shape, generator=g) * 2 - 1).to(device=device, dtype=dtype)
    # exact saturation values and exact ties for the clamp / sign rules
    pred.view(-1)[:7] = torch.tensor([1.0, -1.0, 1.5, -2.0, 0.25, 0.999, -0.999], dtype=dtype)
    target.view(-1)[4] = 0.25  # d == 0 exactly
    mask = (torch.rand((shape[0], 1) + shape[2:], generator=g) > 0.3).to(device=device, dtype=dtype)
    mask[:, :, 2] = 0  # an all-zero frame
    return pred, target, mask


def _elementwise(kind, v, t, delta, eps):
    if kind == "l1":
        return F.l1_loss(v, t, reduction="none")
    if kind == "mse":
        return F.mse_loss(v, t, reduction="none")
    if kind == "huber":
        return F.huber_loss(v, t, reduction="none", delta=delta)
    if kind == "charbonnier":
        return torch.sqrt((v - t) ** 2 + eps**2)
    raise AssertionError(kind)


def oracle(pred, target, mask=None, *, kind="mse", clamp=False, delta=1.0, eps=1e-3):
    """Autograd in float64: (per-frame sums, d sums.sum() / d pred) with the documented clamp rules."""
    weights = {kind: 1.0} if isinstance(kind, str) else dict(kind)
    p = pred.detach().double().requires_grad_()
    t = target.double()
    v = torch.clamp(p, -1.0, 1.0) if clamp == "pre" else p
    loss = sum(w * _elementwise(k, v, t, delta, eps) for k, w in weights.items())
    if mask is not None:
        m = mask.double().expand_as(loss)
        loss = torch.where(m != 0, loss * m, torch.zeros_like(loss))
    sums = loss.sum(dim=(1, 3, 4))
    (g,) = torch.autograd.grad(sums.sum(), p)
    if clamp in (True, "post"):
        g = g * (p.detach().abs() < 1)
    return sums, g


def torch_clamp_passes_gradient_at_bounds() -> bool:
    x = torch.tensor([-1.0, 1.0], requires_grad=True)
    torch.clamp(x, -1.0, 1.0).sum().backward()
    assert x.grad[0] == x.grad[1]
    return bool(x.grad[0] != 0)


def _close(sums, grad, ref_sums, ref_grad, atol=1e-5):
    assert sums.dtype == torch.float32
    torch.testing.assert_close(sums.double().cpu(), ref_sums.cpu(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grad.double().cpu(), ref_grad.cpu(), rtol=1e-5, atol=atol)


@pytest.mark.parametrize("kind", ["l1", "mse", "charbonnier", "huber", {"mse": 1.0, "l1": 0.5, "huber": 0.25}])
def test_kinds_match_oracle(backend, kernel_device, kind):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    pred, target, mask = _data(device)
    sums, grad = pixel_loss_value_and_grad(pred, target, mask, kind=kind, clamp="pre", delta=0.5)
    assert sums.shape == (SHAPE[0], SHAPE[2]) and grad.shape == pred.shape and grad.dtype == pred.dtype
    _close(sums, grad, *oracle(pred, target, mask, kind=kind, clamp="pre", delta=0.5))
    assert torch.all(sums[:, 2] == 0) and torch.all(grad[:, :, 2] == 0)  # all-zero mask frame


@pytest.mark.parametrize("clamp", [False, True, "post", "pre"])
def test_clamp_rules(backend, kernel_device, clamp):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    pred, target, _ = _data(device)
    sums, grad = pixel_loss_value_and_grad(pred, target, kind="mse", clamp=clamp)
    _close(sums, grad, *oracle(pred, target, kind="mse", clamp=clamp))
    flat = grad.reshape(-1)
    if clamp in (True, "post"):
        assert flat[0] == 0 and flat[1] == 0 and flat[2] == 0  # |pred| >= 1 -> no gradient
    elif clamp == "pre":
        # exactly at the bound: as torch.clamp does (passed up to torch 2.13, not from 2.14 on)
        assert (flat[0] != 0) == (flat[1] != 0) == torch_clamp_passes_gradient_at_bounds()
        assert flat[2] == 0 and flat[3] == 0  # beyond the bound: none
    else:
        assert flat[2] != 0


@pytest.mark.parametrize("mask_kind", ["channels", "bool", "weights"])
def test_mask_variants(backend, kernel_device, mask_kind):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    pred, target, mask = _data(device)
    if mask_kind == "channels":
        mask = mask.expand(pred.shape).clone()
        mask[:, 1] = 0
    elif mask_kind == "bool":
        mask = mask.bool()
    else:
        mask = mask * torch.linspace(0.1, 2.0, mask.shape[-1], device=device)
    sums, grad = pixel_loss_value_and_grad(pred, target, mask, kind="l1")
    _close(sums, grad, *oracle(pred, target, mask, kind="l1"))


def test_masked_out_nonfinite_values_contribute_nothing(backend, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    pred, target, mask = _data(device)
    target[:, :, 2] = float("nan")  # frame 2 is masked out entirely
    sums, grad = pixel_loss_value_and_grad(pred, target, mask, kind="charbonnier")
    assert torch.isfinite(sums).all() and torch.isfinite(grad).all()
    assert torch.all(sums[:, 2] == 0)


def test_grad_scale_and_out_buffers(backend, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    pred, target, mask = _data(device)
    scale = torch.arange(1, SHAPE[2] + 1, dtype=torch.float32, device=device).view(1, -1) / 7
    ref_sums, ref_grad = oracle(pred, target, mask, kind="huber")
    ref_grad = ref_grad * scale.double().cpu()[:, None, :, None, None].to(ref_grad.device)
    sums, grad = pixel_loss_value_and_grad(pred, target, mask, kind="huber", grad_scale=scale)
    _close(sums, grad, ref_sums, ref_grad)
    sums2, grad2 = pixel_loss_value_and_grad(pred, target, mask, kind="huber", grad_scale=0.5)
    _close(sums2, grad2, ref_sums, oracle(pred, target, mask, kind="huber")[1] * 0.5)
    buf = torch.zeros_like(pred)
    _, g3 = pixel_loss_value_and_grad(pred, target, mask, kind="huber", out_grad=buf)
    assert g3.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(g3, grad2 * 2)


def test_inplace_overwrites_prediction(backend, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    pred, target, mask = _data(device)
    ref_sums, ref_grad = oracle(pred, target, mask, kind="mse", clamp="pre")
    version = pred._version
    ptr = pred.data_ptr()
    sums, grad = pixel_loss_value_and_grad(pred, target, mask, kind="mse", clamp="pre", out_grad="inplace")
    assert grad.data_ptr() == ptr and pred.data_ptr() == ptr
    assert pred._version > version  # autograd sees the overwrite
    _close(sums, pred, ref_sums, ref_grad)


def test_inplace_on_saved_tensor_is_caught():
    x = torch.randn(1, 2, 2, 5, 5, requires_grad=True)
    y = x * 1.0
    z = y.sigmoid()  # sigmoid saves its output z
    pixel_loss_value_and_grad(z, torch.zeros_like(z), kind="mse", out_grad="inplace")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()


def test_strided_inputs(backend, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    pred, target, mask = _data(device, shape=(1, 5, 3, 37, 53))
    p = pred.transpose(3, 4).contiguous().transpose(3, 4)  # non-contiguous view, same values
    t = target[:, :, :, :, :]
    m = mask.expand(1, 5, 3, 37, 53)  # stride-0 channel dim
    sums, grad = pixel_loss_value_and_grad(p, t, m, kind="mse")
    _close(sums, grad, *oracle(pred, target, mask, kind="mse"))


def test_values_only_and_autograd_wrapper(backend, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    pred, target, mask = _data(device)
    ref_sums, _ = oracle(pred, target, mask, kind="l1")
    torch.testing.assert_close(pixel_loss_frames(pred, target, mask, kind="l1").double().cpu(), ref_sums.cpu(),
                               rtol=1e-5, atol=1e-3)
    p = pred.clone().requires_grad_()
    loss = fused_pixel_loss(p, target, kind="mse", reduction="mean")
    loss.backward()
    p2 = pred.clone().requires_grad_()
    ref = F.mse_loss(p2, target)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.grad, p2.grad, rtol=1e-5, atol=1e-8)


def test_autograd_wrapper_saves_only_the_gradient(monkeypatch):
    monkeypatch.delenv(ENV_FORCE_TRITON, raising=False)
    pred, target, mask = _data("cpu")
    p = pred.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = fused_pixel_loss(p, target, mask, kind={"charbonnier": 1.0, "mse": 0.5}, reduction="sum")
    assert len(saved) == 1 and saved[0].shape == pred.shape
    loss.backward()


def test_plain_mse_keeps_only_what_the_caller_holds(monkeypatch):
    """Unmasked, unclamped MSE runs as F.mse_loss under autograd: it saves pred and target themselves, not a
    gradient-sized tensor of its own, and gives the fused op's values and gradient."""
    monkeypatch.delenv(ENV_FORCE_TRITON, raising=False)
    pred, target, _ = _data("cpu")
    p = pred.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = fused_pixel_loss(p, target, kind={"mse": 0.5}, reduction="none")
    assert saved and {t.untyped_storage().data_ptr() for t in saved} <= {p.untyped_storage().data_ptr(),
                                                                        target.untyped_storage().data_ptr()}
    assert loss.dtype == torch.float32 and loss.shape == (pred.shape[0], pred.shape[2])
    weights = torch.linspace(0.5, 2.0, loss.numel()).view_as(loss)
    (loss * weights).sum().backward()
    sums, grad = pixel_loss_value_and_grad(pred, target, kind={"mse": 0.5},
                                           grad_scale=weights.repeat_interleave(1, 0))
    torch.testing.assert_close(loss.detach(), sums)
    torch.testing.assert_close(p.grad, grad)


def test_float64_reference():
    pred, target, mask = _data("cpu", dtype=torch.float64)
    sums, grad = pixel_loss_value_and_grad(pred, target, mask, kind="charbonnier", clamp=True)
    ref_sums, ref_grad = oracle(pred, target, mask, kind="charbonnier", clamp=True)
    assert sums.dtype == torch.float64
    torch.testing.assert_close(sums, ref_sums)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda p, t, m: dict(pred=p, target=t[:, :, :2]), ValueError, "target must have the shape"),
        (lambda p, t, m: dict(pred=p.to(torch.int32), target=t.to(torch.int32)), TypeError,
         "pred must have a floating"),
        (lambda p, t, m: dict(pred=p, target=t.double()), TypeError, "target must have the dtype"),
        (lambda p, t, m: dict(pred=p[0], target=t[0]), ValueError, r"pred must be a 5-d tensor"),
        (lambda p, t, m: dict(pred=p, target=t, mask=m[:, :, :2]), ValueError, r"mask must have shape \(B, 1 or C"),
        (lambda p, t, m: dict(pred=p, target=t, mask=m.to(torch.int64)), TypeError, "mask must be a floating or bool"),
        (lambda p, t, m: dict(pred=p, target=t, kind="l2"), ValueError, "unknown pixel loss 'l2'"),
        (lambda p, t, m: dict(pred=p, target=t, clamp="both"), ValueError, "clamp must be"),
        (lambda p, t, m: dict(pred=p.transpose(3, 4), target=t.transpose(3, 4), out_grad="inplace"), ValueError,
         "contiguous pred"),
        (lambda p, t, m: dict(pred=p, target=t, grad_scale=torch.ones(3)), ValueError, r"grad_scale tensor must have"),
        (lambda p, t, m: dict(pred=p, target=t, out_grad="elsewhere"), ValueError, "out_grad must be"),
    ],
)
def test_bad_input_raises(make, exc, match):
    pred, target, mask = _data("cpu", shape=(1, 3, 4, 12, 12))
    kwargs = make(pred, target, mask)
    with pytest.raises(exc, match=match):
        pixel_loss_value_and_grad(**kwargs)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision(dtype):
    pred, target, mask = _data("cuda", shape=(2, 3, 4, 67, 131), dtype=dtype)
    for kind in ("l1", "mse", "charbonnier", "huber"):
        sums, grad = pixel_loss_value_and_grad(pred, target, mask, kind=kind, clamp="pre")
        ref_sums, ref_grad = oracle(pred, target, mask, kind=kind, clamp="pre")
        assert sums.dtype == torch.float32 and grad.dtype == dtype
        torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-4, atol=1e-2)
        tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
        torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol)


@pytest.mark.cuda
def test_cuda_compiled_fp32_matches_reference(monkeypatch):
    from chopgrad.kernels import ENV_FORCE_TRITON

    pred, target, mask = _data("cuda", shape=(2, 3, 5, 257, 129))
    monkeypatch.delenv(ENV_FORCE_TRITON, raising=False)
    s1, g1 = pixel_loss_value_and_grad(pred, target, mask, kind={"mse": 1.0, "l1": 0.3}, clamp=True)
    monkeypatch.setenv(ENV_FORCE_TRITON, "0")
    s2, g2 = pixel_loss_value_and_grad(pred, target, mask, kind={"mse": 1.0, "l1": 0.3}, clamp=True)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(g1, g2)
