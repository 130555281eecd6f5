"""Training and held-out task pairs for a recipe, from procedural clips or a folder of video files.

Clips are addressed by a global index, so a step's batch is fixed by the
step number alone: step ``s`` of rank ``r`` (of ``world`` ranks) takes clips
``(s * world + r) * batch + i``. Hence a run is the same with any number of
DataLoader workers, a resumed run reads the clips the uninterrupted one would
have, and the ranks of a data-parallel run read disjoint clips whose union is
what one process with ``world * batch`` clips per step reads.

- Synthetic (the default): clip ``i`` of a split is ``make_video`` with a seed
  derived from the run's seed, the split and ``i``; training and held-out
  clips never share a seed.
- A folder: the usable files (sorted by path) are split by file. The last
  tenth of them (at least one) is held out when there are two or more files;
  with a single file the held-out clips come from that file and a warning
  says the evaluation is not on unseen footage. Training clips are drawn at
  random positions (``VideoFolder`` random mode), held-out clips are the
  first sequential clips of the held-out files.

Inpainting's hole weights are scaled to a mean of 1 per clip. Then the
mask-weighted mean of ``pixel_loss`` divides every batch by the same count,
so each clip counts alike and the mean over the union of several ranks'
clips is the mean of the ranks' means.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from chopgrad.data.synthetic import make_video
from chopgrad.data.tasks import Task, TaskPair
from chopgrad.data.video_folder import VideoFolder

from .step import Batch

TRAIN, HELD_OUT = 0, 1
#: seeds of different (run seed, index) pairs stay apart as long as a split has fewer clips than this
_SEED_STRIDE = 1_000_003


def clip_seed(seed: int, split: int, index: int) -> int:
    """The seed of clip `index` of `split` (TRAIN or HELD_OUT): disjoint between the splits."""
    return 2 * (seed * _SEED_STRIDE + index) + split


class SyntheticClips:
    """Procedural clips ``(3, frames, height, width)`` (with their object layout, for the driving task)."""

    def __init__(self, frames: int, height: int, width: int, seed: int, split: int):
        self.frames, self.height, self.width, self.seed, self.split = frames, height, width, seed, split

    def clip(self, index: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return make_video(clip_seed(self.seed, self.split, index), self.frames, self.height, self.width, layout=True)


class FolderClips:
    """Clips of a VideoFolder; real footage has no layout, so the driving task uses its edge map."""

    def __init__(self, folder: VideoFolder):
        self.folder = folder

    def clip(self, index: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.folder[index], None

    def __len__(self) -> int:
        return len(self.folder)


class TaskPairs(Dataset):
    """Item ``i``: the task pair of clip ``i`` of `source`, seeded by (seed, split, i)."""

    def __init__(self, task: Task, source, seed: int, split: int, length: int, *, hole_weight: float = 2.0):
        self.task, self.source, self.seed, self.split, self.length = task, source, seed, split, length
        self.hole_weight = hole_weight

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> TaskPair:
        if not 0 <= index < self.length:
            raise IndexError(f"clip index {index} outside 0..{self.length - 1}")
        clip, layout = self.source.clip(index)
        options = {}
        if self.task.name == "driving":
            options["layout"] = layout
        if self.task.name == "inpaint":
            options["hole_weight"] = self.hole_weight
        pair = self.task.pair(clip, seed=clip_seed(self.seed, self.split, index) + 1, **options)
        weights = pair.loss_weights
        if weights is not None:
            # All-equal weights (hole_weight 1) supervise like no mask; dropping it keeps losses that reject masks usable.
            weights = None if bool((weights == weights.flatten()[0]).all()) else weights / weights.mean()
        return TaskPair(pair.condition, pair.target, pair.extra, weights)


class StepBatches(Sampler):
    """Clip indices of steps ``start .. stop - 1`` for one rank: ``(s * world + rank) * batch + i``."""

    def __init__(self, start: int, stop: int, batch: int, rank: int = 0, world: int = 1):
        self.start, self.stop, self.batch, self.rank, self.world = start, stop, batch, rank, world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        for step in range(self.start, self.stop):
            first = (step * self.world + self.rank) * self.batch
            yield list(range(first, first + self.batch))


def collate_pairs(pairs: list[TaskPair]) -> Batch:
    return Batch.of(pairs)


def _single_threaded_worker(_worker_id: int) -> None:
    torch.set_num_threads(1)


def step_loader(pairs: TaskPairs, start: int, stop: int, batch: int, *, rank: int = 0, world: int = 1,
                workers: int = 0) -> DataLoader:
    """Batches of steps ``start .. stop - 1`` of this rank, in order, made by `workers` processes.

    The loader has a generator of its own: starting an iterator draws its workers' base seed from the loader's
    generator, or else from torch's global one, which a model with dropout or noise sampling draws from too. A
    resumed run starts its iterator after restoring the global random state, so a draw from it there would
    shift every later random number against the uninterrupted run.
    """
    generator = torch.Generator().manual_seed(clip_seed(pairs.seed, pairs.split, start))
    return DataLoader(pairs, batch_sampler=StepBatches(start, stop, batch, rank, world), collate_fn=collate_pairs,
                      num_workers=workers, worker_init_fn=_single_threaded_worker if workers else None,
                      persistent_workers=False, generator=generator)


def split_held_out_files(files: list[str]) -> tuple[list[str], list[str]]:
    """(training files, held-out files) of a sorted list: the last tenth (>= 1) held out when there are >= 2."""
    if len(files) < 2:
        return list(files), list(files)
    held = max(1, math.ceil(len(files) / 10))
    return list(files[:-held]), list(files[-held:])


def task_datasets(task: Task, *, data: Optional[str], frames: int, height: int, width: int, frame_stride: int,
                  seed: int, train_clips: int, eval_clips: int, hole_weight: float) -> tuple[TaskPairs, TaskPairs]:
    """(training pairs with `train_clips` items, held-out pairs) of synthetic clips (data None) or a folder."""
    if data is None:
        train = SyntheticClips(frames, height, width, seed, TRAIN)
        held_out = SyntheticClips(frames, height, width, seed, HELD_OUT)
        eval_count = eval_clips
    else:
        every = VideoFolder(data, frames, height, width, stride=frame_stride)
        train_files, eval_files = split_held_out_files([info.path for info in every.files])
        every.close()
        if train_files == eval_files:
            warnings.warn(f"--data {data!r} has one usable video file, so the held-out clips come from the file "
                          f"the model trains on; add more files for an evaluation on unseen footage", stacklevel=2)
        train = FolderClips(VideoFolder(data, frames, height, width, stride=frame_stride, mode="random",
                                        clips_per_epoch=train_clips, seed=seed, files=train_files))
        held_out = FolderClips(VideoFolder(data, frames, height, width, stride=frame_stride, files=eval_files))
        eval_count = min(eval_clips, len(held_out))
    return (TaskPairs(task, train, seed, TRAIN, train_clips, hole_weight=hole_weight),
            TaskPairs(task, held_out, seed, HELD_OUT, eval_count, hole_weight=hole_weight))
