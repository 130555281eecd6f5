"""Subprocess entry: `python -m chopgrad.tools.bench.worker '<json config>'` prints one JSON line.

Config keys: model, device, dtype, inputs (path of a torch.save'd
{"latents", "target"}), method, d_trunc, schedule, repeats, warmup,
save_grad (optional path for the latent gradient), tile / tile_grad /
tile_halo (chopgrad's spatial tiling, optional), lean (the fused decoder
ops: the `lean` argument of pixel_loss and decode, default True; for the
baselines, default False, True patches the model with chopgrad.patch).
The methods are those of ``methods.loss_fn``.

Before anything is measured the worker runs one step of the same method on
the first three latent frames (see ``warm_up_code_paths``), then ``warmup``
full untimed steps, then the step whose peak memory is reported, then
``repeats`` timed steps; the reported time is their median. The memory step
runs with the runner's 64 KiB mmap threshold (RSS then follows live memory);
the timed steps run with glibc's usual thresholds restored
(``use_usual_allocator_thresholds``), since the low threshold makes every
large allocation fault in fresh pages (about 2x slower CPU steps).
"""
from __future__ import annotations

import ctypes
import json
import os
import statistics
import sys
import time


def load_workload(config: dict):
    """(vae, device, latents, target) of a worker config; the model's weights are frozen."""
    import torch

    from chopgrad.tools.bench.workloads import DTYPES, load_model

    device = torch.device(config.get("device", "cpu"))
    if device.type == "cuda" and device.index is None:
        # torch.cuda's per-device calls (memory fraction, peak stats) want an index.
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda" and os.environ.get("CHOPGRAD_MEMORY_BUDGET"):
        budget = int(os.environ["CHOPGRAD_MEMORY_BUDGET"])
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    torch.manual_seed(0)
    dtype = DTYPES[config.get("dtype", "fp32")]
    vae = load_model(config["model"], device=device, dtype=dtype)
    vae.requires_grad_(False)  # the step trains the upstream latents, as in a diffusion fine-tune
    inputs = torch.load(config["inputs"])
    return vae, device, inputs["latents"].to(device=device, dtype=dtype), inputs["target"].to(device=device, dtype=dtype)


def tiling_of(config: dict) -> dict:
    """pixel_loss's tiling arguments in a worker config (none: no tiling)."""
    if config.get("tile") is None:
        return {}
    return {"tile": config["tile"], "tile_grad": config.get("tile_grad", "exact"), "tile_halo": config.get("tile_halo")}


def uses_lean(method: str, lean) -> bool:
    """The configured `lean`, or its default: chopgrad's own (True), the baselines as they are (False)."""
    from chopgrad.tools.bench.methods import CHOPGRAD_METHODS

    return bool(method in CHOPGRAD_METHODS if lean is None else lean)


def patches_model(method: str, lean: bool) -> bool:
    """Whether the model is patched around a step: a baseline on the fused ops (chopgrad's methods patch
    it themselves, for the duration of the call)."""
    from chopgrad.tools.bench.methods import CHOPGRAD_METHODS

    return lean and method not in CHOPGRAD_METHODS


def training_step(vae, latents, target, step_loss):
    """One step: the loss of fresh leaf latents and its backward; returns (loss value, latent gradient)."""
    z = latents.clone().requires_grad_(True)
    loss = step_loss(vae, z, target)
    loss.backward()
    return float(loss.detach()), z.grad


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up_code_paths(vae, latents, step_loss) -> None:
    """One step on the first three latent frames against the model's own decode.

    The first call into each kernel maps library code pages and fills lazy
    caches: tens of MiB of RSS that differ between installs of the same
    packages and do not belong to the method. Its target is the model's own
    decode, so this works for any VAE.
    """
    import torch

    prefix = latents[:, :, : min(3, latents.shape[2])]
    with torch.no_grad():
        prefix_target = vae.decode(prefix).sample
    z = prefix.clone().requires_grad_(True)
    step_loss(vae, z, prefix_target).backward()


def main(argv=None) -> int:
    config = json.loads((argv or sys.argv[1:])[0])
    import torch

    from chopgrad.tools.bench.memory import PeakMemory
    from chopgrad.tools.bench.methods import loss_fn

    vae, device, latents, target = load_workload(config)
    method = config["method"]
    lean = uses_lean(method, config.get("lean"))
    if patches_model(method, lean):  # a baseline on the fused ops: patch the model for the whole run
        from chopgrad.adapters.wan_patch import patch

        patch(vae)
    step_loss = loss_fn(method, config.get("d_trunc"), config.get("schedule", "sliding"), lean=lean,
                        **tiling_of(config))

    try:
        warm_up_code_paths(vae, latents, step_loss)
        for _ in range(int(config.get("warmup", 0))):
            training_step(vae, latents, target, step_loss)
        with PeakMemory(device) as mem:
            synchronize(device)
            t0 = time.perf_counter()
            value, grad = training_step(vae, latents, target, step_loss)
            synchronize(device)
            memory_step_s = time.perf_counter() - t0
        # The peak was measured with a 64 KiB mmap threshold (set by the runner)
        # so that RSS follows live memory; that makes every large allocation
        # fault in fresh pages and doubled CPU step times. Time the steps with
        # glibc's usual steady-state thresholds instead.
        usual_allocator = use_usual_allocator_thresholds()
        times = []
        for _ in range(int(config.get("repeats", 1))):
            synchronize(device)
            t0 = time.perf_counter()
            training_step(vae, latents, target, step_loss)
            synchronize(device)
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError as exc:
        print(json.dumps({"status": "oom", "detail": str(exc).splitlines()[0]}))
        return 0
    if config.get("save_grad"):
        torch.save(grad.float().cpu(), config["save_grad"])
    frames = target.shape[2]
    median = statistics.median(times) if times else float("nan")
    print(json.dumps({
        "status": "ok", "loss": value, "peak_bytes": mem.peak_bytes, "baseline_bytes": mem.baseline_bytes,
        "time_s": median, "times_s": times, "frames_per_s": frames / median if times else None,
        "memory_step_s": memory_step_s, "timed_with_usual_allocator": usual_allocator,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }))
    return 0


#: glibc's mallopt parameters, and the values its dynamic mmap threshold settles at
#: on 64-bit Linux (the threshold grows up to 32 MiB; the trim threshold is twice it)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
STEADY_MMAP_THRESHOLD = 32 * 2**20


def use_usual_allocator_thresholds() -> bool:
    """Raise glibc's mmap/trim thresholds to their usual steady state; False where there is no mallopt."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, 2 * STEADY_MMAP_THRESHOLD))


if __name__ == "__main__":
    sys.exit(main())
