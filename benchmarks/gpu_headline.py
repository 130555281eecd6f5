"""The GPU headline: peak memory and time of one pixel-MSE training step on the full Wan 2.1 VAE.

After Wan's rows, the other supported families' full architectures (HunyuanVideo, HunyuanVideo 1.5, Mochi,
EasyAnimate; ``OTHER_VAES``) get a chopgrad ``d_trunc=1`` row and a full-backprop row each at 49x480x832.

The model is diffusers' default ``AutoencoderKLWan`` config (the Wan 2.1 VAE architecture) with random weights
in bf16; weights do not change memory or time, and nothing is downloaded. Every row is one training step
(decode, MSE against a target video, backward to the latents) run in its own process
(``chopgrad.tools.bench.worker``), which reports ``torch.cuda.max_memory_allocated`` above the inputs and
weights, and the step's time. The decode rows (at the first size) take a loss on the whole video instead:
``chopgrad.decode`` and the MSE plus a temporal-consistency term on frame differences
(``chopgrad.tools.bench.methods.video_loss``), each checked against the pixel_loss row of its schedule:
time at most 1.6x, peak at most that row's plus 3x the video's bytes.

Rows run in the order of ``ROWS``, the headline first (chopgrad ``d_trunc=1``), and each size's rows after
the other size's. A row that would start after ``--budget`` seconds is reported as skipped, so one call fits a
short GPU loan; the first step of a row is its measured step (``--repeats`` adds timed steps).

    python benchmarks/gpu_headline.py --out gpu_out              # on a CUDA machine; appends to RESULTS.md
    python benchmarks/gpu_headline.py --tiny --out tiny_out      # the same on CPU at a tiny size (the test)

The targets (an estimate for the full architecture): chopgrad ``d_trunc=1`` within 16 GB at 81x480x832 and
within 40 GB at 49x720x1280, and with exact spatial tiles (``tile=256``) within 24 GB at 49x720x1280.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import torch

from chopgrad.tools.bench.runner import run_isolated
from chopgrad.tools.bench.workloads import WAN21_RANDOM, latent_shape, load_model

#: (frames, height, width) of the headline sizes, and the CPU sizes of --tiny
SIZES = ((81, 480, 832), (49, 720, 1280))
TINY_SIZES = ((5, 16, 24), (5, 24, 16))
#: targets for chopgrad d_trunc=1 (either schedule), in GB (10^9 bytes); the tiled rows' own target
TARGET_GB = {(81, 480, 832): 16, (49, 720, 1280): 40}
TILED_TARGET_GB = {(49, 720, 1280): 24}
#: the tile (decoded pixels) of the tiled rows, and the sizes (index into SIZES / TINY_SIZES) that get them
TILE, TINY_TILE = 256, 8
TILED_SIZES = (1,)

#: (label, worker settings), most important first within a size; "lean": chopgrad's fused decoder ops
ROWS = (
    ("chopgrad sliding d=1, lean", {"method": "pixel_loss", "d_trunc": 1, "schedule": "sliding", "lean": True}),
    ("chopgrad chunked d=1, lean", {"method": "pixel_loss", "d_trunc": 1, "schedule": "chunked", "lean": True}),
    ("chopgrad sliding d=1", {"method": "pixel_loss", "d_trunc": 1, "schedule": "sliding", "lean": False}),
    ("chopgrad chunked d=1", {"method": "pixel_loss", "d_trunc": 1, "schedule": "chunked", "lean": False}),
    ("chopgrad d=0, lean", {"method": "pixel_loss", "d_trunc": 0, "schedule": "sliding", "lean": True}),
    ("chopgrad d=0", {"method": "pixel_loss", "d_trunc": 0, "schedule": "sliding", "lean": False}),
    ("checkpointed (per step)", {"method": "checkpoint", "lean": False}),
    ("full backprop", {"method": "full", "lean": False}),
)
#: spatially tiled chopgrad (exact gradient), inserted after the headline row at TILED_SIZES
TILED_ROWS = (
    ("chopgrad sliding d=1, lean, tiled exact", {"method": "pixel_loss", "d_trunc": 1, "schedule": "sliding",
                                                 "lean": True, "tile_grad": "exact"}),
)


#: chopgrad.decode with a loss on the whole video, inserted after the two lean pixel_loss rows at DECODE_SIZES
DECODE_ROWS = (
    ("chopgrad decode sliding d=1, lean + video loss", {"method": "decode", "d_trunc": 1, "schedule": "sliding",
                                                        "lean": True}),
    ("chopgrad decode chunked d=1, lean + video loss", {"method": "decode", "d_trunc": 1, "schedule": "chunked",
                                                        "lean": True}),
)
DECODE_SIZES = (0,)
#: the decode rows' targets against the pixel_loss row of the same schedule, d_trunc and lean: time at most
#: DECODE_TIME_FACTOR x its time, peak at most its peak + DECODE_VIDEOS x the video's bytes
DECODE_TIME_FACTOR, DECODE_VIDEOS = 1.6, 3


#: the other VAE families' full architectures, after all of Wan's rows: a chopgrad d_trunc=1 row and a
#: full-backprop row each, at the size valid for every one of them nearest the headline (Mochi: 1 + 6k frames)
OTHER_VAES = ("hunyuanvideo-random", "hunyuanvideo15-random", "mochi-random", "easyanimate-random")
OTHER_VAE_SIZE = (49, 480, 832)
#: --tiny: each family's tiny config at a size it decodes
TINY_OTHER_VAES = {"tiny-hunyuanvideo": (5, 16, 24), "tiny-hunyuanvideo15": (5, 16, 24), "tiny-mochi": (7, 16, 24),
                   "tiny-easyanimate": (5, 16, 24)}
#: lean does nothing for these families (the fused ops are Wan's), so the rows run the model's own modules
OTHER_VAE_ROWS = (
    ("chopgrad sliding d=1", {"method": "pixel_loss", "d_trunc": 1, "schedule": "sliding", "lean": False}),
    ("full backprop", {"method": "full", "lean": False}),
)


def rows_for(size_index: int, tile: int) -> tuple:
    rows = ROWS
    if size_index in DECODE_SIZES:
        rows = rows[:2] + DECODE_ROWS + rows[2:]
    if size_index in TILED_SIZES:
        tiled = tuple((label, {**settings, "tile": tile}) for label, settings in TILED_ROWS)
        rows = rows[:1] + tiled + rows[1:]
    return rows


def make_inputs_file(folder: str, vae, frames: int, height: int, width: int, dtype: torch.dtype) -> str:
    """Random latents and a random target in [-1, 1] (content does not change memory or time), saved for workers."""
    shape = latent_shape(vae, frames, height, width)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(shape, generator=g).to(dtype)
    target = (torch.rand(1, 3, frames, height, width, generator=g) * 2 - 1).to(dtype)
    path = os.path.join(folder, f"inputs_{type(vae).__name__}_{frames}x{height}x{width}.pt")
    torch.save({"latents": latents, "target": target}, path)
    return path


def workloads(tiny: bool) -> list[tuple[str, tuple[int, int, int], tuple]]:
    """(model, (frames, height, width), rows) in the order they run: Wan's sizes, then the other families."""
    wan = "tiny-wan21" if tiny else WAN21_RANDOM
    runs = [(wan, size, rows_for(i, TINY_TILE if tiny else TILE))
            for i, size in enumerate(TINY_SIZES if tiny else SIZES)]
    others = TINY_OTHER_VAES if tiny else {name: OTHER_VAE_SIZE for name in OTHER_VAES}
    return runs + [(name, size, OTHER_VAE_ROWS) for name, size in others.items()]


