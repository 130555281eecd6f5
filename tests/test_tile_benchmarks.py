"""benchmarks/tile_memory.py and benchmarks/tile_fidelity.py at tiny sizes, and the results-file sections they write."""
import re

from script_loader import load_script

from chopgrad.tools.bench.markdown import markers, replace_section


def _rows(text: str, columns: int):
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and len(line.strip("|").split("|")) == columns and not line.startswith("| size")
            and not line.startswith("| tile")]


def test_replace_section_appends_then_replaces(tmp_path):
    path = tmp_path / "R.md"
    path.write_text("# Results\n\nkept\n")
    replace_section(str(path), "demo", "first", heading="Demo")
    replace_section(str(path), "demo", "second", heading="Demo")
    text = path.read_text()
    start, end = markers("demo")
    assert text.count(start) == 1 and text.count("## Demo") == 1 and "kept" in text
    assert "second" in text and "first" not in text


def test_tile_memory_breakdown(tmp_path, capsys):
    script = load_script("tile_memory", folder="benchmarks")
    results = tmp_path / "RESULTS.md"
    assert script.main(["--frames", "5", "--sizes", "32", "64", "--tile", "16", "--halo", "8", "--list", "3",
                        "--results", str(results)]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if " MiB " in line and " from " in line]
    assert len(listed) == 3 * 6
    rows = _rows(results.read_text(), 4 + len(script.CATEGORIES))
    assert [(r[0], r[1].split()[0]) for r in rows] == [(s, m) for s in ("32", "64")
                                                      for m in ("untiled", "exact", "truncated")]
    for size, label, peak, ratio, *parts in rows:
        # the parts are the tensors live at the peak, so they add up to it (rounding to MiB aside)
        assert abs(sum(float(p) for p in parts) - float(peak)) <= len(parts)
        if label == "untiled":
            assert ratio == "1.00x"
    exact_64 = next(r for r in rows if r[0] == "64" and r[1].startswith("exact"))
    assert float(exact_64[3].rstrip("x")) < 1.0


def test_tile_fidelity_table(tmp_path):
    script = load_script("tile_fidelity", folder="benchmarks")
    results = tmp_path / "RESULTS.md"
    # a halo as wide as the frame crops nothing: the truncated gradient is the exact one
    assert script.main(["--frames", "5", "--size", "32", "--tiles", "16", "--halos", "0", "32",
                        "--results", str(results)]) == 0
    rows = {int(r[1]): r for r in _rows(results.read_text(), 7)}
    assert set(rows) == {0, 32}
    cos_z, err_z, cos_p, err_p = (float(x) for x in rows[32][2:6])
    assert cos_z > 0.99999 and err_z < 1e-4 and cos_p > 0.99999 and err_p < 1e-4
    assert float(rows[0][3]) > 10 * err_z  # cropping drops real influence
    for r in rows.values():
        assert abs(float(r[6])) < 1e-5  # the loss is the full decode's
