"""Fidelity of the truncated tiled gradient (`tile_grad="truncated"`) against the exact one, by tile and halo.

On the default model (a trained decoder: its receptive field is what the
halo truncates), one clip is encoded and decoded with an MSE pixel loss. The
reference is the untiled `chopgrad.pixel_loss` gradient with the same
schedule and d_trunc, so only the spatial truncation is measured. For each
tile and halo the table gives the cosine similarity and the relative error
||g - g_ref|| / ||g_ref|| of the latent gradient and of all decoder
parameter gradients together, and the loss, which must equal the reference's.

    python benchmarks/tile_fidelity.py --results benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import platform

import torch

import chopgrad
from chopgrad.tools.bench.markdown import publish_table
from chopgrad.tools.bench.workloads import load_model, make_inputs
from chopgrad.tools.metrics import gradient_fidelity



def gradients(vae, latents, target, **kwargs):
    """(loss, latent gradient, parameter gradients flattened into one vector)."""
    z = latents.clone().requires_grad_(True)
    vae.zero_grad(set_to_none=True)
    loss = chopgrad.pixel_loss(vae, z, target, **kwargs)
    loss.backward()
    params = torch.cat([p.grad.flatten() for p in vae.parameters() if p.grad is not None])
    return loss.item(), z.grad.clone(), params.clone()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--tiles", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--halos", type=int, nargs="+", default=[0, 8, 16, 32, 64])
    parser.add_argument("--d-trunc", type=int, default=1)
    parser.add_argument("--schedule", default="chunked")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", help="markdown file whose tile-fidelity section is replaced")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    vae = load_model("default")
    latents, target = make_inputs(vae, args.frames, args.size, args.size, seed=args.size)
    common = dict(d_trunc=args.d_trunc, schedule=args.schedule)
    ref_loss, ref_z, ref_params = gradients(vae, latents, target, **common)
    lines = ["| tile | halo | latents: cosine | latents: rel. error | parameters: cosine | parameters: rel. error "
             "| loss - untiled loss |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for tile in args.tiles:
        for halo in args.halos:
            loss, g_z, g_params = gradients(vae, latents, target, tile=tile, tile_grad="truncated", tile_halo=halo,
                                            **common)
            cos_z, err_z = gradient_fidelity(g_z, ref_z)
            cos_p, err_p = gradient_fidelity(g_params, ref_params)
            lines.append(f"| {tile} | {halo} | {cos_z:.4f} | {err_z:.4f} | {cos_p:.4f} | {err_p:.4f} "
                         f"| {loss - ref_loss:.1e} |")
            print(lines[-1], flush=True)
    header = (f"Default model, encoded clip, {args.frames} frames at {args.size}x{args.size}, MSE, {args.schedule} "
              f"d_trunc={args.d_trunc}; reference: the untiled gradient (same schedule and d_trunc). "
              f"torch {torch.__version__}, {platform.machine()}. Command: `python benchmarks/tile_fidelity.py "
              f"--frames {args.frames} --size {args.size} --tiles {' '.join(map(str, args.tiles))} "
              f"--halos {' '.join(map(str, args.halos))}`.")
    publish_table(header, lines, args.results, "tile_fidelity",
                  heading="Spatial tiling: fidelity of the truncated mode")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
