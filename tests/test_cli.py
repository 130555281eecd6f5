"""`chopgrad bench|probe|info` end to end on tiny sizes (every bench configuration is a real subprocess),
and how they reject invalid arguments."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from chopgrad.tools.cli import build_parser, main

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


def test_bench_tiled_rows(tmp_path, capsys):
    """--tile adds a tiled row per tile_grad after each chopgrad method; exact tiling has the untiled gradient."""
    out_dir = tmp_path / "out"
    code, _ = run_cli(capsys, "bench", "--model", "tiny-wan21", "--frames", "9", "--sizes", "16", "24",
                      "--repeats", "1", "--threads", "1", "--no-progress", "--baselines", "full",
                      "--schedules", "chunked", "--d-trunc", "1", "--tile", "8", "--tile-grads", "exact", "truncated",
                      "--out", str(out_dir))
    assert code == 0
    rows = json.loads((out_dir / "results.json").read_text())["rows"]
    assert [r["label"] for r in rows[:4]] == ["full backprop", "chopgrad chunked d=1",
                                              "chopgrad chunked d=1 tile 8 exact",
                                              "chopgrad chunked d=1 tile 8 truncated halo 8"]
    assert all(r["status"] == "ok" and r["time_s"] > 0 for r in rows), [r["detail"] for r in rows]
    for size in (16, 24):
        untiled, exact, truncated = [r for r in rows if r["size"] == size and r["method"] == "pixel_loss"]
        assert exact["rel_error"] == pytest.approx(untiled["rel_error"], rel=1e-4, abs=1e-6)
        assert truncated["loss"] == pytest.approx(untiled["loss"], rel=1e-6)
    assert (out_dir / "memory_vs_size.png").stat().st_size > 0


def test_bench_oom_rows_reported(tmp_path, capsys):
    # 0.001 GiB: every worker is over budget as soon as it starts; the run completes and says OOM
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

    from chopgrad.tools.bench.workloads import TINY_WAN21_CONFIG

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
    (["bench", "--model", "/no/such/folder"], "does not exist"),
    (["probe", "--model", "tiny-wan21", "--frames", "10"], "1 + 4k"),
    (["bench", "--device", "tpu"], "cpu"),
    (["bench", "--model", "tiny-wan21", "--tile", "12"], "--tile: 12 is not a multiple of the model's spatial stride (8"),
    (["bench", "--model", "tiny-wan21", "--tile-halo", "8"], "give --tile too"),
    (["bench", "--model", "tiny-wan21", "--tile", "8", "--tile-halo", "4", "--tile-grads", "truncated"],
     "--tile-halo: 4 is not a multiple"),
    (["bench", "--model", "tiny-wan21", "--tile", "8", "--tile-halo", "8"], "applies to --tile-grads truncated only"),
    (["probe", "--device", "cuda:x"], "--device must be 'cpu' or 'cuda[:N]', got 'cuda:x'"),
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
    from chopgrad.tools.bench.bench import check_shapes
    from chopgrad.tools.bench.workloads import latent_shape, load_model

    vae = load_model("default")
    assert type(vae).__name__ == "AutoencoderKLWan" and vae.config.z_dim == 32
    check_shapes(vae, [17, 129], [32, 64, 128])
    assert latent_shape(vae, 129, 64, 64) == (1, 32, 33, 8, 8)


def _row(frames, method, d=None, schedule="sliding", status="ok", peak=100, time_s=1.0, loss=0.5):
    from chopgrad.tools.bench.methods import method_label

    return dict(size=32, frames=frames, method=method, d_trunc=d, schedule=schedule,
                label=method_label(method, d, schedule), status=status, detail="", loss=loss,
                peak_bytes=peak * 2**20 if status == "ok" else None, time_s=time_s if status == "ok" else None,
                frames_per_s=frames / time_s if status == "ok" else None, cosine=None, rel_error=None)


def test_table_summary_and_loss_guard(capsys):
    from chopgrad.tools.bench.bench import _check_same_loss, format_summary, format_table

    rows = [_row(17, "full", peak=70), _row(17, "pixel_loss", 1, peak=58), _row(17, "pixel_loss", 1, "chunked"),
            _row(129, "full", peak=600, time_s=1.8), _row(129, "checkpoint", status="oom"),
            _row(129, "pixel_loss", 1, peak=60), _row(129, "pixel_loss", 1, "chunked", time_s=0.9)]
    rows[5]["cosine"] = 0.98765
    table = format_table(rows)
    assert "| 32x32 | 129 | checkpointed (per step) | OOM | - |" in table
    assert "| 32x32 | 17 | chopgrad sliding d=1 | 58.0 | 0.83x |" in table
    assert format_summary(rows).splitlines() == [
        "at 32x32, 129 frames (ratios against full backprop):",
        "  checkpointed (per step): OOM",
        "  chopgrad sliding d=1: 0.10x peak memory, 0.56x time, latent-gradient cosine 0.9877",
        "  chopgrad chunked d=1: 0.17x peak memory, 0.50x time"]
    without_full = format_summary([r for r in rows if r["method"] != "full"]).splitlines()
    assert without_full[0] == "at 32x32, 129 frames:"
    assert without_full[2] == "  chopgrad sliding d=1: peak 60.0 MiB, 1.000 s/step, latent-gradient cosine 0.9877"
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

    from chopgrad.tools.bench.bench import default_threads

    monkeypatch.setattr(os, "getloadavg", lambda: loads)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert default_threads() == expected


# ----------------------------------------------------------------------------- argument errors
#
# Every invalid argument ends the run with exit code 2 and one `error: ...` line
# on stderr before any work starts: the fixture `no_work` (conftest.py) fails a
# test that reaches input preparation, the probe or the benchmark loop.


def expect_usage_error(capsys, argv) -> tuple[str, str]:
    """Runs the CLI on `argv` expecting a clean usage error; returns (the error line, all of stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    assert exc.value.code == 2, captured.err
    assert "Traceback" not in captured.err + captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, captured.err
    return errors[0], captured.err


@pytest.fixture(scope="module")
def cogvideox_folder(tmp_path_factory):
    """A tiny random AutoencoderKLCogVideoX saved with save_pretrained (safetensors)."""
    from tiny_models import tiny_cogvideox

    folder = tmp_path_factory.mktemp("models") / "cogvideox"
    tiny_cogvideox().save_pretrained(str(folder))
    return folder


def _model_folder(kind: str, tmp_path, source) -> str:
    folder = tmp_path / kind
    if kind == "missing":
        return str(folder)
    if kind == "file":
        folder.write_text("not a model")
        return str(folder)
    folder.mkdir()
    config, weights = source / "config.json", source / "diffusion_pytorch_model.safetensors"
    if kind in ("no_config", "unsupported", "bad_json", "broken_weights"):
        shutil.copy(weights, folder)
    if kind in ("no_weights", "weight_variant_only", "broken_weights"):
        shutil.copy(config, folder)
    if kind == "unsupported":
        (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 4}))
    if kind == "bad_json":
        (folder / "config.json").write_text("{not json")
    if kind == "weight_variant_only":
        shutil.copy(weights, folder / "diffusion_pytorch_model.fp16.safetensors")
    if kind == "broken_weights":
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"truncated download")
    if kind == "missing_shard":
        shutil.copy(config, folder)
        index = {"metadata": {}, "weight_map": {"a": "part-1.safetensors", "b": "part-2.safetensors"}}
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
        shutil.copy(weights, folder / "part-1.safetensors")
    return str(folder)


