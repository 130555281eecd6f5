"""`chopgrad bench`: one pixel-loss training step (decode + MSE + backward to the
latents) per method, side by side. Peak memory and gradients come from each
configuration in a fresh subprocess; times from one process per clip and
size that runs all its methods interleaved (``timing.py``), since times from
separate processes at different moments are not comparable on a shared CPU.

    from chopgrad.tools.bench.bench import BenchSettings, run_bench, write_outputs
    rows = run_bench(BenchSettings(quick=True))
    write_outputs(rows, settings, "bench_out")

Methods: full backprop through the model's own `decode`, correct per-step
checkpointing (explicit state), and `chopgrad.pixel_loss` (sliding / chunked
at several `d_trunc`). Fidelity (cosine similarity, relative error of the
latent gradient) is measured against full backprop on the same inputs.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from ..metrics import gradient_fidelity
from .methods import method_label
from .runner import run_isolated
from .workloads import RANDOM_MODELS, check_frames, check_sizes, load_model, make_inputs, spatial_factor

QUICK_FRAMES = (17, 129)
QUICK_SIZES = (32,)
QUICK_D_TRUNCS = (0, 1)
FULL_FRAMES = (17, 33, 65, 129)
FULL_SIZES = (64, 128)
FULL_D_TRUNCS = (0, 1, 2)


@dataclass
class BenchSettings:
    """What `chopgrad bench` measures. `None` fields take the quick or full-run defaults."""

    model: str = "default"
    device: str = "cpu"
    dtype: str = "fp32"
    quick: bool = False
    frames: Optional[list] = None
    sizes: Optional[list] = None
    d_truncs: Optional[list] = None
    schedules: tuple = ("sliding", "chunked")
    baselines: tuple = ("full", "checkpoint")
    repeats: Optional[int] = None
    warmup: int = 0
    memory_budget_bytes: Optional[int] = None
    timeout_s: float = 1800.0
    seed: int = 0
    threads: Optional[int] = None  # CPU threads per worker; None: the cores not busy with other processes
    unfused: bool = False  # also measure each chopgrad method with lean=False (the model's own modules)
    tile: Optional[int] = None  # also measure each chopgrad method with pixel_loss(tile=...), per tile_grads
    tile_grads: tuple = ("exact",)
    tile_halo: Optional[int] = None  # tile_grad="truncated"'s halo (None: pixel_loss's default)

    def __post_init__(self):
        if self.frames is None:
            self.frames = list(QUICK_FRAMES if self.quick else FULL_FRAMES)
        if self.sizes is None:
            self.sizes = list(QUICK_SIZES if self.quick else FULL_SIZES)
        if self.d_truncs is None:
            self.d_truncs = list(QUICK_D_TRUNCS if self.quick else FULL_D_TRUNCS)
        if self.repeats is None:
            self.repeats = 3
        if self.memory_budget_bytes is None:
            self.memory_budget_bytes = default_memory_budget(self.device)
        if self.threads is None:
            self.threads = default_threads()

    def methods(self):
        """(method, d_trunc, schedule, lean, tile, tile_grad, tile_halo) tuples, baselines first; chopgrad's run
        lean (its default), untiled and then tiled when `tile` is set.

        Full backprop comes first whatever the order of `baselines`: it is the fidelity reference of the others.
        """
        baselines = sorted(self.baselines, key=lambda b: b != "full")
        out = [(b, None, "sliding", False, None, "exact", None) for b in baselines]
        for schedule in self.schedules:
            for d in self.d_truncs:
                if d == 0 and schedule != "sliding" and "sliding" in self.schedules:
                    continue  # d_trunc=0: every schedule is the same computation
                for lean in (True, False) if self.unfused else (True,):
                    out.append(("pixel_loss", d, schedule, lean, None, "exact", None))
                    if self.tile is not None:
                        out += [("pixel_loss", d, schedule, lean, self.tile, g,
                                 self.tile_halo if g == "truncated" else None) for g in self.tile_grads]
        return out


def default_memory_budget(device: str = "cpu") -> int:
    """80% of the available RAM (CPU) or of the GPU's memory (CUDA)."""
    if str(device).startswith("cuda"):
        return int(0.8 * torch.cuda.get_device_properties(torch.device(device)).total_memory)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(0.8 * int(line.split()[1]) * 1024)
    except OSError:
        pass
    return 16 * 2**30


