"""VideoFolder (clips of video files decoded with PyAV) and the video writing helpers.

Every test makes its own small videos in tmp_path. Each frame is one flat grey level that encodes its frame
index, so a decoded frame's index can be read back from its mean value despite lossy compression.
"""
from __future__ import annotations

import gc
import os
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

av = pytest.importorskip("av")

from chopgrad.data import VideoFolder, read_video, save_comparison_grid, write_video  # noqa: E402
from chopgrad.data.video_folder import VideoDecodeError  # noqa: E402
from chopgrad.data.video_io import available_video_encoder  # noqa: E402
from video_files import (frame_indices, grey_level, irregular_timestamps_ms, packets_in_file_order,  # noqa: E402
                         write_header_first_mp4, write_mp4_with_hidden_leading_frames, write_variable_rate_mp4,
                         zero_packet_data)


def encode_indexed_video(path: Path, frame_count: int, height: int, width: int, *, gop: int = 12,
                         codec: str | None = None) -> Path:
    """Write a lossy video whose frame k is flat grey at ``grey_level(k)``; a keyframe every ``gop`` frames."""
    frames = [np.full((height, width, 3), grey_level(k), dtype=np.uint8) for k in range(frame_count)]
    return encode_rgb_frames(path, frames, gop=gop, codec=codec)


