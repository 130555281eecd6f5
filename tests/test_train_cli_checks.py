"""`chopgrad train` refuses what would go wrong later (or silently) before any work, and --overwrite only removes
an earlier run once the new one is built."""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from chopgrad.tools.cli import main
from test_train_run import TINY

TESTS = Path(__file__).resolve().parent
FINISHED = ["--steps", "1", "--eval-every", "1"]
#: TINY without the options that size the built-in model (refused with another model)
TINY_ANY_MODEL = [a for i, a in enumerate(TINY) if a not in ("--width", "--blocks") and TINY[i - 1] not in
                  ("--width", "--blocks")]


@pytest.fixture
def factories_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _finished_run(out: Path, *extra) -> dict:
    assert main(["train", "--task", "vsr", *TINY, *FINISHED, *extra, "--out", str(out)]) == 0
    return {name: os.path.getmtime(out / name) for name in os.listdir(out)}


def test_an_out_folder_inside_the_data_folder_is_refused(tmp_path, capsys):
    from video_files import write_header_first_mp4

    data = tmp_path / "clips"
    data.mkdir()
    for i in range(2):
        write_header_first_mp4(data / f"clip{i}.mp4", 12, 16, 16)
    err = _refused(["train", "--task", "vsr", *TINY, "--data", str(data), "--out", str(data / "runs" / "x")], capsys)
    assert "--out:" in err and "is inside --data" in err
    assert not (data / "runs").exists()


@pytest.mark.parametrize("bad", ["perceptual", "generator", "transformer"])
def test_overwrite_keeps_the_earlier_run_when_the_new_one_is_refused(tmp_path, capsys, factories_importable, bad):
    out = tmp_path / "run"
    before = _finished_run(out)
    capsys.readouterr()
    if bad == "transformer":
        from test_train_transformer import save_tiny_transformer

        argv = [*TINY_ANY_MODEL, "--transformer", save_tiny_transformer(tmp_path / "wide", channels=16)]
    else:
        argv = {"perceptual": [*TINY, "--perceptual", "train_factories:image_loss_that_raises"],
                "generator": [*TINY_ANY_MODEL, "--generator", "train_factories:not_a_module"]}[bad]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--task", "vsr", *argv, *FINISHED, "--overwrite", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert {name: os.path.getmtime(out / name) for name in os.listdir(out)} == before


def test_overwrite_replaces_the_earlier_run_once_the_new_one_is_built(tmp_path):
    _finished_run(tmp_path, "--train-decoder")
    assert main(["train", "--task", "vsr", *TINY, *FINISHED, "--overwrite", "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "decoder").exists()


@pytest.mark.parametrize("task, change, named", [("vsr", ["--width", "16"], "width: 8 -> 16"),
                                                 ("inpaint", [], "task: 'vsr' -> 'inpaint'"),
                                                 ("vsr", ["--size", "32"], "size: [16, 16] -> [32, 32]")])
def test_resume_with_settings_the_weights_do_not_fit_names_them_before_loading(tmp_path, capsys, monkeypatch, task,
                                                                               change, named):
    import chopgrad.tools.train.trainer as trainer

    _finished_run(tmp_path)
    capsys.readouterr()

    def no_run(*args, **kwargs):
        raise AssertionError("the run was built")

    monkeypatch.setattr(trainer, "Run", no_run)
    err = _refused(["train", "--task", task, *TINY, *FINISHED, *change, "--resume", "--out", str(tmp_path)], capsys)
    assert "--resume: the checkpoint in" in err and "was made with other settings" in err
    assert named in err


def test_resume_accepts_the_data_folder_written_another_way(tmp_path, monkeypatch):
    from video_files import write_header_first_mp4

    data = tmp_path / "clips"
    data.mkdir()
    for i in range(3):
        write_header_first_mp4(data / f"clip{i}.mp4", 12, 16, 16)
    monkeypatch.chdir(tmp_path)
    common = ["train", "--task", "vsr", *TINY, "--steps", "2", "--eval-every", "1", "--checkpoint-every", "1"]
    assert main([*common, "--steps", "1", "--data", "clips", "--out", "run"]) == 0
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())["config"]
    assert saved["data"] == str(data)  # recorded where it is, not as typed
    monkeypatch.chdir(data)
    refused = main  # from another folder, written another way: the same data
    with pytest.raises(SystemExit) as exit_info:
        refused([*common, "--steps", "1", "--data", "../clips/", "--resume", "--out", "../run", "--lr", "0.5"])
    assert exit_info.value.code == 2  # a real change is still named (lr), so the paths compared equal
    assert main([*common, "--steps", "1", "--data", "../clips/", "--resume", "--out", "../run"]) == 0


def test_a_perceptual_loss_without_a_graph_is_refused_by_full_backprop_too(tmp_path, capsys, factories_importable):
    for method in ("full", "chopgrad"):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--task", "vsr", *TINY, *FINISHED, "--method", method, "--perceptual",
                  "train_factories:image_loss_without_graph", "--out", str(tmp_path / method)])
        assert exit_info.value.code == 2
        assert "returned a value with no graph" in capsys.readouterr().err


