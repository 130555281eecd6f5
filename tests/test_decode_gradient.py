"""`chopgrad.decode` under autograd: any loss on the whole video.

Exact cases against plain autograd through the model's own decode; truncated
cases against the explicit-detach oracle of tiny_models.truncated_oracle fed
with the video's cotangent (for a whole-video loss L, step g's term is
<frames_g, dL/dframes_g>). Float64 copies of the tiny models make the
comparisons tight.
"""
import pytest
import torch
import torch.nn.functional as F

import chopgrad
from tiny_models import MODELS, truncated_oracle

# batch 2; Wan: 4 steps, CogVideoX: 7 latent frames = 3 steps (3 + 2 + 2)
LATENT_SHAPES = {"wan21": (2, 4, 4, 4, 5), "wan22": (2, 4, 4, 3, 2), "cogvideox": (2, 4, 7, 3, 5)}


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def frame_difference_loss(video):
    """A temporal loss that mixes frames of different decoder steps."""
    diff = video[:, :, 1:] - video[:, :, :-1]
    return diff.square().mean() + 0.1 * (video[:, :, -1] - video[:, :, 0]).abs().mean()


class Critic(torch.nn.Module):
    """A small 3D-conv network scoring the clip: a stand-in for a video reward model."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.conv1 = torch.nn.Conv3d(3, 4, 3, padding=1, dtype=dtype)
        self.conv2 = torch.nn.Conv3d(4, 2, (3, 3, 3), stride=(2, 1, 1), padding=1, dtype=dtype)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g, dtype=dtype) * 0.3
        self.requires_grad_(False)

    def forward(self, video):
        h = F.silu(self.conv1(video))
        return self.conv2(h).tanh().mean(dim=(1, 2, 3, 4)).sum()


# Summing two steps' cotangents before or after a step's backward (one autograd call or two) differs here by
# up to ~1e-7 relative even in float64, with the model's own step code alone: these random tiny decoders are
# ill-conditioned. The oracle backpropagates each step's term on its own; the engine sums a chunk's terms.
ORACLE_TOL = 1e-6

LOSSES = {"frame_differences": lambda: frame_difference_loss, "critic": Critic}


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
    vae = MODELS[request.param]().double()
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(LATENT_SHAPES[request.param], generator=generator, dtype=torch.float64)
    return request.param, vae, latents


def grads_of(vae, latents, video_fn, loss_fn):
    """(loss, video, d loss / d latents, {name: d loss / d param}) with the video from `video_fn(vae, z)`."""
    z = latents.clone().requires_grad_(True)
    vae.zero_grad(set_to_none=True)
    video = video_fn(vae, z)
    loss = loss_fn(video)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}
    vae.zero_grad(set_to_none=True)
    return float(loss.detach()), video.detach(), z.grad.clone(), grads


def model_decode(vae, z):
    return vae.decode(z).sample


def assert_grads_close(got, want, tol):
    _, video, gz, gp = got
    _, ref_video, ref_gz, ref_gp = want
    assert rel_err(gz, ref_gz) <= tol
    assert set(gp) == set(ref_gp)
    for name, ref in ref_gp.items():
        if ref.abs().max() == 0:
            assert gp[name].abs().max() == 0, name
        else:
            assert rel_err(gp[name], ref) <= tol, name


@pytest.mark.parametrize("loss_name,schedule,d_trunc", [
    ("critic", "sliding", None), ("frame_differences", "sliding", None), ("frame_differences", "chunked", None),
    ("frame_differences", "sliding", "G-1"), ("frame_differences", "chunked", "G-1"),
    ("frame_differences", "sliding_recompute", "G-1")])
def test_untruncated_gradient_equals_autograd_through_the_model_decode(case, loss_name, schedule, d_trunc):
    _, vae, latents = case
    loss_fn = LOSSES[loss_name]()
    d = None if d_trunc is None else chopgrad.wrap(vae).plan(latents).num_steps - 1
    want = grads_of(vae, latents, model_decode, loss_fn)
    got = grads_of(vae, latents, lambda m, z: chopgrad.decode(m, z, d_trunc=d, schedule=schedule), loss_fn)
    assert got[0] == pytest.approx(want[0], rel=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
    assert_grads_close(got, want, 1e-10)


@pytest.mark.parametrize("schedule,d_trunc", [("sliding", 0), ("sliding", 1), ("sliding", 2), ("chunked", 0),
                                              ("chunked", 1), ("chunked", 2), ("sliding_recompute", 1)])
def test_truncated_gradient_equals_the_detach_oracle(case, schedule, d_trunc):
    _, vae, latents = case
    critic = Critic()
    loss_fn = lambda video: critic(video) + frame_difference_loss(video)  # noqa: E731
    video = model_decode(vae, latents).detach().requires_grad_(True)
    (cotangent,) = torch.autograd.grad(loss_fn(video), video)
    # the oracle divides each step's term by the video's element count
    scale = video.numel()
    oracle_schedule = "sliding" if schedule == "sliding_recompute" else schedule
    _, ref_gz, ref_gp = truncated_oracle(vae, latents, cotangent, d_trunc=d_trunc, schedule=oracle_schedule,
                                         loss_fn=lambda frames, c: (frames * c).sum() * scale)
    got = grads_of(vae, latents, lambda m, z: chopgrad.decode(m, z, d_trunc=d_trunc, schedule=schedule), loss_fn)
    assert rel_err(got[2], ref_gz) <= ORACLE_TOL
    for name, ref in ref_gp.items():
        if ref.abs().max() == 0:
            assert name not in got[3] or got[3][name].abs().max() == 0, name
        else:
            assert rel_err(got[3][name], ref) <= ORACLE_TOL, name


def test_truncation_changes_the_gradient(case):
    """Guards the oracle comparison: at d_trunc=0 something must be cut."""
    _, vae, latents = case
    want = grads_of(vae, latents, model_decode, frame_difference_loss)
    got = grads_of(vae, latents, lambda m, z: chopgrad.decode(m, z, d_trunc=0), frame_difference_loss)
    assert rel_err(got[2], want[2]) > 1e-3


def test_a_loss_on_some_frames_reaches_only_their_steps(case):
    """Steps the cotangent does not reach are advanced without a backward; the gradient is still exact."""
    _, vae, latents = case
    plan = chopgrad.wrap(vae).plan(latents)
    first_step = plan.frame_slice(0)
    loss_fn = lambda video: video[:, :, first_step].square().sum()  # noqa: E731
    want = grads_of(vae, latents, model_decode, loss_fn)
    got = grads_of(vae, latents, lambda m, z: chopgrad.decode(m, z, d_trunc=None), loss_fn)
    assert_grads_close(got, want, 1e-10)
    # causal decoders: later latent groups do not reach the first step's frames
    assert got[2][:, :, plan.group_bounds[1]:].abs().max() == 0


def test_no_graph_without_gradients(case):
    _, vae, latents = case
    with torch.no_grad():
        want = model_decode(vae, latents)
        video = chopgrad.decode(vae, latents.clone().requires_grad_(True))
    assert not video.requires_grad
    torch.testing.assert_close(video, want, rtol=1e-12, atol=1e-12)
    frozen = [p for p in vae.parameters() if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        video = chopgrad.decode(vae, latents)
        assert not video.requires_grad and video.grad_fn is None
    finally:
        for p in frozen:
            p.requires_grad_(True)


def test_only_trainable_parameters_get_gradients(case):
    _, vae, latents = case
    frozen = [p for n, p in vae.named_parameters() if "conv_out" not in n]
    try:
        for p in frozen:
            p.requires_grad_(False)
        z = latents.clone()  # latents need no grad: only the decoder is trained
        frame_difference_loss(chopgrad.decode(vae, z, d_trunc=1)).backward()
        trained = {n for n, p in vae.named_parameters() if p.grad is not None}
        assert trained and all("conv_out" in n for n in trained)
        assert all(p.grad is None for p in frozen)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        vae.zero_grad(set_to_none=True)
