"""scripts/train_default_vae.py: its data path and --time-budget (tiny runs on CPU)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os

import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location("train_default_vae", os.path.join(ROOT, "scripts", "train_default_vae.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TINY_RUN = ["--batch", "1", "--frames", "9,17", "--crop", "32", "--phase1-frac", "1.0", "--warmup", "1",
            "--eval-every", "1000", "--eval-clips", "1", "--threads", "1", "--seed", "5"]


def test_dataloader_workers_deliver_each_steps_own_batch():
    # item `step` of the dataset is train_batch(step, ...), whichever worker makes it
    train = _script()
    args = argparse.Namespace(steps=4, seed=5, phase1_frac=1.0, batch=3, frames=(9, 17), crop=32)
    loader = torch.utils.data.DataLoader(train.TrainingBatches(4, args), batch_size=None, num_workers=2,
                                         worker_init_fn=train._single_threaded_worker)
    for step, batch in enumerate(loader):
        torch.testing.assert_close(batch, train.train_batch(step, 4, 5, 1.0, 3, (9, 17), 32), rtol=0, atol=0)
    assert step == 3


def test_worker_processes_do_not_change_the_trained_weights(tmp_path):
    train = _script()
    train.main(["--steps", "3", "--workers", "0", "--out", str(tmp_path / "inline"), *TINY_RUN])
    train.main(["--steps", "3", "--workers", "2", "--out", str(tmp_path / "workers"), *TINY_RUN])
    inline = load_file(str(tmp_path / "inline" / "default_vae.safetensors"))
    workers = load_file(str(tmp_path / "workers" / "default_vae.safetensors"))
    assert inline.keys() == workers.keys()
    for name in inline:
        assert torch.equal(inline[name], workers[name]), name


def test_time_budget_stops_training(tmp_path):
    train = _script()
    train.main(["--steps", "100000", "--time-budget", "1.0", "--workers", "0", "--out", str(tmp_path), *TINY_RUN])
    log = json.loads((tmp_path / "default_vae_training.json").read_text())
    assert 1 <= log["steps_done"] < 100, log["steps_done"]
    assert log["train_seconds"] < 1.0 + 10.0  # the budget plus at most one step
    assert (tmp_path / "default_vae.safetensors").exists()