def run(args) -> list[dict]:
    dtype_name = "fp32" if args.tiny else args.dtype
    rows = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        for model, (frames, height, width), model_rows in workloads(args.tiny):
            vae = load_model(model, device="meta")  # only its config is needed here
            inputs = make_inputs_file(scratch, vae, frames, height, width, {"fp32": torch.float32,
                                                                              "bf16": torch.bfloat16}[dtype_name])
            for label, settings in model_rows:
                row = {"model": model, "size": f"{frames}x{height}x{width}", "frames": frames, "height": height,
                       "width": width, "label": label,
                       "video_bytes": 3 * frames * height * width * (2 if dtype_name == "bf16" else 4), **settings}
                elapsed = time.monotonic() - started
                if elapsed > args.budget:
                    rows.append({**row, "status": "skipped", "detail": f"time budget of {args.budget:.0f} s spent"})
                    continue
                config = {"model": model, "device": args.device, "dtype": dtype_name, "inputs": inputs,
                          "repeats": args.repeats, "warmup": 0, **settings}
                measured = run_isolated(config, timeout_s=max(30.0, args.budget - elapsed + 60.0))
                rows.append({**row, "status": measured.status, "detail": measured.detail, **measured.result,
                             "wall_s": time.monotonic() - started - elapsed})
                print(format_row(rows[-1]), file=sys.stderr, flush=True)
    return rows


