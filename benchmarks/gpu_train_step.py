"""One training step of a one-step Wan restorer: the Wan2.1-T2V-1.3B transformer with LoRA, plus a chopgrad pixel
loss through the full Wan 2.1 VAE. Peak memory split between transformer and decoder, and time.

The step is the one `chopgrad train --transformer` takes (chopgrad.tools.train.transformer): the transformer
(Wan2.1-T2V-1.3B's architecture, random weights, frozen in bf16, LoRA rank 16 in fp32 on the attention and
feed-forward layers, gradient checkpointing of its blocks) maps condition latents to restored latents at
timestep 399 under bf16 autocast; the loss is the latent MSE plus ``chopgrad.pixel_loss`` (MSE, ``d_trunc=1``)
through the Wan 2.1 VAE (diffusers' default ``AutoencoderKLWan`` config, random weights, bf16, frozen), and AdamW
steps the LoRA weights. Nothing is downloaded.

To split the memory, the step runs its backward in two parts, which give the same gradient as one: the pixel
loss's forward and backward on a detached copy of the predicted latents (the decoder's part), then the
transformer's backward from the latents' gradient and the latent MSE (the transformer's part). Reported, per
size: the weights; the transformer's peak (its forward and backward, above the weights and inputs); the
decoder's peak (pixel loss forward and backward, above what was allocated when it began, i.e. with the
transformer's saved activations); the step's peak above the weights and inputs; and each part's time.

    python benchmarks/gpu_train_step.py                        # on a CUDA machine; appends to RESULTS.md
    python benchmarks/gpu_train_step.py --tiny --device cpu    # tiny configs on the CPU (the test)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

#: Wan2.1-T2V-1.3B-Diffusers' transformer/config.json
WAN21_T2V_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                      out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                      cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
TINY_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                        out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
#: (frames, height, width)
SIZES = ((33, 480, 832), (81, 480, 832))
TINY_SIZES = ((9, 16, 16), (17, 16, 16))
#: the Wan pipelines pad the UMT5 prompt embedding to 512 tokens
PROMPT_TOKENS, TINY_PROMPT_TOKENS = 512, 4
LORA_RANK = 16
TIMESTEP = 399


def build(args, device):
    """(restorer, vae, LoRA parameters, weight bytes by part)."""
    from diffusers import WanTransformer3DModel

    from chopgrad.tools.bench.workloads import WAN21_RANDOM, load_model
    from chopgrad.tools.train.transformer import (DEFAULT_LORA_TARGETS, OneStepWanRestorer, add_lora,
                                                  latent_statistics)

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    config = TINY_TRANSFORMER if args.tiny else WAN21_T2V_1_3B
    with torch.device(device):
        transformer = WanTransformer3DModel(**config)
    add_lora(transformer, rank=LORA_RANK, alpha=LORA_RANK, targets=DEFAULT_LORA_TARGETS)
    for p in transformer.parameters():
        p.data = p.data.to(torch.float32 if p.requires_grad else dtype)
    transformer.enable_gradient_checkpointing()
    vae = load_model("tiny-wan21" if args.tiny else WAN21_RANDOM, device=device, dtype=dtype).requires_grad_(False)
    tokens = TINY_PROMPT_TOKENS if args.tiny else PROMPT_TOKENS
    prompt = torch.randn(1, tokens, config["text_dim"], device=device)
    mean, std = latent_statistics(vae, config["in_channels"])
    restorer = OneStepWanRestorer(transformer, extra_channels=0, timestep=TIMESTEP, prompt_embeds=prompt,
                                  latents_mean=mean, latents_std=std).to(device)
    lora = [p for p in restorer.parameters() if p.requires_grad]
    nbytes = lambda params: sum(p.numel() * p.element_size() for p in params)
    weights = {"transformer": nbytes(p for p in transformer.parameters() if not p.requires_grad),
               "lora": nbytes(lora), "vae": nbytes(vae.parameters())}
    return restorer, vae, lora, weights


class Meter:
    """Time and peak allocated memory of a part of the step (CUDA); time only elsewhere (memory reads 0)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def now(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.start_bytes = self.now()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.started
        self.peak = torch.cuda.max_memory_allocated() if self.cuda else 0
        return False


def train_step(restorer, vae, optimizer, condition, target_video, target_latents, autocast) -> dict:
    from chopgrad import pixel_loss

    device = condition.device
    optimizer.zero_grad(set_to_none=True)
    base = Meter(device).now()
    with Meter(device) as forward:
        with autocast():
            latents = restorer(condition)
    predicted = latents.detach().requires_grad_(True)
    with Meter(device) as decoder:
        with autocast():
            pixel = pixel_loss(vae, predicted, target_video, loss="mse", d_trunc=1)
        pixel.backward()
    with Meter(device) as backward:
        latent_mse = F.mse_loss(latents.float(), target_latents)
        (latent_mse + (latents.float() * predicted.grad).sum()).backward()
        optimizer.step()
    memory = {"transformer_peak_bytes": max(forward.peak, backward.peak) - base,
              "decoder_peak_bytes": decoder.peak - decoder.start_bytes,
              "saved_activations_bytes": decoder.start_bytes - base,
              "step_peak_bytes": max(forward.peak, decoder.peak, backward.peak) - base}
    if device.type != "cuda":
        memory = dict.fromkeys(memory)
    return {"loss": float(latent_mse.detach()) + float(pixel.detach()), "pixel_loss": float(pixel.detach()), **memory,
            "transformer_forward_s": forward.seconds, "decoder_s": decoder.seconds,
            "transformer_backward_s": backward.seconds,
            "step_s": forward.seconds + decoder.seconds + backward.seconds}


def run_size(restorer, vae, lora, size, args, device) -> dict:
    from contextlib import nullcontext
    from functools import partial

    from chopgrad.tools.bench.workloads import latent_shape

    frames, height, width = size
    shape = latent_shape(vae, frames, height, width)
    generator = torch.Generator(device="cpu").manual_seed(1)
    condition = torch.randn(shape, generator=generator).to(device)
    target_latents = torch.randn(shape, generator=generator).to(device)
    target_video = (torch.rand(1, 3, frames, height, width, generator=generator) * 2 - 1).to(device)
    optimizer = torch.optim.AdamW(lora, lr=1e-4)
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext
    steps = [train_step(restorer, vae, optimizer, condition, target_video, target_latents, autocast)
             for _ in range(1 + args.repeats)]
    row = dict(steps[0])  # the memory of the first step; the time: the median of the timed steps after it
    timed = steps[1:] or steps
    for key in ("transformer_forward_s", "decoder_s", "transformer_backward_s", "step_s"):
        row[key] = statistics.median(s[key] for s in timed)
    patch = restorer.transformer.config.patch_size
    row.update(size=f"{frames}x{height}x{width}", latents="x".join(map(str, shape[1:])), status="ok",
               tokens=(shape[2] // patch[0]) * (shape[3] // patch[1]) * (shape[4] // patch[2]))
    del optimizer, condition, target_latents, target_video
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def format_table(rows: list[dict], weights: dict, device: str) -> str:
    gb = lambda b: "-" if b is None else f"{b / 1e9:.2f}"  # no allocator peak off CUDA
    lines = [f"Device: {device}. Weights: transformer {gb(weights['transformer'])} GB (frozen), LoRA "
             f"{weights['lora'] / 1e6:.1f} MB, VAE {gb(weights['vae'])} GB.", "",
             "| size (frames x H x W) | latents | transformer tokens | transformer peak (GB) | its saved activations "
             "(GB) | decoder peak (GB) | step peak (GB) | transformer fwd / bwd (s) | decoder (s) | step (s) | "
             "status |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['size']} | | | | | | | | | | {r['status']}: {r.get('detail', '')} |")
            continue
        lines.append(f"| {r['size']} | {r['latents']} | {r['tokens']} | {gb(r['transformer_peak_bytes'])} | "
                     f"{gb(r['saved_activations_bytes'])} | {gb(r['decoder_peak_bytes'])} | "
                     f"{gb(r['step_peak_bytes'])} | {r['transformer_forward_s']:.2f} / "
                     f"{r['transformer_backward_s']:.2f} | {r['decoder_s']:.2f} | {r['step_s']:.2f} | ok |")
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"cpu ({platform.processor() or platform.machine()}), torch {torch.__version__}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"),
                        help="frozen weights and autocast (default: bf16)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after the measured one (default: 2)")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds after which no size is started")
    parser.add_argument("--tiny", action="store_true", help="tiny transformer and VAE configs at tiny sizes")
    parser.add_argument("--out", default="gpu_train_step_out", help="folder for train_step.json and .md")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"),
                        help="RESULTS.md to append the table to ('' to skip)")
    args = parser.parse_args(argv)
    if args.repeats < 0:
        parser.error(f"--repeats must be >= 0, got {args.repeats}")
    try:
        import peft  # noqa: F401
    except ImportError as exc:
        parser.error(f"the LoRA adapter needs peft ({exc}); install it (benchmarks/gpu_wheels.sh fetches it)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available (use --tiny --device cpu for the CPU check)")
    started = time.monotonic()
    restorer, vae, lora, weights = build(args, device)
    rows = []
    for size in TINY_SIZES if args.tiny else SIZES:
        label = "x".join(map(str, size))
        if time.monotonic() - started > args.budget:
            rows.append({"size": label, "status": "skipped", "detail": f"past --budget {args.budget:g} s"})
            continue
        try:
            rows.append(run_size(restorer, vae, lora, size, args, device))
        except torch.OutOfMemoryError as exc:
            rows.append({"size": label, "status": "OOM", "detail": str(exc).splitlines()[0][:120]})
            torch.cuda.empty_cache()
        print(rows[-1], flush=True)
    name = device_name(device)
    table = format_table(rows, weights, name)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "train_step.json"), "w") as f:
        json.dump({"device": name, "dtype": args.dtype, "weights": weights, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "train_step.md"), "w") as f:
        f.write(table + "\n")
    if args.results:
        title = "GPU training step: Wan2.1-1.3B transformer with LoRA + chopgrad pixel loss" + (
            " (tiny CPU check)" if args.tiny else "")
        command = "python benchmarks/gpu_train_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.results, "a") as f:
            f.write(f"\n## {title}, {datetime.date.today().isoformat()}\n\nRandom weights, {args.dtype}; LoRA rank "
                    f"{LORA_RANK}, gradient checkpointing, timestep {TIMESTEP}; pixel loss MSE at d_trunc=1 "
                    f"(sliding, lean). Memory: torch.cuda.max_memory_allocated per part (see the script's "
                    f"docstring). Reproduce: `{command}` ({time.monotonic() - started:.0f} s).\n\n{table}\n")
    print(table)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
