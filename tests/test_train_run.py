"""`chopgrad train`: outputs, resume, bad arguments, data parallelism, the decoder, autocast and --compare."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chopgrad.data.video_io import read_video
from chopgrad.tools.cli import main
from chopgrad.tools.train.config import TrainConfig
from chopgrad.tools.train.trainer import Run, train

TESTS = Path(__file__).resolve().parent
TINY = ["--model", "tiny-wan21", "--frames", "9", "--size", "16", "--eval-clips", "1", "--width", "8", "--blocks",
        "1", "--threads", "1", "--no-progress"]


def tiny_config(tmp_path, **changes) -> TrainConfig:
    settings = dict(task="vsr", model="tiny-wan21", frames=9, size=(16, 16), steps=4, eval_every=2, eval_clips=1,
                    samples=1, width=8, blocks=1, threads=1, progress=False, out=str(tmp_path))
    settings.update(changes)
    return TrainConfig(**settings)


@pytest.mark.parametrize("task", ["vsr", "inpaint", "enhance", "driving"])
def test_cli_run_writes_every_output(tmp_path, task, capsys):
    assert main(["train", "--task", task, *TINY, "--steps", "3", "--eval-every", "2", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert [row["step"] for row in record["steps"]] == [1, 2, 3]
    assert [e["step"] for e in record["evals"]] == [0, 2, 3]
    assert all(set(e) >= {"psnr", "ssim", "temporal_error"} for e in record["evals"])
    summary = record["summary"]
    # on the CPU the peak is resident-memory growth: 0 when the allocator reuses memory freed earlier in the process
    assert summary["peak_step_bytes"] >= 0 and summary["time_per_step_s"] > 0 and summary["steps_done"] == 3
    assert "reconstruction" in summary
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and len(rows) == 1 + 4  # steps 0 (eval only) .. 3
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert (tmp_path / "samples" / "clip0_grid.png").stat().st_size > 0
    video = read_video(tmp_path / "samples" / "clip0.mp4")
    assert video.shape == (3, 9, 16, 48)  # condition | output | target
    assert (tmp_path / "checkpoint" / "model.safetensors").exists()
    assert "held-out PSNR" in capsys.readouterr().out


def train_interrupted_after_two_steps(config: TrainConfig, monkeypatch) -> None:
    """Runs `config` until Ctrl-C arrives as step 3 begins (its checkpoint is step 2's)."""
    original_step = Run.step

    def stop_at_step_three(self, batch):
        if self.scheduler.last_epoch == 2:
            raise KeyboardInterrupt
        return original_step(self, batch)

    monkeypatch.setattr(Run, "step", stop_at_step_three)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr(Run, "step", original_step)


@pytest.mark.parametrize("settings", [{}, {"generator": "train_factories:dropout"},
                                      {"video_loss": "train_factories:make_critic", "video_loss_weight": 0.5}],
                         ids=["default", "dropout", "video_loss"])
def test_resume_continues_bit_for_bit(tmp_path, monkeypatch, settings):
    """Also with a model that draws random numbers while it trains (dropout): nothing else may draw from torch's
    generator between the restored random state and the first resumed step (the data loader has its own). And
    with a randomly initialized video critic, which the resumed run must build with the same weights."""
    settings = dict(task="inpaint", **settings)
    uninterrupted = train(tiny_config(tmp_path / "a", **settings))
    train_interrupted_after_two_steps(tiny_config(tmp_path / "b", **settings), monkeypatch)
    assert json.loads((tmp_path / "b" / "checkpoint" / "trainer.json").read_text())["step"] == 2
    resumed = train(tiny_config(tmp_path / "b", resume=True, **settings))

    a = load_file(str(tmp_path / "a" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in resumed["steps"]] == [r["loss"] for r in uninterrupted["steps"]]
    assert resumed["evals"] == uninterrupted["evals"]


def test_resume_needs_a_checkpoint_made_with_the_same_settings(tmp_path, capsys):
    out = ["--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        main(["train", "--task", "vsr", *TINY, "--steps", "2", "--resume", *out])
    assert "--resume: no checkpoint" in capsys.readouterr().err
    assert main(["train", "--task", "vsr", *TINY, "--steps", "2", *out]) == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--task", "vsr", *TINY, "--steps", "2", "--lr", "0.01", "--resume", *out])
    assert exit_info.value.code == 2
    assert "other settings (lr: 0.001 -> 0.01)" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--task", "deblur"], "invalid choice: 'deblur'"),
    (["--task", "vsr", "--generator", "no_such_module_xyz:make"], "--generator: cannot import module"),
    (["--task", "vsr", "--generator", "train_factories"], "--generator: expected 'module:function'"),
    (["--task", "vsr", "--generator", "train_factories:missing"], "has no callable 'missing'"),
    (["--task", "vsr", "--perceptual", "train_factories:missing"], "--perceptual: module"),
    (["--task", "vsr", "--data", "/no/such/folder"], "--data: '/no/such/folder' is not a folder"),
    (["--task", "vsr", "--pixel-loss", "lpips"], "unknown pixel loss 'lpips'"),
    (["--task", "vsr", "--samples", "3", "--eval-clips", "2"], "samples (3) cannot exceed eval_clips (2)"),
    (["--task", "vsr", "--d-trunc", "-1"], "--d-trunc"),
    (["--task", "vsr", "--compare", "--method", "full"], "--compare trains every method afresh"),
    (["--task", "vsr", "--compare", "--resume"], "drop --resume"),
    (["--task", "vsr", "--train-decoder", "--method", "latent"],
     "--train-decoder: the decoder gets its gradient from the pixel term and the video loss only"),
    (["--task", "vsr", "--train-decoder", "--pixel-weight", "0"], "--train-decoder: "),
    (["--task", "vsr", "--latent-weight", "0", "--pixel-loss", "mse=0"], "the loss has no term"),
    (["--task", "vsr", "--latent-weight", "0", "--pixel-loss", "mse=0", "l1=0"], "the loss has no term"),
    (["--task", "vsr", "--compare", "--latent-weight", "0"],
     "--compare: the 'latent loss only' run cannot be made: the loss has no term"),
    (["--task", "vsr", "--pixel-loss", "mse=inf"], "the weight of 'mse' must be a finite number >= 0, got inf"),
    (["--task", "vsr", "--pixel-loss", "mse=nan"], "the weight of 'mse' must be a finite number >= 0, got nan"),
    (["--task", "vsr", "--seed", "4600000000000"], "argument --seed: expected an integer in 0 .. 4294967295"),
    (["--task", "inpaint", "--pixel-loss", "ssim"],
     "--pixel-loss ssim: the inpaint task weights hole pixels --hole-weight 2 times more through a loss mask"),
    (["--task", "inpaint", "--pixel-loss", "mse", "ssim=0.5", "--hole-weight", "3"], "use --hole-weight 1"),
    (["--task", "vsr", "--pixel-loss", "mse=1", "mse=2"],
     "--pixel-loss: 'mse' given more than once (mse=1 mse=2); give each term once"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    import chopgrad.tools.cli as cli

    def no_model_may_load(name):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load_model", no_model_may_load)
    _fails_with_a_usage_error(tmp_path, capsys, argv, message)


@pytest.mark.parametrize("argv,message", [
    (["--task", "vsr", "--frames", "10"], "--frames: "),
    (["--task", "vsr", "--size", "20"], "--size: "),
])
def test_shapes_the_model_cannot_decode_fail_before_training(tmp_path, capsys, argv, message):
    """Checked against the model's configuration, so the model loads, but nothing trains."""
    _fails_with_a_usage_error(tmp_path, capsys, argv, message)


def _fails_with_a_usage_error(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *argv, "--model", "tiny-wan21", "--out", str(out)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_generator_and_perceptual_factories(tmp_path):
    record = train(tiny_config(tmp_path, task="driving", steps=2, generator="train_factories:pointwise",
                               perceptual="train_factories:gradient_l1", perceptual_weight=0.5))
    assert record["summary"]["steps_done"] == 2 and all(r["pixel"] > 0 for r in record["steps"])
    model = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))
    assert set(model) == {"model.proj.weight", "model.proj.bias"}
    with pytest.raises(ValueError, match="must return an nn.Module"):
        train(tiny_config(tmp_path / "bad", generator="train_factories:not_a_module"))
    with pytest.raises(ValueError, match=r"calling it as function\(in_channels=4, out_channels=4\) failed"):
        train(tiny_config(tmp_path / "bad", generator="train_factories:gradient_l1"))


def test_train_decoder_saves_a_diffusers_folder_with_a_changed_decoder(tmp_path):
    from diffusers import AutoencoderKLWan

    from chopgrad.tools.bench.workloads import load_model

    train(tiny_config(tmp_path, steps=2, train_decoder=True, decoder_lr=1e-2))
    tuned = AutoencoderKLWan.from_pretrained(str(tmp_path / "decoder"))
    original = load_model("tiny-wan21")
    assert torch.equal(tuned.encoder.conv_in.weight, original.encoder.conv_in.weight)
    assert not torch.equal(tuned.decoder.conv_out.weight, original.decoder.conv_out.weight)
    saved = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))
    assert any(k.startswith("decoder.") for k in saved) and any(k.startswith("model.") for k in saved)


def test_methods_and_bf16_autocast(tmp_path):
    for method in ("full", "latent"):
        record = train(tiny_config(tmp_path / method, steps=2, method=method))
        assert ("pixel" in record["steps"][0]) == (method == "full")
    record = train(tiny_config(tmp_path / "bf16", steps=2, dtype="bf16", schedule="chunked"))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in record["steps"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_step(rank: int, port: int, out: str, settings: dict) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    run = Run(tiny_config(Path(out) / "ddp", task="inpaint", batch=1, grad_clip=0.0, **settings))
    try:
        from chopgrad.tools.train.data import step_loader

        batch = next(iter(step_loader(run.train_pairs, 0, 1, 1, rank=run.ranks.rank, world=run.ranks.world)))
        row = run.step(run._on_device(batch))
        grads = {name: p.grad for name, p in run.model.named_parameters()}
        torch.save({"row": row, "grads": grads}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("settings", [{}, {"video_loss": "train_factories:make_critic", "video_loss_weight": 0.5}],
                         ids=["default", "video_loss"])
def test_two_rank_gloo_step_equals_one_process_on_the_union_of_the_clips(tmp_path, settings):
    """The video critic averages over the clips, so its term over the union is the mean of the ranks' terms."""
    torch.multiprocessing.spawn(_rank_step, args=(_free_port(), str(tmp_path), settings), nprocs=2, join=True)
    run = Run(tiny_config(tmp_path / "single", task="inpaint", batch=2, grad_clip=0.0, **settings))
    from chopgrad.tools.train.data import step_loader

    row = run.step(run._on_device(next(iter(step_loader(run.train_pairs, 0, 1, 2)))))
    for rank in range(2):
        ranked = torch.load(tmp_path / f"rank{rank}.pt")
        assert ranked["row"]["loss"] == pytest.approx(row["loss"], rel=1e-5)
        for name, p in run.model.named_parameters():
            torch.testing.assert_close(ranked["grads"][name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_torchrun_two_ranks_end_to_end(tmp_path):
    common = ["train", "--task", "enhance", *TINY, "--steps", "2", "--grad-clip", "0"]
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), "-m", "chopgrad", *common, "--batch", "1",
                           "--out", str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("held-out PSNR") == 1, done.stdout  # rank 0's summary only: rank 1 writes nothing
    assert main([*common, "--batch", "2", "--out", str(tmp_path / "single")]) == 0
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    first_ddp, first_single = ddp["steps"][0], single["steps"][0]
    assert first_ddp["loss"] == pytest.approx(first_single["loss"], rel=1e-5)
    assert first_ddp["grad_norm"] == pytest.approx(first_single["grad_norm"], rel=1e-4)


def test_compare_writes_one_table_and_plot_for_every_method(tmp_path, capsys):
    assert main(["train", "--task", "vsr", *TINY, "--steps", "2", "--eval-every", "1", "--compare",
                 "--out", str(tmp_path)]) == 0
    comparison = json.loads((tmp_path / "compare.json").read_text())
    assert [r["method"] for r in comparison["rows"]] == ["latent", "full", "sliding_d0", "sliding_d1", "chunked_d1"]
    assert all(r["status"] == "ok" and len(r["evals"]) == 3 for r in comparison["rows"])
    table = (tmp_path / "compare.md").read_text()
    assert "| chopgrad sliding d=1 |" in table and "| full backprop |" in table
    assert (tmp_path / "compare.png").stat().st_size > 0
    for name in ("latent", "full", "sliding_d0", "sliding_d1", "chunked_d1"):
        assert (tmp_path / name / "metrics.json").exists()
    # every method trained on the same held-out clips: the step-0 evaluation is the same untrained model
    assert len({r["evals"][0][1] for r in comparison["rows"]}) == 1
