"""The paper's claim on one GPU: a pixel loss through the decoder beats a latent-only loss in held-out PSNR.

Three ways of training the default one-step latent model with the default VAE, on the vsr and driving tasks: the
latent loss only; the latent loss plus a pixel MSE with full backprop through the decoder; the same with ChopGrad's
truncated backprop (sliding schedule, ``d_trunc=1``). The pixel-loss runs fine-tune the decoder as well, which the
latent loss cannot reach (``--frozen-decoder`` trains the model alone; see ``GPU_SETTINGS`` for why). The runs are
``chopgrad train --compare``'s own: its ``method_configs`` (filtered to these three methods) and
``run_in_process`` (one fresh process per run, so each peak is its own).

The settings (``GPU_SETTINGS``) come from a CPU study recorded in benchmarks/RESULTS.md ("gpu_compare sizing:
CPU study"). The whole script stays within ``--budget`` seconds (default 480, an 8-minute GPU slot): on CUDA the
six runs share the GPU at once (``--parallel``; each step of these small models is bound by kernel launches, not
by the GPU's arithmetic, so runs side by side get more steps done in the slot than runs one after another), and
each run is stopped at its share of the budget. A stopped run still reports the evaluations of its last
checkpoint (one is written at every evaluation), marked with the step it reached.

It writes, in ``--out``, one folder per task with ``chopgrad train --compare``'s files (one folder per run,
compare.json / .md / .png), gpu_compare.json, the plot (held-out PSNR against step, one panel per task) and
replaces its section of benchmarks/RESULTS.md (keyed by its heading).

    python benchmarks/gpu_compare.py                                  # on a CUDA machine: about 8 minutes
    python benchmarks/gpu_compare.py --tiny --out DIR                 # a few steps at a tiny size on the CPU

With ``--tiny`` the table and plot go into ``--out`` unless ``--results`` / ``--plot`` say otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from chopgrad.tools.cli import positive_float, positive_int
from chopgrad.tools.train.checkpoint import CHECKPOINT_FOLDER, TRAINER_FILE, committed_checkpoint
from chopgrad.tools.train.compare import method_configs, run_in_process, write_comparison
from chopgrad.tools.train.config import TrainConfig

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = ("vsr", "driving")
#: the compared methods, by their folder names in chopgrad.tools.train.compare.COMPARED_METHODS
METHODS = ("latent", "full", "sliding_d1")
LATENT, FULL, CHOPGRAD = METHODS

#: the GPU run; benchmarks/RESULTS.md ("gpu_compare sizing: CPU study") says why these values.
#: - train_decoder: the pixel-loss runs fine-tune the decoder too (decoder_lr), which a latent loss cannot do (its
#:   run leaves the decoder alone). With the decoder frozen no method separated on the CPU: vsr stayed within
#:   0.01 dB of its start and driving's pixel-loss runs ended below latent-only. --frozen-decoder runs that variant.
#: - fp32, not bf16: the model and the VAE are small enough that a step is bound by kernel launches and Python, so
#:   bf16 autocast would save no time, and the differences measured are tenths of a dB, which bf16 rounding in
#:   the decoder's forward and backward would blur.
#: - 64 pixels: the default VAE's ceiling there is 2.3 dB above 32 pixels' and the pixel loss's headroom over the
#:   latent loss is larger; 17 frames (5 latent frames) so that d_trunc=1 truncates something.
GPU_SETTINGS = {"frames": 17, "size": (64, 64), "steps": 500, "lr": 3e-3, "pixel_weight": 1.0,
                "train_decoder": True, "decoder_lr": 3e-4, "eval_every": 50, "eval_clips": 8, "samples": 0,
                "dtype": "fp32"}
#: --tiny: tiny Wan 2.1 VAE and model, a few steps (the CPU test of this script)
TINY_SETTINGS = {"model": "tiny-wan21", "frames": 9, "size": (16, 16), "steps": 4, "lr": 3e-3, "pixel_weight": 1.0,
                 "train_decoder": True, "decoder_lr": 3e-4, "eval_every": 2, "eval_clips": 1, "samples": 0,
                 "width": 8, "blocks": 1, "dtype": "fp32"}

#: the claim's bars: each pixel-loss method ends at least CLAIM_DB above latent-only, and chopgrad d=1 within
#: CLOSE_DB of full backprop (the targets of `chopgrad train --compare` in benchmarks/RESULTS.md)
CLAIM_DB, CLOSE_DB = 0.5, 0.3
#: seconds of the budget kept for starting up and writing the results
RESERVE_S = 20.0
#: a run with less time than this left is not started
MIN_RUN_S = 10.0
RESULTS_HEADING = "## gpu_compare: pixel loss through the decoder vs latent loss only"
FROZEN_SUFFIX, TINY_SUFFIX = " (decoder frozen)", " (tiny CPU check)"
TINY_HEADING = RESULTS_HEADING + TINY_SUFFIX
#: what this script leaves in --out: a non-empty --out without it is someone else's folder
MARKER = "gpu_compare.json"


def task_config(task: str, settings: dict, out: str, device: str, threads: int) -> TrainConfig:
    """The settings every method of `task` starts from (method_configs changes the method's own)."""
    return TrainConfig(task=task, device=device, threads=threads, progress=False, out=os.path.join(out, task),
                       **settings)


def run_configs(settings: dict, out: str, device: str, threads: int) -> list[tuple[str, str, str, TrainConfig]]:
    """(task, method folder name, label, config) of every run, in the order they start."""
    return [(task, name, label, config) for task in TASKS
            for name, label, config in method_configs(task_config(task, settings, out, device, threads))
            if name in METHODS]


def run_timeout(budget_s: float, runs: int, parallel: int) -> float:
    """Each run's time limit: the budget less RESERVE_S, shared by the waves of `parallel` runs."""
    return (budget_s - RESERVE_S) / math.ceil(runs / parallel)


def partial_record(run_folder: str) -> dict | None:
    """The evaluations and summary of a stopped run's last checkpoint, or None if it wrote none."""
    folder = committed_checkpoint(os.path.join(run_folder, CHECKPOINT_FOLDER))
    if folder is None:
        return None
    try:
        with open(os.path.join(folder, TRAINER_FILE)) as f:
            extra = json.load(f).get("extra", {})
    except (OSError, ValueError):
        return None
    return {"evals": extra.get("evals", []), "summary": extra.get("summary", {})} if extra.get("evals") else None


def result_row(name: str, label: str, config: TrainConfig, result: dict) -> dict:
    """A row in chopgrad.tools.train.compare's format, plus steps_done and (on CUDA) the process's peak."""
    row = {"method": name, "label": label, "status": result["status"], "wall_s": result["wall_s"],
           "steps": config.steps}
    if result["status"] != "ok":
        error_lines = (result.get("error") or "").strip().splitlines()
        row["error"] = error_lines[-1].replace("|", "/") if error_lines else ""  # one line, fit for a table cell
    record = result if result["status"] == "ok" else partial_record(config.out)
    if record is None:
        return row
    summary = record["summary"]
    final = summary.get("final_eval") or record["evals"][-1]
    row.update({k: final[k] for k in ("psnr", "ssim", "temporal_error")},
               evals=[(e["step"], e["psnr"]) for e in record["evals"]],
               steps_done=summary.get("steps_done", final["step"]),
               peak_step_bytes=summary.get("peak_step_bytes", 0), time_per_step_s=summary.get("time_per_step_s", 0.0),
               reconstruction_psnr=summary.get("reconstruction", {}).get("psnr", float("nan")),
               max_memory_allocated_bytes=summary.get("max_memory_allocated_bytes"))
    return row


def run(args, settings: dict, log=print) -> dict[str, list[dict]]:
    """Trains every run (args.parallel at a time); returns {task: rows} in METHODS order."""
    runs = run_configs(settings, args.out, args.device, args.threads)
    per_run = run_timeout(args.budget, len(runs), args.parallel)
    deadline = time.monotonic() + args.budget - RESERVE_S

    def one(task, name, label, config):
        left = deadline - time.monotonic()
        if left < MIN_RUN_S:
            return task, {"method": name, "label": label, "status": "skipped", "wall_s": 0.0, "steps": config.steps,
                          "error": f"less than {MIN_RUN_S:.0f} s of the budget left"}
        shutil.rmtree(config.out, ignore_errors=True)  # a stale checkpoint must not pass for this run's
        log(f"{task}: training '{label}' ({config.steps} steps, limit {min(per_run, left):.0f} s) ...")
        row = result_row(name, label, config, run_in_process(config, timeout_s=min(per_run, left)))
        log(f"  {task}: {format_progress(row)}")
        return task, row

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        done = list(pool.map(lambda r: one(*r), runs))
    rows = {task: [row for t, row in done if t == task] for task in TASKS}
    for task in TASKS:
        config = task_config(task, settings, args.out, args.device, args.threads)
        write_comparison(config.out, {"config": config.to_dict(), "rows": [as_compare_row(r) for r in rows[task]]})
    return rows


def as_compare_row(row: dict) -> dict:
    """A stopped run with evaluations counts as done for compare.md and compare.png, its label saying where it
    stopped."""
    if row["status"] == "ok" or "psnr" not in row:
        return row
    return {**row, "status": "ok", "label": f"{row['label']} ({row['status']} at step {row['steps_done']})"}


def format_progress(row: dict) -> str:
    if "psnr" not in row:
        return f"{row['label']}: {row['status']} {row.get('error', '')}".rstrip()
    return (f"{row['label']}: {row['status']}, {row['steps_done']}/{row['steps']} steps, held-out PSNR "
            f"{row['psnr']:.2f} dB, {row['time_per_step_s']:.3f} s/step, {row['wall_s']:.0f} s")


def psnr_at(row: dict, step: int) -> float | None:
    return dict(row.get("evals", [])).get(step)


def common_step(rows: list[dict]) -> int | None:
    """The last evaluated step every row with evaluations reached (all of them, unless a run was stopped)."""
    reached = [row["evals"][-1][0] for row in rows if row.get("evals")]
    return min(reached) if reached else None


def verdicts(rows: list[dict]) -> list[str]:
    """The claim's checks on one task, at the last step all three runs reached."""
    by_method = {r["method"]: r for r in rows if r.get("evals")}
    step = common_step(rows)
    if step is None or LATENT not in by_method:
        return ["no comparison: the latent-only run has no evaluation"]
    latent = psnr_at(by_method[LATENT], step)
    lines = []
    for name in (FULL, CHOPGRAD):
        if name in by_method:
            gain = psnr_at(by_method[name], step) - latent
            lines.append(f"{by_method[name]['label']} - latent loss only at step {step}: {gain:+.2f} dB "
                         f"(bar >= +{CLAIM_DB}: {'met' if gain >= CLAIM_DB else 'missed'})")
    if FULL in by_method and CHOPGRAD in by_method:
        gap = psnr_at(by_method[CHOPGRAD], step) - psnr_at(by_method[FULL], step)
        lines.append(f"chopgrad sliding d=1 - full backprop at step {step}: {gap:+.2f} dB "
                     f"(bar within {CLOSE_DB}: {'met' if abs(gap) <= CLOSE_DB else 'missed'})")
    return lines


def mib(value) -> str:
    return f"{value / 2**20:.1f}" if value else "-"


def format_table(rows_by_task: dict[str, list[dict]]) -> str:
    lines = ["| task | method | status | steps | held-out PSNR (dB) | vs latent only (dB) | SSIM | "
             "step peak (MiB) | process peak (MiB) | time per step (s) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for task, rows in rows_by_task.items():
        latent = next((r for r in rows if r["method"] == LATENT and "psnr" in r), None)
        for r in rows:
            status = f"{r['status']}: {r['error']}" if r.get("error") else r["status"]
            if "psnr" not in r:
                lines.append(f"| {task} | {r['label']} | {status} | 0/{r['steps']} | | | | | | |")
                continue
            step = r["evals"][-1][0]
            base = psnr_at(latent, step) if latent else None
            delta = f"{r['psnr'] - base:+.2f}" if base is not None else "-"
            lines.append(f"| {task} | {r['label']} | {status} | {r['steps_done']}/{r['steps']} | {r['psnr']:.2f} | "
                         f"{delta} | {r['ssim']:.4f} | {mib(r['peak_step_bytes'])} | "
                         f"{mib(r.get('max_memory_allocated_bytes'))} | {r['time_per_step_s']:.3f} |")
    return "\n".join(lines)


def task_notes(rows_by_task: dict[str, list[dict]]) -> str:
    lines = []
    for task, rows in rows_by_task.items():
        ok = [r for r in rows if r.get("evals")]
        start = f"{ok[0]['evals'][0][1]:.2f} dB at step 0, " if ok and ok[0]["evals"][0][0] == 0 else ""
        ceiling = f"VAE reconstruction decode(encode(target)) {ok[0]['reconstruction_psnr']:.2f} dB" if ok else ""
        lines.append(f"- **{task}** ({start}{ceiling}): " + "; ".join(verdicts(rows)) + ".")
    return "\n".join(lines)


def plot(path: str, rows_by_task: dict[str, list[dict]], title: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5 * len(rows_by_task), 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(rows_by_task), squeeze=False)[0]
    for axis, (task, rows) in zip(axes, rows_by_task.items()):
        ok = [r for r in rows if r.get("evals")]
        for r in ok:
            steps, values = zip(*r["evals"])
            label = r["label"] if r["status"] == "ok" else f"{r['label']} ({r['status']})"
            axis.plot(steps, values, marker="o", ms=3, label=label)
        if ok:
            axis.axhline(ok[0]["reconstruction_psnr"], color="grey", ls="--", lw=1, label="VAE reconstruction")
        axis.set(xlabel="step", ylabel="held-out PSNR (dB)", title=task)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, format="png")
    return path


def replace_section(path: str, heading: str, body: str) -> None:
    """Puts `heading` + `body` in the markdown file at `path`: in place of the section under that heading (up to the
    next level-2 heading) if there is one, else at the end."""
    text = open(path).read() if os.path.exists(path) else ""
    lines = text.splitlines(keepends=True)
    section = [f"{heading}\n", "\n", body.rstrip("\n") + "\n"]
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == heading), None)
    if start is None:
        lines += (["\n"] if text and not text.endswith("\n\n") else []) + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = section + (["\n"] if end < len(lines) else [])
    with open(path, "w") as f:
        f.writelines(lines)


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}"


