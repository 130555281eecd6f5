"""One training step of the task recipes: inputs per task, and a step that lowers the loss on a fixed batch."""
import pytest
import torch

from chopgrad.data.synthetic import make_video
from chopgrad.data.tasks import TASKS, get_task
from chopgrad.tools.train.model import OneStepLatentModel
from chopgrad.tools.train.step import (Batch, LossSettings, extra_channels, mask_at_latent_resolution, model_inputs,
                                       pixel_frames_of_latent_frames, training_loss)
from tiny_models import tiny_wan21


@pytest.fixture(scope="module")
def vae():
    return tiny_wan21().requires_grad_(False)


def batch_for(task, seeds=(0, 1)):
    clips = [make_video(s, 9, 32, 32) for s in seeds]
    return Batch.of([task.pair(c, seed=s) for s, c in zip(seeds, clips)])


def test_pixel_frames_of_latent_frames():
    assert pixel_frames_of_latent_frames(3, 4) == [slice(0, 1), slice(1, 5), slice(5, 9)]


def test_mask_at_latent_resolution_is_the_hole_fraction():
    mask = torch.zeros(1, 1, 9, 32, 32)
    mask[:, :, 5:9, :16, :16] = 1  # the hole covers latent frame 2, top-left quarter
    pooled = mask_at_latent_resolution(mask, (1, 4, 3, 4, 4), temporal_factor=4)
    assert pooled.shape == (1, 1, 3, 4, 4)
    assert torch.equal(pooled[0, 0, 2, :2, :2], torch.ones(2, 2)) and float(pooled.sum()) == 4.0


@pytest.mark.parametrize("frames", [8, 16])
def test_mask_at_latent_resolution_of_clips_that_start_with_a_whole_group(frames):
    """CogVideoX encodes 4k frames as k groups of 4 from frame 0 (no frame alone)."""
    mask = torch.zeros(1, 1, frames, 8, 8)
    mask[:, :, -4:] = 1  # the last latent frame's pixels
    pooled = mask_at_latent_resolution(mask, (1, 4, frames // 4, 1, 1), temporal_factor=4)
    assert pooled.flatten().tolist() == [0.0] * (frames // 4 - 1) + [1.0]
    with pytest.raises(ValueError, match="does not map onto"):
        mask_at_latent_resolution(mask[:, :, 1:], (1, 4, frames // 4, 1, 1), temporal_factor=4)


def test_the_inpaint_mask_channel_of_a_cogvideox_clip_of_8_frames():
    from tiny_models import tiny_cogvideox

    vae = tiny_cogvideox().requires_grad_(False)
    task = get_task("inpaint")
    batch = Batch.of([task.pair(torch.rand(3, 8, 16, 16) * 2 - 1, seed=0)])
    batch.extra.zero_()
    batch.extra[:, :, 4:] = 1  # a hole over the last 4 frames: the second latent frame only
    inputs, target_latents = model_inputs(task, vae, batch)
    assert target_latents.shape[2] == 2
    hole_channel = inputs[:, -1]
    assert torch.equal(hole_channel[:, 0], torch.zeros_like(hole_channel[:, 0]))
    assert torch.equal(hole_channel[:, 1], torch.ones_like(hole_channel[:, 1]))


@pytest.mark.parametrize("name", sorted(TASKS))
def test_model_inputs_have_the_task_channels(vae, name):
    task = get_task(name)
    inputs, target_latents = model_inputs(task, vae, batch_for(task))
    assert target_latents.shape == (2, 4, 3, 4, 4)
    assert inputs.shape == (2, 4 + extra_channels(task, 4), 3, 4, 4)


@pytest.mark.parametrize("name", ["inpaint", "driving"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(vae, name):
    task = get_task(name)
    torch.manual_seed(0)
    model = OneStepLatentModel(z_dim=4, extra_channels=extra_channels(task, 4), width=16, blocks=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    batch = batch_for(task)
    settings = LossSettings(latent_weight=1.0, pixel_loss={"mse": 1.0}, d_trunc=1)
    losses = []
    for _ in range(4):
        loss, parts = training_loss(model, vae, task, batch, settings)
        assert set(parts) == {"latent_mse", "pixel"}
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append((float(loss.detach()), parts["latent_mse"], parts["pixel"]))
    totals = [total for total, _, _ in losses]
    # The tiny random VAE's pixel term dominates and has a high floor: the loss falls slowly, but at every step.
    assert all(later < earlier for earlier, later in zip(totals, totals[1:])), losses


def test_the_pixel_term_alone_reaches_the_model_through_the_latents(vae):
    task = get_task("vsr")
    torch.manual_seed(1)
    model = OneStepLatentModel(z_dim=4, width=8, blocks=1)
    loss, parts = training_loss(model, vae, task, batch_for(task, seeds=(3,)), LossSettings(latent_weight=0.0))
    loss.backward()
    assert parts["pixel"] > 0 and float(model.conv_out.weight.grad.abs().sum()) > 0
