"""The trainer's data: clips addressed by step, rank and index; held-out splits; the full-decode pixel loss."""
import pytest
import torch

from chopgrad import pixel_loss, per_frame
from chopgrad.data.tasks import get_task
from chopgrad.data.video_io import write_video
from chopgrad.tools.train.data import (HELD_OUT, TRAIN, StepBatches, SyntheticClips, TaskPairs, clip_seed,
                                       split_held_out_files, step_loader, task_datasets)
from chopgrad.tools.train.step import full_decode_pixel_loss
from chopgrad.tools.train.trainer import warmup_cosine
from tiny_models import tiny_wan21


def test_step_batches_of_ranks_are_disjoint_and_their_union_is_one_process_with_the_whole_batch():
    single = list(StepBatches(0, 3, batch=4))
    ranks = [list(StepBatches(0, 3, batch=2, rank=r, world=2)) for r in range(2)]
    for step in range(3):
        assert sorted(ranks[0][step] + ranks[1][step]) == single[step]
        assert not set(ranks[0][step]) & set(ranks[1][step])
    assert list(StepBatches(2, 3, batch=4)) == single[2:]  # a resumed run reads what the uninterrupted one would


def test_clip_seeds_of_the_splits_never_meet():
    train = {clip_seed(7, TRAIN, i) for i in range(1000)}
    held_out = {clip_seed(7, HELD_OUT, i) for i in range(1000)}
    assert len(train) == len(held_out) == 1000 and not train & held_out


def test_pairs_are_deterministic_and_hole_weights_have_mean_one():
    task = get_task("inpaint")
    pairs = TaskPairs(task, SyntheticClips(9, 16, 16, seed=3, split=TRAIN), seed=3, split=TRAIN, length=4)
    a, b = pairs[2], pairs[2]
    assert torch.equal(a.condition, b.condition) and torch.equal(a.loss_weights, b.loss_weights)
    assert float(a.loss_weights.mean()) == pytest.approx(1.0, rel=1e-6)
    assert len(torch.unique(a.loss_weights)) == 2  # the hole counts more than the rest
    assert not torch.equal(pairs[1].target, pairs[2].target)
    with pytest.raises(IndexError):
        pairs[4]


def test_hole_weight_one_supervises_without_a_mask():
    task = get_task("inpaint")
    pairs = TaskPairs(task, SyntheticClips(9, 16, 16, seed=0, split=TRAIN), seed=0, split=TRAIN, length=1,
                      hole_weight=1.0)
    assert pairs[0].loss_weights is None