def encode_rgb_frames(path: Path, frames: list, *, gop: int = 12, codec: str | None = None) -> Path:
    """Writes (H, W, 3) uint8 frames to a new video file (its folder is created); a keyframe every ``gop`` frames."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape[:2]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec or available_video_encoder(), rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    """Two good videos (mp4 at the top, mkv in a sub-folder), an unreadable .mp4 and a too-short video."""
    root = tmp_path / "videos"
    encode_indexed_video(root / "a.mp4", 30, 48, 64)
    encode_indexed_video(root / "nested" / "b.MKV", 24, 56, 40)
    (root / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(2048))
    encode_indexed_video(root / "short.mp4", 5, 48, 64)
    (root / "notes.txt").write_text("not a video")
    return root


def make_dataset(root, **kwargs) -> VideoFolder:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return VideoFolder(root, **kwargs)


def test_sequential_clips_shapes_range_and_start_frames(folder):
    dataset = make_dataset(folder, frames=4, height=32, width=32, stride=2)
    names = [Path(info.path).name for info in dataset.files]
    assert names == ["a.mp4", "b.MKV"]
    # A clip spans 7 frames and starts every 8: a.mp4 (30 frames) at 0, 8, 16; b.MKV (24) at 0, 8, 16.
    assert len(dataset) == 6
    expected_starts = [0, 8, 16, 0, 8, 16]
    for index, start in enumerate(expected_starts):
        clip = dataset[index]
        assert clip.shape == (3, 4, 32, 32) and clip.dtype == torch.float32
        assert clip.min() >= -1.0 and clip.max() <= 1.0
        assert frame_indices(clip) == [start, start + 2, start + 4, start + 6]
        assert dataset.clip_location(index)[1] == start


@pytest.mark.parametrize("name, codec", [("c.webm", "libvpx-vp9"), ("d.AVI", "mpeg4"), ("e.Mov", None)])
def test_other_extensions_are_found_and_decoded(tmp_path, name, codec):
    if codec is not None:
        try:
            av.codec.Codec(codec, "w")
        except Exception:
            pytest.skip(f"this PyAV has no {codec} encoder")
    encode_indexed_video(tmp_path / "v" / name, 12, 16, 16, gop=4, codec=codec)
    dataset = VideoFolder(tmp_path / "v", frames=3, height=16, width=16, stride=2)
    assert len(dataset) == 2
    assert frame_indices(dataset[1]) == [6, 8, 10]


def test_frame_count_sources_metadata_for_mp4_counted_for_mkv(folder):
    dataset = make_dataset(folder, frames=2, height=16, width=16)
    sources = {Path(info.path).name: (info.frame_count_source, info.num_frames) for info in dataset.files}
    assert sources == {"a.mp4": ("metadata", 30), "b.MKV": ("counted", 24), "short.mp4": ("metadata", 5)}


def test_resize_keeps_aspect_and_crops_to_size(tmp_path):
    # A dark band over the left quarter of a 64x48 frame. Cropping 24x24 resizes to 32x24 (short side covers
    # the crop, aspect kept) and keeps columns 4..27, so the band edge moves from column 16 to 8 to 4.
    # Squashing to 24x24 would put it at 6, a left crop at 8.
    rgb = np.full((48, 64, 3), 220, dtype=np.uint8)
    rgb[:, :16] = 30
    encode_rgb_frames(tmp_path / "v" / "band.mp4", [rgb] * 3)
    clip = VideoFolder(tmp_path / "v", frames=3, height=24, width=24)[0]
    assert clip.shape == (3, 3, 24, 24)
    row = (clip[0, 0, 12] + 1) * 127.5
    assert row[:3].max() < 60 and row[6:].min() > 190
    assert int((row > 125).float().argmax()) == 4


def test_random_mode_is_deterministic_per_seed_and_varies_with_seed_and_epoch(folder):
    def clips(seed, epoch):
        dataset = make_dataset(folder, frames=3, height=24, width=24, mode="random",
                               clips_per_epoch=8, seed=seed)
        dataset.set_epoch(epoch)
        assert len(dataset) == 8
        return [dataset.clip_location(i) for i in range(8)], torch.stack([dataset[i] for i in range(8)])

    locations, tensors = clips(seed=1, epoch=0)
    again_locations, again_tensors = clips(seed=1, epoch=0)
    assert locations == again_locations and torch.equal(tensors, again_tensors)
    assert clips(seed=2, epoch=0)[0] != locations
    assert clips(seed=1, epoch=1)[0] != locations
    for (path, start), clip in zip(locations, tensors):
        assert frame_indices(clip) == [start, start + 1, start + 2]


def test_random_crop_differs_between_clips_of_the_same_frames(tmp_path):
    # A horizontal ramp (wider than the crop) makes the crop position visible in the pixel values.
    ramp = np.repeat(np.linspace(0, 255, 96).astype(np.uint8)[None, :, None], 16, 0).repeat(3, 2)
    encode_rgb_frames(tmp_path / "v" / "ramp.mp4", [np.ascontiguousarray(ramp)] * 2)
    dataset = VideoFolder(tmp_path / "v", frames=2, height=16, width=16, mode="random", clips_per_epoch=16)
    means = {round(float(dataset[i].mean()), 2) for i in range(16)}
    assert len(means) > 4


def test_dataloader_with_two_workers_gives_the_same_clips_as_none(folder):
    for mode, extra in (("sequential", {}), ("random", {"clips_per_epoch": 6, "seed": 3})):
        dataset = make_dataset(folder, frames=3, height=16, width=16, stride=2, mode=mode, **extra)
        dataset[0]  # an open container in the parent must not leak into the workers
        dataset.set_epoch(1)
        single = torch.cat(list(DataLoader(dataset, batch_size=2, num_workers=0)))
        parallel = torch.cat(list(DataLoader(dataset, batch_size=2, num_workers=2)))
        assert single.shape == (len(dataset), 3, 3, 16, 16)
        assert torch.equal(single, parallel), mode


def test_one_warning_lists_every_skipped_file(folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = VideoFolder(folder, frames=4, height=16, width=16, stride=2)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "skipped 2 of 4 video files" in message
    assert "broken.mp4" in message and "cannot be read" in message
    assert "short.mp4" in message and "5 frames, a clip needs 7" in message
    assert sorted(Path(p).name for p, _ in dataset.skipped) == ["broken.mp4", "short.mp4"]


def test_folder_without_usable_clips_is_a_clear_error(tmp_path, folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no usable clip.*empty.*found 0 video files \(none\)"):
        VideoFolder(empty, frames=2, height=8, width=8)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.mp4").write_bytes(b"\x00" * 100)
    (bad / "y.webm").write_bytes(np.random.default_rng(1).bytes(500))
    encode_indexed_video(bad / "z.mp4", 3, 16, 16)
    with pytest.raises(ValueError, match=r"bad.*found 3 video files \(2 \.mp4, 1 \.webm\); 2 unreadable, "
                                         r"1 too short"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            VideoFolder(bad, frames=4, height=8, width=8)
    # Only too-long clips: the same folder's good files are all shorter than a 100-frame clip.
    with pytest.raises(ValueError, match="spanning 100 frames"):
        make_dataset(folder, frames=100, height=8, width=8)
    with pytest.raises(FileNotFoundError, match="missing"):
        VideoFolder(tmp_path / "missing", frames=2, height=8, width=8)


@pytest.mark.parametrize("kwargs, message", [
    ({"frames": 0}, "frames must be a positive integer"),
    ({"frames": 2.0}, "frames must be a positive integer"),
    ({"height": -1}, "height must be a positive integer"),
    ({"width": True}, "width must be a positive integer"),
    ({"stride": 0}, "stride must be a positive integer"),
    ({"mode": "shuffle"}, "mode must be one of"),
    ({"mode": "random"}, "clips_per_epoch is required"),
    ({"mode": "random", "clips_per_epoch": 0}, "clips_per_epoch must be a positive integer"),
    ({"clips_per_epoch": 5}, "clips_per_epoch applies to mode='random' only"),
    ({"mode": "random", "clips_per_epoch": 2, "seed": -1}, "seed must be a non-negative integer"),
])
def test_argument_errors_name_the_argument(folder, kwargs, message):
    arguments = {"frames": 2, "height": 8, "width": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        VideoFolder(folder, **arguments)


def test_files_restricts_the_dataset_to_those_files(folder, tmp_path):
    only_b = make_dataset(folder, frames=4, height=8, width=8, files=[folder / "nested" / "b.MKV"])
    assert [Path(info.path).name for info in only_b.files] == ["b.MKV"] and only_b.skipped == []
    outside = tmp_path / "elsewhere.mp4"
    encode_indexed_video(outside, 8, 16, 16)
    for files, message in (([outside], "is not inside root"), ([folder / "missing.mp4"], "is not a file"),
                           ([], "at least one video file"), (str(folder / "a.mp4"), "a list of paths")):
        with pytest.raises(ValueError, match=message):
            VideoFolder(folder, frames=4, height=8, width=8, files=files)


def test_index_errors(folder):
    dataset = make_dataset(folder, frames=4, height=8, width=8, stride=2)
    assert len(dataset) == 6
    with pytest.raises(IndexError, match=r"clip index 6 out of range for 6 clips \(valid: -6 \.\. 5\)"):
        dataset[len(dataset)]
    # A negative index is reported as the caller gave it, not after adding the length.
    with pytest.raises(IndexError, match=r"clip index -7 out of range for 6 clips \(valid: -6 \.\. 5\)"):
        dataset[-7]
    with pytest.raises(IndexError, match=r"clip index -7 out of range"):
        dataset.clip_location(-7)
    assert torch.equal(dataset[-1], dataset[len(dataset) - 1])
    assert torch.equal(dataset[-6], dataset[0])
    with pytest.raises(ValueError, match="epoch"):
        dataset.set_epoch(-1)


def test_decoding_seeks_instead_of_decoding_from_the_start(tmp_path):
    # 400 frames with a keyframe every 10: a 4-frame clip at the end decodes at most a GOP before it.
    root = tmp_path / "long"
    encode_indexed_video(root / "long.mp4", 400, 16, 16, gop=10)
    encode_indexed_video(root / "long.mkv", 400, 16, 16, gop=10)
    dataset = VideoFolder(root, frames=4, height=16, width=16)
    assert len(dataset) == 200
    for index in (99, 199):  # last clip of each file, frames 396..399
        clip = dataset[index]
        assert frame_indices(clip) == [k % 40 for k in range(396, 400)]
        assert 4 <= dataset.last_clip_decoded_frames <= 4 + 10
    dataset[150]  # a clip in the middle of the mkv, frames 200..203, after a keyframe at 200
    assert dataset.last_clip_decoded_frames <= 4 + 10


def test_write_video_read_video_round_trip(tmp_path):
    frames = torch.linspace(-0.8, 0.8, 6).view(1, 6, 1, 1).expand(3, 6, 32, 48).clone()
    frames[0] *= -1  # a colour, not only grey
    codec = write_video(tmp_path / "out" / "clip.mp4", frames.unsqueeze(0), fps=12)
    assert codec == available_video_encoder() and codec in ("libx264", "h264", "libopenh264", "mpeg4")
    decoded = read_video(tmp_path / "out" / "clip.mp4")
    assert decoded.shape == (3, 6, 32, 48)
    assert decoded.min() >= -1.0 and decoded.max() <= 1.0
    assert (decoded - frames).abs().mean() < 0.03
    with av.open(str(tmp_path / "out" / "clip.mp4")) as container:
        assert container.streams.video[0].average_rate == 12
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", torch.zeros(3, 2, 15, 16))
    with pytest.raises(ValueError, match="shape"):
        write_video(tmp_path / "bad.mp4", torch.zeros(2, 3, 2, 16, 16))


def test_write_video_with_the_mpeg4_fallback_encoder(tmp_path):
    frames = torch.linspace(-0.6, 0.6, 5).view(1, 5, 1, 1).expand(3, 5, 16, 16).contiguous()
    assert write_video(tmp_path / "m.mp4", frames, fps=8, encoder="mpeg4") == "mpeg4"
    with av.open(str(tmp_path / "m.mp4")) as container:
        assert container.streams.video[0].codec_context.name == "mpeg4"
    decoded = read_video(tmp_path / "m.mp4")
    assert decoded.shape == (3, 5, 16, 16) and (decoded - frames).abs().mean() < 0.05
    with pytest.raises(RuntimeError, match="no-such-encoder"):
        write_video(tmp_path / "n.mp4", frames, encoder="no-such-encoder")


def test_save_comparison_grid_writes_a_png(tmp_path):
    video = torch.rand(3, 9, 24, 32) * 2 - 1
    path = save_comparison_grid(tmp_path / "grid" / "compare.png",
                                {"input": video, "output": video.flip(1), "target": video[None, :, :3]}, frames=4)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with pytest.raises(ValueError, match="rows"):
        save_comparison_grid(tmp_path / "x.png", {})


def test_a_file_shorter_than_its_header_says_is_an_error_on_read(folder):
    from dataclasses import replace

    dataset = make_dataset(folder, frames=2, height=8, width=8)
    mp4 = next(info for info in dataset.files if info.path.endswith("a.mp4"))
    promised = replace(mp4, num_frames=40)  # as if the header overstated the 30 frames the file has
    with pytest.raises(RuntimeError, match=r"a\.mp4: could not decode frames \[30, 31\]"):
        dataset._decode(promised, [28, 29, 30, 31])


def test_clips_equal_the_matching_frames_of_a_full_decode(tmp_path):
    # Textured frames, keyframes every 8 frames: a clip decoded after a seek must equal the same frames of a
    # decode from the start, resized the same way (48x64 -> 24x32 keeps the aspect, so nothing is cropped).
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(40)]
    path = encode_rgb_frames(tmp_path / "v" / "noise.mp4", frames, gop=8)
    full = read_video(path)  # (3, 40, 48, 64)
    dataset = VideoFolder(tmp_path / "v", frames=4, stride=3, height=24, width=32)
    assert len(dataset) == 40 // 12
    for index in range(len(dataset)):
        _, start = dataset.clip_location(index)
        picked = full[:, start:start + 12:3].transpose(0, 1)  # (4, 3, 48, 64)
        expected = torch.nn.functional.interpolate(picked, size=(24, 32), mode="bilinear", antialias=True,
                                                   align_corners=False).clamp(-1, 1).transpose(0, 1)
        assert torch.allclose(dataset[index], expected, atol=1e-5)


# ---------------------------------------------------------------- variable frame rates and damaged files


def test_variable_frame_rate_mp4_gives_exactly_the_requested_frames(tmp_path):
    # 40 frames with irregular gaps of 40..200 ms: the header's average rate says nothing about where a frame is.
    timestamps = irregular_timestamps_ms(40)
    path = write_variable_rate_mp4(tmp_path / "v" / "vfr.mp4", timestamps, 32, 32)
    with av.open(str(path)) as container:  # the file holds those times, and a header frame count and rate
        stream = container.streams.video[0]
        assert stream.frames == 40 and stream.average_rate
        written = sorted(float(p.pts * stream.time_base) for p in container.demux(stream) if p.size)
    assert [round(seconds * 1000) for seconds in written] == timestamps
    sequential = VideoFolder(tmp_path / "v", frames=3, height=32, width=32, stride=2)
    assert len(sequential) == 6
    for index in range(len(sequential)):
        start = sequential.clip_location(index)[1]
        assert frame_indices(sequential[index]) == [start, start + 2, start + 4], index
    random = VideoFolder(tmp_path / "v", frames=3, height=32, width=32, stride=2, mode="random",
                         clips_per_epoch=80, seed=0)
    starts = set()
    for index in range(80):
        start = random.clip_location(index)[1]
        starts.add(start)
        assert frame_indices(random[index]) == [start, start + 2, start + 4], (index, start)
    assert len(starts) > 20  # clips start all over the file, across many keyframe intervals
    info = sequential.files[0]
    assert info.num_frames == 40 and [round(float(pts * info.time_base) * 1000) for pts in info.frame_pts] == timestamps


def test_frames_an_mp4_edit_list_hides_are_not_counted(tmp_path):
    path = write_mp4_with_hidden_leading_frames(tmp_path / "v" / "cut.mp4", 3, 17, 32, 32)
    with av.open(str(path)) as container:  # the header counts every coded frame, the decoder shows 17
        assert container.streams.video[0].frames == 20
    assert read_video(path).shape[1] == 17
    dataset = VideoFolder(tmp_path / "v", frames=4, height=32, width=32)
    assert dataset.files[0].num_frames == 17 and len(dataset) == 4
    for index in range(4):
        assert frame_indices(dataset[index]) == list(range(4 * index, 4 * index + 4)), index


def test_a_seek_that_lands_after_the_clip_start_falls_back_to_an_earlier_keyframe(tmp_path, monkeypatch):
    # A demuxer that seeks by decoding timestamps can land after the keyframe asked for; here the index itself
    # points past the clip start, and the clip must still hold exactly its frames.
    from chopgrad.data.video_folder import VideoFileInfo

    encode_indexed_video(tmp_path / "v" / "a.mp4", 40, 16, 16, gop=8)
    dataset = VideoFolder(tmp_path / "v", frames=3, height=16, width=16)
    truthful = VideoFileInfo.keyframe_at_or_before
    monkeypatch.setattr(VideoFileInfo, "keyframe_at_or_before", lambda self, index: truthful(self, index + 8))
    # Both keyframes the patched index offers lie after frame 21 (keyframes are at most 8 apart); frame 0 does not.
    assert frame_indices(dataset[7]) == [21, 22, 23]
    assert dataset.last_clip_decoded_frames >= 24


@pytest.mark.parametrize("cut", ["inside a packet", "between packets"])
def test_truncated_mp4_is_skipped_with_a_warning_when_the_folder_is_opened(tmp_path, cut):
    root = tmp_path / "v"
    encode_indexed_video(root / "good.mp4", 12, 16, 16)
    whole = write_header_first_mp4(tmp_path / "whole.mp4", 40, 32, 32)
    packets = packets_in_file_order(whole)
    offset, size, _ = packets[20]
    end = offset + size // 2 if cut == "inside a packet" else offset
    (root / "truncated.mp4").write_bytes(whole.read_bytes()[:end])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = VideoFolder(root, frames=4, height=16, width=16)
    assert [Path(info.path).name for info in dataset.files] == ["good.mp4"]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "truncated.mp4" in message and "truncated" in message.split("truncated.mp4", 1)[1]
    reason = dict(dataset.skipped)[str(root / "truncated.mp4")]
    expected = "corrupt" if cut == "inside a packet" else "header lists 40 frames, the file holds 20"
    assert expected in reason
    # Alone in a folder it leaves no usable clip: the error counts it as unreadable and says why.
    (root / "good.mp4").unlink()
    with pytest.raises(ValueError, match=r"1 unreadable.*truncated\.mp4.*truncated"):
        make_dataset(root, frames=4, height=16, width=16)


def damaged_inside_a_packet(tmp_path) -> tuple[Path, VideoFolder]:
    """A 24-frame mp4 whose 16th frame's data is zeroed (keyframes at 0 and 12): its index is intact."""
    path = write_header_first_mp4(tmp_path / "v" / "damaged.mp4", 24, 32, 32, gop=12)
    frame_pts = [pts for _, _, pts in packets_in_file_order(path)]
    zero_packet_data(path, sorted(frame_pts)[15])
    return path, VideoFolder(tmp_path / "v", frames=4, height=32, width=32)