def default_threads() -> int:
    """CPU cores not already busy (cpu_count minus the load average), at least 1.

    Oversubscribed OpenMP threads spin-wait for each other: on a busy 2-core
    machine a 2-thread step can run 50x slower than a 1-thread one. The load is
    the largest of the 1-, 5- and 15-minute averages, so a persistent
    background load is still counted right after a brief lull (a lull makes
    the 1-minute average alone undercount it, and the time ratios noisy).
    """
    cores = os.cpu_count() or 1
    try:
        load = max(os.getloadavg())
    except OSError:
        load = 0.0
    return max(1, min(cores, int(cores - load + 0.5)))


class _threads:
    """Sets OMP_NUM_THREADS (inherited by the workers) and torch's threads in this process."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.env, self.torch_threads = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
        os.environ["OMP_NUM_THREADS"] = str(self.n)
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = self.env
        torch.set_num_threads(self.torch_threads)
        return False


def is_trained(model: str) -> bool:
    return model not in RANDOM_MODELS


def check_shapes(vae, frames, sizes) -> None:
    """Raises ValueError with a clear message for frame counts / sizes the model cannot decode to."""
    check_sizes(vae, sizes)
    check_frames(vae, frames)


def _check_same_loss(row: dict, ref_loss: float, rtol: float = 1e-3) -> None:
    """Every method computes the same loss value; a mismatch means the fidelity is not comparable
    (e.g. the model's weights changed on disk during the run), so it is flagged, not hidden."""
    loss = row.get("loss")
    if loss is None or ref_loss is None or abs(loss - ref_loss) <= rtol * max(abs(ref_loss), 1e-12):
        return
    row["detail"] = (row["detail"] + "; " if row["detail"] else "") + \
        f"loss {loss:.6g} differs from full backprop's {ref_loss:.6g}: fidelity not comparable"
    row["cosine"] = row["rel_error"] = None
    print(f"warning: {row['label']} at {row['frames']} frames: {row['detail']}", file=sys.stderr)


def run_bench(settings: BenchSettings, *, progress: bool = True, log=None, timed=None) -> list[dict]:
    """Runs every (size, frames, method) configuration; returns one row dict per configuration.

    `log(row)` is called as each configuration finishes, with its row (memory and fidelity; no times yet).
    The times of a clip and size are measured side by side once all its configurations have run; they are
    filled into those rows (the same dicts), then `timed(rows)` is called with them.
    """
    from tqdm import tqdm

    vae = load_model(settings.model, device="cpu")
    check_shapes(vae, settings.frames, settings.sizes)
    stride = spatial_factor(vae)
    # pixel_loss's default halo (one spatial stride), named in the labels
    methods = [m[:6] + ((stride if m[6] is None else m[6]) if m[5] == "truncated" and m[4] else m[6],)
               for m in settings.methods()]
    total = len(settings.sizes) * len(settings.frames) * len(methods)
    rows: list[dict] = []
    bar = tqdm(total=total, file=sys.stderr, disable=not progress, unit="run", dynamic_ncols=True)
    try:
        with _threads(settings.threads), tempfile.TemporaryDirectory(prefix="chopgrad_bench_") as tmp:
            for size in settings.sizes:
                for frames in settings.frames:
                    latents, target = make_inputs(vae, frames, size, size, seed=settings.seed + frames,
                                                  encode=is_trained(settings.model))
                    inputs = os.path.join(tmp, f"inputs_{size}_{frames}.pt")
                    torch.save({"latents": latents, "target": target}, inputs)
                    workload = []
                    ref_grad = ref_loss = None
                    for i, (method, d, schedule, lean, tile, tile_grad, tile_halo) in enumerate(methods):
                        label = method_label(method, d, schedule, lean, tile, tile_grad, tile_halo)
                        bar.set_description(f"{size}x{size} {frames:>3d}f {label}")
                        grad_path = os.path.join(tmp, f"grad_{size}_{frames}_{i}.pt")
                        config = dict(model=settings.model, device=settings.device, dtype=settings.dtype,
                                      inputs=inputs, method=method, d_trunc=d, schedule=schedule, lean=lean,
                                      tile=tile, tile_grad=tile_grad, tile_halo=tile_halo, repeats=0, warmup=settings.warmup, save_grad=grad_path)
                        t0 = time.monotonic()
                        m = run_isolated(config, memory_budget_bytes=settings.memory_budget_bytes,
                                         timeout_s=settings.timeout_s)
                        row = dict(size=size, frames=frames, method=method, d_trunc=d, schedule=schedule,
                                   lean=lean, tile=tile, tile_grad=tile_grad if tile else None, tile_halo=tile_halo,
                                   label=label, status=m.status, detail=m.detail, wall_s=time.monotonic() - t0,
                                   peak_bytes=None, time_s=None, frames_per_s=None, cosine=None, rel_error=None)
                        if m.ok:
                            row.update(peak_bytes=m.result.get("peak_bytes"), loss=m.result.get("loss"),
                                       memory_step_s=m.result.get("memory_step_s"),
                                       device_name=m.result.get("device_name"))
                            if os.path.exists(grad_path):
                                grad = torch.load(grad_path)
                                os.remove(grad_path)
                                if method == "full":
                                    ref_grad, ref_loss = grad, row["loss"]
                                if ref_grad is not None:
                                    row["cosine"], row["rel_error"] = gradient_fidelity(grad, ref_grad)
                                    _check_same_loss(row, ref_loss)
                        workload.append(row)
                        rows.append(row)
                        bar.update(1)
                        if log is not None:
                            log(row)
                    bar.set_description(f"{size}x{size} {frames:>3d}f timing side by side")
                    time_side_by_side(workload, settings, inputs)
                    if timed is not None:
                        timed(workload)
    finally:
        bar.close()
    return rows


def time_side_by_side(workload: list[dict], settings: BenchSettings, inputs: str) -> None:
    """Fills the time columns of one workload's rows from one interleaved timing process.

    Only methods whose memory run succeeded are timed (one that ran out of memory alone would again).
    A failed timing run leaves the times empty and says why in each row's detail.
    """
    rows = [r for r in workload if r["status"] == "ok"]
    if not rows or settings.repeats < 1:
        return
    config = dict(model=settings.model, device=settings.device, dtype=settings.dtype, inputs=inputs,
                  methods=[[r["method"], r["d_trunc"], r["schedule"], r["lean"], r["tile"], r["tile_grad"] or "exact",
                            r["tile_halo"]] for r in rows],
                  rounds=settings.repeats, settle_rounds=1 + settings.warmup)
    m = run_isolated(config, memory_budget_bytes=settings.memory_budget_bytes,
                     timeout_s=settings.timeout_s * len(rows), module="chopgrad.tools.bench.timing",
                     rss_follows_live_memory=False)
    if not m.ok:
        for r in rows:
            r["detail"] = (r["detail"] + "; " if r["detail"] else "") + f"timing run {m.status}: {m.detail}"
        return
    for r, timed in zip(rows, m.result["results"]):
        r.update(timed)


# ----------------------------------------------------------------------------- reporting

def _mib(b):
    return None if b is None else b / 2**20


def _cell(row, key, fmt):
    if row["status"] != "ok":
        return "OOM" if row["status"] == "oom" else row["status"]
    v = row.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return fmt.format(v)


def format_table(rows: list[dict]) -> str:
    """Markdown table: one line per configuration."""
    lines = ["| size | frames | method | peak MiB | vs full | time/step s | vs full | frames/s | cosine | rel. error |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    full = {(r["size"], r["frames"]): r for r in rows if r["method"] == "full" and r["status"] == "ok"}
    for r in rows:
        ref = full.get((r["size"], r["frames"]))
        mem_ratio = time_ratio = "n/a"
        if r["status"] == "ok" and ref is not None:
            if ref["peak_bytes"]:
                mem_ratio = f"{r['peak_bytes'] / ref['peak_bytes']:.2f}x"
            if ref["time_s"]:
                time_ratio = f"{r['time_s'] / ref['time_s']:.2f}x"
        elif r["status"] != "ok":
            mem_ratio = time_ratio = "-"
        peak = "OOM" if r["status"] == "oom" else _cell(dict(r, peak_bytes=_mib(r["peak_bytes"])), "peak_bytes", "{:.1f}")
        lines.append(f"| {r['size']}x{r['size']} | {r['frames']} | {r['label']} | {peak} | {mem_ratio} | "
                     f"{_cell(r, 'time_s', '{:.3f}')} | {time_ratio} | {_cell(r, 'frames_per_s', '{:.1f}')} | "
                     f"{_cell(r, 'cosine', '{:.5f}')} | {_cell(r, 'rel_error', '{:.2e}')} |")
    return "\n".join(lines)


def format_summary(rows: list[dict]) -> str:
    """Each method on the largest size and longest clip, against full backprop when it ran there."""
    if not rows:
        return ""
    size = max(r["size"] for r in rows)
    frames = max(r["frames"] for r in rows if r["size"] == size)
    measured = [r for r in rows if (r["size"], r["frames"]) == (size, frames)]
    full = next((r for r in measured if r["method"] == "full" and r["status"] == "ok"), None)
    lines = [f"at {size}x{size}, {frames} frames" + (" (ratios against full backprop):" if full else ":")]
    for r in measured:
        if r is full:
            continue
        if r["status"] != "ok":
            lines.append(f"  {r['label']}: {'OOM' if r['status'] == 'oom' else r['status']}")
            continue
        parts = [f"peak {_mib(r['peak_bytes']):.1f} MiB", f"{r['time_s']:.3f} s/step"]
        if full is not None and full["peak_bytes"] and full["time_s"]:
            parts = [f"{r['peak_bytes'] / full['peak_bytes']:.2f}x peak memory",
                     f"{r['time_s'] / full['time_s']:.2f}x time"]
        if r.get("cosine") is not None:
            parts.append(f"latent-gradient cosine {r['cosine']:.4f}")
        lines.append(f"  {r['label']}: {', '.join(parts)}")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(settings: BenchSettings) -> dict:
    if settings.device.startswith("cuda") and torch.cuda.is_available():
        dev = torch.cuda.get_device_name(torch.device(settings.device))
    else:
        dev = f"{_cpu_name()}, {os.cpu_count()} CPU cores"
    return {"device": dev, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "threads_per_worker": settings.threads, "model": settings.model, "dtype": settings.dtype,
            "memory_budget_gib": round(settings.memory_budget_bytes / 2**30, 3),
            "peak_memory": "max_memory_allocated" if settings.device.startswith("cuda")
            else "peak RSS above the pre-step baseline, after a 3-latent-frame warm-up step"}


def _write_atomically(path: str, text: str) -> None:
    # The results are rewritten after every configuration: a reader (or a run
    # stopped mid-write) must never see half a file.
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


#: every file `write_outputs` may write (memory_vs_size.png: with more than one size)
OUTPUT_FILES = ("results.json", "results.md", "memory_vs_frames.png", "time_vs_frames.png", "fidelity_vs_dtrunc.png",
                "memory_vs_size.png")


def remove_outputs(out_dir: str) -> list[str]:
    """Removes the files an earlier bench wrote into `out_dir` (OUTPUT_FILES, nothing else), so that none of
    them is left beside new results (a plot of sizes no longer measured); returns the names removed."""
    removed = []
    for name in OUTPUT_FILES:
        path = os.path.join(out_dir, name)
        if os.path.isfile(path) or os.path.islink(path):
            os.remove(path)
            removed.append(name)
    return removed


def write_outputs(rows: list[dict], settings: BenchSettings, out_dir: str, *, wall_s: Optional[float] = None,
                  plots: bool = True) -> dict:
    """Writes results.json, results.md and the PNG plots; returns {name: path}."""
    os.makedirs(out_dir, exist_ok=True)
    meta = machine_description(settings)
    if wall_s is not None:
        meta["wall_s"] = round(wall_s, 1)
    paths = {"json": os.path.join(out_dir, "results.json"), "md": os.path.join(out_dir, "results.md")}
    table = format_table(rows)
    desc = ", ".join(f"{k}: {v}" for k, v in meta.items())
    _write_atomically(paths["json"], json.dumps({"settings": asdict(settings), "machine": meta, "rows": rows},
                                                indent=1, default=str))
    _write_atomically(paths["md"], f"# chopgrad bench\n\n{desc}\n\n{table}\n")
    if plots:
        paths.update(plot_results(rows, out_dir))
    return paths


def plot_results(rows: list[dict], out_dir: str) -> dict:
    """memory_vs_frames.png, time_vs_frames.png, fidelity_vs_dtrunc.png (OOM marked with x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["size"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))  # every size's plot colours a method alike
    paths = {}
    for key, fname, ylabel, scale in (("peak_bytes", "memory_vs_frames.png", "peak memory (MiB)", 2**-20),
                                      ("time_s", "time_vs_frames.png", "time per step (s)", 1.0)):
        fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.2), squeeze=False)
        for ax, size in zip(axes[0], sizes):
            plot_against_frames(ax, [r for r in rows if r["size"] == size], key, scale, ylabel, labels)
            ax.set_title(f"{size}x{size} pixels")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        paths[fname] = os.path.join(out_dir, fname)
        fig.savefig(paths[fname], dpi=110)
        plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for size in sizes:
        for schedule in ("sliding", "chunked"):
            cand = [r for r in rows if r["size"] == size and r["method"] == "pixel_loss" and r["cosine"] is not None
                    and (r["schedule"] == schedule or r["d_trunc"] == 0) and r.get("tile") is None]
            for frames in sorted({r["frames"] for r in cand}):
                pts = sorted((r["d_trunc"], r["cosine"], r["rel_error"]) for r in cand if r["frames"] == frames)
                name = f"{schedule}, {size}x{size}, {frames} frames"
                style = "-" if schedule == "sliding" else "--"
                axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=name)
                axes[1].plot([p[0] for p in pts], [p[2] for p in pts], style, marker="o", label=name)
    axes[0].set_ylabel("cosine similarity to full backprop")
    axes[1].set_ylabel("relative error vs full backprop")
    for ax in axes:
        ax.set_xlabel("d_trunc")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    paths["fidelity_vs_dtrunc.png"] = os.path.join(out_dir, "fidelity_vs_dtrunc.png")
    fig.savefig(paths["fidelity_vs_dtrunc.png"], dpi=110)
    plt.close(fig)
    if len(sizes) > 1:
        paths.update(_plot_against_size(rows, out_dir, plt))
    return paths


def plot_against_frames(ax, rows: list[dict], key: str, scale: float, ylabel: str,
                        labels: Optional[list] = None) -> None:
    """One line per method label (`labels`, in colour order; default: the rows' labels): `row[key] * scale`
    against the frame count; a configuration that did not run ("status" other than "ok") is an x above the
    lines, named by its status (OOM, skipped, ...)."""
    top = max([r[key] * scale for r in rows if r["status"] == "ok" and r.get(key) is not None] or [1.0])
    for label in labels if labels is not None else dict.fromkeys(r["label"] for r in rows):
        pts = [r for r in rows if r["label"] == label]
        ok = [(r["frames"], r[key] * scale) for r in pts if r["status"] == "ok" and r.get(key) is not None]
        bad = [r for r in pts if r["status"] != "ok"]
        line, = ax.plot([p[0] for p in ok], [p[1] for p in ok], marker="o", label=label)
        if bad:
            ax.scatter([r["frames"] for r in bad], [top * 1.05] * len(bad), marker="x", color=line.get_color(),
                       s=60)
            for r in bad:
                ax.annotate("OOM" if r["status"] == "oom" else r["status"], (r["frames"], top * 1.05), fontsize=7,
                            color=line.get_color(), textcoords="offset points", xytext=(4, 2))
    ax.set_xlabel("frames")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _plot_against_size(rows: list[dict], out_dir: str, plt) -> dict:
    """memory_vs_size.png: peak memory and time per step against resolution, at the longest clip measured."""
    frames = max(r["frames"] for r in rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in dict.fromkeys(r["label"] for r in rows):
        pts = sorted((r["size"], r["peak_bytes"] / 2**20, r["time_s"]) for r in rows
                     if r["label"] == label and r["frames"] == frames and r["status"] == "ok")
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        timed = [p for p in pts if p[2] is not None]
        axes[1].plot([p[0] for p in timed], [p[2] for p in timed], marker="o", label=label)
    for ax, ylabel in zip(axes, ("peak memory (MiB)", "time per step (s)")):
        ax.set_xlabel(f"frame size (pixels, square), {frames} frames")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "memory_vs_size.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"memory_vs_size.png": path}
