"""Device / environment dispatch shared by every fused op in ``chopgrad.kernels``.

Rules (identical for every op):

* CUDA tensors run the Triton kernels when Triton is importable, the PyTorch
  reference otherwise.
* Every other device runs the PyTorch reference.  The reference uses the same
  memory-lean autograd structure (same saved tensors) as the Triton path, so
  CPU users get the memory savings too.
* ``CHOPGRAD_FORCE_TRITON=1`` forces the Triton path on every device.  CPU
  tensors then go through Triton's interpreter, which needs
  ``TRITON_INTERPRET=1`` in the environment before ``triton`` is imported:
  this is how the test-suite runs the kernels without a GPU.  Interpreter
  timings mean nothing.
* ``CHOPGRAD_FORCE_TRITON=0`` forces the PyTorch reference on every device
  (useful to bisect a numerical difference on a GPU).

The variable is read at call time, so tests may set it with ``monkeypatch``.

Kernels are declared with :func:`triton_kernel` rather than ``@triton.jit``:
the wrapper jit-compiles lazily (importing ``chopgrad.kernels`` compiles
nothing) and, before launching on a non-CUDA tensor, checks that the
interpreter is active and otherwise raises an error that says what to set.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import torch

ENV_FORCE_TRITON = "CHOPGRAD_FORCE_TRITON"
"""Name of the environment switch: ``1`` forces Triton (CPU via the interpreter), ``0`` forces the reference."""

try:  # Triton is optional: without it every op runs its PyTorch reference.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
    _TRITON_IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - depends on the install
    import types as _types

    triton = None  # type: ignore[assignment]
    # Stand-in so kernel signatures (``BLOCK: tl.constexpr``) still evaluate.
    tl = _types.SimpleNamespace(constexpr=int)  # type: ignore[assignment]
    HAS_TRITON = False
    _TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

#: dtypes the Triton kernels accept; other floating dtypes (float64) use the reference.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def force_mode() -> str | None:
    """Return ``"triton"``, ``"reference"`` or ``None`` (automatic) from ``CHOPGRAD_FORCE_TRITON``."""
    value = os.environ.get(ENV_FORCE_TRITON, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on", "triton"):
        return "triton"
    if value in ("0", "false", "no", "off", "reference", "ref"):
        return "reference"
    raise ValueError(
        f"{ENV_FORCE_TRITON}={os.environ.get(ENV_FORCE_TRITON)!r} is not understood: "
        "use 1 (force Triton, CPU through the interpreter), 0 (force the PyTorch reference) or leave it unset"
    )


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Decide whether an op on ``tensors`` runs its Triton kernels.

    ``None`` entries are ignored.  float64 inputs always use the reference
    (the kernels are written for fp32/bf16/fp16 with fp32 math).
    """
    present = [t for t in tensors if t is not None]
    mode = force_mode()
    if mode == "reference":
        return False
    if any(t.dtype not in TRITON_DTYPES for t in present if t.is_floating_point()):
        return False
    if mode == "triton":
        if not HAS_TRITON:
            raise RuntimeError(
                f"{ENV_FORCE_TRITON}=1 but Triton cannot be imported ({_TRITON_IMPORT_ERROR}); "
                "install triton or unset the variable"
            )
        if any(not t.is_cuda for t in present) and not interpreter_ready():
            raise RuntimeError(f"{ENV_FORCE_TRITON}=1 with CPU tensors: {_INTERPRET_HINT}")
        return True
    return HAS_TRITON and bool(present) and all(t.is_cuda for t in present)


def backend_name(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> str:
    """Name of the backend :func:`use_triton` picks for ``dtype`` tensors on ``device``.

    One of ``"triton"``, ``"triton-interpreter"``, ``"reference"`` or
    ``"unavailable (set TRITON_INTERPRET=1)"`` (forced Triton on CPU without the interpreter).
    """
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    )
    mode = force_mode()
    if mode == "reference" or not HAS_TRITON or dtype not in TRITON_DTYPES:
        return "reference"
    if dev.type == "cuda":
        return "triton-interpreter" if interpreter_ready() else "triton"
    if mode == "triton":
        return "triton-interpreter" if interpreter_ready() else "unavailable (set TRITON_INTERPRET=1)"
    return "reference"


