"""Every Triton kernel specialization the tests launch compiles for a real GPU.

Without a GPU the kernel tests run through Triton's interpreter, which does
not type-check kernels the way the compiler does (a kernel that failed to
compile on an H200 passed every interpreted test). This test records the
launches of the kernel tests, plus a bf16 / fp16 pass through every op and the
patched Wan decoders, and compiles each specialization ahead of time for sm_90
(H100/H200) down to a cubin. It needs Triton's NVIDIA backend (bundled with
the Linux wheels), not a GPU. With CUDA present it is skipped: the kernel
tests then compile the kernels for the GPU itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
KERNEL_TEST_FILES = sorted(str(p) for p in TESTS.glob("test_kernels_*.py") if p.name != Path(__file__).name)

LOW_PRECISION_PASS = r"""
import torch
from chopgrad import patch
from chopgrad.kernels import pixel_loss_value_and_grad, ssim_value_and_grad
from tiny_models import tiny_wan21, tiny_wan22

for dtype in (torch.bfloat16, torch.float16):
    for make in (tiny_wan21, tiny_wan22):
        vae = patch(make().to(dtype))
        z = torch.randn(1, 4, 2, 3, 4, dtype=dtype, requires_grad=True)
        vae.decode(z).sample.float().sum().backward()
    pred, target = torch.randn(2, 3, 3, 16, 16, dtype=dtype), torch.randn(2, 3, 3, 16, 16, dtype=dtype)
    for kind in ("l1", "mse", "charbonnier", "huber"):
        pixel_loss_value_and_grad(pred, target, kind=kind)
    ssim_value_and_grad(pred, target)
"""


def _nvidia_backend_available() -> bool:
    try:
        import triton  # noqa: F401
        from triton.backends import backends

        return "nvidia" in backends
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the kernel tests compile for this GPU")
@pytest.mark.skipif(not _nvidia_backend_available(), reason="needs Triton with its NVIDIA backend")
def test_launched_kernels_compile_for_sm90(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", CHOPGRAD_RECORD_TRITON_LAUNCHES=str(tmp_path))
    env.pop("CHOPGRAD_FORCE_TRITON", None)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist",
         "-k", "triton or patched", *KERNEL_TEST_FILES, str(TESTS / "test_patch.py")],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    low = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
         "from triton_specs import install_recorder, ENV_RECORD\nimport os\n"
         "install_recorder(os.environ[ENV_RECORD])\n" + LOW_PRECISION_PASS],
        cwd=TESTS.parent, env=dict(env, CHOPGRAD_FORCE_TRITON="1"), capture_output=True, text=True, timeout=600,
    )
    assert low.returncode == 0, low.stdout[-3000:] + low.stderr[-3000:]
    kinds = " ".join(p.read_text() for p in tmp_path.glob("launches-*.jsonl"))
    assert '"*bf16"' in kinds and '"*fp16"' in kinds, "the low-precision pass launched no bf16/fp16 kernel"

    compiled = subprocess.run(
        [sys.executable, str(TESTS / "triton_specs.py"), str(tmp_path), "90"],
        cwd=TESTS.parent, env={k: v for k, v in env.items() if k != "TRITON_INTERPRET"},
        capture_output=True, text=True, timeout=1200,
    )
    summary = "\n".join(line for line in compiled.stdout.splitlines() if line.startswith(("compiled", "FAILED")))
    assert compiled.returncode == 0, summary + compiled.stderr[-3000:]
    assert "compiled" in summary
