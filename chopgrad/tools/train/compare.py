"""`chopgrad train --compare`: the same run with each way of computing the pixel term, side by side.

Each method trains in its own process (a fresh process, so its peak memory is its own) with the same task,
data, model, seed and steps, into ``OUT/<method>/``. The comparison is written to ``compare.json``,
``compare.md`` (one table) and ``compare.png`` (held-out PSNR against step for every method).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace

from .config import TrainConfig

#: (folder name, label, changes to the run's settings)
COMPARED_METHODS = (
    ("latent", "latent loss only", {"method": "latent"}),
    ("full", "full backprop", {"method": "full", "d_trunc": None}),
    ("sliding_d0", "chopgrad sliding d=0", {"method": "chopgrad", "schedule": "sliding", "d_trunc": 0}),
    ("sliding_d1", "chopgrad sliding d=1", {"method": "chopgrad", "schedule": "sliding", "d_trunc": 1}),
    ("chunked_d1", "chopgrad chunked d=1", {"method": "chopgrad", "schedule": "chunked", "d_trunc": 1}),
)
REFERENCE = "full"
#: the compared method whose run uses every setting: its run is built once before the first run starts
PREFLIGHT_METHOD = "sliding_d1"


def method_configs(config: TrainConfig) -> list[tuple[str, str, TrainConfig]]:
    """(folder name, label, settings) of each compared method; ValueError names a setting no method can run with.

    The latent-only run leaves the decoder alone even with train_decoder: its loss gives the decoder no gradient.
    It also trains without video_loss, which scores a decoded clip the latent-only loss never makes; every other
    method adds the video loss.
    """
    runs = []
    for name, label, changes in COMPARED_METHODS:
        if changes["method"] == "latent":
            changes = {**changes, "train_decoder": False, "video_loss": None, "video_loss_weight": 1.0}
        try:
            runs.append((name, label, replace(config, out=os.path.join(config.out, name), resume=False,
                                              progress=False, **changes)))
        except ValueError as exc:
            raise ValueError(f"--compare: the '{label}' run cannot be made: {exc}") from None
    return runs


def preflight(config: TrainConfig) -> None:
    """Builds the run of the method that uses every setting (data, model, factories, critic), then frees it.

    A setting no run can train with is then one ValueError before the first run, not five failed runs.
    """
    import gc

    from .trainer import Run

    settings = next(run_settings for name, _, run_settings in method_configs(config) if name == PREFLIGHT_METHOD)
    run = Run(settings)
    del run
    gc.collect()


def run_in_process(config: TrainConfig, timeout_s: float | None = None) -> dict:
    """Trains `config` in a fresh Python process; returns its record, or {"status": ..., "error": ...}."""
    os.makedirs(config.out, exist_ok=True)
    settings = os.path.join(config.out, "settings.json")
    with open(settings, "w") as f:
        json.dump(config.to_dict(), f, indent=1)
    env = dict(os.environ)
    # Large blocks come from mmap and go back to the OS when freed, so each step's peak RSS is its own.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "chopgrad.tools.train.compare", settings], env=env,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "wall_s": time.monotonic() - started}
    wall = time.monotonic() - started
    if done.returncode != 0:
        status = "OOM" if done.returncode in (-9, 137) or "out of memory" in done.stderr.lower() else "failed"
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        return {"status": status, "error": tail, "wall_s": wall}
    with open(os.path.join(config.out, "metrics.json")) as f:
        record = json.load(f)
    return {"status": "ok", "wall_s": wall, **record}


def compare(config: TrainConfig, *, log=print) -> dict:
    """Runs every method of COMPARED_METHODS on `config`'s task; writes and returns the comparison."""
    rows = []
    for name, label, method_config in method_configs(config):
        log(f"{config.task}: training '{label}' ({method_config.steps} steps) ...")
        result = run_in_process(method_config)
        row = {"method": name, "label": label, "status": result["status"], "wall_s": result["wall_s"]}
        if result["status"] == "ok":
            summary = result["summary"]
            row.update({k: summary["final_eval"][k] for k in ("psnr", "ssim", "temporal_error")},
                       peak_step_bytes=summary["peak_step_bytes"], time_per_step_s=summary["time_per_step_s"],
                       evals=[(e["step"], e["psnr"]) for e in result["evals"]],
                       reconstruction_psnr=summary["reconstruction"]["psnr"])
        else:
            row["error"] = result.get("error", "")
        rows.append(row)
        log(f"  {format_row(row)}")
    comparison = {"config": config.to_dict(), "rows": rows}
    write_comparison(config.out, comparison)
    return comparison


