"""Evaluation on held-out clips and what a run writes: metrics.json, metrics.csv, curves.png, samples."""
from __future__ import annotations

import csv
import json
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from chopgrad.api import decode
from chopgrad.data.tasks import Task
from chopgrad.data.video_io import save_comparison_grid, write_video

from ..metrics import psnr, ssim, temporal_error
from .step import Batch, encode, predicted_latents

METRICS = ("psnr", "ssim", "temporal_error")


@dataclass
class HeldOutClip:
    condition: torch.Tensor  # (3, F, H, W) on the CPU
    output: torch.Tensor
    target: torch.Tensor


def quality(pred: torch.Tensor, target: torch.Tensor) -> dict:
    return {"psnr": psnr(pred, target), "ssim": ssim(pred, target), "temporal_error": temporal_error(pred, target)}


def _mean(rows: list[dict]) -> dict:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


@torch.no_grad()
def evaluate(model, vae, task: Task, batches: list[Batch], autocast=nullcontext,
             model_name: str = "the model") -> tuple[dict, list[HeldOutClip]]:
    """Mean PSNR, SSIM and temporal error of the model's decoded outputs over the held-out batches."""
    was_training = model.training
    model.eval()
    rows, clips = [], []
    try:
        for batch in batches:
            with autocast():
                latents, _ = predicted_latents(model, task, vae, batch, model_name)
                video = decode(vae, latents)
            output, target = video.float().cpu(), batch.target.float().cpu()
            for j in range(output.shape[0]):
                rows.append(quality(output[j], target[j]))
                clips.append(HeldOutClip(batch.condition[j].float().cpu(), output[j], target[j]))
    finally:
        model.train(was_training)
    return _mean(rows), clips


@torch.no_grad()
def reconstruction_quality(vae, batches: list[Batch]) -> dict:
    """Quality of decode(encode(target)): the ceiling any latent-space model can reach through this VAE."""
    rows = []
    for batch in batches:
        video = decode(vae, encode(vae, batch.target)).float().cpu()
        rows += [quality(video[j], batch.target[j].float().cpu()) for j in range(video.shape[0])]
    return _mean(rows)


def write_samples(folder: str, clips: list[HeldOutClip], count: int) -> list[str]:
    """A comparison grid PNG and a side-by-side mp4 (condition | output | target) of the first `count` clips."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for j, clip in enumerate(clips[:count]):
        rows = {"condition": clip.condition, "output": clip.output, "target": clip.target}
        paths.append(str(save_comparison_grid(os.path.join(folder, f"clip{j}_grid.png"), rows)))
        side_by_side = torch.cat([clip.condition, clip.output, clip.target], dim=-1)
        paths.append(str(write_video(os.path.join(folder, f"clip{j}.mp4"), side_by_side)))
    return paths


CSV_COLUMNS = ("step", "loss", "latent_mse", "pixel", "video", "lr", "grad_norm", "time_s", "peak_bytes") + METRICS


def write_metrics(folder: str, record: dict) -> tuple[str, str]:
    """metrics.json (the whole record) and metrics.csv (one row per step, eval columns at eval steps)."""
    os.makedirs(folder, exist_ok=True)
    json_path = os.path.join(folder, "metrics.json")
    with open(json_path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(json_path + ".tmp", json_path)
    evals = {e["step"]: e for e in record["evals"]}
    csv_path = os.path.join(folder, "metrics.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        steps = {row["step"]: row for row in record["steps"]}
        for step in sorted(set(steps) | set(evals)):
            writer.writerow({**steps.get(step, {"step": step}), **evals.get(step, {})})
    return json_path, csv_path


def plot_curves(path: str, record: dict, title: str) -> str:
    """Training loss and held-out PSNR against step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.5), dpi=100)
    FigureCanvasAgg(figure)
    loss_axis, psnr_axis = figure.subplots(1, 2)
    steps = record["steps"]
    loss_axis.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1)
    loss_axis.set(xlabel="step", ylabel="training loss", yscale="log", title="loss")
    evals = record["evals"]
    psnr_axis.plot([e["step"] for e in evals], [e["psnr"] for e in evals], marker="o", ms=3)
    ceiling = record.get("summary", {}).get("reconstruction", {}).get("psnr")
    if ceiling is not None:
        psnr_axis.axhline(ceiling, color="grey", ls="--", lw=1, label="VAE reconstruction")
        psnr_axis.legend(fontsize=8)
    psnr_axis.set(xlabel="step", ylabel="PSNR (dB)", title="held-out PSNR")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path