def test_damage_inside_a_packet_raises_the_promised_error_naming_the_file(tmp_path):
    path, dataset = damaged_inside_a_packet(tmp_path)
    assert dataset.skipped == [] and len(dataset) == 6  # demuxing cannot see damage inside a packet
    assert frame_indices(dataset[0]) == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match=r"damaged\.mp4: cannot decode frames 16\.\.19") as caught:
        dataset[4]  # frames 16..19, decoded from the keyframe at 12 through the damaged frame 15
    assert isinstance(caught.value, VideoDecodeError) and caught.value.path == str(path)
    assert caught.value.summary() == str(caught.value)
    assert frame_indices(dataset[1]) == [4, 5, 6, 7]  # the file's other clips still read


def test_decode_error_in_a_dataloader_worker_keeps_a_one_line_summary(tmp_path):
    path, dataset = damaged_inside_a_packet(tmp_path)
    loader = DataLoader(torch.utils.data.Subset(dataset, [4]), batch_size=1, num_workers=1)
    with pytest.raises(VideoDecodeError) as caught:
        list(loader)
    assert "Traceback" in str(caught.value)  # the worker's traceback comes first
    assert caught.value.summary().startswith(f"{path}: cannot decode frames 16..19")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (DataLoader workers fork on Linux)")
