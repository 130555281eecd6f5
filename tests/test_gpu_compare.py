"""benchmarks/gpu_compare.py: the --tiny run on the CPU, so the GPU run cannot rot; its table, its handling of
stopped runs, its RESULTS.md section and its argument errors."""
import json
import os

import pytest
import torch
from script_loader import REPO, load_script

TASKS = ("vsr", "driving")
LABELS = ("latent loss only", "full backprop", "chopgrad sliding d=1")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_tiny_run_trains_three_methods_on_two_tasks_and_writes_table_and_plot(tmp_path):
    gpu_compare = load_script("gpu_compare", folder="benchmarks")
    out, results = tmp_path / "out", tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n## An earlier section\n\nkept as it was\n")
    assert gpu_compare.main(["--tiny", "--out", str(out), "--results", str(results)]) == 0

    rows = json.loads((out / "gpu_compare.json").read_text())["rows"]
    steps = gpu_compare.TINY_SETTINGS["steps"]
    assert list(rows) == list(TASKS)
    for task in TASKS:
        task_rows = rows[task]
        assert [r["method"] for r in task_rows] == ["latent", "full", "sliding_d1"]
        assert [r["label"] for r in task_rows] == list(LABELS)
        assert all(r["status"] == "ok" and r["steps_done"] == steps for r in task_rows), task_rows
        assert all([s for s, _ in r["evals"]] == [0, 2, 4] for r in task_rows)
        # the same model and clips at step 0; the pixel term changes the training, so step 4 differs from latent-only
        assert len({r["evals"][0][1] for r in task_rows}) == 1
        assert task_rows[1]["psnr"] != task_rows[0]["psnr"]
        assert all(r["peak_step_bytes"] >= 0 and r["time_per_step_s"] > 0 for r in task_rows)
        # what a stopped run would report: the evaluations of its last checkpoint
        partial = gpu_compare.partial_record(str(out / task / "full"))
        assert [[e["step"], e["psnr"]] for e in partial["evals"]] == task_rows[1]["evals"]
        assert all(label in (out / task / "compare.md").read_text() for label in LABELS)

    text = results.read_text()
    assert text.startswith("# Results\n\n## An earlier section\n\nkept as it was\n")
    assert text.count(gpu_compare.TINY_HEADING) == 1
    section = text.split(gpu_compare.TINY_HEADING)[1]
    for task in TASKS:
        for label in LABELS:
            assert f"| {task} | {label} | ok | {steps}/{steps} |" in section
        assert f"- **{task}**" in section and "- latent loss only at step 4:" in section
    assert PNG_MAGIC == (out / "gpu_compare.png").read_bytes()[:8]
    assert (out / "gpu_compare.png").stat().st_size > 10_000  # two panels with curves, not an empty figure


def fake_result(config, evals, status="ok"):
    """What run_in_process returns for a run with these held-out PSNRs; a stopped one leaves only a checkpoint."""
    summary = {"steps_done": evals[-1][0], "time_per_step_s": 0.5, "peak_step_bytes": 2**20,
               "reconstruction": {"psnr": 21.8},
               "final_eval": {"step": evals[-1][0], "psnr": evals[-1][1], "ssim": 0.5, "temporal_error": 0.1}}
    record = {"evals": [{"step": s, "psnr": p, "ssim": 0.5, "temporal_error": 0.1} for s, p in evals],
              "summary": summary}
    if status == "ok":
        return {"status": "ok", "wall_s": 1.0, **record}
    folder = os.path.join(config.out, "checkpoint")
    os.makedirs(folder)
    with open(os.path.join(folder, "trainer.json"), "w") as f:
        json.dump({"step": evals[-1][0], "extra": record}, f)
    return {"status": status, "wall_s": 9.0}