@pytest.mark.parametrize("command", ["probe", "bench"])
@pytest.mark.parametrize("kind, message", [
    ("missing", "does not exist"),
    ("file", "is a file"),
    ("empty", "has no config.json and no weights (diffusion_pytorch_model.safetensors or .bin)"),
    ("no_config", "has weights but no config.json"),
    ("no_weights", "has config.json but no weights: expected diffusion_pytorch_model.safetensors or "
                   "diffusion_pytorch_model.bin"),
    ("weight_variant_only", "only weight variants (diffusion_pytorch_model.fp16.safetensors)"),
    ("unsupported", "is for class AutoencoderKL (`_class_name`), which chopgrad has no adapter for; "
                    "supported: AutoencoderKLWan, AutoencoderKLCogVideoX"),
    ("bad_json", "is not a readable JSON config"),
    ("broken_weights", "could not load"),
    ("missing_shard", "is missing 1 of the 2 weight shards listed in diffusion_pytorch_model.safetensors.index.json: "
                      "part-2.safetensors"),
])
def test_unusable_model_folder_is_one_error_line(command, kind, message, tmp_path, cogvideox_folder, capsys,
                                                  no_work):
    folder = _model_folder(kind, tmp_path, cogvideox_folder)
    line, _ = expect_usage_error(capsys, [command, "--model", folder, "--out", str(tmp_path / "out")])
    assert line.startswith("error: --model: ") and folder in line and message in line, line
    assert not (tmp_path / "out").exists()