def test_a_forked_worker_can_free_the_containers_it_inherits(tmp_path):
    # A DataLoader worker forked after the parent read clips replaces (so frees) the parent's open containers.
    # A decoder that had started worker threads would wait forever in the child for threads the fork did not copy.
    write_header_first_mp4(tmp_path / "v" / "a.mp4", 24, 32, 32)
    dataset = VideoFolder(tmp_path / "v", frames=4, height=32, width=32)
    dataset[2]  # leaves an open container with a decoder in this process
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            ok = frame_indices(dataset[1]) == [4, 5, 6, 7]  # drops the inherited containers, opens its own
            gc.collect()
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        finished, status = os.waitpid(child, os.WNOHANG)
        if finished:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    pytest.fail("the forked child hung while freeing the containers it inherited")


def test_symbolic_links_under_root_are_followed_and_a_broken_one_is_listed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "more").mkdir(parents=True)
    encode_indexed_video(elsewhere / "a.mp4", 8, 16, 16)
    encode_indexed_video(elsewhere / "more" / "b.mp4", 8, 16, 16)
    root = tmp_path / "root"
    root.mkdir()
    encode_indexed_video(root / "own.mp4", 8, 16, 16)
    (root / "linked_file.mp4").symlink_to(elsewhere / "a.mp4")
    (root / "linked_folder").symlink_to(elsewhere / "more")
    (root / "broken.mp4").symlink_to(tmp_path / "gone.mp4")
    (root / "loop").symlink_to(root)  # a link to an ancestor is read once
    with pytest.warns(UserWarning, match=r"skipped 1 of 4 video files(.|\n)*broken\.mp4: cannot be read"):
        folder = VideoFolder(root, 4, 16, 16)
    assert sorted(Path(info.path).name for info in folder.files) == ["b.mp4", "linked_file.mp4", "own.mp4"]
    held_out = [info.path for info in folder.files if Path(info.path).name == "linked_file.mp4"]
    assert len(VideoFolder(root, 4, 16, 16, files=held_out)) == 2
