"""The fused ops as PyTorch custom ops: schema, fake tensors, autograd, torch.compile without graph breaks."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

from chopgrad.kernels import (LOSS_KINDS, causal_pad, fused_pixel_loss, fused_ssim, pixel_loss_value_and_grad,
                              rms_norm_silu)
from chopgrad.kernels._args import Clamp

OPS = torch.ops.chopgrad
MSE, L1, HUBER = (LOSS_KINDS.index(k) for k in ("mse", "l1", "huber"))
CLAMP_PRE, CLAMP_POST, CLAMP_NONE = int(Clamp.PRE), int(Clamp.POST), int(Clamp.NONE)


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    # opcheck runs every op many times; the reference is the CPU kernel (the interpreter would be far too slow)
    monkeypatch.setenv("CHOPGRAD_FORCE_TRITON", "0")


def _randn(*shape, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(shape, generator=g).requires_grad_(requires_grad)


# ---------------------------------------------------------------------------
# opcheck: schema, fake (meta) kernel, autograd registration, AOT dispatch
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 5, 3, 7, 9), (1, 3, 11, 13)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck_rms_norm_silu(shape, with_bias):
    C = shape[1]
    x = _randn(*shape, requires_grad=True)
    gamma = (_randn(C, 1, 1, seed=1).abs() + 0.5).requires_grad_()
    bias = _randn(C, seed=2, requires_grad=True) if with_bias else None
    opcheck(OPS.rms_norm_silu.default, (x, gamma, bias, 0.0, C**0.5, 1e-12))
    rstd = OPS.rms_norm_silu(x.detach(), gamma.detach(), bias, 0.0, C**0.5, 1e-12)[1]
    gy = _randn(*shape, seed=3)
    opcheck(OPS.rms_norm_silu_backward.default,
            (x.detach(), gamma.detach(), None if bias is None else bias.detach(), rstd, gy, 0.0, C**0.5, True, True))


@pytest.mark.parametrize("tc, tx, time_pad, ph, pw", [(0, 1, 2, 1, 1), (1, 3, 2, 1, 0), (2, 2, 2, 0, 2),
                                                      (2, 1, 0, 1, 1)])
@pytest.mark.parametrize("emit_cache", [True, False])
def test_opcheck_causal_pad(tc, tx, time_pad, ph, pw, emit_cache):
    x = _randn(1, 3, tx, 5, 7, requires_grad=True)
    cache = _randn(1, 3, tc, 5, 7, seed=1, requires_grad=True) if tc else None
    opcheck(OPS.causal_pad.default, (x, cache, time_pad, ph, pw, 2, emit_cache))
    out, new = OPS.causal_pad(x.detach(), None if cache is None else cache.detach(), time_pad, ph, pw, 2, True)
    opcheck(OPS.causal_pad_backward.default,
            (torch.randn_like(out), torch.randn_like(new) if emit_cache else None, list(x.shape), tc, time_pad, ph,
             pw, 2, True, True))


@pytest.mark.parametrize("tc, tx, emit_cache", [(0, 1, True), (1, 1, True), (2, 3, True), (2, 1, False)])
def test_opcheck_rms_norm_silu_pad(tc, tx, emit_cache):
    x = _randn(1, 5, tx, 5, 7, requires_grad=True)
    gamma = (_randn(5, seed=1).abs() + 0.5).requires_grad_()
    bias = _randn(5, seed=2, requires_grad=True)
    cache = _randn(1, 5, tc, 5, 7, seed=3, requires_grad=True) if tc else None
    opcheck(OPS.rms_norm_silu_pad.default, (x, gamma, bias, cache, 0.0, 5**0.5, 1e-12, 2, 1, 1, 2, emit_cache))


@pytest.mark.parametrize("tc, tx", [(0, 1), (2, 3)])
def test_opcheck_rms_norm_silu_pad_conv3d(tc, tx):
    x = _randn(1, 5, tx, 5, 7, requires_grad=True)
    gamma = (_randn(5, seed=1).abs() + 0.5).requires_grad_()
    cache = _randn(1, 5, tc, 5, 7, seed=3, requires_grad=True) if tc else None
    weight = (_randn(4, 5, 3, 3, 3, seed=4) * 0.2).requires_grad_()
    conv_bias = _randn(4, seed=5, requires_grad=True)
    opcheck(OPS.rms_norm_silu_pad_conv3d.default,
            (x, gamma, None, cache, weight, conv_bias, 0.0, 5**0.5, 1e-12, 2, 1, 1, 2, True, [1, 1, 1], [1, 1, 1], 1))


@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck_pixel_loss(with_mask):
    pred = _randn(1, 3, 4, 7, 9, requires_grad=True)
    target = _randn(1, 3, 4, 7, 9, seed=1)
    mask = (_randn(1, 1, 4, 7, 9, seed=2) > 0).float() if with_mask else None
    kinds, weights = [MSE, L1, HUBER], [1.0, 0.5, 0.25]
    opcheck(OPS.pixel_loss_value_and_grad.default,
            (pred, target, mask, kinds, weights, CLAMP_PRE, 1.0, 1e-3, None, 1.0))
    opcheck(OPS.pixel_loss_value_and_grad.default,
            (pred.detach(), target, mask, kinds, weights, CLAMP_POST, 1.0, 1e-3, _randn(1, 4, seed=3), 1.0))
    opcheck(OPS.pixel_loss_frames.default, (pred.detach(), target, mask, kinds, weights, CLAMP_NONE, 1.0, 1e-3))
    opcheck(OPS.pixel_loss_value_and_grad_out.default,
            (pred.detach(), target, mask, kinds, weights, CLAMP_NONE, 1.0, 1e-3, None, 0.5, torch.zeros_like(pred)))


def test_opcheck_ssim():
    pred = _randn(1, 2, 2, 13, 15, requires_grad=True)
    target = _randn(1, 2, 2, 13, 15, seed=1)
    opcheck(OPS.ssim_value_and_grad.default, (pred, target, CLAMP_PRE, 2.0, None, 1.0))
    opcheck(OPS.ssim_value_and_grad.default, (pred.detach(), target, CLAMP_POST, 2.0, _randn(1, 2, seed=2), 1.0))
    opcheck(OPS.ssim_frames.default, (pred.detach(), target, CLAMP_NONE, 2.0))
    opcheck(OPS.ssim_value_and_grad_out.default,
            (pred.detach(), target, CLAMP_NONE, 2.0, None, -1.0, torch.zeros_like(pred)))


def test_value_and_grad_ops_refuse_to_differentiate_a_scaled_gradient():
    pred = _randn(1, 2, 2, 5, 5, requires_grad=True)
    sums, _ = OPS.pixel_loss_value_and_grad(pred, torch.zeros_like(pred), None, [MSE], [1.0], CLAMP_NONE, 1.0,
                                            1e-3, None, 2.0)
    with pytest.raises(RuntimeError, match="grad_scale=1"):
        sums.sum().backward()


# ---------------------------------------------------------------------------
# torch.compile: no graph break at the ops, same values and gradients as eager
# ---------------------------------------------------------------------------


def _block(x, gamma, cache, target):
    y = rms_norm_silu(x, gamma, 0.0)
    x_pad, new_cache = causal_pad(y, cache, time_pad=2, pad_h=1, pad_w=1)
    sums, grad = pixel_loss_value_and_grad(x_pad[:, :3].contiguous(), target, kind="mse", clamp="pre")
    loss = fused_pixel_loss(x_pad[:, :3], target, kind={"l1": 0.5, "huber": 1.0}, reduction="sum")
    ssim = fused_ssim(x_pad[:, :3], target)
    return x_pad, new_cache, sums, grad, loss, ssim


def _compile_inputs():
    x = _randn(1, 5, 3, 10, 9, requires_grad=True)
    gamma = (_randn(5, 1, 1, 1, seed=1).abs() + 0.5).requires_grad_()
    cache = _randn(1, 5, 2, 10, 9, seed=2, requires_grad=True)
    target = _randn(1, 3, 5, 12, 11, seed=3)
    return x, gamma, cache, target


def test_dynamo_traces_the_ops_without_graph_breaks():
    import torch._dynamo

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_block)(*_compile_inputs())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compiled_matches_eager(compile_backend):
    import torch._dynamo

    if compile_backend == "inductor":
        pytest.importorskip("torch._inductor")
    torch._dynamo.reset()
    inputs = _compile_inputs()
    eager = _block(*inputs)
    compiled = torch.compile(_block, backend=compile_backend, fullgraph=True)(*inputs)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    params = [inputs[0], inputs[1], inputs[2]]

    def total(x_pad, new_cache, sums, grad, loss, ssim):
        return x_pad.square().sum() + new_cache.sum() + loss + (ssim * torch.arange(1.0, 6.0)).sum()

    want = torch.autograd.grad(total(*eager), params)
    got = torch.autograd.grad(total(*compiled), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
