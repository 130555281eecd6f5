"""One AutoencoderKLWan decoder step, forward + backward, patched (chopgrad.patch) vs unpatched.

Measures, for a tiny and a Wan-2.1-width decoder (base_dim 96, dim_mult
[1, 2, 4, 4], 2 res blocks: the real Wan 2.1 decoder layout, random weights):

* saved-activation bytes: unique storages packed by autograd during the step's
  forward (``saved_tensors_hooks``), parameters excluded -- what the graph
  keeps alive until backward;
* peak live tensor bytes during forward + backward (every tensor the step's
  ops allocate, tracked through a ``TorchDispatchMode`` with storage weakrefs;
  on CUDA ``torch.cuda.max_memory_allocated`` is reported as well);
* wall time of forward + backward (median and minimum of interleaved runs;
  on a shared machine the minimum is the less noisy estimate).

The step is a steady-state one (latent frame 1, after a first step that
filled the cache), driven exactly like ``AutoencoderKLWan._decode`` and the
chopgrad engine do: ``vae.decoder(x[:, :, i:i+1], feat_cache=..., feat_idx=[0])``,
with a gradient for the latent and all decoder parameters.

Run as a script for a table + JSON::

    python benchmarks/bench_decoder_step.py [--configs tiny wan21] [--repeats 5] [--json bench_out/decoder_step.json]

or through pytest-benchmark::

    pytest benchmarks/bench_decoder_step.py --benchmark-only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chopgrad.tools.bench.memory import PeakMemory  # noqa: E402

CONFIGS = {
    "tiny": dict(vae=dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                          temperal_downsample=[False, True, True]), latent_hw=(16, 16)),
    "wan21": dict(vae=dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                           temperal_downsample=[False, True, True]), latent_hw=(12, 12)),
}


def build(name: str, patched: bool, device: str = "cpu", dtype=torch.float32):
    from diffusers import AutoencoderKLWan

    from chopgrad import patch

    cfg = CONFIGS[name]
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**cfg["vae"]).to(device=device, dtype=dtype).eval()
    if patched:
        patch(vae)
    h, w = cfg["latent_hw"]
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, cfg["vae"]["z_dim"], 2, h, w, generator=g).to(device=device, dtype=dtype)
    with torch.no_grad():
        vae.clear_cache()
        x = vae.post_quant_conv(z)
        vae.decoder(x[:, :, :1], feat_cache=vae._feat_map, feat_idx=[0], first_chunk=True)
    state = list(vae._feat_map)
    return vae, x[:, :, 1:2].contiguous(), state


def step(vae, x, state, *, saved=None):
    """Forward + backward of one decoder step; returns the output (detached)."""
    cache = list(state)  # the step reassigns slots: keep the caller's state intact
    xin = x.detach().requires_grad_()
    if saved is not None:
        params = {p.untyped_storage().data_ptr() for p in vae.parameters()}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                saved[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = vae.decoder(xin, feat_cache=cache, feat_idx=[0])
    else:
        out = vae.decoder(xin, feat_cache=cache, feat_idx=[0])
    weight = torch.linspace(-1, 1, out.numel(), device=out.device, dtype=out.dtype).view_as(out)
    (out * weight).sum().backward()
    vae.zero_grad(set_to_none=True)
    return out.detach()


def measure(name: str, repeats: int = 5, device: str = "cpu") -> dict:
    """Memory (both variants) and interleaved timings; returns a result row."""
    models = {p: build(name, p, device) for p in (False, True)}
    row: dict = {"config": name, "device": device, "latent_hw": CONFIGS[name]["latent_hw"]}
    outs = {}
    for patched, (vae, x, state) in models.items():
        key = "patched" if patched else "unpatched"
        saved: dict = {}
        outs[key] = step(vae, x, state, saved=saved)
        row[f"{key}_saved_bytes"] = sum(saved.values())
        with PeakMemory(device, cpu="live_tensors") as tracker:
            step(vae, x, state)
        row[f"{key}_cuda_peak_bytes" if device == "cuda" else f"{key}_peak_live_bytes"] = tracker.peak_bytes
    row["max_abs_diff"] = (outs["patched"] - outs["unpatched"]).abs().max().item()
    times = {"unpatched": [], "patched": []}
    for _ in range(repeats):  # interleave to share the noise of a busy machine
        for patched, (vae, x, state) in models.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(vae, x, state)
            if device == "cuda":
                torch.cuda.synchronize()
            times["patched" if patched else "unpatched"].append(time.perf_counter() - t0)
    for key, ts in times.items():
        row[f"{key}_time_s"] = statistics.median(ts)
        row[f"{key}_time_min_s"] = min(ts)
        row[f"{key}_times_s"] = ts
    row["saved_reduction"] = 1 - row["patched_saved_bytes"] / row["unpatched_saved_bytes"]
    peak_key = "cuda_peak_bytes" if device == "cuda" else "peak_live_bytes"
    row["peak_reduction"] = 1 - row[f"patched_{peak_key}"] / row[f"unpatched_{peak_key}"]
    row["time_ratio"] = row["patched_time_s"] / row["unpatched_time_s"]
    row["time_ratio_min"] = row["patched_time_min_s"] / row["unpatched_time_min_s"]
    return row


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def table(rows: list[dict]) -> str:
    peak = "cuda_peak_bytes" if rows and rows[0]["device"] == "cuda" else "peak_live_bytes"
    lines = [
        "| decoder | latent HxW | saved MiB unpatched | saved MiB patched | saved -% | peak MiB unpatched "
        "| peak MiB patched | peak -% | time s unpatched | time s patched | time ratio (median) | time ratio (min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['latent_hw'][0]}x{r['latent_hw'][1]} | {_mib(r['unpatched_saved_bytes'])} | "
            f"{_mib(r['patched_saved_bytes'])} | {100 * r['saved_reduction']:.0f}% | {_mib(r[f'unpatched_{peak}'])} | "
            f"{_mib(r[f'patched_{peak}'])} | {100 * r['peak_reduction']:.0f}% | {r['unpatched_time_s']:.3f} | "
            f"{r['patched_time_s']:.3f} | {r['time_ratio']:.2f}x | {r['time_ratio_min']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default="bench_out/decoder_step.json")
    args = ap.parse_args(argv)
    rows = [measure(name, args.repeats, args.device) for name in args.configs]
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    print(table(rows))
    for r in rows:
        ok = r["peak_reduction"] >= 0.25 and min(r["time_ratio"], r["time_ratio_min"]) <= 1.1
        print(f"{r['config']}: bar (peak >= 25% lower, time <= 1.1x): {'met' if ok else 'NOT met'}; "
              f"max |patched - unpatched| = {r['max_abs_diff']:.2e}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
        print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------
# pytest-benchmark entry points
# ---------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
    @pytest.mark.parametrize("name", list(CONFIGS))
    def test_decoder_step(benchmark, name, patched):
        pytest.importorskip("diffusers")
        if name == "wan21" and os.environ.get("CHOPGRAD_BENCH_SMALL"):
            pytest.skip("CHOPGRAD_BENCH_SMALL set")
        vae, x, state = build(name, patched)
        saved: dict = {}
        step(vae, x, state, saved=saved)
        with PeakMemory("cpu", cpu="live_tensors") as tracker:
            step(vae, x, state)
        benchmark.extra_info.update(saved_bytes=sum(saved.values()), peak_live_bytes=tracker.peak_bytes)
        benchmark.pedantic(step, args=(vae, x, state), rounds=3, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
