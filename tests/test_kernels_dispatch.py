"""Dispatch rules of chopgrad.kernels: the env switch, backend reporting, import hygiene."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chopgrad import kernels
from chopgrad.kernels import ENV_FORCE_TRITON, fused_ops_available
from chopgrad.kernels import _dispatch as dispatch


def test_env_switch_name_and_values(monkeypatch):
    assert ENV_FORCE_TRITON == "CHOPGRAD_FORCE_TRITON"
    monkeypatch.delenv(ENV_FORCE_TRITON, raising=False)
    assert dispatch.force_mode() is None
    for value, mode in (("1", "triton"), ("true", "triton"), ("0", "reference"), ("off", "reference")):
        monkeypatch.setenv(ENV_FORCE_TRITON, value)
        assert dispatch.force_mode() == mode
    monkeypatch.setenv(ENV_FORCE_TRITON, "maybe")
    with pytest.raises(ValueError, match="CHOPGRAD_FORCE_TRITON='maybe' is not understood"):
        dispatch.force_mode()


def test_automatic_dispatch(monkeypatch):
    monkeypatch.delenv(ENV_FORCE_TRITON, raising=False)
    cpu = torch.zeros(2)
    assert not dispatch.use_triton(cpu)  # CPU tensors: reference
    assert not dispatch.use_triton(cpu.double())
    if torch.cuda.is_available() and dispatch.HAS_TRITON:
        assert dispatch.use_triton(cpu.cuda())
        assert not dispatch.use_triton(cpu.cuda().double())  # float64: reference
    monkeypatch.setenv(ENV_FORCE_TRITON, "0")
    assert not dispatch.use_triton(cpu)


def test_forced_triton_on_cpu(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv(ENV_FORCE_TRITON, "1")
    if dispatch.interpreter_ready():
        assert dispatch.use_triton(torch.zeros(2))
        assert not dispatch.use_triton(torch.zeros(2, dtype=torch.float64))
    else:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            dispatch.use_triton(torch.zeros(2))


def test_the_switch_picks_the_path_on_every_device(monkeypatch):
    """``1`` runs the Triton kernel and ``0`` the PyTorch reference, on CUDA and CPU tensors alike.

    Which path ran is read off the Python calls the op makes (a profile hook matching the two functions by
    name and file), not by replacing module attributes: that would see nothing if the op's implementation
    were bound to another copy of the module, and the message then says what did run.
    """
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and not dispatch.interpreter_ready():
        pytest.skip("Triton interpreter not active")
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    from chopgrad.kernels import pixel_losses

    paths = {"_pixel_loss_triton": "triton", "_pixel_loss_reference": "reference"}
    source = Path(pixel_losses.__file__).name
    calls = []

    def profile(frame, event, arg):
        if event == "call" and Path(frame.f_code.co_filename).name == source:
            calls.append(frame.f_code.co_name)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(1, 2, 2, 4, 4, device=device)
    for switch, path in (("1", "triton"), ("0", "reference"), ("1", "triton")):
        monkeypatch.setenv(ENV_FORCE_TRITON, switch)
        calls.clear()
        sys.setprofile(profile)
        try:
            sums, grad = kernels.pixel_loss_value_and_grad(x, torch.zeros_like(x), kind="mse")
        finally:
            sys.setprofile(None)
        ran = [paths[name] for name in calls if name in paths]
        assert ran == [path], (
            f"{ENV_FORCE_TRITON}={switch} on {device} ran {ran}, expected [{path!r}]; calls into {source}: {calls}; "
            f"dispatch modes active: {_get_current_dispatch_mode_stack()}")
        torch.testing.assert_close(grad, 2 * x)
        torch.testing.assert_close(sums, x.square().sum(dim=(1, 3, 4)))


def test_the_ops_run_the_imported_module():
    """Each op's implementation belongs to the ``chopgrad.kernels`` module a user imports.

    A second copy of a kernel module (imported under another name, or by path) would register its ops first or
    last, and patches or settings applied to the imported module would then not reach the op.
    """
    from torch._library.custom_ops import _maybe_get_opdef

    sources = {p.resolve() for p in Path(kernels.__file__).resolve().parent.glob("*.py")}
    copies = [name for name, m in list(sys.modules.items())
              if getattr(m, "__file__", None) and Path(m.__file__).resolve() in sources
              and not name.startswith("chopgrad.kernels")]
    assert not copies, f"kernel modules imported under other names: {copies}"
    for name, op in (("pixel_losses", "pixel_loss_value_and_grad"), ("ssim", "ssim_value_and_grad"),
                     ("rms_norm_silu", "rms_norm_silu"), ("causal_pad", "causal_pad")):
        module = importlib.import_module(f"chopgrad.kernels.{name}")  # the package's functions shadow two names
        opdef = _maybe_get_opdef(f"chopgrad::{op}")
        assert opdef is not None, op
        assert opdef._init_fn.__globals__ is module.__dict__, (
            f"chopgrad::{op} runs {opdef._init_fn.__module__} from {opdef._init_fn.__code__.co_filename}")


def test_fused_ops_available_reports_every_op(monkeypatch):
    monkeypatch.delenv(ENV_FORCE_TRITON, raising=False)
    info = fused_ops_available("cpu")
    assert set(info) == set(kernels.OPS)
    assert set(info.values()) == {"reference"}
    monkeypatch.setenv(ENV_FORCE_TRITON, "1")
    expected = "triton-interpreter" if dispatch.interpreter_ready() else "unavailable (set TRITON_INTERPRET=1)"
    if not dispatch.HAS_TRITON:
        expected = "reference"
    assert set(fused_ops_available("cpu").values()) == {expected}
    monkeypatch.setenv(ENV_FORCE_TRITON, "0")
    assert set(fused_ops_available().values()) == {"reference"}


def test_kernels_import_without_chopgrad_package_init():
    """chopgrad/kernels/ must import nothing from chopgrad outside chopgrad.kernels (the engine may be unbuilt).

    A stand-in ``chopgrad`` package (its ``__init__`` never runs) exposes only the
    directory holding ``kernels``; importing ``chopgrad.kernels`` must then work
    and load no other ``chopgrad`` module.
    """
    import chopgrad.kernels as k

    parent = str(Path(k.__file__).parent.parent)  # chopgrad/
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('chopgrad'); pkg.__path__ = [{parent!r}]\n"
        "sys.modules['chopgrad'] = pkg\n"
        "import chopgrad.kernels as k\n"
        "bad = [m for m in sys.modules if m.startswith('chopgrad.') and not m.startswith('chopgrad.kernels')]\n"
        "assert not bad, bad\n"
        "print(sorted(k.fused_ops_available('cpu')))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "pixel_losses" in res.stdout
