"""`chopgrad train`: its options, their checks before any work, and the run (or the --compare of methods)."""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys

from chopgrad.data.tasks import TASKS

from ..bench.workloads import FRAME_RULES
from .checkpoint import CHECKPOINT_FOLDER, PARTIAL_SUFFIX, PREVIOUS_SUFFIX, checkpoint_settings, committed_checkpoint
from .compare import COMPARED_METHODS
from .config import MAX_SEED, QUICK, SCHEDULES, TrainConfig, video_loss_weight_problem
from .step import METHODS
from .transformer import DEFAULT_LORA_TARGETS, LORA_FOLDER, NUM_TRAIN_TIMESTEPS

TRAIN_FILES = ("metrics.json", "metrics.csv", "curves.png")
COMPARE_FILES = ("compare.json", "compare.md", "compare.png")
#: everything a run or a --compare writes into --out (what --overwrite removes)
OUTPUTS = (*TRAIN_FILES, *COMPARE_FILES, "samples", "decoder", LORA_FOLDER, LORA_FOLDER + PARTIAL_SUFFIX,
           "settings.json",
           *(CHECKPOINT_FOLDER + suffix for suffix in ("", PARTIAL_SUFFIX, PREVIOUS_SUFFIX)),
           *(name for name, _, _ in COMPARED_METHODS), *(f"{name}.tmp" for name in (*TRAIN_FILES, *COMPARE_FILES)))

TRAIN_HELP = ("train a one-step latent model for a video task with a pixel loss through chopgrad (or full "
              "backprop, or the latent loss alone)")

EPILOG = """\
the model: a causal 3D-conv residual network maps the condition latents (plus the task's extra channels: the
hole mask for inpaint, the first clean frame's latents for driving) to the target latents. --generator
module:function replaces it: function(in_channels=..., out_channels=...) must return an nn.Module mapping
(B, in_channels, T, h, w) to (B, out_channels, T, h, w), causal in time.

--transformer PATH trains a pretrained Wan transformer (a local diffusers WanTransformer3DModel folder, read
only) as a one-step restorer with LoRA (peft): the condition latents enter as the noisy latents at --timestep
and the flow-matching rule x0 = x_t - (t / 1000) * v gives the restored latents. Extra task channels go
through a zero-initialised second patch embedding. Writes OUT/lora: diffusers' pipeline LoRA file, the extra
embedding when the task has extra channels, and restorer.safetensors (prompt embedding, timestep, base folder),
which chopgrad.tools.train.transformer.load_trained_restorer reads. docs/training.md has the recipe.

the loss: --latent-weight * MSE(latents) + --pixel-weight * pixel loss of the decoded video (--pixel-loss terms,
plus --perceptual-weight * the --perceptual image loss per frame) + --video-loss-weight * --video-loss of the
whole decoded clip. --method chopgrad computes the pixel term with chopgrad.pixel_loss and the video loss on
chopgrad.decode's clip (--d-trunc, --schedule), full both with plain autograd through the model's own decode,
latent leaves both out (and refuses --video-loss).

--video-loss module:function: function() (called without arguments, with torch's generator seeded by --seed)
returns a callable (a function or nn.Module: a 3D-conv critic, a temporal-consistency loss, ...) mapping the
(B, 3, F, H, W) decoded clips in [-1, 1] to a scalar tensor; a mean over the clips keeps --batch and data
parallel runs comparable. It is frozen (an nn.Module's parameters stop requiring grad, eval mode) and moved to
--device in fp32; nothing is downloaded.

outputs in --out: metrics.json, metrics.csv, curves.png, samples/ (grid PNGs and mp4s of held-out clips),
checkpoint/ (for --resume), decoder/ (with --train-decoder). With --compare: one folder per method plus
compare.json, compare.md and compare.png. --out must be new or empty, unless --resume continues the run in it
or --overwrite replaces its outputs.

stopping: Ctrl-C (SIGINT) or SIGTERM stops the run; the last checkpoint stays in OUT/checkpoint for --resume.

data parallel: torchrun --nproc_per_node N -m chopgrad train ... (gloo on CPU, NCCL on CUDA); each rank
trains on its own clips and gradients are averaged, so a step equals one process on the union of the clips.
"""


