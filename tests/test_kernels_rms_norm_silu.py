"""Wan RMSNorm + SiLU (and its fusion with the causal pad) against diffusers' eager math."""

from __future__ import annotations

import pytest
import torch

from chopgrad.kernels import causal_pad_reference, rms_norm_silu, rms_norm_silu_pad, rms_norm_silu_reference

pytestmark = pytest.mark.usefixtures("poison_empty")


def _inputs(device, shape=(2, 5, 3, 7, 9), dtype=torch.float32, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    gamma = (torch.rand((C, 1, 1, 1), generator=g) + 0.5).to(device=device, dtype=dtype)
    b = (torch.randn(C, generator=g) * 0.3).to(device=device, dtype=dtype) if bias else 0.0
    return x, gamma, b


def _grads(out, inputs, grads_out):
    total = sum((o * go).sum() for o, go in zip(out, grads_out))
    return torch.autograd.grad(total, inputs, allow_unused=True, retain_graph=True)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(2, 5, 3, 7, 9), (1, 12, 1, 5, 37), (3, 7, 11, 13)])
def test_matches_diffusers_math(backend, kernel_device, shape, bias):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    x, gamma, b = _inputs(device, shape, bias=bias)
    x.requires_grad_()
    gamma.requires_grad_()
    inputs = [x, gamma] + ([b.requires_grad_()] if bias else [])
    y = rms_norm_silu(x, gamma, b)
    ref = rms_norm_silu_reference(x, gamma, b)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    gy = torch.randn_like(y)
    got = _grads([y], inputs, [gy])
    want = _grads([ref], inputs, [gy])
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-5)


def test_gradcheck_float64_reference_path():
    x, gamma, b = _inputs("cpu", (1, 4, 2, 3, 3), dtype=torch.float64, bias=True)
    x.requires_grad_()
    gamma.requires_grad_()
    b.requires_grad_()
    assert torch.autograd.gradcheck(lambda x_, g_, b_: rms_norm_silu(x_, g_, b_), (x, gamma, b))


def test_zero_norm_position(backend, kernel_device):
    """Where ||x|| <= eps diffusers divides by eps: same values and (huge but finite) gradients."""
    device = kernel_device if backend == "triton" else torch.device("cpu")
    x, gamma, _ = _inputs(device)
    x[0, :, 1, 2, 3] = 0
    x.requires_grad_()
    y = rms_norm_silu(x, gamma)
    ref = rms_norm_silu_reference(x, gamma)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    gy = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, x, gy)
    (gr,) = torch.autograd.grad(ref, x, gy)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-5)


