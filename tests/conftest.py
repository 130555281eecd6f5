"""Shared pytest setup.

Kernel tests: without a GPU, Triton's interpreter runs the kernels on CPU
tensors.  Triton decides at import time whether its library functions are
interpreted, so ``TRITON_INTERPRET=1`` is set here, before anything imports
``triton`` (unless the environment already says otherwise or CUDA is present,
where the same tests run the compiled kernels on the GPU).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()

if os.environ.get("CHOPGRAD_RECORD_TRITON_LAUNCHES"):
    # tests/test_kernels_compile.py: record each kernel launch's specialization
    # so it can be compiled for a GPU afterwards (see tests/triton_specs.py).
    from triton_specs import install_recorder

    install_recorder(os.environ["CHOPGRAD_RECORD_TRITON_LAUNCHES"])


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------------------
# kernels: poisoned torch.empty, Triton path selection
# ---------------------------------------------------------------------------

_REAL_EMPTY = torch.empty
_REAL_EMPTY_LIKE = torch.empty_like
_REAL_NEW_EMPTY = torch.Tensor.new_empty


def _poison(t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        elif t.dtype == torch.bool:
            t.fill_(True)
        elif t.dtype == torch.uint8:
            t.fill_(0xAB)
        else:
            t.fill_(-0x5A5A)
    return t


@pytest.fixture
def poison_empty(monkeypatch):
    """Fill every ``torch.empty``/``empty_like``/``new_empty`` result with NaN (ints: a sentinel).

    A kernel or reference that reads memory it never wrote then produces NaN
    and the comparison fails.
    """
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(_REAL_EMPTY(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(_REAL_EMPTY_LIKE(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: _poison(_REAL_NEW_EMPTY(self, *a, **k)))
    yield


@pytest.fixture
def kernel_device():
    """Device on which the Triton path of the kernels is exercised: CUDA if present, else CPU (interpreter)."""
    return torch.device("cuda") if HAS_CUDA else torch.device("cpu")


@pytest.fixture(params=["reference", "triton"])
def backend(request, monkeypatch):
    """Run a kernel test once on the PyTorch reference path and once on the Triton path.

    Sets ``CHOPGRAD_FORCE_TRITON`` accordingly; the Triton case is skipped when
    neither CUDA nor the interpreter is available.
    """
    from chopgrad.kernels import ENV_FORCE_TRITON, interpreter_ready

    if request.param == "triton":
        pytest.importorskip("triton")
        if not HAS_CUDA and not interpreter_ready():
            pytest.skip("Triton interpreter not active (TRITON_INTERPRET=1 must be set before triton is imported)")
        monkeypatch.setenv(ENV_FORCE_TRITON, "1")
    else:
        monkeypatch.setenv(ENV_FORCE_TRITON, "0")
    return request.param


# ---------------------------------------------------------------------------
# the CLI: argument errors
# ---------------------------------------------------------------------------


@pytest.fixture
def no_work(monkeypatch):
    """Fail a test whose CLI run reaches input preparation, the probe or the benchmark loop: for the tests that
    expect an invalid argument to end the run before any work starts."""
    import chopgrad.tools.bench.bench
    import chopgrad.tools.bench.workloads
    import chopgrad.tools.probe

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(chopgrad.tools.bench.workloads, "make_inputs", forbidden)
    monkeypatch.setattr(chopgrad.tools.probe, "probe_locality", forbidden)
    monkeypatch.setattr(chopgrad.tools.bench.bench, "run_bench", forbidden)
