"""The `chopgrad` console script: `chopgrad bench`, `chopgrad probe`, `chopgrad info`.

This module only parses arguments and calls chopgrad.bench.bench, chopgrad.probe
and chopgrad.info.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

DTYPE_CHOICES = ("fp32", "bf16")


def _number(parse, *, minimum, strict: bool, what: str):
    """An argparse type: `parse(text)` bounded below by `minimum` (excluded when `strict`)."""

    def check(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value > minimum if strict else value >= minimum):  # also rejects NaN
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return check


_positive_int = _number(int, minimum=1, strict=False, what="a positive integer")
_nonneg_int = _number(int, minimum=0, strict=False, what="an integer >= 0")
_positive_float = _number(float, minimum=0.0, strict=True, what="a positive number")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="'default' (chopgrad's small trained Wan 2.1 VAE), 'tiny-wan21' (random weights), "
                        "or PATH of a local diffusers VAE folder (save_pretrained / from_pretrained layout)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--dtype", default="fp32", choices=DTYPE_CHOICES, help="model and input dtype (default: fp32)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chopgrad", description="ChopGrad: truncated backprop through "
                                     "causal-cache video VAE decoders. Tools to measure it on your model.")
    sub = parser.add_subparsers(dest="command", metavar="{bench,probe,info}")
    sub.required = True

    b = sub.add_parser("bench", help="peak memory, time and gradient fidelity of one pixel-loss training step, "
                                     "per method, each in a fresh subprocess")
    _add_model_args(b)
    b.add_argument("--quick", action="store_true", help="small grid (17 and 129 frames, 32x32, d_trunc 0 and 1); "
                                                        "a few minutes on 2 CPU cores")
    b.add_argument("--frames", type=_positive_int, nargs="+", help="pixel frame counts (Wan: 1 + 4k)")
    b.add_argument("--sizes", type=_positive_int, nargs="+", help="square resolutions in pixels (e.g. 64 128)")
    b.add_argument("--d-trunc", dest="d_truncs", type=_nonneg_int, nargs="+", help="truncation distances")
    b.add_argument("--schedules", nargs="+", choices=("sliding", "chunked"), default=["sliding", "chunked"])
    b.add_argument("--baselines", nargs="*", choices=("full", "checkpoint"), default=["full", "checkpoint"],
                   help="baseline methods (default: full checkpoint; full backprop is the fidelity reference)")
    b.add_argument("--repeats", type=_positive_int,
                   help="timed steps per configuration after the memory-measured step (run with glibc's usual "
                   "allocator thresholds, unlike the memory step); their median is reported (default: 3)")
    b.add_argument("--warmup", type=_nonneg_int, default=0,
                   help="untimed full steps before the measured one (a short step on the first 3 latent frames "
                   "always runs first, so one-time library and cache costs are not counted)")
    b.add_argument("--memory-budget", type=_positive_float, metavar="GB",
                   help="a configuration above this peak (RSS on CPU, allocator on CUDA) is reported as OOM "
                        "(default: 80%% of available RAM / GPU memory)")
    b.add_argument("--timeout", type=_positive_float, default=1800.0, help="seconds per configuration")
    b.add_argument("--threads", type=_positive_int, help="CPU threads per worker (default: the cores not busy "
                                                         "with other processes, from the load average)")
    b.add_argument("--out", default="bench_out", help="output folder (default: bench_out/)")
    b.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_bench)

    p = sub.add_parser("probe", help="temporal locality of the decoder: influence vs distance, exp fit, "
                                     "recommended d_trunc, truncated-gradient fidelity")
    _add_model_args(p)
    p.add_argument("--frames", type=_positive_int, default=33, help="pixel frames (default: 33)")
    p.add_argument("--size", type=_positive_int, default=64, help="square resolution in pixels (default: 64)")
    p.add_argument("--eps", type=_positive_float, default=1e-3, help="tolerance for the recommended d_trunc")
    p.add_argument("--max-distance", type=_nonneg_int, help="largest distance measured (default: all)")
    p.add_argument("--max-d-trunc", type=_nonneg_int, default=4, help="fidelity for d_trunc 0..N (default: 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive_int, help="CPU threads (default: the cores not busy with other "
                                                         "processes, from the load average)")
    p.add_argument("--out", default="probe_out", help="output folder (default: probe_out/)")
    p.set_defaults(func=cmd_probe)

    i = sub.add_parser("info", help="versions, C++ extension build status, CUDA, fused-op backends")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)
    return parser


def _check_device(parser, args) -> None:
    import torch

    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device must be 'cpu' or 'cuda[:N]', got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available (this torch build or machine has no usable GPU)")
    if args.model not in ("default", "tiny-wan21") and not os.path.isdir(args.model):
        parser.error(f"--model: {args.model!r} is neither 'default', 'tiny-wan21' nor an existing local folder")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_bench(parser, args) -> int:
    from chopgrad.bench.bench import BenchSettings, check_bars, format_table, run_bench, write_outputs

    _check_device(parser, args)
    settings = BenchSettings(
        model=args.model, device=args.device, dtype=args.dtype, quick=args.quick, frames=args.frames,
        sizes=args.sizes, d_truncs=args.d_truncs, schedules=tuple(args.schedules),
        baselines=tuple(args.baselines), repeats=args.repeats, warmup=args.warmup, threads=args.threads,
        memory_budget_bytes=int(args.memory_budget * 1e9) if args.memory_budget else None, timeout_s=args.timeout)
    try:
        from chopgrad.bench.bench import check_shapes
        from chopgrad.bench.workloads import load_model

        check_shapes(load_model(settings.model), settings.frames, settings.sizes)
    except ValueError as exc:
        parser.error(str(exc))
    measured: list[dict] = []

    def record(row: dict) -> None:
        # Rewrite results.json / results.md after every configuration, so a run
        # that is stopped (Ctrl-C, SIGTERM from a job limit) keeps what it measured.
        measured.append(row)
        write_outputs(measured, settings, args.out, plots=False)
        if args.no_progress:
            peak = f"{row['peak_bytes'] / 2**20:.1f} MiB" if row.get("peak_bytes") else "-"
            step = f"{row['time_s']:.3f} s/step" if row.get("time_s") else "-"
            print(f"{row['size']}x{row['size']} {row['frames']:>4d}f {row['label']}: {row['status']}, {peak}, {step}",
                  file=sys.stderr, flush=True)

    t0 = time.monotonic()
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    try:
        rows = run_bench(settings, progress=not args.no_progress, log=record)
    except KeyboardInterrupt:
        print(f"\ninterrupted after {len(measured)} configurations; their results are in "
              f"{os.path.join(args.out, 'results.json')}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    wall = time.monotonic() - t0
    paths = write_outputs(rows, settings, args.out, wall_s=wall, plots=not args.no_plots)
    print(format_table(rows))
    print()
    for name, passed, detail in check_bars(rows):
        print(f"{'PASS' if passed else 'FAIL'}  {name}: {detail}")
    print(f"\n{len(rows)} configurations in {wall:.1f} s; wrote " + ", ".join(sorted(paths.values())))
    return 0


def cmd_probe(parser, args) -> int:
    import torch

    from chopgrad.bench.bench import check_shapes, default_threads, is_trained
    from chopgrad.bench.workloads import DTYPES, load_model, make_inputs
    from chopgrad.probe import plot_probe, probe_locality

    _check_device(parser, args)
    torch.set_num_threads(args.threads or default_threads())
    vae = load_model(args.model)
    try:
        check_shapes(vae, [args.frames], [args.size])
    except ValueError as exc:
        parser.error(str(exc))
    latents, target = make_inputs(vae, args.frames, args.size, args.size, seed=args.seed,
                                  encode=is_trained(args.model))
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    vae = vae.to(device=device, dtype=dtype)
    result = probe_locality(vae, latents.to(device, dtype), target.to(device, dtype), max_distance=args.max_distance,
                            eps=args.eps, d_truncs=range(args.max_d_trunc + 1))
    os.makedirs(args.out, exist_ok=True)
    table = result.table()
    header = (f"model {args.model}, {args.frames} frames ({result.num_steps} decoder steps), "
              f"{args.size}x{args.size}, {args.dtype}, {args.device}")
    with open(os.path.join(args.out, "probe.json"), "w") as f:
        json.dump({"model": args.model, "frames": args.frames, "size": args.size, **result.to_dict()}, f, indent=1)
    with open(os.path.join(args.out, "probe.md"), "w") as f:
        f.write(f"# chopgrad probe\n\n{header}\n\n{table}\n")
    png = plot_probe(result, os.path.join(args.out, "probe.png"))
    print(header + "\n\n" + table)
    print(f"\nwrote {args.out}/probe.json, {args.out}/probe.md, {png}")
    return 0


def cmd_info(parser, args) -> int:
    from chopgrad.info import collect_info, format_info

    info = collect_info()
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser._subparsers._group_actions[0].choices[args.command]  # errors name the subcommand
    return int(args.func(sub, args) or 0)


if __name__ == "__main__":
    sys.exit(main())
