"""Frames PyAV decodes per clip in chopgrad.data.VideoFolder: it seeks to the keyframe before a clip.

Writes one 400-frame 64x64 video per container (keyframe every 10 frames) into a temporary folder and
reads 4-frame clips at stride 3 (10 frames spanned) at the start, middle and end of the file:

    python benchmarks/video_folder_seek.py
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import av
import numpy as np

from chopgrad.data import VideoFolder
from chopgrad.data.video_io import available_video_encoder

FRAMES, SIZE, GOP = 400, 64, 10
CONTAINERS = {"mp4": None, "mkv": None, "avi": "mpeg4"}


def write(path: Path, codec: str) -> None:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = GOP
        for k in range(FRAMES):
            rgb = np.full((SIZE, SIZE, 3), (k * 5) % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def main() -> None:
    print(f"| container | decoded frames for a clip at the start / middle / end of a {FRAMES}-frame file |")
    print("|---|---|")
    for extension, codec in CONTAINERS.items():
        with tempfile.TemporaryDirectory() as folder:
            write(Path(folder) / f"clip.{extension}", codec or available_video_encoder())
            dataset = VideoFolder(folder, frames=4, height=SIZE, width=SIZE, stride=3)
            counts = []
            for index in (0, len(dataset) // 2, len(dataset) - 1):
                dataset[index]
                counts.append(dataset.last_clip_decoded_frames)
            dataset.close()
        print(f"| {extension} ({codec or available_video_encoder()}) | {' / '.join(map(str, counts))} |")


if __name__ == "__main__":
    main()
