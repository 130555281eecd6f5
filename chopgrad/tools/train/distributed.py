"""Data parallelism across the processes `torchrun` starts: rank, world size, gradient averaging.

A pixel-loss step backpropagates through chopgrad's engine and, with a trained
decoder, into modules that are not called through the model's forward, so the
trainer does not wrap the model in DistributedDataParallel. It averages every
trainable gradient with one all-reduce per step (coalesced into one flat
buffer), which is what DistributedDataParallel computes: each rank's loss is
the mean over its own clips, so the averaged gradient is the gradient of the
mean over the union of the ranks' clips.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def average_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Replaces each parameter's gradient by its mean over the ranks (a missing gradient counts as 0)."""
        if not self.active or not parameters:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world
        offset = 0
        for p, g in zip(parameters, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def _reduce(self, value: float, device, op) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=op)
        return float(t)

    def mean(self, value: float, device) -> float:
        """The mean of a float over the ranks."""
        return self._reduce(value, device, dist.ReduceOp.SUM) / self.world

    def max(self, value: float, device) -> float:
        return self._reduce(value, device, dist.ReduceOp.MAX)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def ranks_from_environment(device: torch.device) -> Ranks:
    """Joins the process group when started by torchrun (WORLD_SIZE > 1): gloo on CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    rank = int(os.environ["RANK"])
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Ranks(rank=rank, world=world)


def leave(ranks: Ranks) -> None:
    if ranks.active and dist.is_initialized():
        dist.destroy_process_group()