@pytest.mark.parametrize("factory", ["image_loss_needing_weights", "image_loss_that_raises"])
def test_a_perceptual_factory_that_fails_is_one_error_line_before_any_work(tmp_path, capsys, monkeypatch,
                                                                           factories_importable, factory):
    import chopgrad.tools.cli as cli

    monkeypatch.setattr(cli, "_load_model", lambda name: (_ for _ in ()).throw(AssertionError("model loaded")))
    err = _refused(["train", "--task", "vsr", *TINY, "--perceptual", f"train_factories:{factory}",
                    "--out", str(tmp_path / "out")], capsys)
    assert f"--perceptual train_factories:{factory}: calling it as function() failed" in err


def test_compare_stops_before_the_first_run_on_a_setting_no_run_can_use(tmp_path, capsys, factories_importable,
                                                                        monkeypatch):
    import chopgrad.tools.train.compare as compare

    monkeypatch.setattr(compare, "run_in_process", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    err = _refused(["train", "--task", "vsr", *TINY_ANY_MODEL, *FINISHED, "--compare", "--generator",
                    "train_factories:not_a_module", "--out", str(tmp_path)], capsys)
    assert "--generator train_factories:not_a_module" in err


def test_compare_exits_non_zero_and_names_each_failed_run(tmp_path, capsys, monkeypatch):
    import chopgrad.tools.train.compare as compare

    real = compare.run_in_process

    def chunked_fails(config, timeout_s=None):
        if config.schedule == "chunked":
            return {"status": "failed", "error": "Traceback ...\nRuntimeError: the chunked run broke", "wall_s": 1.0}
        return real(config, timeout_s)

    monkeypatch.setattr(compare, "run_in_process", chunked_fails)
    code = main(["train", "--task", "vsr", *TINY, *FINISHED, "--compare", "--out", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert "error: the 'chopgrad chunked d=1' run failed: RuntimeError: the chunked run broke" in err
    assert json.loads((tmp_path / "compare.json").read_text())["rows"][-1]["status"] == "failed"


@pytest.mark.parametrize("argv, message", [
    (["--task", "vsr", "--method", "full", "--d-trunc", "2"], "--d-trunc choose how chopgrad truncates"),
    (["--task", "vsr", "--method", "latent", "--schedule", "chunked"], "--schedule choose how chopgrad truncates"),
    (["--task", "vsr", "--hole-weight", "3"], "--hole-weight weights the inpaint task's hole pixels"),
    (["--task", "vsr", "--decoder-lr", "1e-4"], "--decoder-lr is the learning rate of --train-decoder"),
    (["--task", "vsr", "--perceptual-weight", "0.5"], "--perceptual-weight weights the --perceptual term"),
    (["--task", "vsr", "--width", "8", "--generator", "train_factories:pointwise"], "--width size the built-in"),
    (["--task", "vsr", "--size", "8"], "each side must be at least 11"),
])
def test_options_the_run_would_ignore_are_refused(tmp_path, capsys, factories_importable, argv, message):
    err = _refused(["train", *argv, "--quick", "--out", str(tmp_path / "out")], capsys)
    assert message in err
    assert not (tmp_path / "out").exists()


def test_inpaint_with_an_ssim_weight_of_zero_keeps_its_hole_weights(tmp_path):
    assert main(["train", "--task", "inpaint", *TINY, *FINISHED, "--pixel-loss", "mse=1", "ssim=0",
                 "--out", str(tmp_path)]) == 0


def test_a_generator_returning_other_latents_is_named(tmp_path, capsys, factories_importable):
    err = _refused(["train", "--task", "vsr", *TINY_ANY_MODEL, *FINISHED, "--generator",
                    "train_factories:too_many_channels", "--out", str(tmp_path / "out")], capsys)
    assert "the model of --generator train_factories:too_many_channels returns latents of shape (1, 5, 3, 2, 2)" in err


def test_a_loss_that_is_not_finite_from_the_start_is_not_blamed_on_the_learning_rate(tmp_path, capsys,
                                                                                    factories_importable):
    err = _refused(["train", "--task", "vsr", *TINY, *FINISHED, "--video-loss", "train_factories:nan_critic",
                    "--out", str(tmp_path / "out")], capsys)
    assert "the training loss is nan at step 1 (not finite: video)" in err
    assert "not from the learning rate" in err and "--dtype fp32" not in err
    assert "UserWarning" not in err


def test_data_warnings_are_one_warning_line_without_chopgrads_source(tmp_path):
    """A skipped file is reported as `warning: ...`, not with the chopgrad source line that noticed it."""
    import subprocess

    from video_files import write_header_first_mp4

    data = tmp_path / "clips"
    data.mkdir()
    for i in range(2):
        write_header_first_mp4(data / f"clip{i}.mp4", 12, 16, 16)
    (data / "empty.mp4").write_bytes(b"")
    done = subprocess.run([sys.executable, "-m", "chopgrad", "train", "--task", "vsr", *TINY, *FINISHED, "--data",
                           str(data), "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "warning: VideoFolder skipped 1 of 3 video files" in done.stderr
    assert "UserWarning" not in done.stderr and "VideoFolder(" not in done.stderr
