"""chopgrad.kernels -- fused ops with a backward pass for training through video VAE decoders.

This package imports nothing from ``chopgrad`` outside itself, so it works before
the C++ engine is built.

Ops (each: private Triton kernels, a launcher, a PyTorch reference, a
memory-lean autograd Function or value-and-grad function, a public function):

* :func:`pixel_loss_value_and_grad` -- ``l1``/``mse``/``charbonnier``/``huber``
  (or a weighted dict of them): per-frame sums and the gradient in one pass,
  optionally written over the prediction.
* :func:`ssim_value_and_grad` -- per-frame SSIM (11x11 Gaussian, sigma 1.5,
  data range 2) and its gradient.
* :func:`rms_norm_silu` -- diffusers ``WanRMS_norm`` + ``SiLU``; saves ``x`` and
  a per-position statistic only.
* :func:`causal_pad` -- cache concat + zero padding of ``WanCausalConv3d`` in one
  pass, emitting the next cache; :func:`rms_norm_silu_pad` fuses both, and
  :func:`rms_norm_silu_pad_conv3d` folds the following conv in too so the
  padded conv input is rebuilt in backward instead of kept.

Every conv these ops and the patched decoder run goes through :func:`conv3d`
(``F.conv3d`` without padding), which on CPU runs a small batch-of-one conv
as two row bands in a batch of two, so PyTorch picks oneDNN instead of its
much slower native convolution (see ``chopgrad/kernels/_cpu_conv3d.py``).

Ops only: nothing here knows a model. ``chopgrad.patch`` (in ``chopgrad.adapters``)
swaps a Wan decoder's hot paths for these ops.

Dispatch: Triton on CUDA tensors, the PyTorch reference elsewhere, with the
same saved tensors on both paths.  ``CHOPGRAD_FORCE_TRITON=1`` forces Triton
(CPU tensors through the interpreter, which needs ``TRITON_INTERPRET=1`` set
before ``triton`` is imported); ``CHOPGRAD_FORCE_TRITON=0`` forces the reference.

Each op is a PyTorch custom op, ``torch.ops.chopgrad.<name>`` (with a fake
kernel and an autograd formula), so ``torch.compile`` traces through the
public functions without a graph break; the dispatch above runs inside the op.
"""

from __future__ import annotations

import torch

from ._dispatch import ENV_FORCE_TRITON, HAS_TRITON, backend_name, force_mode, interpreter_ready
from ._cpu_conv3d import conv3d
from .causal_pad import causal_pad, causal_pad_reference
from .pixel_losses import LOSS_KINDS, fused_pixel_loss, pixel_loss_frames, pixel_loss_value_and_grad
from .rms_norm_silu import rms_norm_silu, rms_norm_silu_pad, rms_norm_silu_pad_conv3d, rms_norm_silu_reference
from .ssim import fused_ssim, ssim_frames, ssim_value_and_grad

OPS = ("pixel_losses", "ssim", "rms_norm_silu", "causal_pad", "rms_norm_silu_pad", "rms_norm_silu_pad_conv3d")
"""Names of the fused ops, as reported by :func:`fused_ops_available`."""


def fused_ops_available(device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """For each op, the backend it runs on for ``dtype`` tensors on ``device``.

    ``device`` defaults to ``cuda`` when available, else ``cpu``.  Values are
    ``"triton"``, ``"triton-interpreter"``, ``"reference"`` or an
    ``"unavailable (...)"`` explanation (``CHOPGRAD_FORCE_TRITON=1`` on CPU
    without ``TRITON_INTERPRET=1``).  Dtypes outside ``TRITON_DTYPES``
    (float64) get ``"reference"``.  Every op decides with the same
    :func:`chopgrad.kernels._dispatch.use_triton` on its tensor inputs, so for
    one device and dtype all entries agree; the table names the ops covered.
    """
    name = backend_name(device, dtype)
    return {op: name for op in OPS}


__all__ = [
    "ENV_FORCE_TRITON", "HAS_TRITON", "LOSS_KINDS", "OPS",
    "causal_pad", "causal_pad_reference", "conv3d", "force_mode", "fused_ops_available", "fused_pixel_loss", "fused_ssim",
    "interpreter_ready", "pixel_loss_frames", "pixel_loss_value_and_grad",
    "rms_norm_silu", "rms_norm_silu_pad", "rms_norm_silu_pad_conv3d", "rms_norm_silu_reference",
    "ssim_frames", "ssim_value_and_grad",
]
