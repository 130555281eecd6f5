"""The training loop of `chopgrad train`: one task, one model, one method.

A run writes into its output folder:

- ``metrics.json``: the settings, one row per step (loss and its parts, learning rate, gradient norm, time,
  peak memory), one row per evaluation (held-out PSNR, SSIM, temporal error) and a summary;
- ``metrics.csv``: the step and evaluation rows as a table;
- ``curves.png``: training loss and held-out PSNR against step;
- ``samples/``: per held-out clip shown, a comparison grid PNG and an mp4 (condition | output | target);
- ``checkpoint/``: model, optimizer, schedule, step and random state (see checkpoint.py), for ``resume``;
- ``decoder/``: with ``train_decoder``, the fine-tuned VAE as a diffusers folder (``from_pretrained`` loads it);
- ``lora/``: with ``transformer``, the LoRA adapter in diffusers' pipeline format, the extra input embedding and
  what inference needs besides (see transformer.py).

Peak memory per step is the growth above the step's start: CUDA's allocator peak, or on the CPU the
process's peak resident memory (see chopgrad.tools.bench.memory). On the CPU that growth is what the process
pays, so it reads low (even 0) where the allocator reuses memory freed earlier; `--compare` runs each method in
a fresh process with large blocks taken from mmap, where it follows live memory.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from contextlib import nullcontext
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn as nn

from chopgrad.data.tasks import get_task
from chopgrad.losses import per_frame

from ..bench.bench import default_threads
from ..bench.memory import PeakMemory
from ..bench.workloads import check_frames, check_sizes, load_model, spatial_factor
from .checkpoint import CHECKPOINT_FOLDER, committed_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import step_loader, task_datasets
from .distributed import Ranks, leave, ranks_from_environment
from .model import OneStepLatentModel, resolve_factory
from .report import evaluate, plot_curves, reconstruction_quality, write_metrics, write_samples
from .step import Batch, LossSettings, VideoCritic, extra_channels, make_video_critic, training_loss

def warmup_cosine(warmup: int, steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear from 1/(warmup+1) to 1 over `warmup` steps, then cosine to 0 at `steps`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_model(config: TrainConfig, z_dim: int, extra: int, vae=None) -> nn.Module:
    """The default OneStepLatentModel, `config.generator`'s module (called with in/out channel counts), or the
    `config.transformer` restorer (which takes the latent statistics from `vae`)."""
    if config.transformer is not None:
        from .transformer import latent_statistics, load_restorer

        mean, std = latent_statistics(vae, z_dim)
        return load_restorer(config.transformer, latent_channels=z_dim, extra_channels=extra,
                             timestep=config.timestep, prompt_embeds=config.prompt_embeds,
                             lora_rank=config.lora_rank, lora_alpha=config.lora_scale_alpha,
                             lora_targets=config.lora_targets, latents_mean=mean, latents_std=std,
                             base_dtype=torch.bfloat16 if config.dtype == "bf16" else torch.float32,
                             gradient_checkpointing=config.gradient_checkpointing)
    if config.generator is None:
        return OneStepLatentModel(z_dim, extra, width=config.width, blocks=config.blocks)
    factory = resolve_factory(config.generator)
    try:
        model = factory(in_channels=z_dim + extra, out_channels=z_dim)
    except TypeError as exc:
        raise ValueError(f"--generator {config.generator}: calling it as function(in_channels={z_dim + extra}, "
                         f"out_channels={z_dim}) failed: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"--generator {config.generator}: the factory must return an nn.Module, "
                         f"got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"--generator {config.generator}: the module has no trainable parameters")
    return model


def perceptual_term(spec: str, device) -> Callable:
    """`spec`'s factory (no arguments) -> an image loss (N, 3, H, W) x 2 -> scalar, frozen, per frame."""
    factory = resolve_factory(spec, "--perceptual")
    try:
        fn = factory()
    except Exception as exc:  # the user's code: one line naming the option, not a traceback
        raise ValueError(f"--perceptual {spec}: calling it as function() failed: {type(exc).__name__}: {exc}") from None
    if isinstance(fn, nn.Module):
        fn = fn.to(device).eval().requires_grad_(False)
    if not callable(fn):
        raise ValueError(f"--perceptual {spec}: the factory must return a callable image loss, got {type(fn).__name__}")
    return per_frame(fn)


