"""Synthetic data for chopgrad: procedural videos for training, tests and benchmarks.

``make_video(seed, frames, height, width)`` returns a deterministic clip of
shape ``(3, frames, height, width)`` in ``[-1, 1]``; ``make_batch`` stacks
several. See :mod:`chopgrad.data.synthetic`.
"""

from .synthetic import make_batch, make_video

__all__ = ["make_video", "make_batch"]