def format_row(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['label']}: {row['status']}"
    return (f"{row['label']}: PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.4f}, temporal {row['temporal_error']:.4f}, "
            f"peak {row['peak_step_bytes'] / 2**20:.1f} MiB, {row['time_per_step_s']:.3f} s/step")


def format_table(comparison: dict) -> str:
    rows = comparison["rows"]
    reference = next((r for r in rows if r["method"] == REFERENCE and r["status"] == "ok"), None)
    lines = ["| method | final PSNR (dB) | SSIM | temporal error | peak memory per step (MiB) | x full | "
             "time per step (s) | x full | wall (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {r['status']} | | | | | | | {r['wall_s']:.0f} |")
            continue
        mem_ratio = f"{r['peak_step_bytes'] / reference['peak_step_bytes']:.2f}" if reference else "-"
        time_ratio = f"{r['time_per_step_s'] / reference['time_per_step_s']:.2f}" if reference else "-"
        lines.append(f"| {r['label']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['temporal_error']:.4f} | "
                     f"{r['peak_step_bytes'] / 2**20:.1f} | {mem_ratio} | {r['time_per_step_s']:.3f} | {time_ratio} | "
                     f"{r['wall_s']:.0f} |")
    ok = [r for r in rows if r["status"] == "ok"]
    if ok:
        lines.append(f"\nVAE reconstruction of the held-out targets (decode(encode(target))): "
                     f"{ok[0]['reconstruction_psnr']:.2f} dB PSNR.")
    return "\n".join(lines)


def write_comparison(folder: str, comparison: dict) -> dict:
    os.makedirs(folder, exist_ok=True)
    paths = {"json": os.path.join(folder, "compare.json"), "md": os.path.join(folder, "compare.md"),
             "png": os.path.join(folder, "compare.png")}
    with open(paths["json"], "w") as f:
        json.dump(comparison, f, indent=1)
    c = comparison["config"]
    header = (f"# chopgrad train --compare: {c['task']}\n\n{c['steps']} steps, {c['frames']} frames "
              f"{c['size'][0]}x{c['size'][1]}, batch {c['batch']}, model {c['model']}, seed {c['seed']}, "
              f"data {c['data'] or 'synthetic'}\n\n")
    with open(paths["md"], "w") as f:
        f.write(header + format_table(comparison) + "\n")
    plot_comparison(paths["png"], comparison)
    return paths


def plot_comparison(path: str, comparison: dict) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 4), dpi=100)
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    for row in comparison["rows"]:
        if row["status"] == "ok":
            steps, values = zip(*row["evals"])
            axis.plot(steps, values, marker="o", ms=3, label=row["label"])
    ok = [r for r in comparison["rows"] if r["status"] == "ok"]
    if ok:
        axis.axhline(ok[0]["reconstruction_psnr"], color="grey", ls="--", lw=1, label="VAE reconstruction")
    c = comparison["config"]
    axis.set(xlabel="step", ylabel="held-out PSNR (dB)",
             title=f"{c['task']}: {c['frames']} frames {c['size'][0]}x{c['size'][1]}, {c['steps']} steps")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def _main(settings_path: str) -> int:
    from .trainer import train

    with open(settings_path) as f:
        config = TrainConfig.from_dict(json.load(f))
    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