def pixel_loss_spec(config: TrainConfig, device):
    spec = dict(config.pixel_loss) if isinstance(config.pixel_loss, dict) else {config.pixel_loss: 1.0}
    if config.perceptual:
        spec[perceptual_term(config.perceptual, device)] = config.perceptual_weight
    return spec


def model_name(config: TrainConfig) -> str:
    if config.transformer is not None:
        return f"the restorer of --transformer {config.transformer}"
    if config.generator is not None:
        return f"the model of --generator {config.generator}"
    return "the built-in model"


def decoder_modules(vae) -> dict[str, nn.Module]:
    """The parts of the VAE that decode latents (what --train-decoder fine-tunes)."""
    parts = {"decoder": vae.decoder}
    if getattr(vae, "post_quant_conv", None) is not None:
        parts["post_quant_conv"] = vae.post_quant_conv
    return parts


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


class Run:
    """Everything a training run holds; `Run(config).train()` runs it.

    video_critic: `config.video_loss`'s critic when the caller already built it (make_video_critic with the
    run's seed) while checking the arguments; None builds it here.
    """

    def __init__(self, config: TrainConfig, *, log: Optional[Callable[[str], None]] = None,
                 video_critic: Optional[VideoCritic] = None):
        self.config = config
        self.log = log or (lambda message: None)
        self.device = resolve_device(config.device)
        self.task = get_task(config.task)
        if config.generator:
            resolve_factory(config.generator)  # fails before the model is loaded
        if config.perceptual:
            resolve_factory(config.perceptual, "--perceptual")
        transformer_config = None
        if config.transformer is not None:
            from .transformer import check_transformer_inputs

            transformer_config = check_transformer_inputs(config.transformer, config.prompt_embeds)
        if config.video_loss is None:
            if video_critic is not None:
                raise ValueError("video_critic is given but config.video_loss is None: the config must name it")
        elif video_critic is None:
            video_critic = make_video_critic(config.video_loss, config.seed)
        self.video_critic = video_critic.to(self.device) if video_critic is not None else None
        torch.set_num_threads(config.threads or default_threads())
        for side in config.size:
            if side % self.task.spatial_multiple:
                raise ValueError(f"size: task {config.task!r} needs sides that are multiples of "
                                 f"{self.task.spatial_multiple}, got {config.size}")
        self.ranks = ranks_from_environment(self.device)
        # the data first: a --data folder with no usable file fails before the model loads
        train_clips = config.steps * config.batch * self.ranks.world
        self.train_pairs, self.eval_pairs = task_datasets(
            self.task, data=config.data, frames=config.frames, height=config.size[0], width=config.size[1],
            frame_stride=config.frame_stride, seed=config.seed, train_clips=train_clips,
            eval_clips=config.eval_clips, hole_weight=config.hole_weight)
        self.vae = load_model(config.model).to(self.device).requires_grad_(False)
        check_frames(self.vae, [config.frames])
        check_sizes(self.vae, list(config.size))
        torch.manual_seed(config.seed)
        z_dim = self.vae.config.z_dim if hasattr(self.vae.config, "z_dim") else self.vae.config.latent_channels
        if transformer_config is not None:
            from .transformer import check_transformer_fits

            check_transformer_fits(transformer_config, latent_channels=z_dim, path=config.transformer,
                                   latent_size=[side // spatial_factor(self.vae) for side in config.size])
        self.model = build_model(config, z_dim, extra_channels(self.task, z_dim), self.vae).to(self.device).train()
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": config.lr}]
        self.saved = nn.ModuleDict({"model": self.model})
        # a pretrained transformer is reloaded from its folder: checkpoints keep what the run trains
        self.checkpoint_trainable_only = config.transformer is not None
        if config.train_decoder:
            for name, module in decoder_modules(self.vae).items():
                module.requires_grad_(True)
                self.saved[name] = module
            groups.append({"params": [p for m in decoder_modules(self.vae).values() for p in m.parameters()],
                           "lr": config.decoder_lr})
        self.trainable = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           warmup_cosine(config.warmup_steps, config.steps))
        self.losses = LossSettings(latent_weight=config.latent_weight, pixel_loss=pixel_loss_spec(config, self.device),
                                   pixel_weight=config.pixel_weight, d_trunc=config.d_trunc,
                                   schedule=config.schedule, method=config.method, video_loss=self.video_critic,
                                   video_weight=config.video_loss_weight, model_name=model_name(config))
        self.eval_batches = [self._on_device(Batch.of([self.eval_pairs[j]])) for j in range(len(self.eval_pairs))]
        self.autocast = (partial(torch.autocast, self.device.type, dtype=torch.bfloat16)
                         if config.dtype == "bf16" else nullcontext)
        self.record = {"config": config.to_dict(), "device": self._device_name(), "world_size": self.ranks.world,
                       "steps": [], "evals": [], "summary": {}}
        self.start = 0

    def _device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"cpu ({torch.get_num_threads()} threads)"

    def _on_device(self, batch: Batch) -> Batch:
        move = lambda t: None if t is None else t.to(self.device)
        return Batch(move(batch.condition), move(batch.target), move(batch.extra), move(batch.loss_weights))

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoint_folder(self) -> str:
        return os.path.join(self.config.out, CHECKPOINT_FOLDER)

    def restore(self) -> None:
        if committed_checkpoint(self.checkpoint_folder) is None:
            raise ValueError(f"--resume: no checkpoint in {self.checkpoint_folder!r}")
        state = load_checkpoint(self.checkpoint_folder, model=self.saved, optimizer=self.optimizer,
                                scheduler=self.scheduler, trainable_only=self.checkpoint_trainable_only)
        refusal = self.config.resume_refusal(TrainConfig.from_dict(state["extra"]["config"]), self.checkpoint_folder)
        if refusal:
            raise ValueError(refusal)
        self.start = state["step"]
        self.record["steps"] = state["extra"]["steps"]
        self.record["evals"] = state["extra"]["evals"]
        self.record["summary"] = state["extra"].get("summary", {})

    def save(self, step: int) -> None:
        if self.ranks.is_main:
            extra = {"config": self.config.to_dict(), "steps": self.record["steps"], "evals": self.record["evals"],
                     "summary": self.record["summary"]}
            save_checkpoint(self.checkpoint_folder, model=self.saved, optimizer=self.optimizer, step=step,
                            scheduler=self.scheduler, extra=extra, trainable_only=self.checkpoint_trainable_only)
        self.ranks.barrier()

    # ---------------------------------------------------------------- steps
    def step(self, batch: Batch) -> dict:
        """One optimizer step on this rank's batch; returns its row (loss averaged over the ranks)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        started = time.perf_counter()
        with PeakMemory(self.device) as memory:
            with self.autocast():
                loss, parts = training_loss(self.model, self.vae, self.task, batch, self.losses)
            if not torch.isfinite(loss):
                raise FloatingPointError(self._non_finite_loss_message(loss, parts))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.ranks.average_gradients(self.trainable)
            max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm))
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.scheduler.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - started
        row = {"loss": self.ranks.mean(float(loss.detach()), self.device), "lr": lr, "grad_norm": grad_norm,
               "time_s": self.ranks.max(elapsed, self.device),
               "peak_bytes": int(self.ranks.max(memory.peak_bytes, self.device))}
        for name, value in parts.items():
            row[name] = self.ranks.mean(value, self.device)
        return row

    def _non_finite_loss_message(self, loss: torch.Tensor, parts: dict) -> str:
        step = self.scheduler.last_epoch + 1  # steps count from 1, as in the log
        bad = [name for name, value in parts.items() if not math.isfinite(value)]
        message = f"the training loss is {loss.detach().item()} at step {step}"
        if bad:
            message += f" (not finite: {', '.join(bad)})"
        if self.scheduler.last_epoch == self.start:
            return (message + "; the weights are as loaded or initialised, so it comes from the data or a loss term "
                    "(--perceptual, --video-loss), not from the learning rate")
        advice = ["lower --lr", "raise --warmup"] + (["use --dtype fp32"] if self.config.dtype == "bf16" else [])
        return message + "; " + ", ".join(advice[:-1]) + " or " + advice[-1]

    def evaluate(self, step: int):
        metrics, clips = evaluate(self.model, self.vae, self.task, self.eval_batches, self.autocast,
                                  self.losses.model_name)
        self.record["evals"].append({"step": step, **metrics})
        return metrics, clips

    # ---------------------------------------------------------------- the run
    def train(self) -> dict:
        config = self.config
        try:
            if config.resume:
                self.restore()
            if self.ranks.is_main and "reconstruction" not in self.record["summary"]:
                self.record["summary"]["reconstruction"] = reconstruction_quality(self.vae, self.eval_batches)
            clips = []
            if self.start == 0 and self.ranks.is_main:
                metrics, clips = self.evaluate(0)
            loader = step_loader(self.train_pairs, self.start, config.steps, config.batch, rank=self.ranks.rank,
                                 world=self.ranks.world, workers=config.workers)
            bar = self._progress_bar()
            began = time.perf_counter()
            for step, batch in zip(range(self.start + 1, config.steps + 1), loader):
                row = {"step": step, **self.step(self._on_device(batch))}
                self.record["steps"].append(row)
                postfix = {"loss": f"{row['loss']:.4g}", "peak": f"{row['peak_bytes'] / 2**20:.0f}MiB"}
                if step % config.eval_every == 0 or step == config.steps:
                    if self.ranks.is_main:
                        metrics, clips = self.evaluate(step)
                        self.log(f"step {step}: loss {row['loss']:.5g}, held-out PSNR {metrics['psnr']:.2f} dB")
                    self.ranks.barrier()
                if self.record["evals"]:
                    postfix["psnr"] = f"{self.record['evals'][-1]['psnr']:.2f}"
                if bar is not None:
                    bar.set_postfix(postfix, refresh=False)
                    bar.update(1)
                every = config.checkpoint_every or config.eval_every
                if step % every == 0 or step == config.steps:
                    self.record["summary"].update(self._summary(time.perf_counter() - began))
                    self.save(step)
            if bar is not None:
                bar.close()
            self.record["summary"].update(self._summary(time.perf_counter() - began))
            if self.ranks.is_main:
                if not clips:  # resumed after the last evaluation: the samples still show the final model
                    _, clips = evaluate(self.model, self.vae, self.task, self.eval_batches, self.autocast,
                                        self.losses.model_name)
                self._write_outputs(clips)
            self.ranks.barrier()
            return self.record
        finally:
            leave(self.ranks)

    def _progress_bar(self):
        if not (self.config.progress and self.ranks.is_main):
            return None
        from tqdm import tqdm

        return tqdm(total=self.config.steps, initial=self.start, desc=f"train {self.config.task}", unit="step",
                    dynamic_ncols=True)

    def _summary(self, wall_s: float) -> dict:
        steps = self.record["steps"]
        summary = {"steps_done": len(steps), "wall_s_this_session": wall_s}
        if steps:
            times = [r["time_s"] for r in steps[1:]] or [steps[0]["time_s"]]  # the first step pays one-time costs
            summary.update(time_per_step_s=statistics.median(times),
                           peak_step_bytes=max(r["peak_bytes"] for r in steps))
        if self.record["evals"]:
            summary["final_eval"] = dict(self.record["evals"][-1])
        if self.device.type == "cuda":
            summary["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return summary

    def _write_outputs(self, clips) -> None:
        out = self.config.out
        write_metrics(out, self.record)
        c = self.config
        method = c.method if c.method != "chopgrad" else f"chopgrad {c.schedule} d_trunc={c.d_trunc}"
        plot_curves(os.path.join(out, "curves.png"), self.record,
                    f"{c.task}, {method}, {c.frames} frames {c.size[0]}x{c.size[1]}")
        if clips:
            write_samples(os.path.join(out, "samples"), clips, c.samples)
        if c.train_decoder:
            self.vae.save_pretrained(os.path.join(out, "decoder"))
        if c.transformer is not None:
            from .transformer import LORA_FOLDER, save_lora

            save_lora(self.model, os.path.join(out, LORA_FOLDER), base=c.transformer)


def train(config: TrainConfig, *, log: Optional[Callable[[str], None]] = None) -> dict:
    """Runs `config` and returns its record (what metrics.json holds)."""
    return Run(config, log=log).train()
