"""Writing and reading videos, and comparison grids of frames.

Videos are tensors ``(3, F, H, W)`` (or ``(1, 3, F, H, W)``) with values in ``[-1, 1]``, the convention of
:class:`chopgrad.data.VideoFolder` and of diffusers video VAEs.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

__all__ = ["write_video", "read_video", "save_comparison_grid", "available_video_encoder"]

#: Encoders tried in order by :func:`write_video`: H.264 first, then codecs most FFmpeg builds carry.
PREFERRED_ENCODERS = ("libx264", "h264", "libopenh264", "mpeg4")


def available_video_encoder(preferred=PREFERRED_ENCODERS) -> str:
    """Name of the first encoder in ``preferred`` that the installed PyAV (its FFmpeg) can use."""
    for name in preferred:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # unknown to this FFmpeg build
            continue
        return name
    raise RuntimeError(f"PyAV {av.__version__} has none of the video encoders {list(preferred)}")


def _as_video(video: torch.Tensor, name: str = "video") -> torch.Tensor:
    """``(3, F, H, W)`` or ``(1, 3, F, H, W)`` tensor -> ``(3, F, H, W)`` float32 on the CPU, checked."""
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(video).__name__}")
    if video.dim() == 5:
        if video.shape[0] != 1:
            raise ValueError(f"{name} with a batch dimension must have batch size 1, got shape {tuple(video.shape)}")
        video = video[0]
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"{name} must have shape (3, F, H, W) or (1, 3, F, H, W), got {tuple(video.shape)}")
    if video.shape[1] < 1:
        raise ValueError(f"{name} has no frames")
    return video.detach().to("cpu", torch.float32)


#: 8-bit pixel values v map to (v / PIXEL_HALF_RANGE - 1) in [-1, 1], the VAEs' convention.
PIXEL_HALF_RANGE = 127.5


def signed_from_uint8(values: torch.Tensor) -> torch.Tensor:
    """8-bit pixel values (any float or integer tensor in [0, 255]) -> float32 in [-1, 1]."""
    return (values.to(torch.float32) / PIXEL_HALF_RANGE - 1.0).clamp(-1.0, 1.0)


def _to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """``(3, F, H, W)`` in [-1, 1] -> ``(F, H, W, 3)`` uint8 (values outside the range are clipped)."""
    scaled = ((video.clamp(-1.0, 1.0) + 1.0) * PIXEL_HALF_RANGE).round().to(torch.uint8)
    return scaled.permute(1, 2, 3, 0).contiguous().numpy()


def write_video(path: str | os.PathLike, video: torch.Tensor, fps: float = 16, *, crf: int = 18,
                encoder: str | None = None) -> str:
    """Encode ``video`` to ``path`` (an mp4 file) and return the name of the encoder used.

    Args:
        path: output file; its parent folder is created if missing.
        video: ``(3, F, H, W)`` or ``(1, 3, F, H, W)`` tensor in ``[-1, 1]`` (clipped to it) on any device.
            ``H`` and ``W`` must be even (4:2:0 chroma subsampling).
        fps: frames per second (a positive number; non-integers are stored as a close fraction).
        crf: H.264 constant rate factor (0 lossless .. 51 worst) when an H.264 encoder is used; other encoders
            get a fixed high-quality quantiser.
        encoder: FFmpeg encoder name to use instead of the first available of :data:`PREFERRED_ENCODERS`.

    Returns:
        The encoder name: ``"libx264"`` (H.264) when the installed PyAV has it, else the first available of
        :data:`PREFERRED_ENCODERS`.
    """
    video = _as_video(video)
    height, width = video.shape[-2:]
    if height % 2 or width % 2:
        raise ValueError(f"video height and width must be even for 4:2:0 encoding, got {height}x{width}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)) or not fps > 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    rate = Fraction(fps).limit_denominator(1001)
    encoder = available_video_encoder() if encoder is None else available_video_encoder((encoder,))
    frames = _to_uint8_frames(video)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(encoder, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if encoder in ("libx264", "h264"):
            stream.options = {"crf": str(int(crf))}
        else:
            stream.codec_context.qscale = 2  # near the best quality of MPEG-4 part 2
            stream.codec_context.bit_rate = max(1_000_000, 8 * width * height * int(np.ceil(float(rate))))
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush delayed frames
            container.mux(packet)
    return encoder


def read_video(path: str | os.PathLike) -> torch.Tensor:
    """Decode every frame of the first video stream of ``path`` to a ``(3, F, H, W)`` float32 tensor in [-1, 1]."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{str(path)!r} has no video stream")
        stream = container.streams.video[0]
        # Without decoder threads, a container left to the garbage collector can be freed in a forked child too.
        stream.codec_context.thread_count = 1
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    if not frames:
        raise ValueError(f"{str(path)!r} has no decodable frames")
    return signed_from_uint8(torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2))


def save_comparison_grid(path: str | os.PathLike, rows: dict[str, torch.Tensor], frames: int = 4,
                         *, dpi: int = 100) -> Path:
    """Write a PNG with one row per entry of ``rows`` and ``frames`` evenly spaced frames per row.

    Args:
        path: output PNG file; its parent folder is created if missing.
        rows: label -> ``(3, F, H, W)`` or ``(1, 3, F, H, W)`` tensor in ``[-1, 1]``, in display order (for
            example ``{"input": ..., "output": ..., "target": ...}``). Rows may differ in frame count and size;
            each row shows frames spread evenly over its own length, titled with their indices.
        frames: frames shown per row (rows with fewer frames show all of theirs).
        dpi: resolution of the PNG; each frame is drawn at its own pixel size or larger.

    Returns:
        The path written.
    """
    if not isinstance(rows, dict) or not rows:
        raise ValueError("rows must be a non-empty dict of label -> video tensor")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be a positive integer, got {frames!r}")
    # The Agg canvas draws without pyplot, so no global figure state or display backend is involved.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    videos = {label: _as_video(video, f"rows[{label!r}]") for label, video in rows.items()}
    columns = max(min(frames, v.shape[1]) for v in videos.values())
    tallest = max(v.shape[2] for v in videos.values())
    widest = max(v.shape[3] for v in videos.values())
    cell_inches = max(1.5, max(tallest, widest) / dpi)
    figure = Figure(figsize=(cell_inches * columns * widest / max(tallest, widest) + 0.8,
                             cell_inches * len(videos) * tallest / max(tallest, widest) + 0.4), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(videos), columns, squeeze=False)
    for row, (label, video) in enumerate(videos.items()):
        count = video.shape[1]
        shown = np.unique(np.linspace(0, count - 1, min(frames, count)).round().astype(int))
        images = _to_uint8_frames(video[:, shown])
        for column in range(columns):
            axis = axes[row][column]
            axis.set_xticks([])
            axis.set_yticks([])
            if column < len(shown):
                axis.imshow(images[column], interpolation="nearest")
                axis.set_title(f"frame {shown[column]}", fontsize=8)
            else:
                axis.set_axis_off()
        axes[row][0].set_ylabel(label, fontsize=9)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(str(path), format="png")
    return path
