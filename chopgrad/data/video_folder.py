"""A folder of video files as a dataset of fixed-size clips, decoded with PyAV.

:class:`VideoFolder` finds every video file under a folder (recursively; extensions ``.mp4``, ``.mkv``,
``.webm``, ``.avi``, ``.mov`` in any case) and serves clips of ``frames`` frames taken every ``stride``-th frame,
resized with antialiasing and cropped to ``height x width``, as float32 tensors ``(3, frames, height, width)``
in ``[-1, 1]`` (the pixel convention of diffusers video VAEs and of :mod:`chopgrad.data.synthetic`).

Only the frames a clip needs are decoded: the container seeks to the keyframe at or before the clip's first
frame, and decoding stops at the clip's last frame.

Frame timestamps
    At construction every file is opened once and its video stream's packets are demuxed without decoding them
    (a small part of the cost of a decode): frame ``k`` is the packet with the ``k``-th smallest timestamp, so
    files with a variable frame rate (irregular gaps between frames) give exactly their frames. The sorted
    timestamps and the keyframes among them are kept per file for the life of the dataset (as
    :class:`VideoFileInfo` in :attr:`VideoFolder.files`), and clips seek and decode by them.

Damaged files
    A file is skipped (with the one warning that lists every skipped file) when it cannot be opened or demuxed,
    has no video stream or frames, or is truncated or damaged: the demuxer flags a packet as corrupt, or the
    stream header lists more frames than the file holds (a truncated mp4 whose header comes first). Damage the
    demuxer cannot see (corrupt data inside a complete packet) surfaces when a clip is read, as
    :class:`VideoDecodeError` naming the file.
"""

from __future__ import annotations

import bisect
import os
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .video_io import signed_from_uint8

__all__ = ["VideoFolder", "VideoFileInfo", "VideoDecodeError", "VIDEO_EXTENSIONS"]

#: File name endings recognised as videos (compared case-insensitively).
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")

MODES = ("sequential", "random")
#: skipped files whose reason the error of a folder without usable clips spells out (the warning lists all)
SKIPPED_FILES_IN_ERROR = 3


class VideoDecodeError(RuntimeError):
    """A clip's frames could not be decoded from its file (a damaged file whose damage the index did not show).

    The message names the file and the frames; ``path`` is the file (``None`` when the error was re-raised in
    the main process by a DataLoader worker, whose message then holds the worker's traceback).
    """

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path

    def summary(self) -> str:
        """The one-line message, without the traceback a DataLoader worker puts in front of it."""
        last = str(self).strip().splitlines()[-1] if str(self).strip() else ""
        marker = f"{type(self).__name__}: "
        return last.split(marker, 1)[1] if marker in last else last


@dataclass(frozen=True, eq=False)
class VideoFileInfo:
    """What the dataset knows about one usable video file, from demuxing its video stream once.

    Frame ``k`` is the frame whose timestamp is ``frame_pts[k]`` (in ``time_base`` units; sorted, so frames are
    in display order whatever the decoding order). ``keyframes`` holds the sorted indices of the frames that
    are keyframes. ``fps`` is the header's average rate (informational; timestamps are never derived from it).
    ``frame_count_source`` is ``"metadata"`` when the stream header states the frame count (mp4, mov, avi; the
    packets then agree with it) and ``"counted"`` when only the packets give it (mkv and webm usually).
    """

    path: str
    num_frames: int
    time_base: Fraction
    fps: Fraction | None
    frame_pts: np.ndarray
    keyframes: np.ndarray
    frame_count_source: str

    @property
    def start_pts(self) -> int:
        """Timestamp of the first frame."""
        return int(self.frame_pts[0])

    def pts_of(self, index: int) -> int:
        """Timestamp (in ``time_base`` units) of frame ``index``."""
        return int(self.frame_pts[index])

    def index_of(self, pts: int) -> int:
        """Frame index of a decoded frame with timestamp ``pts`` (the nearest frame)."""
        position = int(np.searchsorted(self.frame_pts, pts))
        if position == len(self.frame_pts):
            return position - 1
        if position > 0 and pts - self.frame_pts[position - 1] < self.frame_pts[position] - pts:
            return position - 1
        return position

    def keyframe_at_or_before(self, index: int) -> int:
        """Index of the last keyframe at or before frame ``index`` in display order (0 when there is none)."""
        position = int(np.searchsorted(self.keyframes, index, side="right"))
        return int(self.keyframes[position - 1]) if position > 0 else 0


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _read_only(values: list) -> np.ndarray:
    array = np.asarray(values, dtype=np.int64)
    array.setflags(write=False)
    return array


