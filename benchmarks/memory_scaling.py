"""Peak memory of one pixel-loss training step vs video length, measured through the engine.

Each configuration runs in a fresh subprocess on a tiny random-weight Wan 2.1
config on the CPU: peak RSS above the pre-step baseline (after the bench
worker's short warm-up step), for full backprop through `vae.decode` and for
`chopgrad.pixel_loss` at d_trunc 0, 1, 2 with both schedules, at 17, 33 and
65 pixel frames. Writes a markdown table to stdout and, with --results, into
benchmarks/RESULTS.md between markers.

    python benchmarks/memory_scaling.py --results benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile

import torch

from chopgrad.tools.bench import run_isolated
from chopgrad.tools.bench.bench import default_threads
from chopgrad.tools.bench.markdown import replace_section
from chopgrad.tools.bench.methods import method_label
from chopgrad.tools.bench.workloads import load_model, make_inputs


def methods():
    yield ("full", None, "sliding")
    for schedule in ("sliding", "chunked"):
        for d in (0, 1, 2):
            yield ("pixel_loss", d, schedule)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[17, 33, 65])
    parser.add_argument("--size", type=int, default=64, help="pixel height and width")
    parser.add_argument("--results", help="markdown file whose memory-scaling section is replaced")
    parser.add_argument("--json", help="also write raw measurements here")
    args = parser.parse_args(argv)

    # Oversubscribed OpenMP threads spin-wait on a busy machine; workers inherit this.
    os.environ.setdefault("OMP_NUM_THREADS", str(default_threads()))
    vae = load_model("tiny-wan21")
    rows, raw = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for frames in args.frames:
            latents, target = make_inputs(vae, frames, args.size, args.size, seed=frames, encode=False)
            path = os.path.join(tmp, f"inputs_{frames}.pt")
            torch.save({"latents": latents, "target": target}, path)
            for method, d, schedule in methods():
                config = dict(model="tiny-wan21", inputs=path, method=method, d_trunc=d, schedule=schedule,
                              repeats=0, warmup=0)
                m = run_isolated(config, memory_budget_bytes=16 * 2**30)
                label = method_label(method, d, schedule)
                mib = m.result["peak_bytes"] / 2**20 if m.ok else None
                rows.setdefault(label, {})[frames] = mib
                raw.append({"method": label, "frames": frames, "status": m.status, **m.result})
                print(f"{label:28s} {frames:4d} frames: " + (f"{mib:8.1f} MiB" if m.ok else f"{m.status} {m.detail}"),
                      flush=True)
    header = "| method | " + " | ".join(f"{f} frames" for f in args.frames) + " | ratio last/first |"
    lines = [header, "|" + "---|" * (len(args.frames) + 2)]
    for label, by_frames in rows.items():
        vals = [by_frames.get(f) for f in args.frames]
        cells = [f"{v:.1f}" if v is not None else "n/a" for v in vals]
        ratio = f"{vals[-1] / vals[0]:.2f}x" if None not in (vals[0], vals[-1]) and vals[0] > 0 else "n/a"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")
    table = "\n".join(lines)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}; "
               f"tiny Wan 2.1 config (random weights), {args.size}x{args.size} pixels, fp32, peak RSS above the "
               f"pre-step baseline in MiB (after a 3-latent-frame warm-up step), one fresh subprocess per cell")
    print("\n" + table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)
    if args.results:
        replace_section(args.results, "memory_scaling", f"{machine}\n\n{table}", heading="Memory scaling (engine)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
