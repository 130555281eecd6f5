"""The four task pair makers: seeded, shape-preserving, and each doing what its paragraph says."""
import pytest
import torch

from chopgrad.data.synthetic import make_video
from chopgrad.data.tasks import TASKS, get_task


@pytest.fixture(scope="module")
def clip():
    return make_video(4, 9, 32, 40)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_pairs_are_deterministic_shape_preserving_and_in_range(clip, name):
    task = get_task(name)
    first, again, other = task.pair(clip, seed=1), task.pair(clip, seed=1), task.pair(clip, seed=2)
    assert first.condition.shape == clip.shape and first.condition.dtype == clip.dtype
    assert torch.equal(first.target, clip)
    assert float(first.condition.min()) >= -1 and float(first.condition.max()) <= 1
    assert torch.equal(first.condition, again.condition)
    assert not torch.equal(first.condition, clip)
    if name != "driving":  # the edge map of one clip does not depend on the seed
        assert not torch.equal(first.condition, other.condition)
    assert (first.extra is None) == (task.extra == "none")


def test_vsr_loses_detail_but_keeps_the_coarse_picture(clip):
    condition = get_task("vsr").pair(clip, seed=0).condition
    coarse = lambda v: torch.nn.functional.avg_pool2d(v.transpose(0, 1), 8)
    assert float((coarse(condition) - coarse(clip)).abs().mean()) < 0.1
    detail = lambda v: (v[..., 1:] - v[..., :-1]).abs().mean()
    assert float(detail(condition)) < 0.7 * float(detail(clip))


def test_vsr_needs_sizes_divisible_by_four():
    with pytest.raises(ValueError, match="multiples of 4"):
        get_task("vsr").pair(make_video(0, 5, 30, 40), seed=0)


def test_inpaint_hides_the_hole_and_weights_it():
    task = get_task("inpaint")
    clip = make_video(5, 9, 32, 40)
    kinds = set()
    for seed in range(12):
        pair = task.pair(clip, seed=seed, hole_weight=3.0)
        mask = pair.extra
        assert mask.shape == (1, 9, 32, 40) and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert 0 < float(mask.mean()) < 0.6
        assert torch.equal(pair.condition, clip * (1 - mask))
        assert torch.equal(pair.loss_weights, 1 + 2 * mask)
        kinds.add("moving" if not torch.equal(mask[:, 0], mask[:, -1]) else "static")
    assert kinds == {"moving", "static"}


def test_enhance_artefacts_are_visible_but_bounded(clip):
    pair = get_task("enhance").pair(clip, seed=3)
    error = (pair.condition - clip).abs()
    assert 0.02 < float(error.mean()) < 0.6


def test_driving_edges_and_layout(clip):
    task = get_task("driving")
    flat = torch.full((3, 5, 16, 16), 0.3)
    edges = task.pair(flat, seed=0)
    assert torch.equal(edges.condition, torch.full_like(flat, -1.0))  # no edges: all black
    assert torch.equal(edges.extra, flat[:, :1])
    video, labels = make_video(4, 9, 32, 40, layout=True)
    semantic = task.pair(video, seed=0, layout=labels).condition
    for label in labels.unique().tolist():
        colours = semantic.permute(1, 2, 3, 0)[labels[0] == label].unique(dim=0)
        assert colours.shape[0] == 1  # one colour per object
    with pytest.raises(ValueError, match="layout"):
        task.pair(video, seed=0, layout=labels[:, :3])


def test_bad_task_and_clip_are_clear_errors(clip):
    with pytest.raises(ValueError, match="unknown task 'sr'.*vsr"):
        get_task("sr")
    with pytest.raises(ValueError, match=r"\(3, F, H, W\)"):
        get_task("enhance").pair(clip[0], seed=0)
    with pytest.raises(TypeError, match="floating"):
        get_task("enhance").pair(clip.long(), seed=0)
    with pytest.raises(ValueError, match="hole_weight"):
        get_task("inpaint").pair(clip, seed=0, hole_weight=0)


def test_layout_leaves_the_synthetic_clip_unchanged():
    video, labels = make_video(7, 5, 24, 24, layout=True)
    assert torch.equal(video, make_video(7, 5, 24, 24))
    assert labels.shape == (1, 5, 24, 24) and labels.dtype == torch.int64 and int(labels.max()) >= 1