def _probe(path: str) -> VideoFileInfo:
    """Index the first video stream of ``path`` from its packets; raises on unreadable or truncated files."""
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        if stream.time_base is None:
            raise ValueError("video stream has no time base")
        header_frames = int(stream.frames or 0)
        packets = 0
        timestamps: list[tuple[int, bool]] = []
        for packet in container.demux(stream):
            if packet.dts is None and packet.pts is None and not packet.size:
                continue  # the demuxer's end-of-stream marker
            packets += 1
            if packet.is_corrupt:
                raise ValueError(f"truncated or damaged: the demuxer flags packet {packets} of the stream "
                                 f"(timestamp {packet.pts}) as corrupt")
            # Empty packets (an avi's dropped frames) give no frame, nor do packets an mp4 edit list hides (the
            # decoder drops their frames); frames without a timestamp cannot be sought.
            if packet.size and packet.pts is not None and not packet.is_discard:
                timestamps.append((int(packet.pts), bool(packet.is_keyframe)))
        if header_frames and packets < header_frames:
            raise ValueError(f"truncated: the stream header lists {header_frames} frames, the file holds "
                             f"{packets}")
        if not timestamps:
            raise ValueError("video stream has no frames")
        timestamps.sort()
        frame_pts = [pts for pts, _ in timestamps]
        if len(set(frame_pts)) != len(frame_pts):
            raise ValueError("several frames share a timestamp, so frames cannot be told apart by timestamp")
        keyframes = [index for index, (_, is_keyframe) in enumerate(timestamps) if is_keyframe]
        fps = stream.average_rate
        return VideoFileInfo(path, len(frame_pts), Fraction(stream.time_base), Fraction(fps) if fps else None,
                             _read_only(frame_pts), _read_only(keyframes),
                             "metadata" if header_frames else "counted")


def _find_video_files(folder: Path) -> list[Path]:
    """Video files under `folder`, following symbolic links to files and folders (each folder read once, so a
    link to an ancestor ends); a broken link is kept, so that indexing lists it among the skipped files."""
    found, seen = [], set()
    for directory, subdirectories, names in os.walk(folder, followlinks=True):
        seen.add(os.path.realpath(directory))
        subdirectories[:] = sorted(d for d in subdirectories
                                   if os.path.realpath(os.path.join(directory, d)) not in seen)
        for name in names:
            path = Path(directory, name)
            if path.suffix.lower() in VIDEO_EXTENSIONS and (path.is_file() or path.is_symlink()):
                found.append(path)
    return sorted(found)


def _check_files(root: Path, files) -> list[Path]:
    if isinstance(files, (str, os.PathLike)) or not hasattr(files, "__iter__"):
        raise ValueError(f"files must be a list of paths, got {files!r}")
    paths = [Path(f) for f in files]
    if not paths:
        raise ValueError("files must name at least one video file (or be None for every file under root)")
    # inside root as written: a file reached through a symbolic link under root may lie elsewhere on disk
    absolute_root = Path(os.path.abspath(root))
    for path in paths:
        if not path.is_file():
            raise ValueError(f"files: {str(path)!r} is not a file")
        if absolute_root not in Path(os.path.abspath(path)).parents:
            raise ValueError(f"files: {str(path)!r} is not inside root {str(root)!r}")
    return sorted(paths)