def test_loader_with_workers_gives_the_batches_of_none():
    task = get_task("driving")
    pairs = TaskPairs(task, SyntheticClips(9, 16, 16, seed=1, split=TRAIN), seed=1, split=TRAIN, length=6)
    inline = list(step_loader(pairs, 0, 3, batch=2))
    workers = list(step_loader(pairs, 0, 3, batch=2, workers=2))
    assert len(inline) == len(workers) == 3
    for a, b in zip(inline, workers):
        for name in ("condition", "target", "extra"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_split_holds_out_the_last_tenth_of_the_files():
    files = [f"f{i:02d}.mp4" for i in range(11)]
    train, held = split_held_out_files(files)
    assert held == ["f09.mp4", "f10.mp4"] and train == files[:9]
    assert split_held_out_files(["a", "b"]) == (["a"], ["b"])
    assert split_held_out_files(["a"]) == (["a"], ["a"])


def test_folder_data_trains_and_evaluates_on_different_files(tmp_path):
    from chopgrad.data.synthetic import make_video

    for i in range(3):
        write_video(tmp_path / f"clip{i}.mp4", make_video(i, 12, 32, 32), fps=8)
    train, held = task_datasets(get_task("enhance"), data=str(tmp_path), frames=9, height=16, width=16,
                                frame_stride=1, seed=0, train_clips=5, eval_clips=3, hole_weight=2.0)
    assert len(train) == 5 and len(held) == 1  # one held-out file of 12 frames has one clip of 9
    assert [i.path for i in held.source.folder.files] == [str(tmp_path / "clip2.mp4")]
    assert {i.path for i in train.source.folder.files} == {str(tmp_path / "clip0.mp4"), str(tmp_path / "clip1.mp4")}
    assert train[0].target.shape == (3, 9, 16, 16)


def test_a_single_file_warns_that_evaluation_is_not_on_unseen_footage(tmp_path):
    from chopgrad.data.synthetic import make_video

    write_video(tmp_path / "only.mp4", make_video(0, 10, 16, 16), fps=8)
    with pytest.warns(UserWarning, match="one usable video file"):
        task_datasets(get_task("vsr"), data=str(tmp_path), frames=9, height=16, width=16, frame_stride=1, seed=0,
                      train_clips=2, eval_clips=1, hole_weight=2.0)


def test_warmup_then_cosine_to_zero():
    factor = warmup_cosine(warmup=4, steps=20)
    assert [factor(s) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert factor(4) == 1.0 and factor(12) == pytest.approx(0.5) and factor(20) == pytest.approx(0.0, abs=1e-12)
    assert all(factor(s) > factor(s + 1) for s in range(4, 20))


@pytest.mark.parametrize("loss,masked", [("mse", False), ("mse", True), ({"l1": 0.5, "ssim": 0.3}, False),
                                          ("callable", True)])
def test_full_decode_pixel_loss_equals_the_exact_pixel_loss(loss, masked):
    """The 'full' method's loss is pixel_loss's, computed by plain autograd through the model's own decode."""
    vae = tiny_wan21().requires_grad_(False)
    vae.decoder.conv_out.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 3, 3, 5, generator=g)
    target = torch.rand(2, 3, 9, 24, 40, generator=g) * 2 - 1
    mask = (torch.rand(2, 1, 9, 24, 40, generator=g) * 3).floor() if masked else None
    if loss == "callable":
        loss = {per_frame(lambda p, t: (p - t).abs().mean(dim=(1, 2, 3)) * 2): 1.0, "mse": 1.0}
    values, grads = [], []
    for fn in (lambda z: full_decode_pixel_loss(vae, z, target, loss, mask),
               lambda z: pixel_loss(vae, z, target, loss=loss, d_trunc=None, mask=mask)):
        z = latents.clone().requires_grad_(True)
        value = fn(z)
        value.backward()
        values.append(value.detach())
        grads.append((z.grad, vae.decoder.conv_out.weight.grad.clone()))
        vae.decoder.conv_out.weight.grad = None
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_full_decode_loss_hands_a_callable_the_prediction_where_the_mask_is_non_zero():
    """--method full: mask weights scale the elementwise terms only; for a callable the mask selects pixels."""
    vae = tiny_wan21().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 3, 3, 5, generator=g)
    target = torch.rand(1, 3, 9, 24, 40, generator=g) * 2 - 1
    with torch.no_grad():
        decoded = vae.decode(latents).sample
    seen = []

    def recording(pred, tgt):
        seen.append(pred.detach().clone())
        return (pred - tgt).abs().mean()

    def value_and_grad(mask):
        z = latents.clone().requires_grad_(True)
        value = full_decode_pixel_loss(vae, z, target, {recording: 1.0}, mask)
        (grad,) = torch.autograd.grad(value, z)
        return value.detach(), grad

    plain_value, plain_grad = value_and_grad(None)
    uniform_value, uniform_grad = value_and_grad(torch.full((1, 1, 9, 24, 40), 2.0))
    torch.testing.assert_close(uniform_value, plain_value, rtol=1e-6, atol=0)
    torch.testing.assert_close(uniform_grad, plain_grad, rtol=1e-6, atol=1e-9)
    # The inpaint task's hole weights (the trainer scales them to a mean of 1: all > 0).
    weights = get_task("inpaint").pair(target[0], seed=0, hole_weight=2.0).loss_weights[None]
    weights = weights / weights.mean()
    seen.clear()
    value_and_grad(weights)
    torch.testing.assert_close(seen[0], decoded, rtol=0, atol=1e-5)
    # A binary mask: the target where it is zero, with no gradient there.
    binary = (torch.rand(1, 1, 9, 24, 40, generator=g) > 0.5).float()
    seen.clear()
    value_and_grad(binary)
    torch.testing.assert_close(seen[0], torch.where(binary != 0, decoded, target), rtol=0, atol=1e-5)


def test_a_variable_frame_rate_file_in_the_data_folder_gives_its_own_frames(tmp_path):
    from video_files import frame_indices, irregular_timestamps_ms, write_variable_rate_mp4

    for i in range(2):
        write_variable_rate_mp4(tmp_path / f"vfr{i}.mp4", irregular_timestamps_ms(40, seed=i), 16, 16)
    train, held = task_datasets(get_task("enhance"), data=str(tmp_path), frames=9, height=16, width=16,
                                frame_stride=1, seed=0, train_clips=24, eval_clips=3, hole_weight=2.0)
    for pairs in (train, held):
        folder = pairs.source.folder
        for index in range(len(pairs)):
            start = folder.clip_location(index)[1]
            assert frame_indices(pairs[index].target) == list(range(start, start + 9)), index


def test_a_file_damaged_inside_its_packets_is_one_error_line_naming_data_and_the_file(tmp_path, capsys):
    from chopgrad.tools.cli import main
    from video_files import packets_in_file_order, write_header_first_mp4, zero_packet_data

    path = write_header_first_mp4(tmp_path / "data" / "damaged.mp4", 24, 32, 32, gop=24)
    zero_packet_data(path, sorted(pts for _, _, pts in packets_in_file_order(path))[1])  # every clip decodes it
    argv = ["train", "--task", "vsr", "--model", "tiny-wan21", "--frames", "9", "--size", "16", "--eval-clips", "1",
            "--width", "8", "--blocks", "1", "--threads", "1", "--no-progress", "--steps", "1",
            "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    with pytest.warns(UserWarning, match="one usable video file"), pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: --data {str(tmp_path / 'data')!r}: {path}: cannot decode")