def format_row(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['model']} {row['size']} {row['label']}: {row['status']} {row.get('detail', '')}"
    return (f"{row['model']} {row['size']} {row['label']}: {row['peak_bytes'] / 1e9:.2f} GB, {row['memory_step_s']:.2f} s/step "
            f"({row['wall_s']:.0f} s in all)")


def step_time(row: dict) -> float:
    return min(row["times_s"]) if row.get("times_s") else row["memory_step_s"]


def decode_verdict(row: dict, rows: list[dict]) -> str:
    """A decode row against the pixel_loss row of its size, schedule, d_trunc and lean (when that one ran)."""
    ref = next((r for r in rows if r["model"] == row["model"] and r["size"] == row["size"] and r.get("method") == "pixel_loss" and r["status"] == "ok"
                and not r.get("tile") and all(r.get(k) == row.get(k) for k in ("schedule", "d_trunc", "lean"))), None)
    if ref is None:
        return "no pixel_loss row to compare with"
    ratio = step_time(row) / step_time(ref)
    extra = (row["peak_bytes"] - ref["peak_bytes"]) / row["video_bytes"]
    return (f"vs {ref['label']}: time {ratio:.2f}x (<= {DECODE_TIME_FACTOR}: "
            f"{'met' if ratio <= DECODE_TIME_FACTOR else 'missed'}), peak {extra:+.2f} videos "
            f"(<= {DECODE_VIDEOS}: {'met' if extra <= DECODE_VIDEOS else 'missed'})")


def format_table(rows: list[dict], device: str) -> str:
    lines = [f"Device: {device}.", "",
             "| model | size (frames x H x W) | method | peak memory (GB) | target | time per step (s) | status |",
             "|---|---|---|---:|---|---:|---|"]
    for r in rows:
        key = (r["frames"], r["height"], r["width"])
        target = (TILED_TARGET_GB if r.get("tile") else TARGET_GB).get(key)
        is_headline = r.get("d_trunc") == 1 and r.get("method") == "pixel_loss" and r["model"] in ("tiny-wan21",
                                                                                                   WAN21_RANDOM)
        if r["status"] == "ok":
            peak = r["peak_bytes"] / 1e9
            step = step_time(r)
            verdict = ""
            if is_headline and target:
                verdict = f"<= {target}: {'met' if peak <= target else 'missed'}"
            elif r.get("method") == "decode":
                verdict = decode_verdict(r, rows)
            lines.append(f"| {r['model']} | {r['size']} | {r['label']} | {peak:.2f} | {verdict} | {step:.2f} | ok |")
        else:
            lines.append(f"| {r['model']} | {r['size']} | {r['label']} | | | | {r['status']}: {r.get('detail', '')} |")
    return "\n".join(lines)


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"cpu ({platform.processor() or platform.machine()}), torch {torch.__version__}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--repeats", type=int, default=0, help="timed steps after the measured one")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds after which no row is started")
    parser.add_argument("--tiny", action="store_true", help="tiny Wan 2.1 config, tiny sizes, fp32 (a CPU check)")
    parser.add_argument("--out", default="gpu_headline_out", help="folder for headline.json and headline.md")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"),
                        help="RESULTS.md to append the table to ('' to skip)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available (use --tiny --device cpu for the CPU check)")
    started = time.monotonic()
    rows = run(args)
    device = device_name(args.device)
    table = format_table(rows, device)
    os.makedirs(args.out, exist_ok=True)
    dtype = "fp32" if args.tiny else args.dtype
    model = ("Tiny configs of each family (tiny-wan21, " + ", ".join(TINY_OTHER_VAES) + ")" if args.tiny else
             "Full VAE architectures (diffusers' default config of each class: wan21-random, "
             + ", ".join(OTHER_VAES) + ")")
    with open(os.path.join(args.out, "headline.json"), "w") as f:
        json.dump({"device": device, "dtype": dtype, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "headline.md"), "w") as f:
        f.write(table + "\n")
    if args.results:
        title = "GPU headline" + (" (tiny CPU check)" if args.tiny else "")
        command = "python benchmarks/gpu_headline.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.results, "a") as f:
            f.write(f"\n## {title}, {datetime.date.today().isoformat()}\n\n{model} with random weights, "
                    f"{dtype}, one pixel-MSE "
                    f"training step per process (decode rows: `chopgrad.decode` + MSE + temporal-consistency loss "
                    f"on the whole video); peak = torch.cuda.max_memory_allocated above weights and inputs. "
                    f"Reproduce: `{command}` ({time.monotonic() - started:.0f} s).\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
