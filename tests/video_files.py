"""Small video files for the VideoFolder and trainer tests, written with PyAV.

Frame ``k`` of every file is one flat grey level that encodes ``k``, so a decoded frame's index can be read back
from its mean value despite lossy compression (:func:`frame_indices`).
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from chopgrad.data.video_io import available_video_encoder

LEVEL_OFFSET, LEVEL_STEP = 12, 6  # grey level of frame k: 12 + 6 k, distinct up to frame 40


def grey_level(frame_index: int) -> int:
    """Grey level encoding ``frame_index``; long files wrap around so levels stay in range."""
    return LEVEL_OFFSET + LEVEL_STEP * (frame_index % 40)


def frame_indices(clip: torch.Tensor) -> list[int]:
    """Frame indices (mod 40) encoded in a ``(3, F, H, W)`` clip in [-1, 1]."""
    levels = ((clip + 1.0) * 127.5).mean(dim=(0, 2, 3))
    return [int(round((float(v) - LEVEL_OFFSET) / LEVEL_STEP)) for v in levels]


def grey_frame(frame_index: int, height: int, width: int) -> np.ndarray:
    return np.full((height, width, 3), grey_level(frame_index), dtype=np.uint8)


def irregular_timestamps_ms(frame_count: int, seed: int = 0) -> list[int]:
    """Presentation times in milliseconds with gaps drawn uniformly from 40..200 ms (a variable frame rate)."""
    gaps = np.random.default_rng(seed).integers(40, 201, size=frame_count - 1)
    return [0] + np.cumsum(gaps).tolist()


def write_variable_rate_mp4(path: Path, timestamps_ms: list[int], height: int, width: int, *,
                            gop: int = 12) -> Path:
    """An H.264 (or the fallback encoder's) mp4 whose frame k is shown at ``timestamps_ms[k]``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    millisecond = Fraction(1, 1000)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(available_video_encoder(), rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = stream.codec_context.time_base = millisecond
        stream.codec_context.gop_size = gop
        for k, pts in enumerate(timestamps_ms):
            frame = av.VideoFrame.from_ndarray(grey_frame(k, height, width), format="rgb24")
            frame.pts, frame.time_base = int(pts), millisecond
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_header_first_mp4(path: Path, frame_count: int, height: int, width: int, *, gop: int = 12) -> Path:
    """A constant-rate mp4 with its header (the moov atom) before the frame data, as web video usually is,
    so that a truncated copy still opens. Frames are noise over the grey level, so packets are large."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream(available_video_encoder(), rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        for k in range(frame_count):
            noise = rng.integers(-8, 9, size=(height, width, 3))
            rgb = np.clip(grey_frame(k, height, width).astype(int) + noise, 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def packets_in_file_order(path: Path) -> list[tuple[int, int, int]]:
    """``(byte offset, size, pts)`` of the video packets of ``path``, in file order."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = [(p.pos, p.size, p.pts) for p in container.demux(stream) if p.size]
    return sorted(packets)


def zero_packet_data(path: Path, pts: int) -> None:
    """Overwrite the data of the packet with timestamp ``pts`` with zeros: the container's index stays intact."""
    offset, size, _ = next(p for p in packets_in_file_order(path) if p[2] == pts)
    data = bytearray(path.read_bytes())
    data[offset:offset + size] = bytes(size)
    path.write_bytes(bytes(data))


def write_mp4_with_hidden_leading_frames(path: Path, hidden: int, shown: int, height: int, width: int) -> Path:
    """An mp4 of ``hidden + shown`` coded frames whose edit list hides the first ``hidden`` (as a stream-copy cut
    leaves them: decoded as references, never shown). Shown frame k carries ``grey_level(k)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    millisecond = Fraction(1, 1000)
    source = path.with_name(path.stem + ".source.mp4")
    with av.open(str(source), mode="w") as container:
        stream = container.add_stream(available_video_encoder(), rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = stream.codec_context.time_base = millisecond
        stream.codec_context.gop_size = hidden + shown  # one keyframe, among the hidden frames
        for k in range(hidden + shown):
            frame = av.VideoFrame.from_ndarray(grey_frame(k - hidden, height, width), format="rgb24")
            frame.pts, frame.time_base = 40 * k, millisecond
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    # Remuxed 40 * hidden ms earlier, the hidden frames get negative timestamps, which the mp4 muxer cuts off
    # with an edit list.
    with av.open(str(source)) as source_container, av.open(str(path), mode="w") as container:
        source_stream = source_container.streams.video[0]
        stream = container.add_stream_from_template(source_stream)
        shift = int(Fraction(40 * hidden, 1000) / source_stream.time_base)
        for packet in source_container.demux(source_stream):
            if packet.dts is None:
                continue
            packet.pts -= shift
            packet.dts -= shift
            packet.stream = stream
            container.mux(packet)
    source.unlink()
    return path
