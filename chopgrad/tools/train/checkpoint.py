"""Training checkpoints in safetensors: model, optimizer, learning-rate schedule, step and random state.

A checkpoint is a folder:

- ``model.safetensors``: the model's state_dict, or with ``trainable_only`` the parameters that require grad
  (a frozen pretrained base is reloaded from where it came from, not copied into every checkpoint);
- ``optimizer.safetensors``: every tensor of the optimizer's per-parameter state, keyed ``state.<index>.<name>``;
- ``random.safetensors``: the CPU generator's state and, per CUDA device, that device's;
- ``trainer.json``: the step, the optimizer's param groups and non-tensor state, the scheduler's state_dict,
  and whatever the trainer adds (``extra``).

Restoring all of it makes a resumed run continue bit for bit as the uninterrupted one would.

Every file records the step it was saved at (the safetensors files in their metadata), and loading refuses a
folder whose files disagree. A save writes a new folder next to the checkpoint (``<folder>.partial``) and swaps
it in by renaming, so an interruption leaves the previous checkpoint whole: in ``<folder>``, or, when it came
between the two renames, in ``<folder>.previous``, which loading then uses.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

#: the folder of a run's output folder that holds its checkpoint
CHECKPOINT_FOLDER = "checkpoint"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RANDOM_FILE = "random.safetensors"
TRAINER_FILE = "trainer.json"
TENSOR_FILES = (MODEL_FILE, OPTIMIZER_FILE, RANDOM_FILE)
#: a save in progress, and the checkpoint it replaces while the two are swapped
PARTIAL_SUFFIX, PREVIOUS_SUFFIX = ".partial", ".previous"


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


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The entries of `model`'s state_dict that are parameters requiring grad."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items()
            if isinstance(v, torch.nn.Parameter) and v.requires_grad}


def save_checkpoint(folder: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    scheduler: Optional[Any] = None, extra: Optional[dict] = None,
                    trainable_only: bool = False) -> str:
    """Writes the checkpoint into `folder`, replacing the one there as a whole, and returns `folder`."""
    folder = os.path.normpath(folder)
    partial, previous = folder + PARTIAL_SUFFIX, folder + PREVIOUS_SUFFIX
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    stamp = {"step": str(int(step))}
    weights = trainable_state(model) if trainable_only else model.state_dict()
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, os.path.join(partial, MODEL_FILE),
              metadata=stamp)
    optimizer_state = optimizer.state_dict()
    tensors, other = _split_optimizer_state(optimizer_state)
    save_file(tensors, os.path.join(partial, OPTIMIZER_FILE), metadata=stamp)
    random = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for device, state in enumerate(torch.cuda.get_rng_state_all()):
            random[f"cuda.{device}"] = state
    save_file(random, os.path.join(partial, RANDOM_FILE), metadata=stamp)
    trainer = {"step": int(step), "param_groups": optimizer_state["param_groups"], "optimizer_other": other,
               "scheduler": scheduler.state_dict() if scheduler is not None else None, "extra": extra or {}}
    with open(os.path.join(partial, TRAINER_FILE), "w") as f:
        json.dump(trainer, f, indent=1)
    if os.path.isdir(folder):
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(folder, previous)
    os.rename(partial, folder)
    shutil.rmtree(previous, ignore_errors=True)
    return folder


def committed_checkpoint(folder: str) -> Optional[str]:
    """The folder holding the last whole checkpoint saved to `folder` (itself, or the one a swap left), or None."""
    folder = os.path.normpath(folder)
    for candidate in (folder, folder + PREVIOUS_SUFFIX):
        if os.path.isdir(candidate):
            return candidate
    return None


def _recorded_steps(folder: str) -> dict:
    """{file name: the step it records} of a checkpoint folder; ValueError naming the folder if one cannot say."""
    steps = {}
    for name in TENSOR_FILES:
        try:
            with safe_open(os.path.join(folder, name), "pt") as f:
                recorded = (f.metadata() or {}).get("step")
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"checkpoint folder {folder!r}: {name} cannot be read ({exc})") from None
        if recorded is None or not recorded.isdigit():
            raise ValueError(f"checkpoint folder {folder!r}: {name} records no step, so it cannot be checked "
                             f"against the other files; start the run afresh")
        steps[name] = int(recorded)
    return steps


def _read_trainer(folder: str) -> dict:
    try:
        with open(os.path.join(folder, TRAINER_FILE)) as f:
            trainer = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"checkpoint folder {folder!r}: {TRAINER_FILE} is not valid JSON ({exc})") from None
    if not isinstance(trainer, dict) or not isinstance(trainer.get("step"), int):
        raise ValueError(f"checkpoint folder {folder!r}: {TRAINER_FILE} records no step")
    return trainer


def checkpoint_settings(folder: str) -> dict:
    """The run settings the trainer stored with the checkpoint in `folder` (``extra["config"]``), read without
    loading any tensor; ValueError or KeyError when it records none."""
    return _read_trainer(folder)["extra"]["config"]


def load_checkpoint(folder: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Optional[Any] = None, trainable_only: bool = False) -> dict:
    """Restores model, optimizer, scheduler and random state in place; returns ``{"step": ..., "extra": ...}``.

    Checks the whole folder before changing anything: ValueError naming the folder if a file is missing or the
    files were saved at different steps.
    """
    folder = committed_checkpoint(folder) or folder
    missing = [name for name in (*TENSOR_FILES, TRAINER_FILE) if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise ValueError(f"checkpoint folder {folder!r} lacks {', '.join(missing)}")
    trainer = _read_trainer(folder)
    steps = {**_recorded_steps(folder), TRAINER_FILE: trainer["step"]}
    if len(set(steps.values())) > 1:
        listed = ", ".join(f"{name} step {value}" for name, value in steps.items())
        raise ValueError(f"checkpoint folder {folder!r} is inconsistent: its files were saved at different steps "
                         f"({listed}), as when a save is interrupted; it cannot be resumed, start the run afresh")
    if scheduler is not None and trainer["scheduler"] is None:
        raise ValueError(f"checkpoint folder {folder!r} has no learning-rate schedule to restore")
    device = next(model.parameters()).device
    weights = load_file(os.path.join(folder, MODEL_FILE), device=str(device))
    if trainable_only:
        expected = set(trainable_state(model))
        if set(weights) != expected:
            absent, foreign = sorted(expected - set(weights)), sorted(set(weights) - expected)
            raise ValueError(f"checkpoint folder {folder!r} does not hold this run's trainable weights (missing "
                             f"{absent[:3]}, unexpected {foreign[:3]}); resume with the same model settings")
        model.load_state_dict(weights, strict=False)
    else:
        model.load_state_dict(weights)
    tensors = load_file(os.path.join(folder, OPTIMIZER_FILE), device=str(device))
    optimizer.load_state_dict(_merge_optimizer_state(tensors, trainer["optimizer_other"], trainer["param_groups"]))
    if scheduler is not None:
        scheduler.load_state_dict(trainer["scheduler"])
    random = load_file(os.path.join(folder, RANDOM_FILE))
    torch.set_rng_state(random["cpu"])
    cuda_states = [random[k] for k in sorted(k for k in random if k.startswith("cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[:torch.cuda.device_count()])
    return {"step": trainer["step"], "extra": trainer["extra"]}