def test_a_stopped_run_is_compared_at_the_last_step_all_runs_reached(tmp_path, monkeypatch):
    gpu_compare = load_script("gpu_compare", folder="benchmarks")
    curves = {"latent": [(0, 20.0), (2, 20.5), (4, 20.6)],
              "full": [(0, 20.0), (2, 21.2)],  # stopped after its evaluation at step 2
              "sliding_d1": [(0, 20.0), (2, 21.1), (4, 21.4)]}

    def fake_run_in_process(config, timeout_s=None):
        assert 0 < timeout_s <= gpu_compare.run_timeout(100, 6, 1)
        name = os.path.basename(config.out)
        # the pixel-loss runs tune the decoder too; the latent loss gives it no gradient
        assert config.train_decoder == (name != "latent")
        return fake_result(config, curves[name], "timeout" if name == "full" else "ok")

    monkeypatch.setattr(gpu_compare, "run_in_process", fake_run_in_process)
    real_results = os.path.join(REPO, "benchmarks", "RESULTS.md")
    before = os.stat(real_results).st_mtime_ns
    out = tmp_path / "new"
    assert gpu_compare.main(["--tiny", "--budget", "100", "--out", str(out)]) == 0
    assert os.stat(real_results).st_mtime_ns == before  # --tiny writes into --out by default

    section = (out / "RESULTS.md").read_text()
    assert "| vsr | full backprop | timeout | 2/4 | 21.20 | +0.70 |" in section
    assert "| vsr | chopgrad sliding d=1 | ok | 4/4 | 21.40 | +0.80 |" in section
    # the claim is checked at step 2, the last one the stopped run reached
    assert "full backprop - latent loss only at step 2: +0.70 dB (bar >= +0.5: met)" in section
    assert "chopgrad sliding d=1 - latent loss only at step 2: +0.60 dB (bar >= +0.5: met)" in section
    assert "chopgrad sliding d=1 - full backprop at step 2: -0.10 dB (bar within 0.3: met)" in section
    assert "(timeout at step 2)" in (out / "vsr" / "compare.md").read_text()
    assert (out / "gpu_compare.png").read_bytes()[:8] == PNG_MAGIC


def test_a_failed_run_is_reported_without_numbers_and_the_frozen_variant_has_its_own_heading(tmp_path, monkeypatch):
    gpu_compare = load_script("gpu_compare", folder="benchmarks")

    def fake_run_in_process(config, timeout_s=None):
        assert not config.train_decoder
        if os.path.basename(config.out) == "sliding_d1":
            return {"status": "OOM", "error": "CUDA out of memory", "wall_s": 3.0}
        return fake_result(config, [(0, 20.0), (4, 20.1)])

    monkeypatch.setattr(gpu_compare, "run_in_process", fake_run_in_process)
    assert gpu_compare.main(["--tiny", "--frozen-decoder", "--out", str(tmp_path)]) == 0
    section = (tmp_path / "RESULTS.md").read_text()
    assert section.startswith(gpu_compare.RESULTS_HEADING + gpu_compare.FROZEN_SUFFIX + gpu_compare.TINY_SUFFIX)
    assert "decoder frozen" in section
    assert "| driving | chopgrad sliding d=1 | OOM: CUDA out of memory | 0/4 |" in section
    assert "full backprop - latent loss only at step 4: +0.00 dB (bar >= +0.5: missed)" in section


def test_the_section_is_replaced_under_its_heading_and_nothing_else_changes(tmp_path):
    gpu_compare = load_script("gpu_compare", folder="benchmarks")
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\n## Before\n\nb\n\n## Mine\n\nold table\n\n### its subsection\n\nold\n\n"
                    "## After\n\na\n")
    gpu_compare.replace_section(str(path), "## Mine", "new table\n")
    assert path.read_text() == "# Results\n\n## Before\n\nb\n\n## Mine\n\nnew table\n\n## After\n\na\n"
    gpu_compare.replace_section(str(path), "## Other", "appended\n")
    assert path.read_text().endswith("## After\n\na\n\n## Other\n\nappended\n")


@pytest.mark.parametrize("args, message", [
    (["--tiny", "--budget", "0"], "--budget: expected a positive number"),
    (["--tiny", "--budget", "25"], "--budget 25: leaves no time to train"),
    (["--tiny", "--parallel", "0"], "--parallel: expected a positive integer"),
    (["--tiny", "--device", "nonsense"], "--device nonsense"),
])
def test_bad_arguments_stop_with_a_message_that_names_them(tmp_path, capsys, args, message):
    gpu_compare = load_script("gpu_compare", folder="benchmarks")
    with pytest.raises(SystemExit) as stopped:
        gpu_compare.main([*args, "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_folder_someone_else_filled_is_refused_as_out(tmp_path, capsys):
    gpu_compare = load_script("gpu_compare", folder="benchmarks")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        gpu_compare.main(["--tiny", "--out", str(tmp_path)])
    assert "holds files that no earlier gpu_compare wrote" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_before_any_run(tmp_path, capsys):
    gpu_compare = load_script("gpu_compare", folder="benchmarks")
    with pytest.raises(SystemExit):
        gpu_compare.main(["--out", str(tmp_path / "out")])
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err
