"""A loss on the whole decoded video through `chopgrad.decode`: peak memory and time against the frame count.

Three training steps (loss and backward to the latents), side by side at each frame count:

- decode: `chopgrad.decode(vae, z, d_trunc, schedule)` and a whole-video loss on the video it returns;
- pixel_loss: `chopgrad.pixel_loss(vae, z, target, loss="mse", d_trunc, schedule)`, the per-step loss it is
  measured against (no video-sized tensors, one decode less);
- full backprop: autograd through the model's own `vae.decode` and the same whole-video loss. It is skipped
  at a frame count where its peak, extrapolated from the shorter clips, would cross the memory cap, and after
  it crossed the cap once.

The whole-video loss (`chopgrad.tools.bench.methods.video_loss`) is the MSE to the target plus the MSE of the
frame differences `video[:, :, t+1] - video[:, :, t]` against the target's (a temporal-consistency term,
weight 1): every difference at a decoder-step boundary couples the frames of two steps, so it is no sum of
per-step terms.

Memory: each (method, frame count) runs in a fresh process (`chopgrad.tools.bench.worker`), `--memory-repeats`
times, the methods interleaved in rotating order; the peak is the median. On the CPU it is the peak RSS above
the pre-step baseline (after a warm-up step on the first 3 latent frames), on CUDA `max_memory_allocated`
above it. Time: one fresh process per frame count runs every method interleaved (`chopgrad.tools.bench.timing`:
warm-up, a settle round, `--repeats` timed rounds); a method's time is its median. The latent gradient of
decode is compared with full backprop's on the same loss (cosine, relative error).

The targets, checked at `--target-frames` (65): decode's step time at most 1.6x pixel_loss's, and decode's peak
at most pixel_loss's peak plus 3x the video's bytes. Writes bench_decode.json, bench_decode.md and
bench_decode.png (peak and time against frames) into --out.

`--phases` instead splits decode's step into its parts, in this process, interleaved with pixel_loss steps
(median of `--repeats` rounds after one untimed round): the forward decode (no graph), the loss, and the
backward (the loss's and decode's, which runs the engine as pixel_loss does). Writes phases.json and phases.md.

    python benchmarks/bench_decode.py --out bench_decode_out          # 17, 65, 129 frames, 64x64, default model
    python benchmarks/bench_decode.py --quick --out bench_decode_out  # default model, 32x32, 17 and 33 frames
    python benchmarks/bench_decode.py --tiny --out /tmp/bench_decode  # tiny random model, under a minute (the test)
    python benchmarks/bench_decode.py --phases --frames 17 65           # where decode's time goes
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Optional

import torch

from chopgrad.tools.bench.bench import (BenchSettings, default_memory_budget, default_threads, is_trained,
                                        machine_description, plot_against_frames)
from chopgrad.tools.bench.markdown import replace_section
from chopgrad.api import decode
from chopgrad.tools.bench.methods import TEMPORAL_WEIGHT, loss_fn, method_label, video_loss
from chopgrad.tools.bench.runner import run_isolated
from chopgrad.tools.bench.timing import rotated
from chopgrad.tools.bench.worker import synchronize
from chopgrad.tools.bench.workloads import DTYPES, check_frames, check_sizes, load_model, make_inputs
from chopgrad.tools.metrics import gradient_fidelity

#: method keys of the worker, in the order of the table: the method measured, its reference, the baseline
METHODS = ("decode", "pixel_loss", "full_video")
DECODE, PIXEL_LOSS, FULL = METHODS
#: the targets: decode's time <= TIME_FACTOR x pixel_loss's, decode's peak <= pixel_loss's + VIDEOS x video bytes
TIME_FACTOR, VIDEOS = 1.6, 3
MIB = 2**20

FULL_RUN = dict(model="default", frames=[17, 65, 129], size=64, repeats=3, memory_repeats=3)
QUICK_RUN = dict(model="default", frames=[17, 33], size=32, repeats=2, memory_repeats=1)
TINY_RUN = dict(model="tiny-wan21", frames=[5, 9, 13], size=16, repeats=2, memory_repeats=1)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="default model, 32x32, 17 and 33 frames (about 1 min)")
    mode.add_argument("--tiny", action="store_true",
                      help="tiny random Wan 2.1 config, 16x16, 5-13 frames (under a minute, mostly process start-up; "
                           "checks that it runs, its numbers mean little)")
    parser.add_argument("--model", help="default, tiny-wan21, wan21-random or a diffusers VAE folder")
    parser.add_argument("--frames", type=int, nargs="+")
    parser.add_argument("--size", type=int, help="pixel height and width")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--d-trunc", type=int, default=1)
    parser.add_argument("--schedule", default="sliding", choices=("sliding", "chunked", "sliding_recompute"))
    parser.add_argument("--repeats", type=int, help="timed rounds of the interleaved timing process")
    parser.add_argument("--memory-repeats", type=int, help="fresh memory processes per method and frame count")
    parser.add_argument("--memory-cap-gib", type=float,
                        help="memory cap of each process (default: 80%% of the available RAM, or of the GPU)")
    parser.add_argument("--threads", type=int, help="CPU threads per process (default: the idle cores)")
    parser.add_argument("--target-frames", type=int, default=65,
                        help="frame count whose targets are checked (the longest clip when it was not measured)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per process")
    parser.add_argument("--out", default="bench_decode_out", help="folder for the JSON, markdown and plot")
    parser.add_argument("--phases", action="store_true",
                        help="time decode's forward, loss and backward against pixel_loss, in this process")
    parser.add_argument("--results", help="markdown file whose bench_decode section is replaced with the table")
    args = parser.parse_args(argv)
    run = TINY_RUN if args.tiny else QUICK_RUN if args.quick else FULL_RUN
    for key, value in run.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads is None:
        args.threads = default_threads()
    cap = default_memory_budget(args.device) if args.memory_cap_gib is None else int(args.memory_cap_gib * 2**30)
    args.memory_cap_bytes = cap
    return args


def predicted_full_peak(measured: dict, frames: int) -> Optional[float]:
    """Full backprop's peak at `frames`, extrapolated from its peaks at fewer frames ({frames: bytes}): a line
    through the two longest clips, or proportional to the frame count from one."""
    below = sorted((f, p) for f, p in measured.items() if f < frames)
    if not below:
        return None
    if len(below) == 1:
        f0, p0 = below[0]
        return p0 * frames / f0
    (f0, p0), (f1, p1) = below[-2:]
    return p1 + (p1 - p0) / (f1 - f0) * (frames - f1)


class FullBackpropHistory:
    """What the shorter clips said about full backprop's memory: peaks ({frames: bytes}), the largest
    pre-step baseline, and the first frame count at which it crossed the cap."""

    def __init__(self):
        self.peaks: dict[int, float] = {}
        self.baseline = 0
        self.over_cap: Optional[int] = None

    def reason_to_skip(self, frames: int, cap: int) -> Optional[str]:
        if self.over_cap is not None:
            return f"crossed the memory cap at {self.over_cap} frames"
        predicted = predicted_full_peak(self.peaks, frames)
        if predicted is not None and predicted + self.baseline > cap:
            return (f"predicted peak {predicted / 2**30:.2f} GiB (+ {self.baseline / 2**30:.2f} GiB baseline) > "
                    f"memory cap {cap / 2**30:.2f} GiB")
        return None


def measure_memory(args, inputs: str, frames: int, history: FullBackpropHistory, tmp: str) -> dict:
    """{method: row} of one frame count: the median peak of fresh processes, interleaved; the latent gradients
    of decode and full backprop (first repeat) for their fidelity."""
    rows = {m: {"method": m, "label": method_label(m, args.d_trunc, args.schedule), "status": "ok", "detail": "",
                "peaks_bytes": [], "baseline_bytes": None} for m in METHODS}
    full = rows[FULL]
    skip = history.reason_to_skip(frames, args.memory_cap_bytes)
    if skip:
        full.update(status="skipped", detail=skip)
        print(f"{frames:4d} frames {full['label']}: skipped, {skip}", file=sys.stderr, flush=True)
    grads = {}
    for r in range(args.memory_repeats):
        for method in rotated(list(METHODS), r):
            row = rows[method]
            if row["status"] != "ok":
                continue
            config = dict(model=args.model, device=args.device, dtype=args.dtype, inputs=inputs, method=method,
                          d_trunc=args.d_trunc, schedule=args.schedule, repeats=0, warmup=0)
            if r == 0 and method in (DECODE, FULL):
                config["save_grad"] = grads[method] = os.path.join(tmp, f"grad_{method}_{frames}.pt")
            m = run_isolated(config, memory_budget_bytes=args.memory_cap_bytes, timeout_s=args.timeout)
            if not m.ok:
                row.update(status=m.status, detail=m.detail)
                if method == FULL and m.status == "oom" and history.over_cap is None:
                    history.over_cap = frames
                print(f"{frames:4d} frames {row['label']}: {m.status} {m.detail}", file=sys.stderr, flush=True)
                continue
            row["peaks_bytes"].append(m.result["peak_bytes"])
            row["baseline_bytes"] = m.result["baseline_bytes"]
            row["loss"] = m.result["loss"]
            row["device_name"] = m.result.get("device_name")
            print(f"{frames:4d} frames {row['label']}: peak {m.result['peak_bytes'] / MIB:.1f} MiB", file=sys.stderr,
                  flush=True)
    for row in rows.values():
        row["peak_bytes"] = statistics.median(row["peaks_bytes"]) if row["status"] == "ok" else None
    if full["status"] == "ok":
        history.peaks[frames] = full["peak_bytes"]
        history.baseline = max(history.baseline, full["baseline_bytes"])
    if all(rows[m]["status"] == "ok" for m in (DECODE, FULL)):
        decode_grad, full_grad = torch.load(grads[DECODE]), torch.load(grads[FULL])
        rows[DECODE]["cosine"], rows[DECODE]["rel_error"] = gradient_fidelity(decode_grad, full_grad)
        rows[FULL]["cosine"], rows[FULL]["rel_error"] = 1.0, 0.0
    return rows


def measure_time(args, inputs: str, rows: dict) -> None:
    """Fills time_s / times_s of the rows that ran, from one process that runs their methods interleaved."""
    timed = [r for r in rows.values() if r["status"] == "ok"]
    if not timed or args.repeats < 1:
        return
    config = dict(model=args.model, device=args.device, dtype=args.dtype, inputs=inputs,
                  methods=[[r["method"], args.d_trunc, args.schedule, None] for r in timed],
                  rounds=args.repeats, settle_rounds=1)
    m = run_isolated(config, memory_budget_bytes=args.memory_cap_bytes, timeout_s=args.timeout * len(timed),
                     module="chopgrad.tools.bench.timing", rss_follows_live_memory=False)
    if not m.ok:
        for r in timed:
            r["detail"] = (r["detail"] + "; " if r["detail"] else "") + f"timing run {m.status}: {m.detail}"
        return
    for r, result in zip(timed, m.result["results"]):
        r.update(time_s=result["time_s"], times_s=result["times_s"])


def check_targets(rows: list[dict], target_frames: int) -> list[dict]:
    """The two targets at `target_frames` (or the longest clip measured): one dict each, with "pass"."""
    measured = sorted({r["frames"] for r in rows})
    frames = target_frames if target_frames in measured else measured[-1]
    at = {r["method"]: r for r in rows if r["frames"] == frames}
    decode, pixel = at[DECODE], at[PIXEL_LOSS]
    video_bytes = decode["video_bytes"]
    targets = []
    if decode.get("time_s") is not None and pixel.get("time_s") is not None:
        ratio = decode["time_s"] / pixel["time_s"]
        targets.append(dict(name="time", frames=frames, value=ratio, limit=TIME_FACTOR, passed=ratio <= TIME_FACTOR,
                            text=f"decode + loss + backward time <= {TIME_FACTOR}x pixel_loss time at {frames} "
                                 f"frames: {decode['time_s']:.3f} s / {pixel['time_s']:.3f} s = {ratio:.2f}x"))
    else:
        targets.append(dict(name="time", frames=frames, value=None, limit=TIME_FACTOR, passed=False,
                            text=f"time target at {frames} frames: not measured"))
    if decode.get("peak_bytes") is not None and pixel.get("peak_bytes") is not None:
        limit = pixel["peak_bytes"] + VIDEOS * video_bytes
        extra = (decode["peak_bytes"] - pixel["peak_bytes"]) / video_bytes
        targets.append(dict(name="peak", frames=frames, value=decode["peak_bytes"], limit=limit,
                            passed=decode["peak_bytes"] <= limit,
                            text=f"decode peak <= pixel_loss peak + {VIDEOS}x video bytes at {frames} frames: "
                                 f"{decode['peak_bytes'] / MIB:.1f} MiB vs {pixel['peak_bytes'] / MIB:.1f} + "
                                 f"{VIDEOS} x {video_bytes / MIB:.2f} = {limit / MIB:.1f} MiB "
                                 f"(pixel_loss + {extra:.2f} videos)"))
    else:
        targets.append(dict(name="peak", frames=frames, value=None, limit=None, passed=False,
                            text=f"peak target at {frames} frames: not measured"))
    return targets


def _fmt(value, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def format_table(rows: list[dict]) -> str:
    lines = ["| frames | video MiB | method | peak MiB | peak - pixel_loss (videos) | time/step s | vs pixel_loss | "
             "grad cosine vs full | rel. error |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for frames in sorted({r["frames"] for r in rows}):
        at = [r for r in rows if r["frames"] == frames]
        pixel = next(r for r in at if r["method"] == PIXEL_LOSS)
        for r in at:
            if r["status"] != "ok":
                status = "OOM" if r["status"] == "oom" else r["status"]
                lines.append(f"| {frames} | {r['video_bytes'] / MIB:.2f} | {r['label']} | {status}: {r['detail']} "
                             f"| | | | | |")
                continue
            extra = ratio = None
            if pixel.get("peak_bytes") is not None:
                extra = (r["peak_bytes"] - pixel["peak_bytes"]) / r["video_bytes"]
            if r.get("time_s") is not None and pixel.get("time_s"):
                ratio = r["time_s"] / pixel["time_s"]
            lines.append(f"| {frames} | {r['video_bytes'] / MIB:.2f} | {r['label']} | {r['peak_bytes'] / MIB:.1f} | "
                         f"{_fmt(extra, '{:+.2f}')} | {_fmt(r.get('time_s'), '{:.3f}')} | {_fmt(ratio, '{:.2f}x')} | "
                         f"{_fmt(r.get('cosine'), '{:.5f}')} | {_fmt(r.get('rel_error'), '{:.2e}')} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    """Peak memory and time per step against frames, one line per method; pixel_loss + VIDEOS videos dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    plot_against_frames(axes[0], rows, "peak_bytes", 1 / MIB, "peak memory (MiB, log scale)")
    axes[0].set_yscale("log")  # full backprop grows with the frames; chopgrad's rows differ by a few videos
    plot_against_frames(axes[1], rows, "time_s", 1.0, "time per step (s)")
    limit = sorted((r["frames"], (r["peak_bytes"] + VIDEOS * r["video_bytes"]) / MIB) for r in rows
                   if r["method"] == PIXEL_LOSS and r["status"] == "ok")
    axes[0].plot([p[0] for p in limit], [p[1] for p in limit], "k--", lw=1,
                 label=f"target: pixel_loss + {VIDEOS}x video bytes")
    timed = sorted((r["frames"], r["time_s"] * TIME_FACTOR) for r in rows
                   if r["method"] == PIXEL_LOSS and r.get("time_s") is not None)
    axes[1].plot([p[0] for p in timed], [p[1] for p in timed], "k--", lw=1,
                 label=f"target: {TIME_FACTOR}x pixel_loss")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> list[dict]:
    vae = load_model(args.model, dtype=DTYPES[args.dtype])  # on the CPU: inputs only, the workers load their own
    check_sizes(vae, [args.size])
    check_frames(vae, args.frames)
    rows, history = [], FullBackpropHistory()
    # Oversubscribed OpenMP threads spin-wait on a busy machine; the workers inherit this.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
        for frames in sorted(args.frames):
            latents, target = make_inputs(vae, frames, args.size, args.size, seed=frames, encode=is_trained(args.model))
            inputs = os.path.join(tmp, f"inputs_{frames}.pt")
            torch.save({"latents": latents, "target": target}, inputs)
            by_method = measure_memory(args, inputs, frames, history, tmp)
            measure_time(args, inputs, by_method)
            video_bytes = target.numel() * target.element_size()  # the decoded video: the target's shape and dtype
            for row in by_method.values():
                row.update(frames=frames, size=args.size, video_bytes=video_bytes)
                rows.append(row)
                peak = None if row["peak_bytes"] is None else row["peak_bytes"] / MIB
                print(f"{frames:4d} frames {row['label']}: {row['status']}, peak {_fmt(peak, '{:.1f}')} MiB, "
                      f"{_fmt(row.get('time_s'), '{:.3f}')} s", file=sys.stderr, flush=True)
    return rows


