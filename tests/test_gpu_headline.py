"""benchmarks/gpu_headline.py at a tiny size on the CPU, so the GPU run cannot rot."""
import json

from script_loader import load_script

from chopgrad.tools.bench.methods import VIDEO_LOSS_METHODS


def test_headline_runs_every_row_and_writes_its_table(tmp_path):
    headline = load_script("gpu_headline", folder="benchmarks")
    results = tmp_path / "RESULTS.md"
    assert headline.main(["--tiny", "--device", "cpu", "--budget", "900", "--out", str(tmp_path / "out"),
                          "--results", str(results)]) == 0
    record = json.loads((tmp_path / "out" / "headline.json").read_text())
    rows = record["rows"]
    assert len(rows) == len(headline.TINY_SIZES) * len(headline.ROWS) + len(headline.TILED_SIZES) * len(
        headline.TILED_ROWS) + len(headline.DECODE_SIZES) * len(headline.DECODE_ROWS) + len(
        headline.TINY_OTHER_VAES) * len(headline.OTHER_VAE_ROWS)
    assert [r["tile"] for r in rows if r.get("tile")] == [headline.TINY_TILE] * len(headline.TILED_ROWS)
    assert all(r["status"] == "ok" and r["peak_bytes"] > 0 and r["memory_step_s"] > 0 for r in rows), rows
    # every pixel-MSE row decodes to the same loss as full backprop: the same step on the same inputs
    for model, size in {(r["model"], r["size"]) for r in rows}:
        losses = [r["loss"] for r in rows
                  if (r["model"], r["size"]) == (model, size) and r["method"] not in VIDEO_LOSS_METHODS]
        assert max(losses) - min(losses) <= 1e-5 * abs(losses[0])
    # the decode rows, at the first size only, right after the lean pixel_loss rows of their schedules
    first = "x".join(map(str, headline.TINY_SIZES[0]))
    decode_rows = [r for r in rows if r["method"] == "decode"]
    assert [r["label"] for r in decode_rows] == [label for label, _ in headline.DECODE_ROWS]
    assert {(r["model"], r["size"]) for r in decode_rows} == {("tiny-wan21", first)}
    labels = [r["label"] for r in rows if r["size"] == first and r["model"] == "tiny-wan21"]
    assert labels[2:2 + len(headline.DECODE_ROWS)] == [label for label, _ in headline.DECODE_ROWS]
    assert all(r["video_bytes"] == 3 * r["frames"] * r["height"] * r["width"] * 4 for r in rows)
    table = results.read_text()
    assert "## GPU headline (tiny CPU check)" in table and table.count("| ok |") == len(rows)
    assert "chopgrad sliding d=1, lean" in table
    # each decode row is checked against the pixel_loss row of its schedule
    for label, settings in headline.DECODE_ROWS:
        line = next(line for line in table.splitlines() if f"| {label} |" in line)
        assert f"vs chopgrad {settings['schedule']} d=1, lean: time" in line and "videos (<= 3:" in line


def test_budget_skips_the_rows_it_cannot_start(tmp_path, monkeypatch):
    headline = load_script("gpu_headline", folder="benchmarks")
    from chopgrad.tools.bench.runner import Measurement

    clock = [0.0]

    def one_row_takes_ten_seconds(config, **kwargs):
        clock[0] += 10.0
        return Measurement(config, "ok", result={"peak_bytes": 1, "memory_step_s": 1.0, "times_s": []})

    monkeypatch.setattr(headline, "run_isolated", one_row_takes_ten_seconds)
    monkeypatch.setattr(headline.time, "monotonic", lambda: clock[0])
    assert headline.main(["--tiny", "--device", "cpu", "--budget", "25", "--out", str(tmp_path), "--results", ""]) == 0
    rows = json.loads((tmp_path / "headline.json").read_text())["rows"]
    assert [r["status"] for r in rows[:3]] == ["ok"] * 3  # started at 0, 10 and 20 s
    assert {r["status"] for r in rows[3:]} == {"skipped"}
    # every other family: a chopgrad d_trunc=1 row and a full-backprop row, after Wan's rows
    others = [(r["model"], r["label"]) for r in rows if r["model"] != "tiny-wan21"]
    assert others == [(model, label) for model in headline.TINY_OTHER_VAES for label, _ in headline.OTHER_VAE_ROWS]
    assert rows[-len(others):] == [r for r in rows if r["model"] != "tiny-wan21"]
