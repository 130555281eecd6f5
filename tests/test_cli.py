"""`chopgrad bench|probe|info` end to end on tiny sizes (every bench configuration is a real subprocess)."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch

from chopgrad.cli import main

TINY = ["--frames", "5", "9", "--sizes", "16", "--repeats", "1", "--threads", "1", "--no-progress"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, out


def test_bench_end_to_end(tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out = run_cli(capsys, "bench", "--model", "tiny-wan21", *TINY, "--baselines", "full",
                        "--schedules", "chunked", "--d-trunc", "1", "--out", str(out_dir))
    assert code == 0
    for name in ("results.json", "results.md", "memory_vs_frames.png", "time_vs_frames.png",
                 "fidelity_vs_dtrunc.png"):
        assert (out_dir / name).stat().st_size > 0, name
    data = json.loads((out_dir / "results.json").read_text())
    rows = data["rows"]
    assert [(r["frames"], r["label"]) for r in rows] == [
        (5, "full backprop"), (5, "chopgrad chunked d=1"), (9, "full backprop"), (9, "chopgrad chunked d=1")]
    assert all(r["status"] == "ok" for r in rows), [r["detail"] for r in rows]
    for r in rows:
        assert r["peak_bytes"] > 0 and r["time_s"] > 0 and r["frames_per_s"] > 0
        assert math.isfinite(r["cosine"]) and math.isfinite(r["rel_error"])
    # 5 frames = 2 decoder steps: d_trunc=1 is no truncation, so the gradient equals full backprop
    assert rows[1]["cosine"] == pytest.approx(1.0, abs=1e-5) and rows[1]["rel_error"] < 1e-4
    assert rows[0]["rel_error"] == 0.0
    assert "| 16x16 | 9 | chopgrad chunked d=1 |" in out
    assert "| 16x16 | 9 | chopgrad chunked d=1 |" in (out_dir / "results.md").read_text()
    assert data["machine"]["torch"] == torch.__version__


def test_bench_oom_rows_reported(tmp_path, capsys):
    # 0.001 GB: every worker is over budget as soon as it starts; the run completes and says OOM
    code, out = run_cli(capsys, "bench", "--model", "tiny-wan21", "--frames", "5", "--sizes", "16", "--repeats", "1",
                        "--d-trunc", "0", "--schedules", "sliding", "--memory-budget", "0.001", "--no-progress",
                        "--out", str(tmp_path))
    assert code == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["oom", "oom", "oom"]
    assert all(r["cosine"] is None for r in rows)
    assert out.count("OOM") >= 3
    assert (tmp_path / "memory_vs_frames.png").exists()


def test_bench_stopped_by_sigterm_keeps_the_measured_rows(tmp_path):
    out_dir = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "chopgrad", "bench", "--model", "tiny-wan21", "--frames", "5", "9", "13",
         "--sizes", "16", "--repeats", "1", "--threads", "1", "--no-progress", "--out", str(out_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = out_dir / "results.json"
    deadline = time.monotonic() + 300
    while not results.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no configuration finished in 300 s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    rows = json.loads(results.read_text())["rows"]
    assert 1 <= len(rows) < 15  # 3 frame counts x 5 methods were asked for
    assert f"interrupted after {len(rows)} configurations" in err
    assert "16x16    5f full backprop: ok," in err  # the per-configuration line of --no-progress


def test_bench_local_diffusers_folder(tmp_path, capsys):
    from diffusers import AutoencoderKLWan

    from chopgrad.bench.workloads import TINY_WAN21_CONFIG

    torch.manual_seed(0)
    folder = tmp_path / "my_vae"
    AutoencoderKLWan(**TINY_WAN21_CONFIG).save_pretrained(str(folder))
    code, out = run_cli(capsys, "bench", "--model", str(folder), "--frames", "5", "--sizes", "16", "--repeats", "1",
                        "--baselines", "--schedules", "sliding", "--d-trunc", "0", "--no-plots", "--no-progress",
                        "--out", str(tmp_path / "out"))
    assert code == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["status"] == "ok", rows[0]["detail"]
    assert rows[0]["cosine"] is None  # no full-backprop reference requested
    assert "n/a" in out


@pytest.mark.parametrize("argv, message", [
    (["bench", "--model", "tiny-wan21", "--frames", "6"], "1 + 4k"),
    (["bench", "--model", "tiny-wan21", "--frames", "5", "--sizes", "12"], "multiple"),
    (["bench", "--dtype", "fp8"], "invalid choice"),
    (["bench", "--frames", "0"], "positive integer"),
    (["bench", "--model", "/no/such/folder"], "neither"),
    (["probe", "--model", "tiny-wan21", "--frames", "10"], "1 + 4k"),
    (["bench", "--device", "tpu"], "cpu"),
])
def test_bad_arguments_exit_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_without_cuda_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--device", "cuda", "--model", "tiny-wan21"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_info(capsys):
    code, out = run_cli(capsys, "info")
    assert code == 0
    assert f"torch      {torch.__version__}" in out
    assert "C++ extension:" in out and "CUDA:" in out and "causal_pad" in out
    code, out = run_cli(capsys, "info", "--json")
    info = json.loads(out)
    assert info["torch"] == torch.__version__ and isinstance(info["extension_built"], bool)
    assert "cpu" in info["fused_ops"]


def test_probe_cli(tmp_path, capsys):
    code, out = run_cli(capsys, "probe", "--model", "tiny-wan21", "--frames", "13", "--size", "16",
                        "--max-d-trunc", "1", "--out", str(tmp_path))
    assert code == 0
    assert "recommended d_trunc" in out
    data = json.loads((tmp_path / "probe.json").read_text())
    assert data["num_steps"] == 4 and data["distances"] == [0, 1, 2, 3] and data["d_truncs"] == [0, 1]
    assert (tmp_path / "probe.png").stat().st_size > 0 and (tmp_path / "probe.md").exists()


def test_default_model_loads_for_bench():
    from chopgrad.bench.bench import check_shapes
    from chopgrad.bench.workloads import latent_shape, load_model

    vae = load_model("default")
    assert type(vae).__name__ == "AutoencoderKLWan" and vae.config.z_dim == 32
    check_shapes(vae, [17, 129], [32, 64, 128])
    assert latent_shape(vae, 129, 64, 64) == (1, 32, 33, 8, 8)


def _row(frames, method, d=None, schedule="sliding", status="ok", peak=100, time_s=1.0, loss=0.5):
    from chopgrad.bench.methods import method_label

    return dict(size=32, frames=frames, method=method, d_trunc=d, schedule=schedule,
                label=method_label(method, d, schedule), status=status, detail="", loss=loss,
                peak_bytes=peak * 2**20 if status == "ok" else None, time_s=time_s if status == "ok" else None,
                frames_per_s=frames / time_s if status == "ok" else None, cosine=None, rel_error=None)


def test_table_bars_and_loss_guard(capsys):
    from chopgrad.bench.bench import _check_same_loss, check_bars, format_table

    rows = [_row(17, "full", peak=70), _row(17, "pixel_loss", 1, peak=58), _row(17, "pixel_loss", 1, "chunked"),
            _row(129, "full", status="oom"), _row(129, "checkpoint", peak=97, time_s=2.0),
            _row(129, "pixel_loss", 1, peak=59), _row(129, "pixel_loss", 1, "chunked", time_s=0.9)]
    table = format_table(rows)
    assert "| 32x32 | 129 | full backprop | OOM | - |" in table
    assert "| 32x32 | 17 | chopgrad sliding d=1 | 58.0 | 0.83x |" in table
    bars = {name: passed for name, passed, _ in check_bars(rows)}
    assert bars["sliding d=1 peak at 129 / at 17 frames <= 1.15"] is True
    assert not any("peak / full backprop peak" in name for name in bars)  # full backprop OOM: not evaluated
    assert bars["correct checkpointing reported"] is True
    row = dict(_row(17, "pixel_loss", 1, loss=0.25), cosine=0.9, rel_error=0.1)
    _check_same_loss(row, 0.5)
    assert row["cosine"] is None and "differs from full backprop" in row["detail"]
    assert "warning" in capsys.readouterr().err


@pytest.mark.parametrize(
    "loads, cores, expected",
    [
        ((0.0, 0.0, 0.0), 2, 2),  # idle machine: every core
        ((0.4, 0.9, 1.0), 2, 1),  # a lull in a persistent one-core load still counts the load
        ((1.2, 0.3, 0.2), 2, 1),  # a fresh load counts at once
        ((9.0, 9.0, 9.0), 2, 1),  # overloaded: never below one thread
        ((3.0, 2.0, 1.0), 16, 13),
    ],
)
def test_default_threads_counts_the_busiest_load_average(monkeypatch, loads, cores, expected):
    import os

    from chopgrad.bench.bench import default_threads

    monkeypatch.setattr(os, "getloadavg", lambda: loads)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert default_threads() == expected
