"""chopgrad.kernels.conv3d (two row bands on CPU below PyTorch's oneDNN size bound) against F.conv3d."""
import pytest
import torch
import torch.nn.functional as F

from chopgrad.kernels import conv3d
from chopgrad.kernels._cpu_conv3d import NATIVE_CONV_MAX_SIZE, _row_bands, conv3d_backward

# (input shape, weight shape); padded inputs as the decoder's causal convs see them, odd heights included
SHAPES = [
    ((1, 4, 4, 9, 7), (5, 4, 3, 3, 3)),
    ((1, 3, 3, 8, 5), (2, 3, 3, 3, 3)),
    ((1, 2, 1, 4, 6), (3, 2, 1, 3, 3)),
    ((1, 3, 2, 4, 4), (2, 3, 1, 3, 3)),  # two output rows: one per band
    ((1, 3, 3, 6, 6), (4, 3, 3, 1, 3)),
]


def _inputs(x_shape, w_shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=g, dtype=torch.float64).float()
    w = torch.randn(w_shape, generator=g, dtype=torch.float64).float()
    b = torch.randn(w_shape[0], generator=g, dtype=torch.float64).float()
    return x, w, b


@pytest.mark.parametrize("x_shape,w_shape", SHAPES)
def test_bands_are_used_on_small_cpu_inputs(x_shape, w_shape):
    x, w, _ = _inputs(x_shape, w_shape)
    assert _row_bands(x, w, (1, 1, 1), (1, 1, 1), 1) is not None


@pytest.mark.parametrize("x_shape,w_shape", SHAPES)
def test_values_and_gradients_match_f_conv3d(x_shape, w_shape):
    x, w, b = _inputs(x_shape, w_shape)
    ref_leaves = [t.double().requires_grad_() for t in (x, w, b)]
    ref = F.conv3d(*ref_leaves, 1, 0, 1, 1)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    out = conv3d(*leaves, (1, 1, 1), (1, 1, 1), 1)
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, ref_leaves, g)
    grads = torch.autograd.grad(out, leaves, g.float())
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    explicit = conv3d_backward(g.float(), x, w, True, (1, 1, 1), (1, 1, 1), 1, [True, True, True])
    for got, want in zip(explicit, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_backward_without_bias_and_partial_mask():
    x, w, _ = _inputs((1, 3, 3, 7, 5), (4, 3, 3, 3, 3))
    g = torch.randn(1, 4, 1, 5, 3)
    g_x, g_w, g_b = conv3d_backward(g, x, w, False, (1, 1, 1), (1, 1, 1), 1, [False, True, False])
    assert g_x is None and g_b is None
    x_leaf, w_leaf = x.double().requires_grad_(), w.double().requires_grad_()
    want = torch.autograd.grad(F.conv3d(x_leaf, w_leaf), w_leaf, g.double())[0]
    torch.testing.assert_close(g_w.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["float64", "batch2", "strided", "one_by_one", "large", "one_row"])
def test_plain_path_elsewhere(case):
    x, w, b = _inputs((1, 3, 3, 8, 6), (4, 3, 3, 3, 3))
    stride = (1, 1, 1)
    if case == "float64":
        x, w, b = x.double(), w.double(), b.double()
    elif case == "batch2":
        x = torch.cat([x, x])
    elif case == "strided":
        stride = (1, 2, 2)
    elif case == "one_by_one":
        w = w[..., 1:2, 1:2].contiguous()
    elif case == "large":
        x = torch.randn(1, 16, 6, NATIVE_CONV_MAX_SIZE // 96 + 1, 4)
        w = torch.randn(4, 16, 3, 3, 3)
    elif case == "one_row":
        x = x[:, :, :, :3]
    assert _row_bands(x, w, stride, (1, 1, 1), 1) is None
    torch.testing.assert_close(conv3d(x, w, b, stride, (1, 1, 1), 1), F.conv3d(x, w, b, stride, 0, 1, 1))


def test_integer_stride_and_dilation():
    x, w, b = _inputs((1, 3, 3, 8, 6), (4, 3, 3, 3, 3))
    torch.testing.assert_close(conv3d(x, w, b, 1, 1, 1), F.conv3d(x, w, b, 1, 0, 1, 1), rtol=1e-5, atol=1e-5)
    g = torch.randn(1, 4, 1, 6, 4)
    got = conv3d_backward(g, x, w, True, 1, 1, 1, [True, True, True])
    want = conv3d_backward(g, x, w, True, (1, 1, 1), (1, 1, 1), 1, [True, True, True])
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_)