def _pixel_term(text: str):
    name, _, weight = text.partition("=")
    try:
        value = float(weight) if weight else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME or NAME=WEIGHT, got {text!r}") from None
    from chopgrad.losses import LOSS_NAMES

    if name not in LOSS_NAMES:
        raise argparse.ArgumentTypeError(f"unknown pixel loss {name!r}; known: {', '.join(sorted(LOSS_NAMES))}")
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"the weight of {name!r} must be a finite number >= 0, got {value}")
    return name, value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in 0 .. {MAX_SEED}, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer in 0 .. {MAX_SEED}, got {value}")
    return value


def _video_loss_weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}") from None
    problem = video_loss_weight_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def _timestep(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in 1 .. {NUM_TRAIN_TIMESTEPS - 1}, "
                                         f"got {text!r}") from None
    if not 0 < value < NUM_TRAIN_TIMESTEPS:
        raise argparse.ArgumentTypeError(f"expected an integer in 1 .. {NUM_TRAIN_TIMESTEPS - 1}, got {value}")
    return value


def _d_trunc(text: str):
    if text.lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 or 'none', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 or 'none', got {value}")
    return value


def add_train_command(parser, subparsers, *, positive_int, nonneg_int, positive_float, nonneg_float, add_model):
    """Registers `train` on the top-level parser (the number types and model options are the CLI's own)."""
    defaults = TrainConfig(task="vsr")
    t = parser.add_command(subparsers, "train", TRAIN_HELP)
    t.formatter_class = argparse.RawDescriptionHelpFormatter
    t.epilog = EPILOG
    quick_note = lambda name: f"; with --quick: {QUICK[name]}" if name in QUICK else ""

    def default(name, shown=None):
        value = getattr(defaults, name) if shown is None else shown
        value = " ".join(map(str, value)) if isinstance(value, tuple) else value
        return f"(default: {value}{quick_note(name)})"

    t.add_argument("--task", required=True, choices=sorted(TASKS), help="the video task")
    t.add_argument("--data", metavar="DIR", help="a folder of video files (mp4, mkv, webm, avi, mov; searched "
                   "recursively); the last tenth of the files is held out for evaluation (default: procedural "
                   "synthetic clips)")
    add_model(t)
    t.add_argument("--steps", type=positive_int, help=f"optimizer steps {default('steps')}")
    t.add_argument("--batch", type=positive_int, help=f"clips per step and rank {default('batch')}")
    t.add_argument("--frames", type=positive_int, help=f"frames per clip ({FRAME_RULES}) {default('frames')}")
    t.add_argument("--size", type=positive_int, nargs="+", metavar=("H", "W"),
                   help=f"clip height and width in pixels (one value: square) {default('size')}")
    t.add_argument("--frame-stride", type=positive_int, help=f"take every N-th frame of a video file "
                   f"{default('frame_stride')}")
    t.add_argument("--method", choices=METHODS, help="how the pixel term is computed: chopgrad (pixel_loss), "
                   "full (autograd through the model's own decode) or latent (no pixel term) (default: chopgrad)")
    t.add_argument("--d-trunc", type=_d_trunc, default=argparse.SUPPRESS, help="chopgrad's truncation distance in decoder steps, or 'none' "
                   "for the exact gradient (default: 1)")
    t.add_argument("--schedule", choices=SCHEDULES, help="chopgrad's schedule (default: sliding)")
    t.add_argument("--pixel-loss", type=_pixel_term, nargs="+", metavar="NAME[=WEIGHT]",
                   help="pixel loss terms, each given once with a finite weight >= 0: mse, l1, charbonnier, huber, "
                   "ssim (inpaint: ssim takes no mask, so it needs --hole-weight 1) (default: mse=1)")
    t.add_argument("--latent-weight", type=nonneg_float, help=f"weight of the latent MSE {default('latent_weight')}")
    t.add_argument("--pixel-weight", type=nonneg_float, help=f"weight of the pixel loss {default('pixel_weight')}")
    t.add_argument("--perceptual", metavar="MODULE:FUNCTION", help="an image loss added to the pixel loss, through "
                   "chopgrad.per_frame: FUNCTION() returns a callable (or module) mapping two (N, 3, H, W) images "
                   "in [-1, 1] to a loss (LPIPS, DISTS, ... with weights you have on disk; nothing is downloaded)")
    t.add_argument("--perceptual-weight", type=nonneg_float, help=f"weight of --perceptual "
                   f"{default('perceptual_weight')}")
    t.add_argument("--video-loss", metavar="MODULE:FUNCTION", help="a whole-clip loss added to the training loss: "
                   "FUNCTION() returns a callable (or module) mapping the (B, 3, F, H, W) decoded clips in [-1, 1] "
                   "to a scalar tensor (a video critic, a temporal loss; see below); MODULE is imported as for "
                   "--generator; not with --method latent")
    t.add_argument("--video-loss-weight", type=_video_loss_weight, metavar="W", help="weight of --video-loss, a "
                   "finite number > 0 (default: 1.0; only with --video-loss)")
    t.add_argument("--hole-weight", type=positive_float, help=f"inpaint: how much more a hole pixel counts in the "
                   f"pixel loss {default('hole_weight')}")
    t.add_argument("--lr", type=positive_float, help=f"peak learning rate of the model {default('lr')}")
    t.add_argument("--decoder-lr", type=positive_float, help=f"peak learning rate of the decoder with "
                   f"--train-decoder {default('decoder_lr')}")
    t.add_argument("--weight-decay", type=nonneg_float, help=f"AdamW weight decay {default('weight_decay')}")
    t.add_argument("--warmup", type=nonneg_int, help="linear warm-up steps before the cosine decay (default: 5%% "
                   "of the steps)")
    t.add_argument("--grad-clip", type=nonneg_float, help=f"clip the gradient norm to this; 0: no clipping "
                   f"{default('grad_clip')}")
    t.add_argument("--width", type=positive_int, help=f"channels of the default model {default('width')}")
    t.add_argument("--blocks", type=positive_int, help=f"residual blocks of the default model {default('blocks')}")
    t.add_argument("--generator", metavar="MODULE:FUNCTION", help="the model to train instead of the default one "
                   "(see below); MODULE is imported as by python -m: from the current folder or the installed "
                   "packages")
    t.add_argument("--transformer", metavar="PATH", help="train this local diffusers WanTransformer3DModel folder "
                   "(save_pretrained layout; read only) as a one-step restorer with LoRA instead of the default "
                   "model; nothing is downloaded")
    t.add_argument("--timestep", type=_timestep, help=f"--transformer: the fixed timestep the condition latents "
                   f"enter at, 1 .. {NUM_TRAIN_TIMESTEPS - 1} {default('timestep')}")
    t.add_argument("--prompt-embeds", metavar="FILE", help="--transformer: a safetensors file holding one tensor "
                   "(L, text_dim) of text-encoder embeddings (default: a zero embedding)")
    t.add_argument("--lora-rank", type=positive_int, help=f"--transformer: LoRA rank {default('lora_rank')}")
    t.add_argument("--lora-alpha", type=positive_float, help="--transformer: LoRA alpha (default: the rank)")
    t.add_argument("--lora-targets", nargs="+", metavar="NAME", help=f"--transformer: module names LoRA adapts "
                   f"(default: {' '.join(DEFAULT_LORA_TARGETS)})")
    t.add_argument("--no-gradient-checkpointing", action="store_true", help="--transformer: keep the transformer "
                   "blocks' activations instead of recomputing them in backward (faster, more memory)")
    t.add_argument("--train-decoder", action="store_true", help="fine-tune the VAE decoder too (with --decoder-lr); "
                   "saved to OUT/decoder as a diffusers folder")
    t.add_argument("--eval-every", type=positive_int, help=f"steps between held-out evaluations "
                   f"{default('eval_every')}")
    t.add_argument("--eval-clips", type=positive_int, help=f"held-out clips {default('eval_clips')}")
    t.add_argument("--samples", type=nonneg_int, help=f"held-out clips written as grid and mp4 {default('samples')}")
    t.add_argument("--checkpoint-every", type=nonneg_int, help="steps between checkpoints (default: at every "
                   "evaluation and at the end)")
    t.add_argument("--seed", type=_seed, help=f"seed of the model, data and degradations, 0 .. {MAX_SEED} "
                   f"{default('seed')}")
    t.add_argument("--workers", type=nonneg_int, help=f"DataLoader worker processes {default('workers')}")
    t.add_argument("--threads", type=positive_int, help="CPU threads (default: the cores not busy with other "
                   "processes, from the load average)")
    t.add_argument("--out", metavar="DIR", help="output folder, new or empty (default: train_out)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (same settings)")
    t.add_argument("--overwrite", action="store_true", help="remove the outputs of an earlier run in --out (metrics, "
                   "curves, samples/, checkpoint/, decoder/, --compare's folders) before training; a folder that "
                   "holds anything else is refused")
    t.add_argument("--quick", action="store_true", help="a short run: " + ", ".join(
        f"{k} {' '.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in QUICK.items()))
    t.add_argument("--compare", action="store_true", help="train the same task, data, model and steps with each "
                   "method (latent only, full backprop, chopgrad sliding d_trunc 0 and 1, chunked d_trunc 1), each "
                   "in its own process, and write one table and one plot")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    return t


def config_from_args(args) -> TrainConfig:
    """The run's TrainConfig: given options, else --quick's, else the defaults. ValueError names a bad one."""
    values = {}
    for name in ("data", "model", "device", "dtype", "steps", "batch", "frames", "frame_stride", "method",
                 "schedule", "latent_weight", "pixel_weight", "perceptual", "perceptual_weight", "hole_weight",
                 "lr", "decoder_lr", "weight_decay", "warmup", "grad_clip", "width", "blocks", "generator",
                 "eval_every", "eval_clips", "samples", "checkpoint_every", "seed", "workers", "threads", "out",
                 "video_loss", "video_loss_weight", "transformer", "timestep", "prompt_embeds", "lora_rank",
                 "lora_alpha"):
        value = getattr(args, name, None)
        if value is None and args.quick and name in QUICK:
            value = QUICK[name]
        if value is not None and name in ("data", "transformer", "prompt_embeds"):
            value = os.path.abspath(value)  # the run records where they are, whatever folder it resumes from
        if value is not None:
            values[name] = value
    if args.size is not None:
        if len(args.size) > 2:
            raise ValueError(f"--size takes H W or one side, got {len(args.size)} values")
        values["size"] = tuple(args.size) * (2 // len(args.size))
    elif args.quick:
        values["size"] = QUICK["size"]
    unused = _options_this_run_ignores(args)
    if unused:
        raise ValueError(unused)
    if args.video_loss_weight is not None and args.video_loss is None:
        raise ValueError(f"--video-loss-weight {args.video_loss_weight:g} is given without --video-loss: it weights "
                         f"the --video-loss term; give --video-loss module:function too, or drop the weight")
    if args.lora_targets:
        values["lora_targets"] = tuple(args.lora_targets)
    if args.no_gradient_checkpointing:
        values["gradient_checkpointing"] = False
    if hasattr(args, "d_trunc"):  # given ('none' included)
        values["d_trunc"] = args.d_trunc
    if args.pixel_loss:
        names = [name for name, _ in args.pixel_loss]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            given = " ".join(f"{name}={weight:g}" for name, weight in args.pixel_loss if name in repeated)
            raise ValueError(f"--pixel-loss: {', '.join(map(repr, repeated))} given more than once ({given}); give "
                             f"each term once")
        values["pixel_loss"] = dict(args.pixel_loss)
    if args.samples is None and "eval_clips" in values:
        values["samples"] = min(values.get("samples", TrainConfig.samples), values["eval_clips"])
    return TrainConfig(task=args.task, train_decoder=args.train_decoder, resume=args.resume,
                       progress=not args.no_progress, **values)


def _options_this_run_ignores(args) -> str:
    """Why an option given on the command line would have no effect on this run ("" when each has one)."""
    method = args.method or "chopgrad"
    ignored = []
    if method != "chopgrad":
        given = [option for option, value in (("--d-trunc", hasattr(args, "d_trunc")),
                                              ("--schedule", args.schedule is not None)) if value]
        if given:
            ignored.append(f"{' and '.join(given)} choose how chopgrad truncates, and --method {method} does not "
                           f"use chopgrad")
    if args.hole_weight is not None and args.task != "inpaint":
        ignored.append(f"--hole-weight weights the inpaint task's hole pixels, and task {args.task!r} has none")
    if args.decoder_lr is not None and not args.train_decoder:
        ignored.append("--decoder-lr is the learning rate of --train-decoder, which is not given")
    if args.perceptual_weight is not None and args.perceptual is None:
        ignored.append("--perceptual-weight weights the --perceptual term, which is not given")
    model = "--transformer" if args.transformer is not None else "--generator" if args.generator is not None else None
    given = [option for option, value in (("--width", args.width), ("--blocks", args.blocks)) if value is not None]
    if model and given:
        ignored.append(f"{' and '.join(given)} size the built-in model, and {model} names another")
    if not ignored:
        return ""
    return "; ".join(ignored) + ": drop what this run does not use"


def check_before_work(config: TrainConfig, fail, *, overwrite: bool = False):
    """The checks that need no model: the output folder, the data folder, the factories.

    Returns the --video-loss critic it built to check what function() returns (None without --video-loss), for
    run_train to use rather than build it again.
    """
    from .model import resolve_factory
    from .step import make_video_critic
    from .trainer import perceptual_term

    checkpoint = os.path.join(config.out, CHECKPOINT_FOLDER)
    if config.resume and overwrite:
        fail("--resume continues the run in --out and --overwrite removes it; give one of them")
    if config.resume:
        committed = committed_checkpoint(checkpoint)
        if committed is None:
            fail(f"--resume: no checkpoint in {checkpoint!r}")
        # before anything loads: other settings may not even fit the saved weights
        try:
            refusal = config.resume_refusal(TrainConfig.from_dict(checkpoint_settings(committed)), checkpoint)
        except (ValueError, TypeError, KeyError) as exc:
            refusal = f"--resume: the checkpoint in {checkpoint!r} does not record its settings ({exc})"
        if refusal:
            fail(refusal)
    if config.data is not None and _is_inside(config.out, config.data):
        fail(f"--out: {config.out!r} is inside --data {config.data!r}: the videos a run writes (samples/) would "
             f"become training clips of later runs; give an --out outside the data folder")
    if not config.resume and os.path.isdir(config.out):
        present = sorted(os.listdir(config.out))
        foreign = [name for name in present if name not in OUTPUTS]
        if present and not overwrite:
            fail(f"--out: {config.out!r} is not empty ({_listing(present)}); give a new or empty folder, --resume "
                 f"to continue the run in it, or --overwrite to replace its outputs")
        if foreign:
            fail(f"--out: {config.out!r} holds files chopgrad train does not write ({_listing(foreign)}), which "
                 f"--overwrite leaves alone; give a new or empty folder")
    if config.data is not None and not os.path.isdir(config.data):
        fail(f"--data: {config.data!r} is not a folder")
    if config.data is not None:
        _check_data_folder(config, fail)
    try:
        if config.generator is not None:
            resolve_factory(config.generator, "--generator")
        if config.perceptual is not None:
            perceptual_term(config.perceptual, "cpu")  # built once here, so its errors come before any work
    except ValueError as exc:
        fail(str(exc))
    if config.transformer is not None:
        _check_transformer(config, fail)
    if config.video_loss is None:
        return None
    try:
        return make_video_critic(config.video_loss, config.seed)
    except ValueError as exc:
        fail(str(exc))


def _check_transformer(config: TrainConfig, fail) -> None:
    """The --transformer folder's config, peft and the --prompt-embeds file, before any model is loaded."""
    from .transformer import check_transformer_inputs

    try:
        check_transformer_inputs(config.transformer, config.prompt_embeds, config.lora_targets)
    except ValueError as exc:
        fail(str(exc))


def _check_data_folder(config: TrainConfig, fail) -> None:
    """Opens --data as the run will (each file indexed, nothing decoded), so a folder without a usable file fails
    before the model loads; the files it skips are reported when the run opens the folder."""
    import warnings

    from chopgrad.data.video_folder import VideoFolder

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            VideoFolder(config.data, config.frames, *config.size, stride=config.frame_stride).close()
    except (ValueError, RuntimeError) as exc:
        fail(f"--data {config.data!r}: {exc}")


def _is_inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def _listing(names: list, shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def remove_outputs(out: str) -> None:
    """Removes what a run or a --compare wrote into `out` (check_before_work refused anything else)."""
    for name in OUTPUTS:
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def summary_line(config: TrainConfig, record: dict) -> str:
    summary = record["summary"]
    final = summary.get("final_eval", {})
    return (f"{config.task}: {summary.get('steps_done', 0)} steps, held-out PSNR {final.get('psnr', float('nan')):.2f} "
            f"dB, SSIM {final.get('ssim', float('nan')):.4f}, temporal error "
            f"{final.get('temporal_error', float('nan')):.4f}; {summary.get('time_per_step_s', float('nan')):.3f} "
            f"s/step, peak {summary.get('peak_step_bytes', 0) / 2**20:.1f} MiB per step; wrote {config.out}")


def report(config: TrainConfig, record: dict, *, rank: int) -> None:
    """Prints the run's summary line on rank 0: the rank that evaluates and writes the outputs."""
    if rank == 0:
        print(summary_line(config, record))


def interrupted_message(config: TrainConfig) -> str:
    checkpoint = committed_checkpoint(os.path.join(config.out, CHECKPOINT_FOLDER))
    if checkpoint is None:
        return "interrupted before the first checkpoint; nothing to resume"
    return f"interrupted; the last checkpoint is in {checkpoint}: continue with the same options and --resume"


def run_train(config: TrainConfig, fail, video_critic=None, *, overwrite: bool = False) -> int:
    """Trains `config`; `video_critic`: the one check_before_work built (None: the run builds its own).

    With `overwrite`, the earlier outputs in --out are removed once the run is built (model, data, factories),
    so a run refused while it is being built leaves them as they were.
    """
    from chopgrad.data.video_folder import VideoDecodeError

    from .trainer import Run

    try:
        run = Run(config, log=lambda message: None if config.progress else print(message, file=sys.stderr),
                  video_critic=video_critic)
        if overwrite and run.ranks.is_main:
            remove_outputs(config.out)
        record = run.train()
    except VideoDecodeError as exc:  # a file under --data damaged where indexing could not see it
        fail(f"--data {config.data!r}: {exc.summary()}")
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        fail(str(exc))
    report(config, record, rank=run.ranks.rank)
    return 0