def test_saves_only_input_and_statistic(backend, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    x, gamma, _ = _inputs(device, (2, 6, 3, 8, 8))
    x.requires_grad_()
    gamma.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = rms_norm_silu(x, gamma)
    shapes = sorted(tuple(t.shape) for t in saved if t is not None)
    assert shapes == sorted([tuple(x.shape), tuple(gamma.shape), (2, 3 * 8 * 8)])
    stat = [t for t in saved if t is not None and t.shape == (2, 192)][0]
    assert stat.dtype == torch.float32
    y.sum().backward()


@pytest.mark.parametrize(
    "tc, tx, time_pad, ph, pw",
    [(0, 1, 2, 1, 1), (1, 1, 2, 1, 1), (2, 1, 2, 1, 1), (2, 4, 2, 1, 1), (1, 3, 2, 0, 2), (2, 2, 0, 1, 1)],
)
def test_fused_pad_matches_composition(backend, kernel_device, tc, tx, time_pad, ph, pw):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    x, gamma, b = _inputs(device, (1, 5, tx, 7, 9), bias=True)
    cache = torch.randn(1, 5, tc, 7, 9, device=device).requires_grad_() if tc else None
    x.requires_grad_()
    gamma.requires_grad_()
    b.requires_grad_()
    out, new = rms_norm_silu_pad(x, gamma, b, cache, time_pad=time_pad, pad_h=ph, pad_w=pw)
    ref_out, ref_new = causal_pad_reference(rms_norm_silu_reference(x, gamma, b), cache, time_pad=time_pad,
                                            pad_h=ph, pad_w=pw)
    assert out.shape == ref_out.shape and new.shape == ref_new.shape
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new, ref_new, rtol=1e-5, atol=1e-6)
    inputs = [x, gamma, b] + ([cache] if cache is not None else [])
    gs = [torch.randn_like(out), torch.randn_like(new)]
    got = _grads([out, new], inputs, gs)
    want = _grads([ref_out, ref_new], inputs, gs)
    for a, w in zip(got, want):
        if w is None:  # cache unused by the reference (time_pad=0): our gradient must then be zero
            assert a is None or not a.any()
            continue
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-5)
    # gradient through the padded output only (emitted cache unused)
    got = torch.autograd.grad(out.sum(), x)[0]
    want = torch.autograd.grad(ref_out.sum(), x)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fused_pad_saves_no_activation_but_input(backend, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    x, gamma, _ = _inputs(device, (1, 4, 4, 6, 6))
    cache = torch.randn(1, 4, 2, 6, 6, device=device, requires_grad=True)
    x.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out, new = rms_norm_silu_pad(x, gamma, 0.0, cache, time_pad=2, pad_h=1, pad_w=1)
    big = [t for t in saved if t is not None and t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].shape == x.shape  # x only: no output, no cache
    assert sum(t.numel() for t in saved if t is not None) <= x.numel() + gamma.numel() + 4 * 6 * 6


def test_bad_input_raises():
    x, gamma, _ = _inputs("cpu")
    with pytest.raises(ValueError, match="gamma must have C = 5 elements"):
        rms_norm_silu(x, gamma[:3])
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        rms_norm_silu(x.to(torch.int32), gamma)
    with pytest.raises(ValueError, match="bias must be"):
        rms_norm_silu(x, gamma, torch.zeros(4))
    with pytest.raises(ValueError, match=r"cache must have shape \(B, C, Tc, H, W\)"):
        rms_norm_silu_pad(x, gamma, 0.0, torch.zeros(2, 5, 2, 7, 8), time_pad=2)
    with pytest.raises(TypeError, match="cache must have the dtype"):
        rms_norm_silu_pad(x, gamma, 0.0, torch.zeros(2, 5, 2, 7, 9, dtype=torch.float64), time_pad=2)
    with pytest.raises(ValueError, match="x must be a 5-d tensor"):
        rms_norm_silu_pad(x[0], gamma, 0.0, None, time_pad=2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision(dtype):
    x, gamma, _ = _inputs("cuda", (2, 96, 4, 33, 65), dtype=dtype)
    cache = torch.randn(2, 96, 2, 33, 65, device="cuda", dtype=dtype, requires_grad=True)
    x.requires_grad_()
    gamma.requires_grad_()
    out, new = rms_norm_silu_pad(x, gamma, 0.0, cache, time_pad=2, pad_h=1, pad_w=1)
    x32 = x.detach().float().requires_grad_()
    g32 = gamma.detach().float().requires_grad_()
    c32 = cache.detach().float().requires_grad_()
    ro, rn = causal_pad_reference(rms_norm_silu_reference(x32, g32), c32, time_pad=2, pad_h=1, pad_w=1)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.float(), ro, rtol=tol, atol=tol)
    torch.testing.assert_close(new.float(), rn, rtol=tol, atol=tol)
    go, gn = torch.randn_like(ro), torch.randn_like(rn)
    got = torch.autograd.grad((out.float() * go).sum() + (new.float() * gn).sum(), [x, gamma, cache])
    want = torch.autograd.grad((ro * go).sum() + (rn * gn).sum(), [x32, g32, c32])
    for a, w in zip(got, want):
        torch.testing.assert_close(a.float(), w, rtol=5 * tol, atol=5 * tol * w.abs().max().item())


@pytest.mark.parametrize("tc, tx", [(0, 1), (1, 1), (2, 3)])
def test_fused_pad_conv_matches_eager_block_half(backend, kernel_device, tc, tx):
    from chopgrad.kernels import rms_norm_silu_pad_conv3d

    device = kernel_device if backend == "triton" else torch.device("cpu")
    x, gamma, _ = _inputs(device, (1, 5, tx, 6, 7))
    g = torch.Generator().manual_seed(9)
    cache = torch.randn(1, 5, tc, 6, 7, generator=g).to(device).requires_grad_() if tc else None
    weight = (torch.randn(4, 5, 3, 3, 3, generator=g) * 0.2).to(device).requires_grad_()
    cbias = torch.randn(4, generator=g).to(device).requires_grad_()
    x.requires_grad_()
    gamma.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out, new = rms_norm_silu_pad_conv3d(x, gamma, 0.0, cache, weight, cbias, time_pad=2, pad_h=1, pad_w=1)
    # nothing as large as the padded input (tx + 2 frames) is kept
    assert max(t.numel() for t in saved if t is not None) <= max(x.numel(), weight.numel())
    y = rms_norm_silu_reference(x, gamma, 0.0)
    y_pad, ref_new = causal_pad_reference(y, cache, time_pad=2, pad_h=1, pad_w=1)
    ref = torch.nn.functional.conv3d(y_pad, weight, cbias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new, ref_new, rtol=1e-5, atol=1e-6)
    inputs = [x, gamma, weight, cbias] + ([cache] if cache is not None else [])
    gs = [torch.randn_like(out), torch.randn_like(new)]
    for a, w in zip(_grads([out, new], inputs, gs), _grads([ref, ref_new], inputs, gs)):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-5)
    # only the conv output used downstream
    for a, w in zip(torch.autograd.grad(out.sum(), inputs), torch.autograd.grad(ref.sum(), inputs)):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-5)
