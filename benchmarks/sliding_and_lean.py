"""The sliding schedules and the lean (fused-op) default side by side, in one process, on the default model.

One pixel-MSE training step (backward to the latents) per configuration: full backprop through the model's own
decode, and chopgrad's sliding, sliding_recompute and chunked schedules at each d_trunc, lean and unfused. Peak
memory is the peak of live tensor storages the step allocates (independent of the allocator); time is the
median of interleaved runs, so machine noise hits every configuration alike.

    python benchmarks/sliding_and_lean.py [--frames 33] [--size 64] [--d-trunc 1 2] [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import chopgrad
from chopgrad.tools.bench.memory import PeakMemory
from chopgrad.tools.bench.workloads import load_model, make_inputs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--d-trunc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    vae = load_model("default").requires_grad_(False)
    latents, target = make_inputs(vae, args.frames, args.size, args.size)

    def step(schedule, d, lean):
        z = latents.clone().requires_grad_(True)
        if schedule == "full":
            loss = F.mse_loss(vae.decode(z).sample, target)
        else:
            loss = chopgrad.pixel_loss(vae, z, target, d_trunc=d, schedule=schedule, lean=lean)
        loss.backward()

    configs = [("full", None, False)] + [(s, d, lean) for d in args.d_trunc
                                         for s in ("sliding", "sliding_recompute", "chunked") for lean in (True, False)]
    peaks = {}
    for c in configs:
        with PeakMemory("cpu", cpu="live_tensors") as memory:
            step(*c)
        peaks[c] = memory.peak_bytes
    times = {c: [] for c in configs}
    for _ in range(args.repeats):
        for c in configs:
            t0 = time.perf_counter()
            step(*c)
            times[c].append(time.perf_counter() - t0)
    full = configs[0]
    full_time = statistics.median(times[full])
    print(f"default model, {args.frames} frames {args.size}x{args.size}, {args.threads} thread(s), median of "
          f"{args.repeats} interleaved runs\n")
    print("| method | d_trunc | lean | peak (MiB) | x full | x sliding unfused | time (s) | x full | x sliding unfused |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for c in configs:
        schedule, d, lean = c
        t = statistics.median(times[c])
        base = ("sliding", d, False) if d is not None else None
        mem_vs = f"{peaks[c] / peaks[base]:.2f}" if base else "-"
        time_vs = f"{t / statistics.median(times[base]):.2f}" if base else "-"
        print(f"| {schedule if schedule != 'full' else 'full backprop'} | {d if d is not None else '-'} | "
              f"{'yes' if lean else 'no'} | {peaks[c] / 2**20:.1f} | {peaks[c] / peaks[full]:.2f} | {mem_vs} | "
              f"{t:.3f} | {t / full_time:.2f} | {time_vs} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