def describe(settings: dict, args) -> str:
    size = "x".join(map(str, settings["size"]))
    model = settings.get("model", "default")
    return (f"{model} VAE, default one-step latent model (width {settings.get('width', 64)}, "
            f"blocks {settings.get('blocks', 3)}), {settings['frames']} frames {size}, batch 1, "
            f"{settings['steps']} steps, lr {settings['lr']:g} (warm-up and cosine decay), latent weight 1, "
            f"pixel MSE weight {settings['pixel_weight']:g}, "
            + (f"decoder fine-tuned by the pixel-loss runs at lr {settings['decoder_lr']:g}, "
               if settings["train_decoder"] else "decoder frozen, ")
            + f"{settings['dtype']}, {settings['eval_clips']} held-out "
            f"clips evaluated every {settings['eval_every']} steps; {args.parallel} run(s) at a time on "
            f"{args.device} ({args.threads} CPU thread(s) each)")


def results_body(args, settings: dict, device: str, command: str, wall: float, plot_path: str, table: str,
                 notes: str) -> str:
    repo = os.path.dirname(HERE)
    shown_plot = os.path.relpath(plot_path, repo) if plot_path.startswith(repo + os.sep) else plot_path
    per_run = run_timeout(args.budget, len(TASKS) * len(METHODS), args.parallel)
    sharing = (f" The {args.parallel} runs shared the device at once, so a run's time per step includes waiting for "
               f"the others; peak memory is each process's own." if args.parallel > 1 else "")
    return (f"{datetime.date.today().isoformat()}, {device}. {describe(settings, args)}. Reproduce: `{command}` "
            f"({wall:.0f} s in all; budget {args.budget:.0f} s, each run's limit {per_run:.0f} s).{sharing} Step "
            f"peak: the allocator's (CUDA) or resident memory's (CPU) growth during a step; process peak: "
            f"torch.cuda.max_memory_allocated of the whole run. Plot: `{shown_plot}`.\n\n{table}\n\n{notes}\n")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", help="where the runs train (default: cuda; with --tiny: cpu)")
    parser.add_argument("--budget", type=positive_float, default=480.0,
                        help="seconds the whole script may take; each run's limit is its share (default: 480)")
    parser.add_argument("--parallel", type=positive_int,
                        help="runs training at once (default: all six on CUDA, one on the CPU)")
    parser.add_argument("--threads", type=positive_int,
                        help="CPU threads per run (default: the cores shared by the parallel runs; 1 on the CPU)")
    parser.add_argument("--steps", type=positive_int, help=f"steps per run (default: {GPU_SETTINGS['steps']}; "
                                                           f"with --tiny: {TINY_SETTINGS['steps']})")
    parser.add_argument("--frozen-decoder", action="store_true",
                        help="train the model alone, leaving the decoder as it is in every run")
    parser.add_argument("--tiny", action="store_true", help="tiny VAE and model, a few steps: a CPU check")
    parser.add_argument("--out", default="gpu_compare_out", help="folder for the runs and gpu_compare.json "
                                                                  "(new, empty, or an earlier gpu_compare's)")
    parser.add_argument("--results", help="markdown file whose section this script replaces ('' to skip; default: "
                                          "benchmarks/RESULTS.md, with --tiny OUT/RESULTS.md)")
    parser.add_argument("--plot", help="PNG of held-out PSNR against step (default: benchmarks/gpu_compare.png, "
                                       "with --tiny OUT/gpu_compare.png)")
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device {args.device}: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available (use --tiny for the CPU check)")
    if args.budget <= RESERVE_S + MIN_RUN_S:
        parser.error(f"--budget {args.budget:g}: leaves no time to train (at least {RESERVE_S + MIN_RUN_S:.0f} s)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out}: is a file, not a folder")
    if os.path.isdir(args.out) and os.listdir(args.out) and not os.path.exists(os.path.join(args.out, MARKER)):
        parser.error(f"--out {args.out}: holds files that no earlier gpu_compare wrote; give a new or empty folder")
    if args.results is None:
        args.results = os.path.join(args.out, "RESULTS.md") if args.tiny else os.path.join(HERE, "RESULTS.md")
    if args.plot is None:
        args.plot = os.path.join(args.out if args.tiny else HERE, "gpu_compare.png")
    results_folder = os.path.dirname(os.path.abspath(args.results)) if args.results else None
    if results_folder and not os.path.isdir(results_folder) and results_folder != os.path.abspath(args.out):
        parser.error(f"--results {args.results}: its folder does not exist")
    runs = len(TASKS) * len(METHODS)
    args.parallel = args.parallel or (runs if device.type == "cuda" else 1)
    # a CUDA run's CPU work is launching kernels and making its clips: the cores are shared among the runs
    args.threads = args.threads or (max(1, (os.cpu_count() or 1) // args.parallel) if device.type == "cuda" else 1)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    settings = dict(TINY_SETTINGS if args.tiny else GPU_SETTINGS)
    if args.frozen_decoder:
        settings.update(train_decoder=False, decoder_lr=TrainConfig.decoder_lr)
    if args.steps:
        settings["steps"] = args.steps
        settings["eval_every"] = min(settings["eval_every"], args.steps)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, MARKER), "w") as f:  # claims --out at once, so a stopped script can rerun there
        json.dump({"rows": None}, f)
    rows = run(args, settings, log=lambda message: print(message, file=sys.stderr, flush=True))
    device = device_name(args.device)
    table = format_table(rows)
    notes = task_notes(rows)
    wall = time.monotonic() - started
    with open(os.path.join(args.out, MARKER), "w") as f:
        json.dump({"device": device, "settings": {**settings, "size": list(settings["size"])}, "budget_s": args.budget,
                   "parallel": args.parallel, "threads": args.threads, "wall_s": wall, "rows": rows}, f, indent=1)
    plot_path = plot(args.plot, rows, f"{device}: {settings['frames']} frames "
                                      f"{'x'.join(map(str, settings['size']))}, {settings['steps']} steps")
    if args.results:
        command = " ".join(["python benchmarks/gpu_compare.py", *(argv if argv is not None else sys.argv[1:])])
        body = results_body(args, settings, device, command, wall, plot_path, table, notes)
        heading = RESULTS_HEADING + (FROZEN_SUFFIX if args.frozen_decoder else "") + (TINY_SUFFIX if args.tiny else "")
        replace_section(args.results, heading, body)
    print(table)
    print(notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
