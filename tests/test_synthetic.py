"""Tests for the procedural synthetic video generator (chopgrad.data.synthetic)."""

import time

import pytest
import torch

from chopgrad.data import make_batch, make_video


def test_shape_dtype_range():
    v = make_video(0, 17, 64, 64)
    assert v.shape == (3, 17, 64, 64)
    assert v.dtype == torch.float32
    assert torch.isfinite(v).all()
    assert v.min() >= -1.0 and v.max() <= 1.0
    # uses the range, not a constant image
    assert v.max() - v.min() > 0.5
    assert v.std() > 0.1


@pytest.mark.parametrize("frames,h,w", [(1, 64, 64), (7, 48, 80), (9, 32, 32), (30, 72, 56)])
def test_any_size_and_frame_count(frames, h, w):
    v = make_video(3, frames, h, w)
    assert v.shape == (3, frames, h, w)
    assert v.min() >= -1.0 and v.max() <= 1.0


def test_deterministic():
    a = make_video(123, 9, 64, 64)
    b = make_video(123, 9, 64, 64)
    assert torch.equal(a, b)
    # global RNG state plays no role
    torch.manual_seed(999)
    torch.rand(10)
    c = make_video(123, 9, 64, 64)
    assert torch.equal(a, c)


def test_seeds_differ():
    a = make_video(1, 9, 64, 64)
    b = make_video(2, 9, 64, 64)
    assert (a - b).abs().mean() > 0.05


def test_longer_clip_extends_shorter():
    a = make_video(5, 17, 64, 64)
    b = make_video(5, 33, 64, 64)
    assert torch.equal(a, b[:, :17])


def test_video_moves_and_changes():
    v = make_video(7, 17, 64, 64)
    # consecutive frames differ (pan, motion, brightness) but are correlated
    diffs = (v[:, 1:] - v[:, :-1]).abs().mean(dim=(0, 2, 3))
    assert (diffs > 1e-3).all()
    assert (v[:, 16] - v[:, 0]).abs().mean() > diffs.mean()


def test_dtype_and_device_args():
    v = make_video(0, 5, 32, 32, dtype=torch.float64)
    assert v.dtype == torch.float64
    v32 = make_video(0, 5, 32, 32)
    assert torch.allclose(v.float(), v32)


def test_make_batch():
    b = make_batch(4, 3, 9, 32, 48)
    assert b.shape == (3, 3, 9, 32, 48)
    assert torch.equal(b, make_batch(4, 3, 9, 32, 48))
    assert not torch.equal(b[0], b[1])
    assert not torch.equal(b, make_batch(5, 3, 9, 32, 48))


def test_fast_enough():
    # ~0.4 s on one idle CPU core; the bound is loose for loaded CI machines
    make_video(0, 5, 32, 32)  # warm-up
    t = time.perf_counter()
    v = make_video(11, 129, 128, 128)
    dt = time.perf_counter() - t
    assert v.shape == (3, 129, 128, 128)
    assert dt < 10.0, f"129x128x128 clip took {dt:.2f}s"