def interpreter_ready() -> bool:
    """True when Triton's interpreter can run chopgrad kernels on CPU tensors.

    Triton decides at *import* time whether its own library functions
    (``tl.sum`` ...) are interpreted, so ``TRITON_INTERPRET=1`` must be in the
    environment before ``triton`` is first imported.
    """
    if not HAS_TRITON:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover
        return False
    return isinstance(tl.sum, InterpretedFunction)


_INTERPRET_HINT = (
    "Triton kernels on CPU tensors run through Triton's interpreter, which needs TRITON_INTERPRET=1 in the "
    "environment before triton is imported (e.g. `TRITON_INTERPRET=1 CHOPGRAD_FORCE_TRITON=1 python ...`)"
)


class TritonKernel:
    """A lazily ``triton.jit``-compiled kernel that checks the device before launching.

    Use as ``kernel[grid](*args, **constexprs)`` like a ``triton.jit`` function.
    CUDA tensors run the compiled kernel; CPU tensors need the interpreter
    (``TRITON_INTERPRET=1``, see :func:`interpreter_ready`).
    """

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "triton_kernel")
        self.__doc__ = fn.__doc__
        self._kernel = None

    def _get(self):
        if self._kernel is None:
            self._kernel = triton.jit(self.fn)
        return self._kernel

    def __getitem__(self, grid: Iterable[int]):
        def launch(*args: Any, **kwargs: Any):
            for a in list(args) + list(kwargs.values()):
                if isinstance(a, torch.Tensor):
                    if a.device.type != "cuda" and not interpreter_ready():
                        raise RuntimeError(f"cannot launch {self.__name__} on {a.device} tensors: {_INTERPRET_HINT}")
                    break
            return self._get()[tuple(grid)](*args, **kwargs)

        return launch


def triton_kernel(fn: Callable[..., Any]) -> TritonKernel:
    """Decorator replacing ``@triton.jit`` for chopgrad kernels (see module docstring)."""
    if not HAS_TRITON:  # keep the module importable; launching raises.
        return _MissingTritonKernel(fn)  # type: ignore[return-value]
    return TritonKernel(fn)


class _MissingTritonKernel:
    def __init__(self, fn: Callable[..., Any]):
        self.__name__ = getattr(fn, "__name__", "triton_kernel")

    def __getitem__(self, grid):  # pragma: no cover - only without triton
        raise RuntimeError(f"Triton is not available ({_TRITON_IMPORT_ERROR}); cannot launch {self.__name__}")


# ---------------------------------------------------------------------------
# Argument checks shared by the ops (clear errors naming the argument).
# ---------------------------------------------------------------------------


def check_float_tensor(name: str, t: Any, *, ndim: int | None = None, shape_hint: str = "") -> None:
    """Raise ``TypeError``/``ValueError`` unless ``t`` is a floating tensor with ``ndim`` dims."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, float16 or float64), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        hint = f" {shape_hint}" if shape_hint else ""
        raise ValueError(f"{name} must be a {ndim}-d tensor{hint}, got shape {tuple(t.shape)}")


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, *, dtype: bool = True) -> None:
    """Raise unless ``a`` and ``b`` have the same shape, device (and dtype)."""
    if a.shape != b.shape:
        raise ValueError(f"{name_b} must have the shape of {name_a} {tuple(a.shape)}, got {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{name_b} is on {b.device} but {name_a} is on {a.device}; move them to one device")
    if dtype and a.dtype != b.dtype:
        raise TypeError(f"{name_b} must have the dtype of {name_a} ({a.dtype}), got {b.dtype}")
