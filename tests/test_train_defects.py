"""`chopgrad train`: resume with a model that draws random numbers, checkpoints that a save left half written,
settings that would train on nothing, the output folder, signals, and what the command prints."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import chopgrad.tools.train.checkpoint as checkpoint_module
from chopgrad.tools.cli import _check_out, main
from chopgrad.tools.train.checkpoint import load_checkpoint, save_checkpoint
from chopgrad.tools.train.command import TRAIN_FILES
from chopgrad.tools.train.config import TrainConfig
from chopgrad.tools.train.model import resolve_factory
from chopgrad.tools.train.trainer import Run, train
from test_train_run import TINY, tiny_config

TESTS = Path(__file__).resolve().parent


# ---------------------------------------------------------------- checkpoints a save left half written

def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer


def _one_step(model, optimizer):
    loss = model(torch.randn(2, 3)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_a_save_interrupted_between_two_files_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    model, optimizer = _model_and_optimizer()
    folder = tmp_path / "checkpoint"
    _one_step(model, optimizer)
    save_checkpoint(str(folder), model=model, optimizer=optimizer, step=1)
    saved = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    _one_step(model, optimizer)

    real_save_file, calls = checkpoint_module.save_file, []

    def interrupted_after_the_model(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:  # the model file is written, the optimizer's is not
            raise KeyboardInterrupt
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", interrupted_after_the_model)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(folder), model=model, optimizer=optimizer, step=2)
    monkeypatch.setattr(checkpoint_module, "save_file", real_save_file)

    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == saved
    fresh_model, fresh_optimizer = _model_and_optimizer()
    assert load_checkpoint(str(folder), model=fresh_model, optimizer=fresh_optimizer)["step"] == 1


def test_a_save_interrupted_while_swapping_folders_resumes_from_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer = _model_and_optimizer()
    folder = tmp_path / "checkpoint"
    save_checkpoint(str(folder), model=model, optimizer=optimizer, step=1)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    _one_step(model, optimizer)

    real_rename = os.rename

    def interrupted_after_the_first_rename(source, destination):
        real_rename(source, destination)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.os, "rename", interrupted_after_the_first_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(folder), model=model, optimizer=optimizer, step=2)
    monkeypatch.setattr(checkpoint_module.os, "rename", real_rename)

    fresh_model, fresh_optimizer = _model_and_optimizer()
    with torch.no_grad():
        for p in fresh_model.parameters():
            p.zero_()
    assert load_checkpoint(str(folder), model=fresh_model, optimizer=fresh_optimizer)["step"] == 1
    assert all(torch.equal(fresh_model.state_dict()[k], v) for k, v in expected.items())


def test_a_checkpoint_whose_files_come_from_different_steps_is_refused(tmp_path):
    model, optimizer = _model_and_optimizer()
    early, late = tmp_path / "early", tmp_path / "late"
    save_checkpoint(str(early), model=model, optimizer=optimizer, step=8)
    _one_step(model, optimizer)
    save_checkpoint(str(late), model=model, optimizer=optimizer, step=12)
    shutil.copy(late / "model.safetensors", early / "model.safetensors")
    fresh_model, fresh_optimizer = _model_and_optimizer()
    before = {k: v.clone() for k, v in fresh_model.state_dict().items()}
    with pytest.raises(ValueError, match=r"checkpoint folder .*early' is inconsistent: .*model.safetensors step "
                                         r"12, optimizer.safetensors step 8"):
        load_checkpoint(str(early), model=fresh_model, optimizer=fresh_optimizer)
    assert all(torch.equal(fresh_model.state_dict()[k], v) for k, v in before.items())  # nothing loaded


def test_resume_refuses_an_inconsistent_checkpoint_naming_the_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--task", "vsr", *TINY, "--steps", "2", "--eval-every", "1", "--out", str(out)]) == 0
    model_file = out / "checkpoint" / "model.safetensors"
    tensors = load_file(str(model_file))
    from safetensors.torch import save_file

    save_file(tensors, str(model_file), metadata={"step": "1"})  # as if the model of an earlier save were left
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--task", "vsr", *TINY, "--steps", "2", "--eval-every", "1", "--resume", "--out", str(out)])
    assert exit_info.value.code == 2
    assert f"checkpoint folder {str(out / 'checkpoint')!r} is inconsistent" in capsys.readouterr().err


# ---------------------------------------------------------------- arguments refused before any work

def test_train_config_checks_what_the_command_line_checks():
    with pytest.raises(ValueError, match="--train-decoder"):
        TrainConfig(task="vsr", method="latent", train_decoder=True)
    with pytest.raises(ValueError, match="the loss has no term"):
        TrainConfig(task="vsr", latent_weight=0, pixel_loss={"mse": 0.0})
    with pytest.raises(ValueError, match="the loss has no term"):
        TrainConfig(task="vsr", latent_weight=0, pixel_weight=0, perceptual="train_factories:gradient_l1")
    with pytest.raises(ValueError, match="the weight of 'mse' must be a finite number >= 0, got inf"):
        TrainConfig(task="vsr", pixel_loss={"mse": float("inf")})
    with pytest.raises(ValueError, match="seed must be an integer in 0 .. 4294967295"):
        TrainConfig(task="vsr", seed=2**32)
    with pytest.raises(ValueError, match="--pixel-loss ssim: the inpaint task"):
        TrainConfig(task="inpaint", pixel_loss={"ssim": 1.0})
    TrainConfig(task="inpaint", pixel_loss={"ssim": 1.0}, method="latent")  # no pixel term: no mask to refuse


def test_compare_with_train_decoder_leaves_the_decoder_of_the_latent_only_run_alone():
    from chopgrad.tools.train.compare import method_configs

    runs = {name: config for name, _, config in method_configs(TrainConfig(task="vsr", train_decoder=True))}
    assert not runs["latent"].train_decoder and runs["latent"].method == "latent"
    assert all(config.train_decoder for name, config in runs.items() if name != "latent")


def test_the_largest_seed_trains(tmp_path):
    from chopgrad.tools.train.config import MAX_SEED

    record = train(tiny_config(tmp_path, seed=MAX_SEED, steps=1, eval_every=1))
    assert record["summary"]["steps_done"] == 1


def test_inpaint_with_ssim_trains_with_hole_weight_one(tmp_path):
    record = train(tiny_config(tmp_path, task="inpaint", pixel_loss={"ssim": 1.0}, hole_weight=1.0, steps=1,
                               eval_every=1))
    assert record["summary"]["steps_done"] == 1 and record["steps"][0]["pixel"] > 0


def test_pixel_loss_refuses_weights_that_are_not_finite():
    import chopgrad
    from chopgrad.tools.bench.workloads import load_model

    vae = load_model("tiny-wan21")
    latents = torch.randn(1, 4, 2, 2, 2)
    target = torch.zeros(1, 3, 5, 16, 16)
    for weight in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=f"loss: the weight of 'mse' must be a finite number, got {weight}"):
            chopgrad.pixel_loss(vae, latents, target, loss={"mse": weight, "l1": 1.0})


# ---------------------------------------------------------------- the output folder

def test_an_output_folder_with_an_earlier_run_is_refused_without_resume_or_overwrite(tmp_path, capsys):
    common = ["train", "--task", "vsr", *TINY, "--steps", "1", "--eval-every", "1", "--out", str(tmp_path)]
    assert main([*common, "--train-decoder"]) == 0
    assert (tmp_path / "decoder").is_dir()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(common)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--out: {str(tmp_path)!r} is not empty (checkpoint, curves.png, decoder" in err
    assert "--resume to continue the run in it, or --overwrite to replace its outputs" in err

    assert main([*common, "--overwrite"]) == 0
    assert not (tmp_path / "decoder").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["config"]["train_decoder"] is False


def test_overwrite_leaves_files_it_did_not_write_alone(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--task", "vsr", *TINY, "--overwrite", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "holds files chopgrad train does not write (notes.txt)" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["metrics.json", "notes.txt"]
    with pytest.raises(SystemExit):
        main(["train", "--task", "vsr", *TINY, "--overwrite", "--resume", "--out", str(tmp_path)])
    assert "give one of them" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_out_check_writes_a_probe_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: True)  # permission bits as root sees them
    with pytest.raises(SystemExit):
        _check_out("/proc/chopgrad-no-such-folder", TRAIN_FILES)
    assert "--out: cannot write in '/proc/chopgrad-no-such-folder'" in capsys.readouterr().err
    new = tmp_path / "a" / "b"
    _check_out(str(new), TRAIN_FILES)
    assert os.listdir(tmp_path) == []  # the probe removed what it created


# ---------------------------------------------------------------- the model's module, the summary, signals

def test_generator_module_in_the_current_folder_is_found(tmp_path, monkeypatch):
    name = "chopgrad_test_local_generator"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        def make(in_channels, out_channels):
            return nn.Conv3d(in_channels, out_channels, 1)
    """))
    monkeypatch.chdir(tmp_path)
    here = str(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p and os.path.abspath(p) != here])
    try:
        factory = resolve_factory(f"{name}:make")
        assert isinstance(factory(in_channels=5, out_channels=4), torch.nn.Conv3d)
    finally:
        sys.modules.pop(name, None)


