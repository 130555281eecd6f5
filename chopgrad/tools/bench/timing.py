"""Subprocess entry: `python -m chopgrad.tools.bench.timing '<json config>'` times several methods on one
workload side by side and prints one JSON line.

Config keys: those of the worker (model, device, dtype, inputs), plus
methods (a list of [method, d_trunc, schedule, lean] or
[method, d_trunc, schedule, lean, tile, tile_grad, tile_halo]), rounds and
settle_rounds.

Why one process for all methods: step times measured in separate processes
at different moments differ by more than the methods do on a shared CPU
(load from other processes, frequency changes, a fresh process's heap
faulting in pages during its first steps). Here every method runs in the
same process, interleaved: each round times one step of every method, the
order rotating by one method per round so that no method always follows the
same neighbour. Before the timed rounds, each method runs a step on a 3-latent-frame
prefix (code paths and lazy caches) and then ``settle_rounds`` untimed full
rounds, so that the allocator's heap has grown to the workload's steady
state. The process keeps glibc's usual allocator thresholds (the memory
worker lowers them for its RSS measurement, which slows CPU steps about
twofold). A method's time is the median of its rounds.

A baseline with lean=True runs on the fused decoder ops: the model is
patched for its steps only, outside the timer. chopgrad's own lean path is
timed as the user calls it, patch included.
"""
from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time


def rotated(items: list, shift: int) -> list:
    shift %= max(len(items), 1)
    return items[shift:] + items[:shift]


def main(argv=None) -> int:
    config = json.loads((argv or sys.argv[1:])[0])
    import torch

    from chopgrad.adapters.wan_patch import lean_decoder
    from chopgrad.tools.bench.methods import loss_fn
    from chopgrad.tools.bench.worker import (load_workload, patches_model, synchronize, tiling_of, training_step,
                                             uses_lean, warm_up_code_paths)

    vae, device, latents, target = load_workload(config)
    methods = [tuple(m) for m in config["methods"]]
    if not methods:
        raise SystemExit("timing: the config's 'methods' list is empty")
    steps = []
    for method, d_trunc, schedule, lean, *tile in methods:
        lean = uses_lean(method, lean)
        patched = patches_model(method, lean)
        tiling = tiling_of(dict(zip(("tile", "tile_grad", "tile_halo"), tile)))
        steps.append((loss_fn(method, d_trunc, schedule, lean=lean, **tiling), patched))

    def model_for(patched):
        return lean_decoder(vae) if patched else contextlib.nullcontext()

    def run(index, timed):
        step_loss, patched = steps[index]
        with model_for(patched):
            synchronize(device)
            t0 = time.perf_counter()
            training_step(vae, latents, target, step_loss)
            synchronize(device)
            return time.perf_counter() - t0 if timed else None

    order = list(range(len(methods)))
    times: list[list[float]] = [[] for _ in methods]
    try:
        for step_loss, patched in steps:
            with model_for(patched):
                warm_up_code_paths(vae, latents, step_loss)
        for _ in range(int(config.get("settle_rounds", 1))):
            for i in order:
                run(i, timed=False)
        for r in range(int(config.get("rounds", 3))):
            for i in rotated(order, r):
                times[i].append(run(i, timed=True))
    except torch.OutOfMemoryError as exc:
        print(json.dumps({"status": "oom", "detail": str(exc).splitlines()[0]}))
        return 0
    frames = target.shape[2]
    results = []
    for ts in times:
        median = statistics.median(ts) if ts else float("nan")
        results.append({"time_s": median, "times_s": ts, "frames_per_s": frames / median if ts else None})
    print(json.dumps({"status": "ok", "methods": [list(m) for m in methods], "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
