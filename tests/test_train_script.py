"""scripts/train_default_vae.py: its data path and --time-budget (tiny runs on CPU)."""
from __future__ import annotations

import argparse
import json

import torch
from safetensors.torch import load_file

from script_loader import load_script

TINY_RUN = ["--batch", "1", "--frames", "9,17", "--crop", "32", "--phase1-frac", "1.0", "--warmup", "1",
            "--eval-every", "1000", "--eval-clips", "1", "--threads", "1", "--seed", "5"]


def test_dataloader_workers_deliver_each_steps_own_batch():
    # item `step` of the dataset is train_batch(step, ...), whichever worker makes it
    train = load_script("train_default_vae")
    args = argparse.Namespace(steps=4, seed=5, phase1_frac=1.0, batch=3, frames=(9, 17), crop=32)
    loader = torch.utils.data.DataLoader(train.TrainingBatches(4, args), batch_size=None, num_workers=2,
                                         worker_init_fn=train._single_threaded_worker)
    for step, batch in enumerate(loader):
        torch.testing.assert_close(batch, train.train_batch(step, 4, 5, 1.0, 3, (9, 17), 32), rtol=0, atol=0)
    assert step == 3


def test_worker_processes_do_not_change_the_trained_weights(tmp_path):
    train = load_script("train_default_vae")
    train.main(["--steps", "3", "--workers", "0", "--out", str(tmp_path / "inline"), *TINY_RUN])
    train.main(["--steps", "3", "--workers", "2", "--out", str(tmp_path / "workers"), *TINY_RUN])
    inline = load_file(str(tmp_path / "inline" / "default_vae.safetensors"))
    workers = load_file(str(tmp_path / "workers" / "default_vae.safetensors"))
    assert inline.keys() == workers.keys()
    for name in inline:
        assert torch.equal(inline[name], workers[name]), name


def test_time_budget_stops_training(tmp_path):
    train = load_script("train_default_vae")
    train.main(["--steps", "100000", "--time-budget", "1.0", "--workers", "0", "--out", str(tmp_path), *TINY_RUN])
    log = json.loads((tmp_path / "default_vae_training.json").read_text())
    assert 1 <= log["steps_done"] < 100, log["steps_done"]
    assert log["train_seconds"] < 1.0 + 10.0  # the budget plus at most one step
    assert (tmp_path / "default_vae.safetensors").exists()


def test_psnr_references_rank_the_codecs_by_their_size():
    ref = load_script("psnr_references")
    x = torch.arange(3 * 9 * 16 * 16, dtype=torch.float32).reshape(3, 9, 16, 16)
    p = ref.patches(x)
    assert p.shape == (2 * 2 * 2, 3 * 4 * 8 * 8)
    # patch 0 is frames 1-4, rows 0-7, columns 0-7 of every channel, in (c, t, y, x) order
    torch.testing.assert_close(p[0], x[:, 1:5, :8, :8].reshape(-1))
    out = ref.references(clips=1, fit_clips=3, components=(4, 16, 64))
    assert out["mean_colour"] < out["avg_pool_8x8"] < out["avg_pool_4x4"] < out["avg_pool_2x2"]
    assert out["pca_8x8x4_k4"] < out["pca_8x8x4_k16"] < out["pca_8x8x4_k64"]


def test_latent_optimisation_does_not_lower_the_default_vaes_psnr():
    out = load_script("psnr_references").decoder_with_optimised_latents(steps=2, lr=1e-3)
    assert out["vae_clip0_latents_optimised_2_steps"] >= out["vae_clip0_encoder_latents"] - 0.01
    assert out["vae_clip0_encoder_latents"] > 16.0  # above the mean-colour level: real latents
