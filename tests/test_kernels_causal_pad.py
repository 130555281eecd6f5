"""Causal cache concat + pad against diffusers' cat + F.pad + clone."""

from __future__ import annotations

import pytest
import torch

from chopgrad.kernels import causal_pad, causal_pad_reference

pytestmark = pytest.mark.usefixtures("poison_empty")

GEOMETRIES = [
    # (cache frames, chunk frames, time_pad, pad_h, pad_w)
    (0, 1, 2, 1, 1),  # first chunk: no cache
    (1, 1, 2, 1, 1),  # second chunk: 1-frame cache, one zero frame left
    (2, 1, 2, 1, 1),  # steady state, 1-frame chunk (cache = [old last, x])
    (2, 4, 2, 1, 1),  # steady state, 4-frame chunk
    (2, 2, 2, 0, 0),  # temporal-only conv (time_conv of the upsampler)
    (2, 1, 1, 0, 2),  # cache longer than the time pad: cropped like F.pad's negative pad
    (2, 3, 0, 1, 1),  # no time pad: the cache is not used, only carried into the emitted cache
    (1, 3, 4, 2, 0),
]


@pytest.mark.parametrize("tc, tx, time_pad, ph, pw", GEOMETRIES)
def test_matches_eager(backend, kernel_device, tc, tx, time_pad, ph, pw):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    g = torch.Generator().manual_seed(tc * 10 + tx)
    x = torch.randn(2, 3, tx, 7, 9, generator=g).to(device).requires_grad_()
    cache = torch.randn(2, 3, tc, 7, 9, generator=g).to(device).requires_grad_() if tc else None
    out, new = causal_pad(x, cache, time_pad=time_pad, pad_h=ph, pad_w=pw)
    ref_out, ref_new = causal_pad_reference(x, cache, time_pad=time_pad, pad_h=ph, pad_w=pw)
    assert out.shape == ref_out.shape and new.shape == ref_new.shape
    assert torch.equal(out, ref_out) and torch.equal(new, ref_new)
    assert new.data_ptr() != out.data_ptr()
    inputs = [x] + ([cache] if cache is not None else [])
    go, gn = torch.randn_like(out), torch.randn_like(new)
    for use_new in (True, False):
        loss = (out * go).sum() + ((new * gn).sum() if use_new else 0)
        ref_loss = (ref_out * go).sum() + ((ref_new * gn).sum() if use_new else 0)
        got = torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=True)
        want = torch.autograd.grad(ref_loss, inputs, allow_unused=True, retain_graph=True)
        for a, w in zip(got, want):
            if w is None:
                assert a is None or not a.any()
            else:
                torch.testing.assert_close(a, w, rtol=0, atol=0)


def test_no_emitted_cache_and_partial_grads(backend, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    x = torch.randn(1, 4, 2, 5, 6, device=device, requires_grad=True)
    cache = torch.randn(1, 4, 2, 5, 6, device=device)  # no grad wanted
    out = causal_pad(x, cache, time_pad=2, pad_h=1, pad_w=1, emit_cache=False)
    ref, _ = causal_pad_reference(x, cache, time_pad=2, pad_h=1, pad_w=1)
    assert isinstance(out, torch.Tensor) and torch.equal(out, ref)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    (gr,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(g, gr)
    # only the cache needs a gradient
    cache.requires_grad_()
    xd = x.detach()
    out, new = causal_pad(xd, cache, time_pad=2, pad_h=1, pad_w=1)
    ref, ref_new = causal_pad_reference(xd, cache, time_pad=2, pad_h=1, pad_w=1)
    (g,) = torch.autograd.grad(out.square().sum() + new.sum(), cache)
    (gr,) = torch.autograd.grad(ref.square().sum() + ref_new.sum(), cache)
    torch.testing.assert_close(g, gr)


def test_saves_nothing(backend, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    x = torch.randn(1, 4, 2, 5, 6, device=device, requires_grad=True)
    cache = torch.randn(1, 4, 2, 5, 6, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        causal_pad(x, cache, time_pad=2, pad_h=1, pad_w=1)
    assert saved == []


def test_strided_inputs(backend, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    x = torch.randn(1, 3, 9, 7, 2, device=device).permute(0, 1, 4, 3, 2)  # (1, 3, 2, 7, 9), non-contiguous
    cache = torch.randn(1, 3, 4, 7, 9, device=device)[:, :, ::2]  # strided frames
    out, new = causal_pad(x, cache, time_pad=2, pad_h=1, pad_w=1)
    ref, ref_new = causal_pad_reference(x, cache, time_pad=2, pad_h=1, pad_w=1)
    assert torch.equal(out, ref) and torch.equal(new, ref_new)


def test_bad_input_raises():
    x = torch.randn(1, 3, 2, 5, 6)
    with pytest.raises(ValueError, match=r"cache must have shape \(B, C, Tc, H, W\) = \(1, 3, Tc, 5, 6\)"):
        causal_pad(x, torch.randn(1, 4, 2, 5, 6), time_pad=2)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        causal_pad(x.long(), None, time_pad=2)
    with pytest.raises(ValueError, match="time_pad must be a non-negative int"):
        causal_pad(x, None, time_pad=-1)
    with pytest.raises(ValueError, match=r"x must be a 5-d tensor \(B, C, T, H, W\)"):
        causal_pad(x[0], None, time_pad=2)
    with pytest.raises(TypeError, match="cache must have the dtype of x"):
        causal_pad(x, torch.randn(1, 3, 2, 5, 6, dtype=torch.float64), time_pad=2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_exact(dtype):
    x = torch.randn(2, 96, 4, 33, 65, device="cuda", dtype=dtype, requires_grad=True)
    cache = torch.randn(2, 96, 2, 33, 65, device="cuda", dtype=dtype, requires_grad=True)
    out, new = causal_pad(x, cache, time_pad=2, pad_h=1, pad_w=1)
    ref, ref_new = causal_pad_reference(x, cache, time_pad=2, pad_h=1, pad_w=1)
    assert torch.equal(out, ref) and torch.equal(new, ref_new)
    go, gn = torch.randn_like(out), torch.randn_like(new)
    got = torch.autograd.grad((out * go).sum() + (new * gn).sum(), [x, cache])
    want = torch.autograd.grad((ref * go).sum() + (ref_new * gn).sum(), [x, cache])
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w)
