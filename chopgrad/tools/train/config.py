"""The settings of a training run, their defaults, the --quick preset, and the checks done before any work."""
from __future__ import annotations

import math
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Optional, Union

from chopgrad.data.tasks import TASKS
from chopgrad.losses import ELEMENTWISE_LOSSES, LOSS_NAMES

from .step import METHODS
from .transformer import DEFAULT_LORA_TARGETS, DEFAULT_TIMESTEP, NUM_TRAIN_TIMESTEPS

DTYPES = ("fp32", "bf16")
SCHEDULES = ("sliding", "chunked")

#: settings --quick changes (unless given explicitly): a run of well under 3 minutes on 2 CPU cores
QUICK = {"steps": 30, "frames": 9, "size": (32, 32), "eval_every": 10, "eval_clips": 2, "width": 32, "blocks": 2,
         "samples": 1}

#: settings that may differ between a run and its resumption: where it writes and how it shows progress
RESUMABLE_DIFFERENCES = ("resume", "progress", "workers", "threads", "out")

#: the smallest frame side: the held-out evaluation's SSIM window
MIN_SIDE = 11

#: the largest --seed: clip seeds derived from it (see data.clip_seed) stay within torch's 64-bit seeds
MAX_SEED = 2**32 - 1


@dataclass
class TrainConfig:
    """Everything a run depends on; `chopgrad train --help` describes each option.

    method: "chopgrad" (pixel_loss at d_trunc / schedule), "full" (the same pixel loss with plain autograd
        through the model's own decode) or "latent" (no pixel term).
    video_loss: "module:function" of a whole-clip loss (see step.make_video_critic), added as
        video_loss_weight * critic(decoded clip); needs a method that decodes (not "latent").
    dtype: "fp32", or "bf16" for bf16 autocast of the model and decoder compute (weights and optimizer state
        stay fp32).
    warmup: linear warm-up steps of the learning rate, then cosine decay to 0 at `steps`; None: 5% of steps.
    checkpoint_every: steps between checkpoints; 0: at every evaluation (and always at the end).
    transformer: a local diffusers WanTransformer3DModel folder, trained as a one-step restorer with LoRA instead
        of the default model (see transformer.py); timestep, prompt_embeds, lora_rank, lora_alpha (None: the
        rank), lora_targets and gradient_checkpointing configure it and need it.
    """

    task: str
    data: Optional[str] = None
    model: str = "default"
    generator: Optional[str] = None
    transformer: Optional[str] = None
    timestep: int = DEFAULT_TIMESTEP
    prompt_embeds: Optional[str] = None
    lora_rank: int = 16
    lora_alpha: Optional[float] = None
    lora_targets: tuple = DEFAULT_LORA_TARGETS
    gradient_checkpointing: bool = True
    perceptual: Optional[str] = None
    perceptual_weight: float = 0.1
    video_loss: Optional[str] = None
    video_loss_weight: float = 1.0
    device: str = "cpu"
    dtype: str = "fp32"
    steps: int = 300
    batch: int = 1
    frames: int = 17
    size: tuple = (64, 64)
    frame_stride: int = 1
    method: str = "chopgrad"
    d_trunc: Optional[int] = 1
    schedule: str = "sliding"
    pixel_loss: Union[str, dict] = field(default_factory=lambda: {"mse": 1.0})
    latent_weight: float = 1.0
    pixel_weight: float = 1.0
    hole_weight: float = 2.0
    lr: float = 1e-3
    decoder_lr: float = 1e-5
    weight_decay: float = 0.0
    warmup: Optional[int] = None
    grad_clip: float = 1.0
    width: int = 64
    blocks: int = 3
    train_decoder: bool = False
    eval_every: int = 50
    eval_clips: int = 4
    samples: int = 2
    checkpoint_every: int = 0
    seed: int = 0
    workers: int = 0
    threads: Optional[int] = None
    out: str = "train_out"
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        self.size = tuple(self.size) if isinstance(self.size, (list, tuple)) else (self.size, self.size)
        if isinstance(self.lora_targets, list):
            self.lora_targets = tuple(self.lora_targets)
        self.check()

    @property
    def lora_scale_alpha(self) -> float:
        """The LoRA alpha in use: lora_alpha, or the rank (a scale of 1)."""
        return float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)

    @property
    def warmup_steps(self) -> int:
        return max(0, self.steps // 20) if self.warmup is None else self.warmup

    def check(self) -> None:
        """Raises ValueError naming the setting, for anything that would fail later or be silently wrong."""
        if self.task not in TASKS:
            raise ValueError(f"task: unknown task {self.task!r}; known tasks are {', '.join(TASKS)}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("steps", "batch", "frames", "frame_stride", "width", "blocks", "eval_every", "eval_clips"):
            _check_int(name, getattr(self, name), 1)
        for name in ("samples", "checkpoint_every", "workers"):
            _check_int(name, getattr(self, name), 0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in 0 .. {MAX_SEED}, got {self.seed!r}")
        if self.threads is not None:
            _check_int("threads", self.threads, 1)
        if self.warmup is not None:
            _check_int("warmup", self.warmup, 0)
        if self.d_trunc is not None:
            _check_int("d_trunc", self.d_trunc, 0)
        if len(self.size) != 2:
            raise ValueError(f"size must be (height, width), got {self.size!r}")
        for value in self.size:
            _check_int("size", value, 1)
            if value < MIN_SIDE:
                raise ValueError(f"size: the held-out evaluation scores SSIM with an {MIN_SIDE}x{MIN_SIDE} window, so "
                                 f"each side must be at least {MIN_SIDE}, got {self.size}")
        for name in ("lr", "decoder_lr"):
            _check_number(name, getattr(self, name), strict=True)
        for name in ("weight_decay", "grad_clip", "latent_weight", "pixel_weight", "perceptual_weight"):
            _check_number(name, getattr(self, name), strict=False)
        _check_number("hole_weight", self.hole_weight, strict=True)
        if self.samples > self.eval_clips:
            raise ValueError(f"samples ({self.samples}) cannot exceed eval_clips ({self.eval_clips})")
        pixel_terms = _pixel_loss_terms(self.pixel_loss)
        self._check_video_loss()
        self._check_transformer()
        if self.latent_weight == 0 and not self.has_pixel_term and self.video_loss is None:
            raise ValueError("the loss has no term: latent_weight is 0 and there is no pixel term (method 'latent', "
                             "pixel_weight 0, or every pixel_loss and perceptual weight 0) and no video_loss")
        if self.train_decoder and not self.has_pixel_term and self.video_loss is None:
            raise ValueError("--train-decoder: the decoder gets its gradient from the pixel term and the video loss "
                             "only, and this run has neither (method 'latent', pixel_weight 0, or every pixel_loss "
                             "and perceptual weight 0, and no --video-loss); use --method chopgrad or full with a "
                             "pixel loss or --video-loss, or drop --train-decoder")
        if (self.task == "inpaint" and self.hole_weight != 1 and pixel_terms.get("ssim", 0) > 0
                and self.method != "latent" and self.pixel_weight > 0):
            elementwise = ", ".join(ELEMENTWISE_LOSSES)
            raise ValueError(f"--pixel-loss ssim: the inpaint task weights hole pixels --hole-weight "
                             f"{self.hole_weight:g} times more through a loss mask, and the ssim loss takes no mask "
                             f"(its windows straddle hole and background); use --hole-weight 1 (every pixel counts "
                             f"alike, no mask) or only elementwise pixel losses ({elementwise})")

    def _check_video_loss(self) -> None:
        if self.video_loss is None:
            if self.video_loss_weight != 1.0:
                raise ValueError(f"video_loss_weight ({self.video_loss_weight!r}) is set but video_loss is not: the "
                                 f"weight scales the video_loss term; give video_loss too, or leave the weight out")
            return
        if not isinstance(self.video_loss, str):
            raise ValueError(f"video_loss must be a 'module:function' string, got {self.video_loss!r}")
        problem = video_loss_weight_problem(self.video_loss_weight)
        if problem:
            raise ValueError(f"video_loss_weight: {problem}")
        if self.method == "latent":
            raise ValueError("--video-loss: --method latent trains on the latent loss alone and decodes no video "
                             "for the video loss to score; use --method chopgrad or full, or drop --video-loss")

    def _check_transformer(self) -> None:
        _check_int("lora_rank", self.lora_rank, 1)
        if self.lora_alpha is not None:
            _check_number("lora_alpha", self.lora_alpha, strict=True)
        if isinstance(self.timestep, bool) or not isinstance(self.timestep, int) or not (
                0 < self.timestep < NUM_TRAIN_TIMESTEPS):
            raise ValueError(f"timestep must be an integer in 1 .. {NUM_TRAIN_TIMESTEPS - 1}, got {self.timestep!r}")
        if (not isinstance(self.lora_targets, tuple) or not self.lora_targets
                or not all(isinstance(t, str) and t for t in self.lora_targets)):
            raise ValueError(f"lora_targets must be a non-empty list of module names, got {self.lora_targets!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing must be a bool, got {self.gradient_checkpointing!r}")
        if self.transformer is None:
            given = [name for name in TRANSFORMER_SETTINGS if getattr(self, name) != _DEFAULTS[name]]
            if given:
                raise ValueError(f"{', '.join(given)}: these configure the --transformer restorer; give --transformer "
                                 f"too, or leave them out")
            return
        if not isinstance(self.transformer, str) or not self.transformer:
            raise ValueError(f"transformer must be a folder path, got {self.transformer!r}")
        if self.generator is not None:
            raise ValueError("--transformer and --generator each name the model to train; give one of them")

    @property
    def has_pixel_term(self) -> bool:
        """Whether the loss has a pixel term that is not 0 by its weights."""
        if self.method == "latent" or self.pixel_weight == 0:
            return False
        weights = list(_pixel_loss_terms(self.pixel_loss).values())
        if self.perceptual:
            weights.append(self.perceptual_weight)
        return any(w > 0 for w in weights)

    def to_dict(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        return cls(**{k: (tuple(v) if k in ("size", "lora_targets") else v) for k, v in values.items()})

    def differences(self, other: "TrainConfig", ignore=RESUMABLE_DIFFERENCES) -> list[str]:
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k}: {theirs[k]!r} -> {mine[k]!r}" for k in mine if k not in ignore and mine[k] != theirs[k]
                and not (k in PATH_SETTINGS and _same_path(mine[k], theirs[k]))]

    def resume_refusal(self, saved: "TrainConfig", checkpoint: str) -> Optional[str]:
        """Why a run with these settings cannot continue the checkpoint made with `saved`, or None."""
        changed = self.differences(saved)
        if not changed:
            return None
        return (f"--resume: the checkpoint in {checkpoint!r} was made with other settings ({'; '.join(changed)}); "
                f"resume with the same settings or use another --out")


#: settings that name files or folders: the same place written another way (relative, absolute) is no change
PATH_SETTINGS = ("data", "model", "transformer", "prompt_embeds")


def _same_path(a, b) -> bool:
    if not (isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b)):
        return False
    return os.path.samefile(a, b)


#: the settings of the --transformer restorer, which need it
TRANSFORMER_SETTINGS = ("timestep", "prompt_embeds", "lora_rank", "lora_alpha", "lora_targets",
                        "gradient_checkpointing")
_DEFAULTS = {f.name: (f.default_factory() if f.default_factory is not MISSING else f.default)
             for f in fields(TrainConfig)}


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    return value


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _pixel_loss_terms(pixel_loss) -> dict:
    """{loss name: weight} of a pixel_loss setting; ValueError for an unknown name or a weight that is not finite."""
    known = ", ".join(sorted(LOSS_NAMES))
    if isinstance(pixel_loss, str):
        pixel_loss = {pixel_loss: 1.0}
    if not isinstance(pixel_loss, dict) or not pixel_loss:
        raise ValueError(f"pixel_loss must be a loss name or a non-empty {{name: weight}} dict, got {pixel_loss!r}")
    for name, weight in pixel_loss.items():
        if name not in LOSS_NAMES:
            raise ValueError(f"pixel_loss: unknown pixel loss {name!r}; known: {known}")
        _check_number(f"pixel_loss: the weight of {name!r}", weight, strict=False)
    return dict(pixel_loss)


def video_loss_weight_problem(value) -> Optional[str]:
    """Why `value` cannot weight the video loss, or None: it must be a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"expected a finite number > 0, got {value!r}"
    if value == 0:
        # the critic would be built and run every step for a term that adds nothing
        return "0 leaves the video loss out of the training loss; drop --video-loss to train without it"
    if value < 0:
        return (f"expected a number > 0, got {value!r}: the video loss is a loss the training lowers; to raise a "
                f"score, have the callable return its negative")
    return None


def _check_number(name: str, value, *, strict: bool) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and (value > 0 if strict else value >= 0)
    if not ok or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} 0, got {value!r}")


__all__ = ["DTYPES", "MAX_SEED", "QUICK", "SCHEDULES", "TrainConfig"]
