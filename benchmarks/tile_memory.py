"""Where a tiled training step's peak memory goes, against resolution at a fixed tile.

For each size, one `chopgrad.pixel_loss` training step (chunked, d_trunc=1 by
default) runs untiled, with `tile_grad="exact"` and with `tile_grad="truncated"`,
on the default model on the CPU. Memory is the peak of live tensor storages
(independent of the allocator, exact for this comparison). The tensors live at
the peak are split by their spatial size:

* full frame: tensors at the full resolution of one of the decoder's stages
  (stage inputs and outputs, the cache state, their gradients, the frames
  and target), which must grow with the frame area;
* latent resolution: the global part (post_quant_conv, conv_in, the mid block)
  and the latents;
* other: everything else, i.e. tile crops (the recompute's working set),
  which a fixed tile keeps constant.

The tiled rows also split the full-frame part into the step's own
full-frame buffers (stage inputs, new state: `new_empty`), gradient buffers
(`zeros_like`) and the rest (mostly the previous step's state and the frames).

    python benchmarks/tile_memory.py --results benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import collections
import platform

import torch

import chopgrad
from chopgrad.tools.bench.memory import PeakLiveBytes
from chopgrad.tools.bench.markdown import publish_table
from chopgrad.tools.bench.workloads import load_model, make_inputs

MIB = 2**20


def _category(shape, op: str, size: int, latent: int) -> str:
    if len(shape) < 2:
        return "other"
    hw = tuple(shape[-2:])
    if hw == (latent, latent):
        return "latent resolution"
    scale = size // hw[0] if hw[0] and size % hw[0] == 0 else 0
    if scale and hw == (size // scale, size // scale) and hw[0] > latent:
        if "new_empty" in op:
            return "full frame: tiled step's buffers"
        if "zeros_like" in op:
            return "full frame: gradient buffers"
        return "full frame: other"
    return "other"


def measure(vae, latents, target, size: int, tile, tile_grad: str, d_trunc: int, schedule: str, halo=None):
    kwargs = dict(d_trunc=d_trunc, schedule=schedule)
    if tile is not None:
        kwargs.update(tile=tile, tile_grad=tile_grad)
        if tile_grad == "truncated" and halo is not None:
            kwargs["tile_halo"] = halo
    z = latents.clone().requires_grad_(True)
    vae.zero_grad(set_to_none=True)
    with PeakLiveBytes(snapshot=True) as live:
        chopgrad.pixel_loss(vae, z, target, **kwargs).backward()
    parts = collections.Counter()
    for nbytes, shape, op in live.at_peak:
        parts[_category(shape, op, size, latents.shape[-1])] += nbytes
    return live.peak, parts, live.at_peak


def largest(at_peak, count: int) -> list[str]:
    """The `count` largest groups of equal (shape, op) among the tensors live at the peak."""
    groups = collections.defaultdict(lambda: [0, 0])
    for nbytes, shape, op in at_peak:
        groups[(shape, op)][0] += nbytes
        groups[(shape, op)][1] += 1
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:count]
    return [f"    {n / MIB:7.1f} MiB  {k:3d} x {shape}  from {op}" for (shape, op), (n, k) in ranked]


CATEGORIES = ("full frame: tiled step's buffers", "full frame: gradient buffers", "full frame: other",
              "latent resolution", "other")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 384, 512])
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--halo", type=int, default=32, help="tile_halo of the truncated rows")
    parser.add_argument("--d-trunc", type=int, default=1)
    parser.add_argument("--schedule", default="chunked")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--list", type=int, default=0, metavar="N",
                        help="also print the N largest groups of tensors live at each peak")
    parser.add_argument("--results", help="markdown file whose tile-memory section is replaced")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    vae = load_model("default")
    lines = ["| size | method | peak MiB | vs untiled | " + " | ".join(CATEGORIES) + " |",
             "|---:|---|---:|---:|" + "---:|" * len(CATEGORIES)]
    for size in args.sizes:
        latents, target = make_inputs(vae, args.frames, size, size, seed=size, encode=False)
        untiled = None
        for label, tile, mode in (("untiled", None, None), (f"exact tile {args.tile}", args.tile, "exact"),
                                  (f"truncated tile {args.tile} halo {args.halo}", args.tile, "truncated")):
            peak, parts, at_peak = measure(vae, latents, target, size, tile, mode, args.d_trunc, args.schedule,
                                           args.halo)
            untiled = peak if tile is None else untiled
            cells = " | ".join(f"{parts[c] / MIB:.0f}" for c in CATEGORIES)
            lines.append(f"| {size} | {label} | {peak / MIB:.0f} | {peak / untiled:.2f}x | {cells} |")
            print(lines[-1], flush=True)
            if args.list:
                print("\n".join(largest(at_peak, args.list)), flush=True)
    header = (f"Default model, {args.frames} frames, {args.schedule} d_trunc={args.d_trunc}, peak of live tensor "
              f"storages in MiB and its parts at the peak, torch {torch.__version__}, {platform.machine()}. "
              f"Command: `python benchmarks/tile_memory.py --frames {args.frames} --sizes "
              f"{' '.join(map(str, args.sizes))} --tile {args.tile} --halo {args.halo}`.")
    publish_table(header, lines, args.results, "tile_memory", heading="Spatial tiling: where the peak goes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