def test_pipeline_folder_points_at_its_vae(tmp_path, cogvideox_folder, capsys, no_work):
    shutil.copytree(cogvideox_folder, tmp_path / "pipeline" / "vae")
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    line, _ = expect_usage_error(capsys, ["probe", "--model", str(tmp_path / "pipeline")])
    assert f"pass its VAE, {str(tmp_path / 'pipeline' / 'vae')!r}" in line


@pytest.mark.parametrize("argv, message", [
    (["probe", "--frames", "13", "--size", "16"], "cannot decode 13 frames; nearest valid counts: 9 and 16"),
    (["bench", "--frames", "17", "12", "--sizes", "16"], "cannot decode 12 frames; nearest valid counts: 9 and 16"),
    (["probe", "--frames", "2", "--size", "16"], "cannot decode 2 frames; nearest valid counts: 1 and 8"),
])
def test_cogvideox_frame_count_it_cannot_decode_is_one_error_line(argv, message, cogvideox_folder, tmp_path,
                                                                   capsys, no_work):
    line, _ = expect_usage_error(capsys, [*argv, "--model", str(cogvideox_folder), "--out", str(tmp_path / "out")])
    assert line.startswith("error: --frames: this AutoencoderKLCogVideoX ") and message in line, line
    assert "(valid: 1, 8k or 8k + 1; it decodes chunks of 2 latent frames to 8 frames each" in line


def test_cogvideox_decodable_frame_counts_are_those_its_encode_and_decode_round_trip(cogvideox_folder):
    from chopgrad.tools.bench.workloads import is_decodable, load_model, nearest_decodable

    vae = load_model(str(cogvideox_folder))
    for frames in range(1, 27):
        with torch.no_grad():
            latents = vae.encode(torch.zeros(1, 3, frames, 4, 4)).latent_dist.mode()
            decoded = vae.decode(latents).sample.shape[2]
        assert is_decodable(vae, frames) == (decoded == frames) == (frames == 1 or frames % 8 in (0, 1)), frames
    assert nearest_decodable(vae, 13) == (9, 16) and nearest_decodable(vae, 30) == (25, 32)
    assert nearest_decodable(vae, 1) == (None, 8)


@pytest.mark.parametrize("command", ["probe", "bench"])
@pytest.mark.parametrize("layout, message", [
    ("existing_file", "is an existing file; give a folder"),
    ("under_a_file", "cannot be created: {parent!r} is a file, not a folder"),
    ("output_name_is_a_folder", "is a folder, so {name} cannot be written there"),
])
def test_unusable_out_path_is_one_error_line_before_any_work(command, layout, message, tmp_path, capsys, no_work):
    name = "probe.json" if command == "probe" else "results.json"
    blocker = tmp_path / "blocker"
    if layout == "existing_file":
        blocker.write_text("")
        out = blocker
    elif layout == "under_a_file":
        blocker.write_text("")
        out = blocker / "out"
    else:
        (blocker / name).mkdir(parents=True)
        out = blocker
    sizes = ["--size", "16"] if command == "probe" else ["--sizes", "16"]
    line, _ = expect_usage_error(capsys, [command, "--model", "tiny-wan21", "--frames", "5", *sizes,
                                          "--out", str(out)])
    assert line.startswith("error: --out: ") and str(out) in line, line
    assert message.format(parent=str(blocker), name=name) in line, line


