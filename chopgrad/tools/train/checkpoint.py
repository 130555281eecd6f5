"""Training checkpoints in safetensors: model, optimizer, learning-rate schedule, step and random state.

A checkpoint is a folder:

- ``model.safetensors``: the model's state_dict;
- ``optimizer.safetensors``: every tensor of the optimizer's per-parameter state, keyed ``state.<index>.<name>``;
- ``random.safetensors``: the CPU generator's state and, per CUDA device, that device's;
- ``trainer.json``: the step, the optimizer's param groups and non-tensor state, the scheduler's state_dict,
  and whatever the trainer adds (``extra``).

Restoring all of it makes a resumed run continue bit for bit as the uninterrupted one would.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

#: the folder of a run's output folder that holds its checkpoint
CHECKPOINT_FOLDER = "checkpoint"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RANDOM_FILE = "random.safetensors"
TRAINER_FILE = "trainer.json"


def _split_optimizer_state(state_dict: dict) -> tuple[dict, dict]:
    tensors, other = {}, {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().contiguous()
            else:
                other.setdefault(str(index), {})[name] = value
    return tensors, other


def _merge_optimizer_state(tensors: dict, other: dict, param_groups: list) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entries in other.items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": param_groups}


def save_checkpoint(folder: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    scheduler: Optional[Any] = None, extra: Optional[dict] = None) -> str:
    """Writes the checkpoint folder (replacing its files) and returns it."""
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, MODEL_FILE))
    optimizer_state = optimizer.state_dict()
    tensors, other = _split_optimizer_state(optimizer_state)
    save_file(tensors, os.path.join(folder, OPTIMIZER_FILE))
    random = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for device, state in enumerate(torch.cuda.get_rng_state_all()):
            random[f"cuda.{device}"] = state
    save_file(random, os.path.join(folder, RANDOM_FILE))
    trainer = {"step": int(step), "param_groups": optimizer_state["param_groups"], "optimizer_other": other,
               "scheduler": scheduler.state_dict() if scheduler is not None else None, "extra": extra or {}}
    with open(os.path.join(folder, TRAINER_FILE), "w") as f:
        json.dump(trainer, f, indent=1)
    return folder


def load_checkpoint(folder: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Optional[Any] = None) -> dict:
    """Restores model, optimizer, scheduler and random state in place; returns ``{"step": ..., "extra": ...}``."""
    missing = [name for name in (MODEL_FILE, OPTIMIZER_FILE, RANDOM_FILE, TRAINER_FILE)
               if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise ValueError(f"checkpoint folder {folder!r} lacks {', '.join(missing)}")
    device = next(model.parameters()).device
    model.load_state_dict(load_file(os.path.join(folder, MODEL_FILE), device=str(device)))
    with open(os.path.join(folder, TRAINER_FILE)) as f:
        trainer = json.load(f)
    tensors = load_file(os.path.join(folder, OPTIMIZER_FILE), device=str(device))
    optimizer.load_state_dict(_merge_optimizer_state(tensors, trainer["optimizer_other"], trainer["param_groups"]))
    if scheduler is not None:
        if trainer["scheduler"] is None:
            raise ValueError(f"checkpoint folder {folder!r} has no learning-rate schedule to restore")
        scheduler.load_state_dict(trainer["scheduler"])
    random = load_file(os.path.join(folder, RANDOM_FILE))
    torch.set_rng_state(random["cpu"])
    cuda_states = [random[k] for k in sorted(k for k in random if k.startswith("cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[:torch.cuda.device_count()])
    return {"step": trainer["step"], "extra": trainer["extra"]}
