"""Data for chopgrad: procedural videos, folders of video files, and video writing.

``make_video(seed, frames, height, width)`` returns a deterministic clip of
shape ``(3, frames, height, width)`` in ``[-1, 1]``; ``make_batch`` stacks
several. See :mod:`chopgrad.data.synthetic`.

``VideoFolder(root, frames, height, width, ...)`` serves clips of the video
files under a folder in the same layout and range, decoded with PyAV
(:mod:`chopgrad.data.video_folder`). ``write_video``, ``read_video`` and
``save_comparison_grid`` write and read such tensors (:mod:`chopgrad.data.video_io`).
:mod:`chopgrad.data.tasks` turns clean clips into training pairs for the
vsr, inpaint, enhance and driving tasks.
"""

from .synthetic import make_batch, make_video
from .video_folder import VideoFolder
from .video_io import read_video, save_comparison_grid, write_video

__all__ = ["make_video", "make_batch", "VideoFolder", "write_video", "read_video", "save_comparison_grid"]