class _Reached(Exception):
    pass


@pytest.mark.parametrize("command", ["probe", "bench"])
def test_valid_arguments_reach_the_work(command, cogvideox_folder, tmp_path, monkeypatch):
    """The checks accept an existing output folder, a missing parent and a frame count CogVideoX decodes."""
    import chopgrad.tools.bench.bench
    import chopgrad.tools.bench.workloads

    def reached(*args, **kwargs):
        raise _Reached

    monkeypatch.setattr(chopgrad.tools.bench.workloads, "make_inputs", reached)
    monkeypatch.setattr(chopgrad.tools.bench.bench, "run_bench", reached)
    sizes = ["--size", "16"] if command == "probe" else ["--sizes", "16"]
    for out in (tmp_path, tmp_path / "new" / "nested"):
        with pytest.raises(_Reached):
            main([command, "--model", str(cogvideox_folder), "--frames", "16", *sizes, "--out", str(out)])


def test_local_folder_with_pickle_weights_loads_without_diffusers_errors(tmp_path, capfd):
    from tiny_models import tiny_cogvideox

    from chopgrad.tools.bench.workloads import check_model_source, load_model

    tiny_cogvideox().save_pretrained(str(tmp_path), safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").exists()
    check_model_source(str(tmp_path))
    assert type(load_model(str(tmp_path))).__name__ == "AutoencoderKLCogVideoX"
    assert "error" not in capfd.readouterr().err.lower()


def _normalised(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("command, defaults", [
    ("probe", ["--eps EPS tolerance for the recommended d_trunc", "(default: 0.001)", "(default: 33)",
               "(default: 64)", "(default: 4)", "seed of the synthetic input clip", "(default: probe_out)",
               "(default: default)", "(default: cpu)", "(default: fp32)", "(default: all,"]),
    ("bench", ["(default: 1800.0)", "(default: 17 33 65 129; with --quick: 17 129)",
               "(default: 64 128; with --quick: 32)", "(default: 0 1 2; with --quick: 0 1)",
               "(default: sliding chunked)", "(default: full checkpoint)", "(default: 3)", "(default: 0)",
               "(default: bench_out)", "(default: 80% of available RAM"]),
    ("info", ["--json print JSON instead of text"]),
])
def test_help_gives_every_option_a_text_and_its_default(command, defaults, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = _normalised(capsys.readouterr().out)
    assert text.startswith(f"usage: chopgrad {command} ")
    for expected in defaults:
        assert expected in text, expected
    for action in build_parser().commands[command].arguments:
        assert action.help, action.option_strings
        if action.nargs != 0:  # takes a value, so it has a default to show
            assert "(default" in action.help, action.option_strings


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = _normalised(capsys.readouterr().out)
    for command in ("bench peak memory", "probe temporal locality", "train train a one-step latent model",
                    "info versions"):
        assert command in text
    assert "chopgrad COMMAND --help" in text


def test_no_command_shows_the_commands_and_one_error_line(capsys):
    line, err = expect_usage_error(capsys, [])
    assert line == "error: a command is required: bench, probe, train or info"
    assert "probe temporal locality" in _normalised(err)


@pytest.mark.parametrize("argv, usage, error", [
    (["probe", "--epss", "1"], "usage: chopgrad probe [-h]",
     "error: unrecognized arguments: --epss 1 (did you mean --eps?)"),
    (["bench", "--model", "tiny-wan21", "--quik"], "usage: chopgrad bench [-h]",
     "error: unrecognized arguments: --quik (did you mean --quick?)"),
    (["info", "--jsn"], "usage: chopgrad info [-h]", "error: unrecognized arguments: --jsn (did you mean --json?)"),
    (["probe", "--frames", "x"], "usage: chopgrad probe [-h]",
     "error: argument --frames: expected a positive integer, got 'x'"),
])
def test_misspelt_option_shows_the_subcommand_usage(argv, usage, error, capsys, no_work):
    line, err = expect_usage_error(capsys, argv)
    assert err.startswith(usage) and line == error, err


def test_console_script_prints_one_error_line_and_no_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "chopgrad", "probe", "--model", str(tmp_path / "empty")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"error: --model: folder {str(tmp_path / 'empty')!r} has no config.json and no weights "
        "(diffusion_pytorch_model.safetensors or .bin); a diffusers VAE folder holds both (save_pretrained layout: "
        "config.json + diffusion_pytorch_model.safetensors or .bin)"]


def test_probe_interrupted_is_one_line_and_exit_code_130(monkeypatch, tmp_path, capsys):
    import chopgrad.tools.probe

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(chopgrad.tools.probe, "probe_locality", interrupted)
    assert main(["probe", "--model", "tiny-wan21", "--frames", "5", "--size", "16", "--out", str(tmp_path)]) == 130
    captured = capsys.readouterr()
    assert captured.err.strip() == "interrupted" and "Traceback" not in captured.out


# ----------------------------------------------------------------------------- probe: what it can measure


@pytest.mark.parametrize("argv, message", [
    (["--frames", "17", "--size", "32", "--max-distance", "0"],
     "error: --max-distance 0: no distance to measure, nothing to fit"),
    (["--frames", "1", "--size", "32"],
     "error: --frames 1: this AutoencoderKLWan decodes 1 frame in one decoder step: no distance to measure, nothing "
     "to fit; give 5 frames or more"),
    (["--model", "tiny-hunyuanvideo", "--frames", "9", "--size", "16"],
     "error: --frames 9: this AutoencoderKLHunyuanVideo decodes 9 frames in one decoder step: no distance to "
     "measure, nothing to fit; give 21 frames or more"),
])
def test_probe_with_no_distance_to_measure_is_refused_before_any_work(argv, message, tmp_path, capsys, no_work):
    line, _ = expect_usage_error(capsys, ["probe", *argv, "--out", str(tmp_path / "out")])
    assert line.startswith(message), line
    assert not (tmp_path / "out").exists()


def test_probe_json_is_standard_json(tmp_path, capsys, monkeypatch):
    """A result with no fit (NaN) or no decay beyond distance 0 (alpha = inf) is written as null, never as
    NaN / Infinity (which json.loads accepts but JSON does not)."""
    import chopgrad.tools.probe
    from chopgrad.tools.probe import ProbeResult

    nothing_fitted = ProbeResult(distances=[0, 1], influence=[1.0, float("nan")], C=float("nan"),
                                 alpha=float("nan"), eps=1e-3, recommended_d_trunc=None, num_steps=2)
    monkeypatch.setattr(chopgrad.tools.probe, "probe_locality", lambda *a, **k: nothing_fitted)
    code, out = run_cli(capsys, "probe", "--model", "tiny-wan21", "--frames", "5", "--size", "16",
                        "--out", str(tmp_path))
    assert code == 0 and "recommended d_trunc for eps = 0.001: n/a" in out
    text = (tmp_path / "probe.json").read_text()
    data = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in probe.json"))
    assert data["alpha"] is None and data["C"] is None and data["influence"] == [1.0, None]


@pytest.fixture
def diffusers_log():
    """What diffusers logs, read from a handler of our own: its library logger does not propagate, and its stderr
    handler may hold a stream an earlier test's capture has closed."""
    import io
    import logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def test_probe_bf16_casts_without_diffusers_empty_float32_warning(tmp_path, diffusers_log):
    from chopgrad.tools.bench.workloads import load_model

    load_model("tiny-wan21").to(torch.bfloat16)  # the plain cast logs it: the check below can see it
    assert "should be kept in float32: []" in diffusers_log.getvalue()
    diffusers_log.truncate(0)
    diffusers_log.seek(0)
    code = main(["probe", "--model", "tiny-wan21", "--frames", "5", "--size", "16", "--dtype", "bf16",
                 "--max-d-trunc", "0", "--threads", "1", "--out", str(tmp_path)])
    assert code == 0
    assert "should be kept in float32" not in diffusers_log.getvalue()


def test_cast_model_keeps_diffusers_float32_warning_that_names_modules(diffusers_log):
    """Only the warning with an empty module list is noise; one that names modules still shows."""
    from chopgrad.tools.bench.workloads import cast_model, load_model

    vae = load_model("tiny-wan21")
    vae._keep_in_fp32_modules = ["post_quant_conv"]
    assert next(cast_model(vae, torch.bfloat16).parameters()).dtype == torch.bfloat16
    assert "should be kept in float32: ['post_quant_conv']" in diffusers_log.getvalue()


# ----------------------------------------------------------------------------- bench: stops, --out, fidelity
#
# fake_workers replaces the worker subprocesses with instant results, so these run the real bench loop and
# CLI without measuring anything.


def fake_workers(monkeypatch, stop_at=None):
    """Every configuration "runs" at once with a random gradient and the same loss; the `stop_at`-th run (1-based)
    is interrupted as Ctrl-C would. Returns the configs run, in order."""
    import chopgrad.tools.bench.bench
    from chopgrad.tools.bench.runner import Measurement

    calls = []

    def run_isolated(config, **kwargs):
        calls.append(config)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        if "methods" in config:  # the side-by-side timing run of a clip and size
            return Measurement(config, "ok", result={"results": [{"time_s": 0.5, "frames_per_s": 10.0}
                                                                 for _ in config["methods"]]})
        torch.save(torch.randn(1, 4, 2, 2, 2, generator=torch.Generator().manual_seed(len(calls))),
                   config["save_grad"])
        return Measurement(config, "ok", result={"peak_bytes": len(calls) * 2**20, "loss": 0.5})

    monkeypatch.setattr(chopgrad.tools.bench.bench, "run_isolated", run_isolated)
    return calls


FAKE_BENCH = ["bench", "--model", "tiny-wan21", "--frames", "5", "--sizes", "16", "--schedules", "sliding",
              "--d-trunc", "0", "--threads", "1", "--no-progress"]


def test_bench_records_and_prints_each_configuration_as_it_finishes(tmp_path, capsys, monkeypatch):
    """A stop inside a clip and size keeps the configurations that finished in it, and says they have no times."""
    out = tmp_path / "out"
    fake_workers(monkeypatch, stop_at=3)  # full, checkpoint, then the stop during chopgrad's configuration
    assert main([*FAKE_BENCH, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["label"], r["status"], r["time_s"]) for r in rows] == [
        ("full backprop", "ok", None), ("checkpointed (per step)", "ok", None)]
    assert "16x16    5f full backprop: ok, 1.0 MiB, cosine 1.00000" in err.splitlines()
    assert "16x16    5f checkpointed (per step): ok, 2.0 MiB, cosine " in err
    assert (f"interrupted after 2 configurations; their results are in {out / 'results.json'} and "
            f"{out / 'results.md'} (no plots); 2 of them without times") in err
    assert "| 16x16 | 5 | checkpointed (per step) |" in (out / "results.md").read_text()


def test_bench_prints_the_times_of_a_clip_once_timed(tmp_path, capsys, monkeypatch):
    fake_workers(monkeypatch)
    assert main([*FAKE_BENCH, "--frames", "5", "9", "--no-plots", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[:4] == [
        "16x16    5f full backprop: ok, 1.0 MiB, cosine 1.00000",
        lines[1], lines[2],
        "16x16    5f time per step, side by side: full backprop 0.500 s, checkpointed (per step) 0.500 s, "
        "chopgrad sliding d=0 0.500 s"]
    assert lines[4].startswith("16x16    9f full backprop: ok,")
    assert all(r["time_s"] == 0.5 for r in json.loads((tmp_path / "results.json").read_text())["rows"])


def test_bench_replaces_only_its_own_earlier_outputs_in_out(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    earlier = {"results.json": "{}", "results.md": "old", "memory_vs_size.png": "old", "time_vs_frames.png": "old",
               "notes.txt": "the user's"}
    for name, text in earlier.items():
        (out / name).write_text(text)
    # stopped before any configuration finished: nothing written, the earlier outputs stay as they were
    fake_workers(monkeypatch, stop_at=1)
    assert main([*FAKE_BENCH, "--out", str(out)]) == 130
    assert "interrupted before any configuration finished; nothing was written" in capsys.readouterr().err
    assert {p.name: p.read_text() for p in out.iterdir()} == earlier
    # a run: no plot of the earlier run is left beside the new results (here none are drawn), other files are
    fake_workers(monkeypatch)
    assert main([*FAKE_BENCH, "--no-plots", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "results.json", "results.md"]
    assert (out / "notes.txt").read_text() == "the user's"


def test_bench_interrupted_before_any_configuration_writes_nothing(tmp_path, capsys, monkeypatch):
    fake_workers(monkeypatch, stop_at=1)
    assert main([*FAKE_BENCH, "--out", str(tmp_path / "new")]) == 130
    assert capsys.readouterr().err.strip() == "interrupted before any configuration finished; nothing was written"
    assert not (tmp_path / "new").exists()


def test_bench_fidelity_does_not_depend_on_the_order_of_the_baselines(tmp_path, capsys, monkeypatch):
    from chopgrad.tools.bench.bench import BenchSettings

    assert [m[0] for m in BenchSettings(baselines=("checkpoint", "full"), d_truncs=[0], schedules=("sliding",),
                                        threads=1).methods()] == ["full", "checkpoint", "pixel_loss"]
    calls = fake_workers(monkeypatch)
    assert main([*FAKE_BENCH, "--baselines", "checkpoint", "full", "--no-plots", "--out", str(tmp_path)]) == 0
    assert calls[0]["method"] == "full"  # the reference runs first
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["full backprop", "checkpointed (per step)", "chopgrad sliding d=0"]
    assert all(r["cosine"] is not None and r["rel_error"] is not None for r in rows), rows


def _bench_workers(parent: int) -> list[int]:
    """The bench worker subprocesses whose parent is `parent` (from /proc)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"chopgrad.tools.bench.worker" in command:
            found.append(int(entry))
    return found


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie has finished)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the worker subprocess in /proc")
def test_bench_stopped_by_sigterm_stops_its_running_worker(tmp_path):
    # --warmup 100000: the worker would run for an hour on its own
    proc = subprocess.Popen(
        [sys.executable, "-m", "chopgrad", "bench", "--model", "tiny-wan21", "--frames", "5", "--sizes", "16",
         "--baselines", "full", "--schedules", "sliding", "--d-trunc", "0", "--warmup", "100000", "--threads", "1",
         "--no-progress", "--out", str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not workers:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no worker started in 120 s"
            time.sleep(0.1)
            workers = _bench_workers(proc.pid)
        # Past its imports (about 5 CPU seconds) and into its steps: stopped before it has loaded its inputs, which
        # the bench removes as it exits, a worker would fail on its own and the test would show nothing.
        while _cpu_seconds(workers[0]) < 8:
            assert proc.poll() is None and _running(workers[0]), proc.communicate()
            assert time.monotonic() < deadline, "the worker did not get to its steps in 120 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        deadline = time.monotonic() + 10
        while _running(workers[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(workers[0]), "the worker outlived the bench it belongs to"
        assert err.strip().splitlines()[-1] == "interrupted before any configuration finished; nothing was written"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
