"""Fused ops vs eager PyTorch: forward, backward and both, with memory.

Each op of ``chopgrad.kernels`` against the eager PyTorch code it replaces:

=====================  ==============================================================
case                   eager baseline
=====================  ==============================================================
``pixel_mse``          ``F.mse_loss(reduction="none").sum`` per frame (autograd)
``pixel_charbonnier``  ``sqrt((p - t)**2 + eps**2)`` per frame (autograd)
``ssim``               separable-Gaussian SSIM with ``conv2d`` (pytorch-msssim's math)
``rms_norm_silu``      diffusers ``WanRMS_norm`` + ``SiLU``
``causal_pad``         ``torch.cat`` + ``F.pad`` + ``clone`` of the cache
``norm_silu_pad_conv`` the whole ``WanResidualBlock`` half: norm, SiLU, cache, cat, pad, conv3d
=====================  ==============================================================

The fused side is the public op: Triton on CUDA, the memory-lean PyTorch
reference elsewhere (on CPU this compares the lean reference path with eager;
Triton-interpreter timings mean nothing and are never reported).  Memory per
case: bytes saved for backward (unique storages, parameters excluded) and the
peak of live tensor bytes over forward + backward (``TorchDispatchMode``
tracker on CPU, ``torch.cuda.max_memory_allocated`` on CUDA).

    python benchmarks/bench_kernels.py [--repeats 5] [--json bench_out/kernels.json]
    pytest benchmarks/bench_kernels.py --benchmark-only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chopgrad import kernels as K  # noqa: E402
from chopgrad.tools.bench.memory import PeakMemory  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------
# eager baselines
# ---------------------------------------------------------------------------


def eager_ssim(pred, target):
    B, C, Fr, H, W = pred.shape
    g = K.ssim.gaussian_window(dtype=pred.dtype, device=pred.device)
    wh = g.view(1, 1, 1, -1).repeat(C, 1, 1, 1)
    wv = g.view(1, 1, -1, 1).repeat(C, 1, 1, 1)

    def filt(t):
        return F.conv2d(F.conv2d(t, wh, groups=C), wv, groups=C)

    x = pred.permute(0, 2, 1, 3, 4).reshape(B * Fr, C, H, W)
    y = target.permute(0, 2, 1, 3, 4).reshape(B * Fr, C, H, W)
    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    c1, c2 = 0.02**2, 0.06**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.reshape(B, Fr, -1).mean(-1)


def eager_norm_silu_pad_conv(x, gamma, cache, weight, bias):
    y = K.rms_norm_silu_reference(x, gamma, 0.0)
    new_cache = y[:, :, -2:].clone()
    out = F.conv3d(F.pad(torch.cat([cache, y], 2), (1, 1, 1, 1, 0, 0)), weight, bias)
    return out, new_cache


# ---------------------------------------------------------------------------
# cases: make() -> dict of inputs; fused/eager(inputs) -> output tensor(s) to backprop
# ---------------------------------------------------------------------------


def _video(shape, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    t = (torch.rand(shape, generator=g) * 2 - 1).to(DEVICE)
    return t.requires_grad_(requires_grad)


def _make_pixel():
    shape = (1, 3, 4, 256, 256) if DEVICE == "cpu" else (1, 3, 16, 480, 832)
    return dict(pred=_video(shape), target=_video(shape, 1, False))


def _make_norm():
    shape = (1, 96, 4, 64, 64) if DEVICE == "cpu" else (1, 96, 4, 240, 416)
    g = torch.Generator().manual_seed(2)
    return dict(x=_video(shape), gamma=(torch.rand(96, 1, 1, 1, generator=g) + 0.5).to(DEVICE).requires_grad_())


def _make_pad():
    d = _make_norm()
    x = d["x"]
    return dict(x=x, cache=_video((x.shape[0], x.shape[1], 2) + tuple(x.shape[3:]), 3))


def _make_block():
    d = _make_pad()
    C = d["x"].shape[1]
    g = torch.Generator().manual_seed(4)
    d["gamma"] = (torch.rand(C, 1, 1, 1, generator=g) + 0.5).to(DEVICE).requires_grad_()
    d["weight"] = (torch.randn(C, C, 3, 3, 3, generator=g) * 0.02).to(DEVICE).requires_grad_()
    d["bias"] = torch.zeros(C, device=DEVICE, requires_grad=True)
    return d


CASES = {
    "pixel_mse": (
        _make_pixel,
        lambda d: K.fused_pixel_loss(d["pred"], d["target"], kind="mse", reduction="none"),
        lambda d: F.mse_loss(d["pred"], d["target"], reduction="none").sum(dim=(1, 3, 4)),
    ),
    "pixel_charbonnier": (
        _make_pixel,
        lambda d: K.fused_pixel_loss(d["pred"], d["target"], kind="charbonnier", reduction="none"),
        lambda d: torch.sqrt((d["pred"] - d["target"]) ** 2 + 1e-6).sum(dim=(1, 3, 4)),
    ),
    "ssim": (
        _make_pixel,
        lambda d: K.fused_ssim(d["pred"], d["target"]),
        lambda d: eager_ssim(d["pred"], d["target"]),
    ),
    "rms_norm_silu": (
        _make_norm,
        lambda d: K.rms_norm_silu(d["x"], d["gamma"]),
        lambda d: K.rms_norm_silu_reference(d["x"], d["gamma"]),
    ),
    "causal_pad": (
        _make_pad,
        lambda d: K.causal_pad(d["x"], d["cache"], time_pad=2, pad_h=1, pad_w=1),
        lambda d: K.causal_pad_reference(d["x"], d["cache"], time_pad=2, pad_h=1, pad_w=1),
    ),
    "norm_silu_pad_conv": (
        _make_block,
        lambda d: K.rms_norm_silu_pad_conv3d(d["x"], d["gamma"], 0.0, d["cache"], d["weight"], d["bias"],
                                             time_pad=2, pad_h=1, pad_w=1),
        lambda d: eager_norm_silu_pad_conv(d["x"], d["gamma"], d["cache"], d["weight"], d["bias"]),
    ),
}


def _as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _leaves(d):
    return [v for v in d.values() if isinstance(v, torch.Tensor) and v.requires_grad]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run_forward(fn, d):
    return _as_list(fn(d))


def run_backward(outs, grads):
    torch.autograd.backward(outs, grads)


def run_both(fn, d):
    outs = _as_list(fn(d))
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])


def memory(fn, d) -> dict:
    """Saved bytes (forward) and peak live bytes over forward + backward."""
    params = set()
    saved: dict = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    inputs = {v.untyped_storage().data_ptr() for v in d.values() if isinstance(v, torch.Tensor)}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = _as_list(fn(d))
    saved_bytes = sum(n for k, n in saved.items() if k not in inputs)
    saved_input_bytes = sum(n for k, n in saved.items() if k in inputs)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    del outs
    for v in _leaves(d):
        v.grad = None
    with PeakMemory(DEVICE, cpu="live_tensors") as tracker:
        run_both(fn, d)
    for v in _leaves(d):
        v.grad = None
    return dict(saved_new_bytes=saved_bytes, saved_input_bytes=saved_input_bytes, peak_bytes=tracker.peak_bytes)


def _time_once(fn, d) -> dict:
    _sync()
    t0 = time.perf_counter()
    outs = run_forward(fn, d)
    _sync()
    t1 = time.perf_counter()
    run_backward(outs, [torch.ones_like(o) for o in outs])
    _sync()
    t2 = time.perf_counter()
    del outs
    run_both(fn, d)
    _sync()
    t3 = time.perf_counter()
    for v in _leaves(d):
        v.grad = None
    return {"forward": t1 - t0, "backward": t2 - t1, "both": t3 - t2}


def measure_all(repeats: int = 5) -> list[dict]:
    """Memory per impl, then ``repeats`` timings interleaved eager/fused; the minimum is reported
    (on a shared machine the least disturbed run), the medians are kept in the JSON."""
    rows = []
    for name, (make, fused, eager) in CASES.items():
        d = make()
        row = {"case": name, "device": DEVICE, "backend": K.fused_ops_available(DEVICE)["pixel_losses"],
               "shape": list(next(iter(d.values())).shape)}
        impls = (("eager", eager), ("fused", fused))
        samples = {impl: [] for impl, _ in impls}
        for impl, fn in impls:
            run_both(fn, d)  # warm-up
            for v in _leaves(d):
                v.grad = None
            row[impl] = memory(fn, d)
        for _ in range(repeats):
            for impl, fn in impls:
                samples[impl].append(_time_once(fn, d))
        for impl, _ in impls:
            for mode in ("forward", "backward", "both"):
                ts = [s_[mode] for s_ in samples[impl]]
                row[impl][mode] = min(ts)
                row[impl][mode + "_median"] = statistics.median(ts)
        rows.append(row)
    return rows


def table(rows) -> str:
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    ms = lambda s: f"{1e3 * s:.1f}"  # noqa: E731
    out = ["| case | shape | impl | saved MiB | peak MiB | fwd ms | bwd ms | fwd+bwd ms |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for impl in ("eager", "fused"):
            m = r[impl]
            out.append(f"| {r['case']} | {'x'.join(map(str, r['shape']))} | {impl} | {mib(m['saved_new_bytes'])} | "
                       f"{mib(m['peak_bytes'])} | {ms(m['forward'])} | {ms(m['backward'])} | {ms(m['both'])} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fused ops vs eager PyTorch")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default="bench_out/kernels.json")
    args = ap.parse_args(argv)
    if DEVICE == "cpu" and K.fused_ops_available("cpu")["pixel_losses"] != "reference":
        print("refusing to time the Triton interpreter: unset CHOPGRAD_FORCE_TRITON", file=sys.stderr)
        return 2
    rows = measure_all(args.repeats)
    print(f"torch {torch.__version__}, device {DEVICE}, threads {torch.get_num_threads()}; "
          "saved = bytes newly kept for backward (inputs excluded); times = min over interleaved repeats")
    print(table(rows))
    if args.json:
        p = Path(args.json)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
        print(f"wrote {p}")
    return 0


# ---------------------------------------------------------------------------
# pytest-benchmark entry points
# ---------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.fixture(autouse=True)
    def _no_interpreter_timing():
        if DEVICE == "cpu" and K.fused_ops_available("cpu")["pixel_losses"] != "reference":
            pytest.skip("Triton interpreter timings mean nothing: unset CHOPGRAD_FORCE_TRITON")

    @pytest.mark.parametrize("mode", ["forward", "backward", "both"])
    @pytest.mark.parametrize("impl", ["eager", "fused"])
    @pytest.mark.parametrize("case", list(CASES))
    def test_op(benchmark, case, impl, mode):
        make, fused, eager = CASES[case]
        fn = fused if impl == "fused" else eager
        d = make()
        benchmark.extra_info.update(memory(fn, d))
        benchmark.extra_info["backend"] = K.fused_ops_available(DEVICE)["pixel_losses"] if impl == "fused" else "eager"

        def clear():
            for v in _leaves(d):
                v.grad = None

        if mode == "forward":
            def setup():
                clear()
                return (fn, d), {}
            benchmark.pedantic(lambda f, dd: (run_forward(f, dd), _sync()), setup=setup, rounds=5)
        elif mode == "backward":
            def setup():
                clear()
                outs = run_forward(fn, d)
                return (outs, [torch.ones_like(o) for o in outs]), {}
            benchmark.pedantic(lambda o, g: (run_backward(o, g), _sync()), setup=setup, rounds=5)
        else:
            def setup():
                clear()
                return (fn, d), {}
            benchmark.pedantic(lambda f, dd: (run_both(f, dd), _sync()), setup=setup, rounds=5)


if __name__ == "__main__":
    sys.exit(main())
