"""`chopgrad info`: versions, the C++ extension's build status, CUDA, and fused-op backends."""
from __future__ import annotations

import importlib
import platform


def _version(name: str) -> str:
    try:
        return getattr(importlib.import_module(name), "__version__", "installed (version unknown)")
    except Exception as exc:  # noqa: BLE001 -- any import failure means "not usable"
        return f"not available ({type(exc).__name__})"


def collect_info() -> dict:
    import torch

    from chopgrad._ext import extension_status
    from chopgrad._version import __version__

    built, detail = extension_status()
    info = {
        "chopgrad": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "peft": _version("peft"),  # for train --transformer
        "extension_built": built,
        "extension_detail": detail,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "torch_cuda": torch.version.cuda,
    }
    try:
        from chopgrad.kernels import fused_ops_available

        devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
        info["fused_ops"] = {dev: fused_ops_available(dev) for dev in devices}
    except Exception as exc:  # noqa: BLE001
        info["fused_ops"] = {"error": f"{type(exc).__name__}: {exc}"}
    return info


def format_info(info: dict) -> str:
    lines = [f"chopgrad   {info['chopgrad']}", f"python     {info['python']}", f"torch      {info['torch']}",
             f"triton     {info['triton']}", f"diffusers  {info['diffusers']}", f"peft       {info['peft']}", ""]
    if info["extension_built"]:
        lines.append(f"C++ extension: built ({info['extension_detail']})")
    else:
        lines.append("C++ extension: NOT built")
        lines += ["  " + line for line in str(info["extension_detail"]).splitlines()]
    if info["cuda_available"]:
        lines.append(f"CUDA: available (CUDA {info['torch_cuda']}; {', '.join(info['cuda_devices'])})")
    else:
        lines.append("CUDA: not available" + (f" (torch built with CUDA {info['torch_cuda']})" if info["torch_cuda"] else
                                                " (CPU-only torch build)"))
    lines.append("")
    fused = info.get("fused_ops", {})
    if "error" in fused:
        lines.append(f"fused ops: could not query ({fused['error']})")
    for dev, ops in fused.items():
        if dev == "error":
            continue
        lines.append(f"fused ops on {dev} tensors:")
        for op, backend in ops.items():
            kind = "Triton kernel" if str(backend).startswith("triton") else "falls back"
            lines.append(f"  {op:<26s} {backend:<20s} ({kind})")
    return "\n".join(lines)
