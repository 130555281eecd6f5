"""Record the Triton kernel launches of a test run and compile them for a GPU.

Triton's interpreter, which runs the kernel tests on machines without a GPU,
executes the kernel bodies as NumPy code and skips the compiler's checks: a
kernel that passes every interpreted test can still fail to compile (for
example when a variable assigned in both branches of a runtime ``if`` has two
shapes). This module closes that gap without a GPU:

* :func:`install_recorder` (used by ``conftest.py`` when
  ``CHOPGRAD_RECORD_TRITON_LAUNCHES`` names a folder) wraps every chopgrad
  kernel launch and appends the launch's specialization (argument types,
  ``tl.constexpr`` values, launch options) to a JSON-lines file there;
* ``python tests/triton_specs.py FOLDER`` compiles each recorded
  specialization ahead of time for an NVIDIA target (default sm_90, the
  H100/H200) with ``triton.compile``, all the way to a cubin, and exits
  non-zero if any fails.

``tests/test_kernels_compile.py`` runs both steps.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any

ENV_RECORD = "CHOPGRAD_RECORD_TRITON_LAUNCHES"

# Keyword arguments of a launch that are compiler options, not kernel parameters.
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")

_POINTER_TYPES = {
    "torch.float32": "fp32",
    "torch.float16": "fp16",
    "torch.bfloat16": "bf16",
    "torch.float64": "fp64",
    "torch.int64": "i64",
    "torch.int32": "i32",
    "torch.int16": "i16",
    "torch.int8": "i8",
    "torch.uint8": "u8",
    "torch.bool": "i1",
}


def _is_constexpr(annotation: Any) -> bool:
    # Kernel modules use `from __future__ import annotations`, so the
    # annotation may be the string "tl.constexpr".
    if isinstance(annotation, str):
        return annotation.split(".")[-1] == "constexpr"
    return getattr(annotation, "__name__", "") == "constexpr"


def _argument_type(value: Any) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + _POINTER_TYPES[str(value.dtype)]
    if value is None:
        return "constexpr"
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        # Like Triton's launcher: the integer 1 is specialized as a constant.
        if value == 1:
            return "constexpr"
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot describe a kernel argument of type {type(value).__name__}")


def launch_spec(fn, args: tuple, kwargs: dict) -> dict:
    """The specialization of one launch of kernel function ``fn``."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
    bound = inspect.signature(fn).bind(*args, **kwargs)
    params = []
    for name, p in inspect.signature(fn).parameters.items():
        value = bound.arguments.get(name, p.default)
        if _is_constexpr(p.annotation):
            params.append([name, "constexpr", value])
        else:
            kind = _argument_type(value)
            params.append([name, kind, value if kind == "constexpr" else None])
    return {"module": fn.__module__, "name": fn.__name__, "params": params, "options": options}


def install_recorder(folder: str) -> None:
    """Record every chopgrad kernel launch of this process under ``folder``."""
    from chopgrad.kernels._dispatch import TritonKernel

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"launches-{os.getpid()}.jsonl")
    original = TritonKernel.__getitem__

    def recording_getitem(self, grid):
        launch = original(self, grid)

        def recorded_launch(*args, **kwargs):
            with open(path, "a") as f:
                f.write(json.dumps(launch_spec(self.fn, args, kwargs)) + "\n")
            return launch(*args, **kwargs)

        return recorded_launch

    TritonKernel.__getitem__ = recording_getitem


def load_specs(folder: str) -> list[dict]:
    """The distinct recorded specializations, in a stable order."""
    seen = {}
    for path in sorted(Path(folder).glob("launches-*.jsonl")):
        for line in path.read_text().splitlines():
            key = json.dumps(json.loads(line), sort_keys=True)
            seen.setdefault(key, json.loads(line))
    return [seen[k] for k in sorted(seen)]


def compile_spec(spec: dict, arch: int = 90):
    """Compile one specialization for NVIDIA compute capability ``arch`` (to a cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(spec["module"]), spec["name"]).fn
    constexprs = {name: value for name, kind, value in spec["params"] if kind == "constexpr"}
    if "constexprs" in inspect.signature(ASTSource).parameters:  # triton >= 3.3: constexprs in the signature
        signature = {name: kind for name, kind, _ in spec["params"]}
        source = ASTSource(fn=JITFunction(fn), signature=signature, constexprs=constexprs)
    else:  # triton 3.2 (torch 2.6): the signature lists the runtime arguments, `constants` the rest
        signature = {name: kind for name, kind, _ in spec["params"] if kind != "constexpr"}
        source = ASTSource(fn=JITFunction(fn), signature=signature, constants=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=spec["options"] or None)


def _try_compile(spec: dict, arch: int) -> str | None:
    try:
        compile_spec(spec, arch)
        return None
    except Exception as exc:  # report every failing specialization, not only the first
        shown = {n: v for n, k, v in spec["params"] if k == "constexpr"}
        pointers = sorted({k for _, k, _ in spec["params"] if k.startswith("*")})
        return f"{spec['module']}.{spec['name']} {shown} {pointers}: {type(exc).__name__}: {exc}"


def main(argv: list[str]) -> int:
    from concurrent.futures import ProcessPoolExecutor

    folder = argv[0]
    arch = int(argv[1]) if len(argv) > 1 else 90
    specs = load_specs(folder)
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        failures = [f for f in pool.map(_try_compile, specs, [arch] * len(specs)) if f]
    print(f"compiled {len(specs) - len(failures)} of {len(specs)} recorded kernel specializations for sm_{arch}")
    for f in failures:
        print("FAILED", f)
    return 1 if failures or not specs else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main(sys.argv[1:]))
