"""benchmarks/bench_decode.py in its tiny mode: what it writes, not what it measures."""
import json

import pytest
from script_loader import load_script


def test_tiny_run_writes_every_row_the_targets_and_the_plot(tmp_path, capsys):
    script = load_script("bench_decode", folder="benchmarks")
    results = tmp_path / "RESULTS.md"
    out = tmp_path / "out"
    assert script.main(["--tiny", "--frames", "5", "9", "--out", str(out), "--results", str(results)]) == 0
    record = json.loads((out / "bench_decode.json").read_text())
    rows = record["rows"]
    assert [(r["frames"], r["method"]) for r in rows] == [(f, m) for f in (5, 9) for m in script.METHODS]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["peak_bytes"] >= 0 and len(r["peaks_bytes"]) == 1
        assert r["time_s"] > 0 and len(r["times_s"]) == script.TINY_RUN["repeats"]
        assert r["video_bytes"] == 3 * r["frames"] * 16 * 16 * 4
    # decode and full backprop take the same loss on the same video: equal values, and a fidelity
    for f in (5, 9):
        decode, _, full = (r for r in rows if r["frames"] == f)
        assert decode["loss"] == pytest.approx(full["loss"], rel=1e-5)
        assert -1 <= decode["cosine"] <= 1 and full["cosine"] == 1.0
    # at 5 frames (2 decoder steps) d_trunc=1 truncates nothing: the exact gradient
    assert rows[0]["cosine"] > 0.9999
    targets = record["targets"]
    assert [t["name"] for t in targets] == ["time", "peak"] and all(t["frames"] == 9 for t in targets)
    assert all(isinstance(t["passed"], bool) for t in targets)
    assert (out / "bench_decode.png").stat().st_size > 0
    printed = capsys.readouterr().out
    for t in targets:
        assert f"{'PASS' if t['passed'] else 'FAIL'}: {t['text']}" in printed
    section = results.read_text()
    assert "<!-- bench_decode:start -->" in section and "| 9 | " in section
    assert section.count("| chopgrad decode sliding d=1 + video loss |") == 2


def test_full_backprop_is_skipped_where_its_predicted_peak_crosses_the_cap():
    script = load_script("bench_decode", folder="benchmarks")
    history = script.FullBackpropHistory()
    assert history.reason_to_skip(17, cap=2**30) is None  # nothing measured yet
    history.peaks = {17: 100 * 2**20, 33: 200 * 2**20}
    history.baseline = 300 * 2**20
    assert script.predicted_full_peak(history.peaks, 65) == pytest.approx(400 * 2**20)
    assert history.reason_to_skip(65, cap=2**30) is None  # 400 + 300 MiB
    assert "predicted peak" in history.reason_to_skip(129, cap=2**30)  # 800 + 300 MiB
    history.over_cap = 65
    assert history.reason_to_skip(129, cap=2**40) == "crossed the memory cap at 65 frames"


def test_phases_split_decode_step_against_pixel_loss(tmp_path, capsys):
    script = load_script("bench_decode", folder="benchmarks")
    assert script.main(["--phases", "--tiny", "--frames", "5", "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "phases.json").read_text())["rows"]
    assert [r["frames"] for r in rows] == [5]
    row = rows[0]
    assert all(row[p] > 0 and len(row["times_s"][p]) == 1 for p in script.PHASES)
    parts = row["decode forward"] + row["loss forward"] + row["backward"]
    assert row["decode total"] == pytest.approx(parts, rel=1e-6)
    assert "| 5 | " in (tmp_path / "phases.md").read_text() and "| 5 | " in capsys.readouterr().out