class VideoFolder(Dataset):
    """Clips of the videos under ``root`` as ``(3, frames, height, width)`` float32 tensors in ``[-1, 1]``.

    Args:
        root: folder searched recursively for video files (see :data:`VIDEO_EXTENSIONS`).
        frames: frames per clip.
        height, width: spatial size of a clip. Each decoded frame is resized (bilinear with antialiasing,
            aspect ratio kept) so that its short side covers the crop, then cropped: centred in sequential
            mode, at a random position in random mode.
        stride: a clip takes every ``stride``-th frame, so it spans ``(frames - 1) * stride + 1`` frames of its
            file. Files shorter than that are skipped, like unreadable and truncated files (see the module
            docstring), with one warning listing every skipped file.
        mode: ``"sequential"``: a fixed index of all clips, starting at frames ``0, frames * stride, ...`` of
            every file (in sorted path order); ``len`` is the number of such clips.
            ``"random"``: ``len`` is ``clips_per_epoch``; clip ``i`` is drawn from a generator seeded by
            ``(seed, epoch, i)``, with the file and start frame chosen uniformly among all valid
            (file, start) pairs, and a random crop. The same seed and epoch give the same clips whatever the
            number of DataLoader workers.
        clips_per_epoch: number of clips per epoch, required in random mode only.
        seed: seed of random mode.
        max_open_files: open containers kept per process for reuse (least recently used closed first).
        files: use these video files under ``root`` instead of every one found there (for example to hold some
            files out for evaluation); each must be a file inside ``root``.

    Containers are opened lazily in the process that reads a clip and are never carried across processes,
    so the dataset works in a DataLoader with worker processes. With ``persistent_workers=True`` the workers
    keep the epoch they were started with; call :meth:`set_epoch` before creating each epoch's iterator
    without persistent workers.

    Raises:
        ValueError: an argument is invalid (the message names it), or no file under ``root`` gives a clip (the
            message counts the files found per extension, the unreadable ones (truncated ones included) and the
            too short ones).
        FileNotFoundError: ``root`` is not a folder.
        IndexError: a clip index outside ``-len .. len - 1`` (the message gives the index as passed and the range).
        VideoDecodeError: (a ``RuntimeError``) on reading a clip, when its file fails to decode or decodes fewer
            frames than its index holds (damage inside packets, which indexing does not see); the message names
            the file and the frames.

    Attributes:
        files: the usable files, as :class:`VideoFileInfo` in sorted path order.
        skipped: ``(path, reason)`` for every file that was skipped.
        last_clip_decoded_frames: frames the decoder produced for the most recent clip read in this process
            (including frames between the seek keyframe and the clip's first frame).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        frames: int,
        height: int,
        width: int,
        *,
        stride: int = 1,
        mode: str = "sequential",
        clips_per_epoch: int | None = None,
        seed: int = 0,
        max_open_files: int = 8,
        files: Sequence[str | os.PathLike] | None = None,
    ):
        self.frames = _positive_int("frames", frames)
        self.height = _positive_int("height", height)
        self.width = _positive_int("width", width)
        self.stride = _positive_int("stride", stride)
        self.max_open_files = _positive_int("max_open_files", max_open_files)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        if mode == "random":
            if clips_per_epoch is None:
                raise ValueError("clips_per_epoch is required in mode='random'")
            self.clips_per_epoch = _positive_int("clips_per_epoch", clips_per_epoch)
        else:
            if clips_per_epoch is not None:
                raise ValueError("clips_per_epoch applies to mode='random' only; sequential mode serves every clip")
            self.clips_per_epoch = None
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.epoch = 0

        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"VideoFolder root {str(self.root)!r} is not a folder")
        self.span = (self.frames - 1) * self.stride + 1
        candidates = _find_video_files(self.root) if files is None else _check_files(self.root, files)
        self.files: list[VideoFileInfo] = []
        self.skipped: list[tuple[str, str]] = []
        unreadable = too_short = 0
        for path in candidates:
            try:
                info = _probe(str(path))
            except Exception as error:  # any decoder or container failure makes the file unusable
                unreadable += 1
                self.skipped.append((str(path), f"cannot be read ({type(error).__name__}: {error})"))
                continue
            if info.num_frames < self.span:
                too_short += 1
                self.skipped.append((str(path), f"{info.num_frames} frames, a clip needs {self.span}"))
                continue
            self.files.append(info)

        if not self.files:
            by_extension = Counter(p.suffix.lower() for p in candidates)
            found = ", ".join(f"{count} {ext}" for ext, count in sorted(by_extension.items())) or "none"
            shown = SKIPPED_FILES_IN_ERROR
            reasons = "; ".join(f"{path}: {reason}" for path, reason in self.skipped[:shown])
            if len(self.skipped) > shown:
                reasons += f"; and {len(self.skipped) - shown} more"
            raise ValueError(
                f"no usable clip of {self.frames} frames with stride {self.stride} (spanning {self.span} frames) "
                f"in {str(self.root)!r}: found {len(candidates)} video files ({found}); "
                f"{unreadable} unreadable, {too_short} too short" + (f" ({reasons})" if reasons else "")
            )
        if self.skipped:
            listing = "\n".join(f"  {path}: {reason}" for path, reason in self.skipped)
            warnings.warn(f"VideoFolder skipped {len(self.skipped)} of {len(candidates)} video files "
                          f"under {str(self.root)!r}:\n{listing}", stacklevel=2)

        # Valid start frames per file: 0 .. num_frames - span. Cumulative counts map a flat draw to (file, start).
        self._start_counts = [info.num_frames - self.span + 1 for info in self.files]
        self._start_offsets = np.cumsum([0] + self._start_counts).tolist()
        # Sequential index: clip starts at multiples of frames * stride, the whole span inside the file.
        self._sequential: list[tuple[int, int]] = []
        for file_index, info in enumerate(self.files):
            for start in range(0, info.num_frames - self.span + 1, self.frames * self.stride):
                self._sequential.append((file_index, start))

        self._open: OrderedDict[str, av.container.InputContainer] = OrderedDict()
        self._owner_pid = os.getpid()
        self.last_clip_decoded_frames = 0

    # ------------------------------------------------------------------ sampling
    def __len__(self) -> int:
        return len(self._sequential) if self.mode == "sequential" else self.clips_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose clips random mode draws (no effect in sequential mode)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = int(epoch)

    def clip_location(self, index: int) -> tuple[str, int]:
        """``(path, first frame index)`` of clip ``index`` in the current epoch."""
        file_index, start, _ = self._locate(index)
        return self.files[file_index].path, start

    def _locate(self, index: int) -> tuple[int, int, tuple[float, float] | None]:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"clip index must be an integer, got {index!r}")
        length = len(self)
        if not -length <= index < length:
            raise IndexError(f"clip index {index} out of range for {length} clips (valid: {-length} .. {length - 1})")
        if index < 0:
            index += length
        if self.mode == "sequential":
            file_index, start = self._sequential[index]
            return file_index, start, None
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        flat = int(rng.integers(self._start_offsets[-1]))
        file_index = bisect.bisect_right(self._start_offsets, flat) - 1
        start = flat - self._start_offsets[file_index]
        crop = (float(rng.random()), float(rng.random()))
        return file_index, start, crop

    # ------------------------------------------------------------------ decoding
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # open containers never cross a process boundary
        return state

    def _container(self, path: str):
        if os.getpid() != self._owner_pid:
            # A forked worker inherits the parent's open containers; it opens its own instead, so no two
            # processes ever drive one demuxer or share its file position.
            self._open = OrderedDict()
            self._owner_pid = os.getpid()
        container = self._open.get(path)
        if container is None:
            container = av.open(path)
            # A decoder with worker threads cannot be freed in a forked child (a DataLoader worker that drops or
            # collects containers of the parent): it waits forever for threads the fork did not copy. Clips are
            # small and DataLoader workers decode in parallel, so one thread per decoder costs little.
            container.streams.video[0].codec_context.thread_count = 1
            self._open[path] = container
            while len(self._open) > self.max_open_files:
                _, oldest = self._open.popitem(last=False)
                oldest.close()
        else:
            self._open.move_to_end(path)
        return container

    def _forget(self, path: str) -> None:
        container = self._open.pop(path, None)
        if container is not None:
            container.close()

    def _seek_anchors(self, info: VideoFileInfo, first: int) -> list[int]:
        """Frames to seek to for a clip starting at frame ``first``, tried in order until one does not overshoot.

        The keyframe at or before ``first`` (in display order) nearly always works; a demuxer that seeks by
        decoding timestamps can land after it in display order (B-frames), so the keyframe before that follows,
        then the first frame of the file.
        """
        anchor = info.keyframe_at_or_before(first)
        anchors = [anchor]
        if anchor > 0:
            anchors.append(info.keyframe_at_or_before(anchor - 1))
        if anchors[-1] > 0:
            anchors.append(0)
        return anchors

    def _decode(self, info: VideoFileInfo, indices: list[int]) -> list[np.ndarray]:
        """RGB frames ``(H, W, 3)`` uint8 for the sorted frame ``indices`` of one file, seeking by its timestamps."""
        wanted = set(indices)
        found: dict[int, np.ndarray] = {}
        decoded = 0
        try:
            for anchor in self._seek_anchors(info, indices[0]):
                container = self._container(info.path)
                stream = container.streams.video[0]
                container.seek(info.pts_of(anchor), stream=stream, backward=True, any_frame=False)
                first_decoded = None
                for frame in container.decode(stream):
                    decoded += 1
                    if frame.pts is None:
                        continue
                    frame_index = info.index_of(frame.pts)
                    if first_decoded is None:
                        first_decoded = frame_index
                    if frame_index in wanted and frame_index not in found:
                        found[frame_index] = frame.to_ndarray(format="rgb24")
                    if frame_index >= indices[-1]:
                        break
                if first_decoded is not None and first_decoded <= indices[0]:
                    break
        except av.error.FFmpegError as error:
            self._forget(info.path)  # a decoder that failed mid-stream is not reused
            self.last_clip_decoded_frames = decoded
            raise VideoDecodeError(f"{info.path}: cannot decode frames {indices[0]}..{indices[-1]} "
                                   f"({type(error).__name__}: {error}); the file is damaged", info.path) from error
        self.last_clip_decoded_frames = decoded
        missing = [k for k in indices if k not in found]
        if missing:
            raise VideoDecodeError(f"{info.path}: could not decode frames {missing} (the file has {info.num_frames} "
                                   f"frames by its index); the file is damaged", info.path)
        return [found[k] for k in indices]

    def _resize_and_crop(self, video: torch.Tensor, crop: tuple[float, float] | None) -> torch.Tensor:
        """``(F, 3, h, w)`` float in [0, 255] -> ``(F, 3, height, width)``, short side covering the crop."""
        source_height, source_width = video.shape[-2:]
        scale = max(self.height / source_height, self.width / source_width)
        resized_height = max(self.height, round(source_height * scale))
        resized_width = max(self.width, round(source_width * scale))
        if (resized_height, resized_width) != (source_height, source_width):
            video = F.interpolate(video, size=(resized_height, resized_width), mode="bilinear",
                                  align_corners=False, antialias=True)
        spare_height, spare_width = resized_height - self.height, resized_width - self.width
        if crop is None:
            top, left = spare_height // 2, spare_width // 2
        else:
            top = min(int(crop[0] * (spare_height + 1)), spare_height)
            left = min(int(crop[1] * (spare_width + 1)), spare_width)
        return video[..., top:top + self.height, left:left + self.width]

    def __getitem__(self, index: int) -> torch.Tensor:
        file_index, start, crop = self._locate(index)
        info = self.files[file_index]
        indices = [start + k * self.stride for k in range(self.frames)]
        rgb = np.stack(self._decode(info, indices))  # (F, H, W, 3) uint8
        video = torch.from_numpy(rgb).permute(0, 3, 1, 2).to(torch.float32)
        video = self._resize_and_crop(video, crop)
        video = signed_from_uint8(video)
        return video.permute(1, 0, 2, 3).contiguous()  # (3, F, H, W)

    def close(self) -> None:
        """Close the containers this process has open (they reopen on the next read)."""
        while self._open:
            _, container = self._open.popitem()
            container.close()

    def __del__(self):
        try:
            if os.getpid() == self._owner_pid:
                self.close()
        except Exception:  # at interpreter exit av or our attributes may already be gone; nothing to report to
            pass