def test_only_rank_zero_prints_the_summary(tmp_path, capsys):
    from chopgrad.tools.train.command import report

    config = tiny_config(tmp_path)
    record = {"summary": {"steps_done": 4, "final_eval": {"psnr": 20.0, "ssim": 0.5, "temporal_error": 0.01},
                          "time_per_step_s": 0.1, "peak_step_bytes": 2**20}}
    report(config, record, rank=1)
    assert capsys.readouterr().out == ""
    report(config, record, rank=0)
    assert capsys.readouterr().out.startswith("vsr: 4 steps, held-out PSNR 20.00 dB")


def test_sigterm_stops_train_like_ctrl_c(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        from chopgrad.tools.cli import main
        from chopgrad.tools.train.trainer import Run

        original_step = Run.step

        def terminated_at_step_three(self, batch):
            if self.scheduler.last_epoch == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return original_step(self, batch)

        Run.step = terminated_at_step_three
        sys.exit(main(["train", "--task", "vsr", *{TINY!r}, "--steps", "4", "--eval-every", "2",
                       "--out", {str(tmp_path / "run")!r}]))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 130, done.stderr[-2000:]
    checkpoint = tmp_path / "run" / "checkpoint"
    assert f"interrupted; the last checkpoint is in {checkpoint}: continue with the same options and --resume" \
        in done.stderr
    assert json.loads((checkpoint / "trainer.json").read_text())["step"] == 2


def test_a_data_folder_without_a_usable_file_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import chopgrad.tools.cli as cli
    from video_files import write_header_first_mp4

    def no_model_may_load(name):
        raise AssertionError("the model was loaded before --data was checked")

    monkeypatch.setattr(cli, "_load_model", no_model_may_load)
    data = tmp_path / "clips"
    data.mkdir()
    whole = write_header_first_mp4(tmp_path / "whole.mp4", 40, 32, 32)
    (data / "cut.mp4").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--task", "vsr", "--quick", "--model", "tiny-wan21", "--data", str(data), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--data {str(data)!r}" in err and "cut.mp4" in err and "truncated" in err, err
    assert not out.exists()
