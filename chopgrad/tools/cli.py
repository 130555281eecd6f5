"""The `chopgrad` console script: `chopgrad bench`, `chopgrad probe`, `chopgrad train`, `chopgrad info`.

This module parses and checks the arguments and calls chopgrad.tools.bench.bench,
chopgrad.tools.probe, chopgrad.tools.train and chopgrad.tools.info. Every invalid argument (including a
model folder, frame count or output path that could only fail later) is reported
before any work starts, as one `error: ...` line on stderr with exit code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import signal
import sys
import tempfile
import time
import warnings
from typing import NoReturn

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


positive_int = _number(int, minimum=1, strict=False, what="a positive integer")
nonneg_int = _number(int, minimum=0, strict=False, what="an integer >= 0")
positive_float = _number(float, minimum=0.0, strict=True, what="a positive number")
nonneg_float = _number(float, minimum=0.0, strict=False, what="a number >= 0")


def _help_with_default(text: str, default) -> str:
    """`text` with the option's default appended, unless it already says what the default is."""
    if "(default" in text or default is None or default is False or default == argparse.SUPPRESS:
        return text
    shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
    return f"{text} (default: {shown.replace('%', '%%')})"  # help texts are %-formatted


class _Parser(argparse.ArgumentParser):
    """Errors print this (sub)command's usage and one `error: ...` line, exit code 2.

    Keeps what it was given, for the checks after parsing: `arguments` (the
    actions of add_argument) and `commands` (the parsers of add_command).
    """

    def __init__(self, *args, **kwargs):
        self.arguments: list[argparse.Action] = []
        self.commands: dict[str, _Parser] = {}
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if action.option_strings:
            action.help = _help_with_default(action.help or "", action.default)
        self.arguments.append(action)
        return action

    def add_command(self, subparsers, name: str, help_text: str) -> "_Parser":
        """A subcommand of this parser, from `subparsers = self.add_subparsers(...)`."""
        command = subparsers.add_parser(name, help=help_text, description=help_text)
        self.commands[name] = command
        return command

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def fail(message: str) -> NoReturn:
    """An invalid argument found after parsing (a model folder, frame count, output path): one line, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _add_model_args(p: argparse.ArgumentParser, dtype_help: str = "model and input dtype") -> None:
    from chopgrad.tools.bench.workloads import FULL_RANDOM_MODELS, SUPPORTED_CLASSES, TINY_MODELS

    p.add_argument("--model", default="default",
                   help=f"'default' (chopgrad's small trained Wan 2.1 VAE); with random weights, a tiny config "
                        f"({', '.join(TINY_MODELS)}: CPU runs) or the full architecture "
                        f"({', '.join(FULL_RANDOM_MODELS)}: memory and speed on a GPU) of Wan 2.1, HunyuanVideo, "
                        f"HunyuanVideo 1.5, Mochi or EasyAnimate; "
                        f"or PATH of a local diffusers VAE folder of class {' / '.join(SUPPORTED_CLASSES)} "
                        f"(save_pretrained layout: config.json + diffusion_pytorch_model.safetensors or .bin)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="fp32", choices=DTYPE_CHOICES, help=dtype_help)


def _grid(values) -> str:
    return " ".join(map(str, values))


def build_parser() -> _Parser:
    from chopgrad.tools.bench.bench import (FULL_D_TRUNCS, FULL_FRAMES, FULL_SIZES, QUICK_D_TRUNCS, QUICK_FRAMES,
                                            QUICK_SIZES)
    from chopgrad.tools.bench.workloads import FRAME_RULES

    parser = _Parser(prog="chopgrad", description="ChopGrad: truncated backprop through causal-cache video VAE "
                     "decoders. Tools to measure it on your model.",
                     epilog="Run 'chopgrad COMMAND --help' for the options of a command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    bench_help = ("peak memory, time and gradient fidelity of one pixel-loss training step, per method, "
                  "each in a fresh subprocess")
    b = parser.add_command(sub, "bench", bench_help)
    _add_model_args(b)
    b.add_argument("--quick", action="store_true",
                   help=f"small grid (frames {_grid(QUICK_FRAMES)}, sizes {_grid(QUICK_SIZES)}, d_trunc "
                        f"{_grid(QUICK_D_TRUNCS)}); a few minutes on 2 CPU cores")
    b.add_argument("--frames", type=positive_int, nargs="+",
                   help=f"pixel frame counts ({FRAME_RULES}) (default: "
                        f"{_grid(FULL_FRAMES)}; with --quick: {_grid(QUICK_FRAMES)})")
    b.add_argument("--sizes", type=positive_int, nargs="+",
                   help=f"square resolutions in pixels (default: {_grid(FULL_SIZES)}; with --quick: "
                        f"{_grid(QUICK_SIZES)})")
    b.add_argument("--d-trunc", dest="d_truncs", type=nonneg_int, nargs="+",
                   help=f"truncation distances of chopgrad's methods (default: {_grid(FULL_D_TRUNCS)}; with "
                        f"--quick: {_grid(QUICK_D_TRUNCS)})")
    b.add_argument("--schedules", nargs="+", choices=("sliding", "chunked", "sliding_recompute"),
                   default=["sliding", "chunked"],
                   help="chopgrad schedules to measure")
    b.add_argument("--baselines", nargs="*", choices=("full", "checkpoint"), default=["full", "checkpoint"],
                   help="baseline methods; full backprop is the fidelity reference of every method, so it runs "
                        "first whatever the order given (give none to skip them)")
    b.add_argument("--unfused", action="store_true",
                   help="also measure every chopgrad method with lean=False (the model's own modules instead of "
                        "the fused decoder ops that pixel_loss uses by default)")
    b.add_argument("--tile", type=positive_int, metavar="PIXELS",
                   help="also measure every chopgrad method with pixel_loss(tile=PIXELS): a spatially tiled "
                        "backward (a multiple of the model's spatial stride) (default: no tiled rows)")
    b.add_argument("--tile-grads", nargs="+", choices=("exact", "truncated"), default=["exact"],
                   help="the tile_grad modes measured with --tile")
    b.add_argument("--tile-halo", type=nonneg_int, metavar="PIXELS",
                   help="tile_halo of tile_grad='truncated' (default: one spatial stride, as pixel_loss)")
    b.add_argument("--repeats", type=positive_int, default=3,
                   help="timed rounds per clip and size: all methods that fit in memory run in one process, "
                   "interleaved (one step of each per round, in rotating order, with glibc's usual allocator "
                   "thresholds); each method's median is reported")
    b.add_argument("--warmup", type=nonneg_int, default=0,
                   help="untimed full steps before the memory-measured one, and untimed rounds before the timed "
                   "ones in addition to the one that always runs (a short step on the first 3 latent frames "
                   "always runs first, so one-time library and cache costs are not counted)")
    b.add_argument("--memory-budget", type=positive_float, metavar="GIB",
                   help="a configuration whose peak (RSS on CPU, allocator on CUDA) exceeds this many GiB is "
                        "reported as OOM (default: 80%% of available RAM / GPU memory)")
    b.add_argument("--timeout", type=positive_float, default=1800.0, metavar="SECONDS",
                   help="wall-clock limit per configuration; one that runs longer is reported as timeout")
    b.add_argument("--threads", type=positive_int, help="CPU threads per worker (default: the cores not busy "
                                                         "with other processes, from the load average)")
    b.add_argument("--out", default="bench_out", metavar="DIR",
                   help="output folder for results.json, results.md and the plots (created if missing); "
                        "results.json and results.md are rewritten as each configuration finishes, the plots drawn "
                        "at the end. The results and plots of an earlier bench in it are removed when the first "
                        "configuration finishes (other files are left alone)")
    b.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    b.add_argument("--no-progress", action="store_true",
                   help="no progress bar; on stderr instead, one line per configuration as it finishes (status, "
                        "peak memory, gradient cosine) and one per clip and size with the times per step, measured "
                        "side by side once all its configurations have run")
    b.set_defaults(func=cmd_bench)

    probe_help = ("temporal locality of the decoder: influence vs distance, exp fit, recommended d_trunc, "
                  "truncated-gradient fidelity")
    p = parser.add_command(sub, "probe", probe_help)
    _add_model_args(p)
    p.add_argument("--frames", type=positive_int, default=33,
                   help=f"pixel frames ({FRAME_RULES})")
    p.add_argument("--size", type=positive_int, default=64, help="square resolution in pixels")
    p.add_argument("--eps", type=positive_float, default=1e-3,
                   help="tolerance for the recommended d_trunc: the distance whose fitted influence is below it")
    p.add_argument("--max-distance", type=nonneg_int,
                   help="largest distance measured, 1 or more (default: all, up to the number of decoder steps - "
                        "1; the probe needs two decoder steps or more)")
    p.add_argument("--max-d-trunc", type=nonneg_int, default=4, metavar="N",
                   help="measure the truncated-gradient fidelity for d_trunc 0..N")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic input clip (and of the random latents of the random-weight models)")
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: the cores not busy with other "
                                                         "processes, from the load average)")
    p.add_argument("--out", default="probe_out", metavar="DIR",
                   help="output folder for probe.json, probe.md and probe.png (created if missing)")
    p.set_defaults(func=cmd_probe)

    from chopgrad.tools.train.command import add_train_command

    train = add_train_command(
        parser, sub, positive_int=positive_int, nonneg_int=nonneg_int, positive_float=positive_float,
        nonneg_float=nonneg_float,
        add_model=lambda p: _add_model_args(p, "fp32, or bf16: bf16 autocast of the model and decoder compute "
                                               "(weights and optimizer state stay fp32)"))
    train.set_defaults(func=cmd_train)

    info_help = "versions, C++ extension build status, CUDA, fused-op backends"
    i = parser.add_command(sub, "info", info_help)
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.set_defaults(func=cmd_info)
    return parser


def _check_device(args) -> None:
    import torch

    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        fail(f"--device must be 'cpu' or 'cuda[:N]', got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device}: CUDA is not available (this torch build or machine has no usable GPU)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        fail(f"--device {args.device}: there are only {torch.cuda.device_count()} CUDA devices (cuda:0 .. "
             f"cuda:{torch.cuda.device_count() - 1})")


def _check_model(args) -> None:
    from chopgrad.tools.bench.workloads import check_model_source

    try:
        check_model_source(args.model)
    except ValueError as exc:
        fail(f"--model: {exc}")


def _load_model(name: str):
    """load_model, with a failure inside diffusers (weights that do not fit the config, a corrupt file) as one line."""
    from chopgrad.tools.bench.workloads import load_model

    try:
        return load_model(name)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError, AttributeError) as exc:
        first_line = next(iter(str(exc).strip().splitlines()), "")
        fail(f"--model: could not load {name!r}: {type(exc).__name__}" + (f": {first_line}" if first_line else ""))


def _check_shapes(vae, frames, sizes, *, size_option: str) -> None:
    from chopgrad.tools.bench.workloads import check_frames, check_sizes

    try:
        check_sizes(vae, sizes)
    except ValueError as exc:
        fail(f"{size_option}: {exc}")
    try:
        check_frames(vae, frames)
    except ValueError as exc:
        fail(f"--frames: {exc}")


def _check_tiling(vae, args) -> None:
    from chopgrad.adapters import WanAdapter, wrap
    from chopgrad.tools.bench.workloads import spatial_factor

    if args.tile is None:
        if args.tile_halo is not None or args.tile_grads != ["exact"]:
            fail("--tile-halo and --tile-grads apply to tiled runs: give --tile too")
        return
    stride = spatial_factor(vae)
    if args.tile % stride:
        fail(f"--tile: {args.tile} is not a multiple of the model's spatial stride ({stride} pixels)")
    if args.tile_halo is not None and args.tile_halo % stride:
        fail(f"--tile-halo: {args.tile_halo} is not a multiple of the model's spatial stride ({stride} pixels)")
    if args.tile_halo is not None and "truncated" not in args.tile_grads:
        fail("--tile-halo applies to --tile-grads truncated only")
    if "exact" in args.tile_grads and not isinstance(wrap(vae), WanAdapter):
        fail(f"--tile-grads exact: exact tiling supports the Wan decoders only, not {type(vae).__name__}; "
             f"use --tile-grads truncated")


def _check_out(path: str, files) -> None:
    """`--out` must be a folder that exists or can be created, in which each of `files` can be written."""
    if not path:
        fail("--out: empty path; give a folder")
    if os.path.lexists(path) and not os.path.exists(path):
        fail(f"--out: {path!r} is a broken symbolic link")
    if os.path.exists(path):
        if not os.path.isdir(path):
            fail(f"--out: {path!r} is an existing file; give a folder (existing or new) for {', '.join(files)}")
        for name in files:
            target = os.path.join(path, name)
            if os.path.isdir(target):
                fail(f"--out: {target!r} is a folder, so {name} cannot be written there")
        if not os.access(path, os.W_OK | os.X_OK):
            fail(f"--out: no permission to write in {path!r}")
        _probe_write(path)
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        fail(f"--out: {path!r} cannot be created: {parent!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        fail(f"--out: {path!r} cannot be created: no permission to write in {parent!r}")
    _probe_write(path)


def _probe_write(path: str) -> None:
    """Creates `path` (with its missing parents) and writes a file in it, then removes all of it again.

    Permission bits do not tell everything: root may write anywhere by them, yet not in /proc or on a read-only
    mount, and such an --out would otherwise fail only when the run writes its outputs.
    """
    missing = []
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    created = []
    try:
        for folder in reversed(missing):
            try:
                os.mkdir(folder)
            except FileExistsError:  # another rank of the same run made it meanwhile: it is not ours to remove
                if not os.path.isdir(folder):
                    raise
                continue
            created.append(folder)
        descriptor, probe = tempfile.mkstemp(prefix=".chopgrad-write-probe-", dir=path)
        try:
            os.write(descriptor, b"probe")
        finally:
            os.close(descriptor)
            os.remove(probe)
    except OSError as exc:
        fail(f"--out: cannot write in {path!r}: {exc.strerror or exc}")
    finally:
        # Under torchrun the other ranks check the same folder at the same time, and the run creates it anyway:
        # removing it here could pull it from under another rank's probe.
        for folder in reversed(created if int(os.environ.get("WORLD_SIZE", "1")) <= 1 else []):
            try:
                os.rmdir(folder)
            except OSError:
                pass


@contextlib.contextmanager
def _stop_signals_deferred():
    """SIGINT and SIGTERM that arrive inside the block are delivered when it ends."""
    stops = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


PROBE_FILES = ("probe.json", "probe.md", "probe.png")


def cmd_bench(args) -> int:
    from chopgrad.tools.bench.bench import (OUTPUT_FILES, BenchSettings, format_summary, format_table, remove_outputs,
                                            run_bench, write_outputs)

    _check_device(args)
    _check_model(args)
    _check_out(args.out, OUTPUT_FILES)
    settings = BenchSettings(
        model=args.model, device=args.device, dtype=args.dtype, quick=args.quick, frames=args.frames,
        sizes=args.sizes, d_truncs=args.d_truncs, schedules=tuple(args.schedules),
        baselines=tuple(args.baselines), unfused=args.unfused, tile=args.tile, tile_grads=tuple(args.tile_grads),
        tile_halo=args.tile_halo, repeats=args.repeats, warmup=args.warmup,
        threads=args.threads,
        memory_budget_bytes=int(args.memory_budget * 2**30) if args.memory_budget else None, timeout_s=args.timeout)
    vae = _load_model(settings.model)
    _check_shapes(vae, settings.frames, settings.sizes, size_option="--sizes")
    _check_tiling(vae, args)
    measured: list[dict] = []
    timed: set[int] = set()  # ids of the rows whose clip and size has been timed

    def record(row: dict) -> None:
        # Rewrite results.json / results.md as each configuration finishes, so a run
        # that is stopped (Ctrl-C, SIGTERM from a job limit) keeps what it measured.
        # The first one replaces an earlier bench's outputs in --out (so no stale plot
        # stays beside the new results), and a run stopped before it leaves them alone.
        # A stop waits until the row is recorded, so the printed lines, the file
        # and the count in the stop message agree.
        with _stop_signals_deferred():
            if not measured:
                remove_outputs(args.out)
            measured.append(row)
            if args.no_progress:
                print(_bench_row_line(row), file=sys.stderr, flush=True)
            write_outputs(measured, settings, args.out, plots=False)

    def record_times(rows: list[dict]) -> None:
        with _stop_signals_deferred():
            timed.update(map(id, rows))
            if args.no_progress:
                print(_bench_times_line(rows), file=sys.stderr, flush=True)
            write_outputs(measured, settings, args.out, plots=False)

    t0 = time.monotonic()
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    try:
        rows = run_bench(settings, progress=not args.no_progress, log=record, timed=record_times)
    except KeyboardInterrupt:
        print(f"\n{_bench_interrupted(measured, timed, args.out)}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    wall = time.monotonic() - t0
    paths = write_outputs(rows, settings, args.out, wall_s=wall, plots=not args.no_plots)
    print(format_table(rows))
    summary = format_summary(rows)
    if summary:
        print("\n" + summary)
    print(f"\n{len(rows)} configurations in {wall:.1f} s; wrote " + ", ".join(sorted(paths.values())))
    return 0


def _check_probe_steps(vae, frames: int) -> None:
    """The probe measures how far back the loss of a decoder step reaches: it needs two steps or more."""
    from chopgrad.tools.bench.workloads import decoded_frames, decoder_steps, is_decodable

    if decoder_steps(vae, frames) >= 2:
        return
    enough = next((f for f in map(lambda n: decoded_frames(vae, n), range(1, 257))
                   if is_decodable(vae, f) and decoder_steps(vae, f) >= 2), None)
    fail(f"--frames {frames}: this {type(vae).__name__} decodes {frames} frame{'s' if frames != 1 else ''} in one "
         f"decoder step: no distance to measure, nothing to fit"
         + (f"; give {enough} frames or more" if enough else ""))


def _bench_where(row: dict) -> str:
    return f"{row['size']}x{row['size']} {row['frames']:>4d}f"


def _bench_row_line(row: dict) -> str:
    """--no-progress: a configuration as it finishes (its time comes with its clip and size's timing line)."""
    peak = f"{row['peak_bytes'] / 2**20:.1f} MiB" if row.get("peak_bytes") else "-"
    cosine = f", cosine {row['cosine']:.5f}" if row.get("cosine") is not None else ""
    return f"{_bench_where(row)} {row['label']}: {row['status']}, {peak}{cosine}"


def _bench_times_line(rows: list[dict]) -> str:
    """--no-progress: the times of one clip and size, measured side by side for its configurations that ran."""
    ran = [r for r in rows if r["status"] == "ok"]
    if not ran:
        return f"{_bench_where(rows[0])} not timed: no configuration ran"
    if all(r.get("time_s") is None for r in ran):  # time_side_by_side said why at the end of each row's detail
        detail = ran[0]["detail"]
        why = detail[detail.find("timing run "):] if "timing run " in detail else "not timed"
        return f"{_bench_where(rows[0])} {why}"
    return f"{_bench_where(rows[0])} time per step, side by side: " + ", ".join(
        f"{r['label']} {r['time_s']:.3f} s" if r.get("time_s") is not None else f"{r['label']} -" for r in ran)


def _bench_interrupted(measured: list[dict], timed: set, out: str) -> str:
    """The stop message: what was recorded and where, or that nothing was."""
    if not measured:
        return "interrupted before any configuration finished; nothing was written"
    untimed = sum(1 for r in measured if r["status"] == "ok" and id(r) not in timed)
    note = (f"; {untimed} of them without times (a clip and size is timed side by side once all its configurations "
            f"have run)" if untimed else "")
    return (f"interrupted after {len(measured)} configurations; their results are in "
            f"{os.path.join(out, 'results.json')} and {os.path.join(out, 'results.md')} (no plots){note}")


def cmd_probe(args) -> int:
    import torch

    from chopgrad.tools.bench.bench import default_threads, is_trained
    from chopgrad.tools.bench.workloads import DTYPES, cast_model, make_inputs
    from chopgrad.tools.probe import plot_probe, probe_locality

    _check_device(args)
    _check_model(args)
    _check_out(args.out, PROBE_FILES)
    if args.max_distance == 0:
        fail("--max-distance 0: no distance to measure, nothing to fit (the influence at distance 0 is 1 by "
             "definition); give 1 or more, or leave it out to measure every distance")
    vae = _load_model(args.model)
    _check_shapes(vae, [args.frames], [args.size], size_option="--size")
    _check_probe_steps(vae, args.frames)
    torch.set_num_threads(args.threads or default_threads())
    latents, target = make_inputs(vae, args.frames, args.size, args.size, seed=args.seed,
                                  encode=is_trained(args.model))
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    vae = vae.to(device=device)
    if dtype != torch.float32:
        # only cast when asked: diffusers logs a "should be kept in float32" warning on every dtype cast
        # (cast_model hides it where it names no module)
        vae = cast_model(vae, dtype)
    result = probe_locality(vae, latents.to(device, dtype), target.to(device, dtype), max_distance=args.max_distance,
                            eps=args.eps, d_truncs=range(args.max_d_trunc + 1))
    os.makedirs(args.out, exist_ok=True)
    table = result.table()
    header = (f"model {args.model}, {args.frames} frames ({result.num_steps} decoder steps), "
              f"{args.size}x{args.size}, {args.dtype}, {args.device}")
    with open(os.path.join(args.out, "probe.json"), "w") as f:
        # to_dict gives a non-finite number as null; allow_nan=False keeps Infinity / NaN (not JSON) out for good
        json.dump({"model": args.model, "frames": args.frames, "size": args.size, **result.to_dict()}, f, indent=1,
                  allow_nan=False)
    with open(os.path.join(args.out, "probe.md"), "w") as f:
        f.write(f"# chopgrad probe\n\n{header}\n\n{table}\n")
    png = plot_probe(result, os.path.join(args.out, "probe.png"))
    print(header + "\n\n" + table)
    print(f"\nwrote {args.out}/probe.json, {args.out}/probe.md, {png}")
    return 0


def cmd_train(args) -> int:
    from chopgrad.tools.train.command import (COMPARE_FILES, TRAIN_FILES, check_before_work, config_from_args,
                                              interrupted_message, remove_outputs, run_train)

    if args.compare:
        chosen = [o for o, given in (("--resume", args.resume), ("--method", args.method is not None),
                                     ("--d-trunc", hasattr(args, "d_trunc")), ("--schedule", args.schedule is not None))
                  if given]
        if chosen:
            fail(f"--compare trains every method afresh (latent only, full backprop, chopgrad sliding d_trunc 0 and "
                 f"1, chunked d_trunc 1); drop {', '.join(chosen)}")
    try:
        config = config_from_args(args)
        if args.compare:
            from chopgrad.tools.train.compare import method_configs

            method_configs(config)
    except ValueError as exc:
        fail(str(exc))
    _check_device(args)
    _check_model(args)
    _check_out(config.out, COMPARE_FILES if args.compare else TRAIN_FILES)
    video_critic = check_before_work(config, fail, overwrite=args.overwrite)
    _check_shapes(_load_model(config.model), [config.frames], [*config.size], size_option="--size")
    # SIGTERM (a job limit, `kill`) stops the run as Ctrl-C does, with the same message
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.compare:
            from chopgrad.tools.train.compare import compare, format_table, preflight

            try:
                preflight(config)
            except (ValueError, FileNotFoundError) as exc:
                fail(str(exc))
            if args.overwrite:
                remove_outputs(config.out)
            t0 = time.monotonic()
            comparison = compare(config, log=lambda message: print(message, file=sys.stderr, flush=True))
            print(format_table(comparison))
            print(f"\n{len(comparison['rows'])} runs in {time.monotonic() - t0:.0f} s; wrote {config.out}/compare.md, "
                  f"compare.json, compare.png")
            failed = [row for row in comparison["rows"] if row["status"] != "ok"]
            for row in failed:
                reason = (row.get("error") or "").strip().splitlines()
                print(f"error: the '{row['label']}' run {row['status']}"
                      f"{': ' + reason[-1] if reason else ''} ({config.out}/{row['method']}/)", file=sys.stderr)
            return 1 if failed else 0
        return run_train(config, fail, video_critic, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print(f"\n{'interrupted' if args.compare else interrupted_message(config)}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)


def cmd_info(args) -> int:
    from chopgrad.tools.info import collect_info, format_info

    info = collect_info()
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    # Unknown options are reported by the subcommand they were given to, with
    # its usage; a plain parse_args would show only the top-level usage.
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        parser.print_help(sys.stderr)
        fail("a command is required: bench, probe, train or info")
    sub = parser.commands[args.command]
    if unknown:
        sub.error(f"unrecognized arguments: {' '.join(unknown)}{_suggestion(sub, unknown)}")
    previous_format = warnings.formatwarning
    warnings.formatwarning = _format_warning
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous_format


_PYTHON_FORMAT = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """chopgrad's own warnings (skipped data files, a single held-out file) as `warning: ...` lines for a command
    line user; they are about the user's input, not the line of chopgrad that noticed it. Others as Python shows
    them."""
    if category is UserWarning and os.sep + "chopgrad" + os.sep in filename:
        return f"warning: {message}\n"
    return _PYTHON_FORMAT(message, category, filename, lineno, line)


def _suggestion(parser: _Parser, unknown) -> str:
    options = [o for action in parser.arguments for o in action.option_strings if o.startswith("--")]
    for arg in unknown:
        if arg.startswith("--"):
            close = difflib.get_close_matches(arg.split("=", 1)[0], options, n=1)
            if close:
                return f" (did you mean {close[0]}?)"
    return ""


if __name__ == "__main__":
    sys.exit(main())