PHASES = ("pixel_loss", "decode forward", "loss forward", "backward", "decode total")


def measure_phases(args) -> list[dict]:
    """Per frame count, the median time of each phase of decode's step and of a pixel_loss step (one process)."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    vae = load_model(args.model, device=device, dtype=DTYPES[args.dtype]).requires_grad_(False)
    check_sizes(vae, [args.size])
    check_frames(vae, args.frames)
    pixel_step = loss_fn("pixel_loss", args.d_trunc, args.schedule)
    rows = []

    def now():
        synchronize(device)
        return time.perf_counter()

    for frames in sorted(args.frames):
        latents, target = make_inputs(vae, frames, args.size, args.size, seed=frames, encode=is_trained(args.model))
        times = {p: [] for p in PHASES}
        for r in range(args.repeats + 1):  # the first round is untimed
            t0 = now()
            pixel_step(vae, latents.clone().requires_grad_(True), target).backward()
            t1 = now()
            video = decode(vae, latents.clone().requires_grad_(True), d_trunc=args.d_trunc, schedule=args.schedule)
            t2 = now()
            loss = video_loss(video, target)
            t3 = now()
            del video
            loss.backward()
            t4 = now()
            if r:
                for phase, t in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t1)):
                    times[phase].append(t)
        row = {"frames": frames, **{p: statistics.median(ts) for p, ts in times.items()}, "times_s": times}
        rows.append(row)
        print(f"{frames:4d} frames: " + ", ".join(f"{p} {row[p]:.3f} s" for p in PHASES), file=sys.stderr, flush=True)
    return rows


def format_phases(rows: list[dict]) -> str:
    lines = ["| frames | pixel_loss s | decode forward s | loss forward s | backward s | decode total s | "
             "total / pixel_loss | forward / pixel_loss | backward / pixel_loss |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        pixel = r["pixel_loss"]
        lines.append(f"| {r['frames']} | {pixel:.3f} | {r['decode forward']:.3f} | {r['loss forward']:.3f} | "
                     f"{r['backward']:.3f} | {r['decode total']:.3f} | {r['decode total'] / pixel:.2f}x | "
                     f"{r['decode forward'] / pixel:.2f}x | {r['backward'] / pixel:.2f}x |")
    return "\n".join(lines)


def main_phases(args, argv) -> int:
    rows = measure_phases(args)
    command = "python benchmarks/bench_decode.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"{args.model}, {args.dtype}, {args.size}x{args.size}, {args.device}, {args.threads} thread(s), chopgrad "
            f"{args.schedule} d_trunc={args.d_trunc}; median of {args.repeats} interleaved rounds in one process. "
            f"Command: `{command}`.\n\n{format_phases(rows)}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "phases.json"), "w") as f:
        json.dump({"settings": {k: v for k, v in vars(args).items()}, "rows": rows}, f, indent=1, default=str)
    with open(os.path.join(args.out, "phases.md"), "w") as f:
        f.write(f"# chopgrad.decode + whole-video loss: phases\n\n{text}\n")
    print(text)
    return 0


def description(args, meta: dict) -> str:
    peak = ("max_memory_allocated above the pre-step level" if args.device.startswith("cuda") else
            "peak RSS above the pre-step baseline (after a 3-latent-frame warm-up step)")
    return (f"{meta['device']}, torch {meta['torch']}, {meta['threads_per_worker']} thread(s) per process; model "
            f"{args.model}, {args.dtype}, {args.size}x{args.size} pixels; chopgrad {args.schedule} "
            f"d_trunc={args.d_trunc}. Peak = {peak}, median of {args.memory_repeats} fresh process(es) per cell, "
            f"methods interleaved; time = median of {args.repeats} interleaved rounds in one process per frame "
            f"count. Whole-video loss: MSE + {TEMPORAL_WEIGHT:g} x MSE of frame differences; pixel_loss: MSE. "
            f"Gradient cosine: decode's latent gradient against full backprop's on the same loss. Memory cap per "
            f"process: {args.memory_cap_bytes / 2**30:.1f} GiB.")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.phases:
        return main_phases(args, argv)
    started = time.monotonic()
    rows = run(args)
    wall_s = time.monotonic() - started
    settings = BenchSettings(model=args.model, device=args.device, dtype=args.dtype, frames=args.frames,
                             sizes=[args.size], repeats=args.repeats, threads=args.threads,
                             memory_budget_bytes=args.memory_cap_bytes)
    meta = dict(machine_description(settings), wall_s=round(wall_s, 1))
    targets = check_targets(rows, args.target_frames)
    command = "python benchmarks/bench_decode.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"{description(args, meta)} Command: `{command}` ({wall_s / 60:.1f} min).\n\n{format_table(rows)}\n\n"
            + "\n".join(f"- {'PASS' if t['passed'] else 'FAIL'}: {t['text']}" for t in targets))
    os.makedirs(args.out, exist_ok=True)
    settings_record = {k: v for k, v in vars(args).items()}
    with open(os.path.join(args.out, "bench_decode.json"), "w") as f:
        json.dump({"settings": settings_record, "machine": meta,
                   "video_loss": f"mse(video, target) + {TEMPORAL_WEIGHT:g} * mse(diff_t(video), diff_t(target))",
                   "rows": rows, "targets": targets}, f, indent=1, default=str)
    with open(os.path.join(args.out, "bench_decode.md"), "w") as f:
        f.write(f"# chopgrad.decode + whole-video loss\n\n{text}\n")
    plot(rows, os.path.join(args.out, "bench_decode.png"),
         f"{args.model}, {args.size}x{args.size}, {args.dtype}, {meta['device']}")
    if args.results:
        replace_section(args.results, "bench_decode", text, heading="chopgrad.decode with a whole-video loss")
    print(text)
    for t in targets:
        print(f"{'PASS' if t['passed'] else 'FAIL'}: {t['text']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
