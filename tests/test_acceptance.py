"""benchmarks/acceptance.py: the project's acceptance bars, evaluated on a `chopgrad bench` results.json."""
from __future__ import annotations

import json

import pytest
from script_loader import load_script

from chopgrad.tools.bench.methods import method_label


@pytest.fixture(scope="module")
def acceptance():
    return load_script("acceptance", folder="benchmarks")


def _row(frames, method, d=None, schedule="sliding", status="ok", peak=100, time_s=1.0):
    return dict(size=32, frames=frames, method=method, d_trunc=d, schedule=schedule,
                label=method_label(method, d, schedule), status=status, detail="",
                peak_bytes=peak * 2**20 if status == "ok" else None, time_s=time_s if status == "ok" else None)


ROWS = [_row(17, "full", peak=70), _row(17, "pixel_loss", 1, peak=58), _row(17, "pixel_loss", 1, "chunked"),
        _row(129, "full", status="oom"), _row(129, "checkpoint", peak=97, time_s=2.0),
        _row(129, "pixel_loss", 1, peak=59), _row(129, "pixel_loss", 1, "chunked", time_s=0.9)]


def test_bars_are_evaluated_where_their_rows_ran(acceptance):
    bars = {name: passed for name, passed, _ in acceptance.check_bars(ROWS)}
    assert bars == {
        "sliding d=1 peak at 129 / at 17 frames <= 1.15": True,
        "chunked d=1 time / full backprop time at 17 frames <= 1.1": True,
        "correct checkpointing reported": True,
    }  # full backprop ran out of memory at 129 frames: the bars against it there are not evaluated


def test_bars_fail_above_their_thresholds(acceptance):
    rows = [_row(17, "full", peak=100), _row(17, "pixel_loss", 1, peak=50), _row(17, "pixel_loss", 1, "chunked",
                                                                                   time_s=1.2),
            _row(129, "full", peak=100), _row(129, "pixel_loss", 1, peak=60), _row(129, "checkpoint", status="error")]
    bars = {name: (passed, measured) for name, passed, measured in acceptance.check_bars(rows)}
    assert bars["sliding d=1 peak at 129 / at 17 frames <= 1.15"] == (False, "1.200")
    assert bars["sliding d=1 peak / full backprop peak at 129 frames <= 0.35"] == (False, "0.600")
    assert bars["chunked d=1 time / full backprop time at 17 frames <= 1.1"] == (False, "1.200")
    assert bars["correct checkpointing reported"] == (False, "129f error")


def test_main_reads_results_json_and_sets_the_exit_code(acceptance, tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"settings": {}, "machine": {}, "rows": ROWS}))
    assert acceptance.main([str(results)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "PASS  sliding d=1 peak at 129 / at 17 frames <= 1.15: 1.017" and len(out) == 3
    results.write_text(json.dumps({"rows": [dict(ROWS[4], status="timeout")]}))
    assert acceptance.main([str(results)]) == 1
    assert capsys.readouterr().out == "FAIL  correct checkpointing reported: 129f timeout\n"
    assert acceptance.main([str(tmp_path / "missing.json")]) == 2
    assert "not a readable chopgrad bench results.json" in capsys.readouterr().err
