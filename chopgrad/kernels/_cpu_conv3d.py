"""``conv3d`` without padding, and its backward, avoiding PyTorch's slow native path on CPU.

PyTorch picks its CPU convolution backend by a size heuristic: a float32
batch-of-one input with a kernel of at most 3x3 goes to oneDNN only when
``N * C * T * H > 20480``; below that it runs the native unfold-and-matmul
convolution (``slow_conv3d``), about 10x slower forward and 18x slower
backward at 16 channels (measured with torch 2.13 on one thread). Small-width
decoders hit this at every resolution, and so does every spatial tile of a
wide one. A batch of two goes to oneDNN whatever its size, so such a conv is
run here as two overlapping row bands stacked into a batch of two; the bands
overlap by the kernel's height minus one, so each output row is computed
once, from exactly the inputs it reads. Elsewhere (other devices, dtypes,
strides, batches) this is ``F.conv3d`` and ``aten.convolution_backward``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

#: PyTorch's size bound below which a batch-of-one float32 conv runs natively on CPU
NATIVE_CONV_MAX_SIZE = 20480


def _triple(value) -> tuple[int, int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * 3


def _row_bands(x_pad: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], dilation: Sequence[int],
               groups: int) -> Optional[tuple[int, int]]:
    """(rows per band, output rows) when the conv should run as two row bands, else None."""
    if x_pad.device.type != "cpu" or x_pad.dtype != torch.float32 or x_pad.dim() != 5 or x_pad.shape[0] != 1:
        return None
    if groups != 1 or _triple(stride)[1] != 1 or _triple(dilation)[1] != 1:
        return None
    k_h, k_w = weight.shape[-2:]
    if k_h == k_w == 1 or (k_h > 3 and k_w > 3):  # PyTorch's choice there is the fast one already
        return None
    if x_pad.shape[1] * x_pad.shape[2] * x_pad.shape[3] > NATIVE_CONV_MAX_SIZE:
        return None
    out_rows = x_pad.shape[3] - k_h + 1
    if out_rows < 2:
        return None
    return (out_rows + 1) // 2, out_rows


def conv3d(x_pad: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
           dilation: Sequence[int], groups: int) -> torch.Tensor:
    """``F.conv3d(x_pad, weight, bias, stride, 0, dilation, groups)``; differentiable."""
    bands = _row_bands(x_pad, weight, stride, dilation, groups)
    if bands is None:
        return F.conv3d(x_pad, weight, bias, stride, 0, dilation, groups)
    rows, out_rows = bands
    k_h = weight.shape[-2]
    pair = torch.cat([x_pad[:, :, :, : rows + k_h - 1], x_pad[:, :, :, out_rows - rows:]])
    y = F.conv3d(pair, weight, bias, stride, 0, dilation, groups)
    # the lower band's first rows repeat the upper band's last ones when the output rows are odd
    return torch.cat([y[:1], y[1:, :, :, 2 * rows - out_rows:]], dim=3)


def conv3d_backward(grad_out: torch.Tensor, x_pad: torch.Tensor, weight: torch.Tensor, has_bias: bool,
                    stride: Sequence[int], dilation: Sequence[int], groups: int, output_mask: Sequence[bool]):
    """``aten.convolution_backward`` of :func:`conv3d`: (grad x_pad, grad weight, grad bias), None where unasked."""
    bands = _row_bands(x_pad, weight, stride, dilation, groups)
    bias_sizes = [weight.shape[0]] if has_bias else None
    if bands is None:
        return torch.ops.aten.convolution_backward(grad_out, x_pad, weight, bias_sizes, list(_triple(stride)),
                                                   [0, 0, 0], list(_triple(dilation)), False, [0, 0, 0], groups,
                                                   list(output_mask))
    rows, out_rows = bands
    k_h = weight.shape[-2]
    lower = grad_out[:, :, :, out_rows - rows:].clone()
    lower[:, :, :, : 2 * rows - out_rows] = 0  # rows the upper band owns
    grad_pair = torch.cat([grad_out[:, :, :, :rows], lower])
    pair = torch.cat([x_pad[:, :, :, : rows + k_h - 1], x_pad[:, :, :, out_rows - rows:]])
    g_pair, g_w, g_b = torch.ops.aten.convolution_backward(grad_pair, pair, weight, bias_sizes,
                                                           list(_triple(stride)), [0, 0, 0],
                                                           list(_triple(dilation)), False, [0, 0, 0], groups,
                                                           list(output_mask))
    g_x = None
    if g_pair is not None:
        g_x = torch.zeros_like(x_pad)
        g_x[:, :, :, : rows + k_h - 1] += g_pair[0:1]
        g_x[:, :, :, out_rows - rows:] += g_pair[1:2]
    return g_x, g_w, g_b
