"""The C++ engine through its Python binding, on a toy decoder whose
gradients are easy to compute independently; also FunctionalAdapter."""
import pytest
import torch

import chopgrad
from chopgrad._ext import load_extension


class ToyDecoder(torch.nn.Module):
    """s_{g+1} = tanh(A s_g + B z_g), x_g = C s_{g+1}: a causal recurrence."""

    def __init__(self, latent=3, hidden=5, out=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = torch.nn.Parameter(torch.randn(hidden, hidden, generator=g) * 0.5)
        self.B = torch.nn.Parameter(torch.randn(hidden, latent, generator=g))
        self.C = torch.nn.Parameter(torch.randn(out, hidden, generator=g))

    def step(self, index, z, state):
        h = state[0] if state and state[0] is not None else torch.zeros(z.shape[0], self.A.shape[0])
        h = torch.tanh(h @ self.A.T + z[:, :, 0, 0, 0] @ self.B.T)
        frames = (h @ self.C.T)[:, :, None, None, None]
        return frames, [h]


def toy_adapter(toy):
    return chopgrad.FunctionalAdapter(toy.step, latent_channels=3, out_channels=2, frames_out=1,
                                      initial_state=[None], parameters=toy.parameters())


def oracle(toy, z, target, d, schedule, supervised):
    grads = torch.zeros_like(z)
    params = list(toy.parameters())
    pgrads = [torch.zeros_like(p) for p in params]
    for g in supervised:
        start = 0 if d is None else (max(0, g - d) if schedule in ("sliding", "sliding_recompute") else g - g % (d + 1))
        h = [None]
        with torch.no_grad():
            for k in range(start):
                _, h = toy.step(k, z[:, :, k:k + 1], h)
        h = [t.detach() if t is not None else None for t in h]
        leaf = z.detach().clone().requires_grad_(True)
        for k in range(start, g + 1):
            x, h = toy.step(k, leaf[:, :, k:k + 1], h)
        l_g = (x - target[:, :, g:g + 1]).square().sum() / (target[:, :, :1].numel() * len(supervised))
        out = torch.autograd.grad(l_g, [leaf] + params)
        grads += out[0]
        for a, b in zip(pgrads, out[1:]):
            a += b
    return grads, pgrads


@pytest.mark.parametrize("schedule", ["sliding", "chunked", "sliding_recompute"])
@pytest.mark.parametrize("d_trunc", [0, 1, 3, None])
@pytest.mark.parametrize("steps", [1, 6, 7])
def test_toy_decoder_against_oracle(schedule, d_trunc, steps):
    toy = ToyDecoder()
    z = torch.randn(2, 3, steps, 1, 1, generator=torch.Generator().manual_seed(1))
    target = torch.randn(2, 2, steps, 1, 1, generator=torch.Generator().manual_seed(2))
    supervised = [g for g in range(steps) if g != 2] if steps > 3 else list(range(steps))
    ref_z, ref_p = oracle(toy, z, target, d_trunc, schedule, supervised)
    zz = z.clone().requires_grad_(True)
    loss = chopgrad.pixel_loss(toy_adapter(toy), zz, target, d_trunc=d_trunc, schedule=schedule,
                               groups=supervised, clamp=False)
    toy.zero_grad(set_to_none=True)
    loss.backward()
    torch.testing.assert_close(zz.grad, ref_z, rtol=1e-5, atol=1e-7)
    for p, r in zip(toy.parameters(), ref_p):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-7)


def test_backward_scales_by_grad_output():
    toy = ToyDecoder()
    z = torch.randn(1, 3, 5, 1, 1)
    target = torch.randn(1, 2, 5, 1, 1)
    z1 = z.clone().requires_grad_(True)
    chopgrad.pixel_loss(toy_adapter(toy), z1, target, d_trunc=1, clamp=False).backward()
    z2 = z.clone().requires_grad_(True)
    (chopgrad.pixel_loss(toy_adapter(toy), z2, target, d_trunc=1, clamp=False) * -2.5).backward()
    torch.testing.assert_close(z2.grad, -2.5 * z1.grad)


def _engine(toy, steps, d, schedule, supervised=None, loss_log=None):
    ext = load_extension()

    def loss(g, frames, need_grad):
        if loss_log is not None:
            loss_log.append((g, need_grad))
        return frames.square().sum()

    adapter = toy_adapter(toy)
    return ext.Engine(adapter.step, loss, list(range(steps + 1)), supervised or [True] * steps, d, schedule,
                      [None], 2)


@pytest.mark.parametrize("d", [0, 1, 2, 4])
def test_sliding_runs_every_step_once_and_keeps_at_most_d_plus_1_step_graphs(d):
    toy = ToyDecoder()
    steps = 12
    engine = _engine(toy, steps, d, "sliding")
    engine.loss(torch.randn(1, 3, steps, 1, 1, requires_grad=True), list(toy.parameters()))
    stats = engine.stats
    assert stats["steps_run"] == stats["steps_run_with_grad"] == steps  # 1x forward compute
    assert stats["max_states_held"] == 1
    assert stats["max_steps_in_graph"] == d + 1
    # the loss of step g: one vector-Jacobian product through each of steps g-D .. g
    assert stats["backward_calls"] == sum(min(g, d) + 1 for g in range(steps))


@pytest.mark.parametrize("supervised", [[True, False, False, False, True, False, True, True],
                                        [False, True, False, False, False, False, False, True]])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_sliding_frees_each_step_graph_after_its_last_loss(d, supervised):
    toy = ToyDecoder()
    steps = len(supervised)
    engine = _engine(toy, steps, d, "sliding", supervised=supervised)
    z = torch.randn(1, 3, steps, 1, 1, requires_grad=True)
    engine.loss(z, list(toy.parameters()))
    last = max(g for g in range(steps) if supervised[g])
    # a step runs with a graph only when a loss within D steps reaches it, and no graph outlives its last loss
    needed = [any(supervised[g:min(g + d, last) + 1]) for g in range(last + 1)]
    assert engine.stats["steps_run_with_grad"] == sum(needed) and engine.stats["steps_run"] == last + 1
    assert engine.stats["max_steps_in_graph"] <= d + 1


@pytest.mark.parametrize("d", [0, 1, 2, 4])
def test_sliding_recompute_buffers_are_bounded(d):
    toy = ToyDecoder()
    steps = 12
    engine = _engine(toy, steps, d, "sliding_recompute")
    engine.loss(torch.randn(1, 3, steps, 1, 1, requires_grad=True), list(toy.parameters()))
    stats = engine.stats
    assert stats["max_states_held"] <= d + 1
    assert stats["max_steps_in_graph"] == d + 1
    assert stats["backward_calls"] == steps
    # steps g-D..g re-run for every g: (D+1) per step, fewer at the start
    assert stats["steps_run_with_grad"] == sum(min(g, d) + 1 for g in range(steps))


@pytest.mark.parametrize("d", [0, 2, 3])
def test_chunked_buffers_are_bounded(d):
    toy = ToyDecoder()
    steps = 12
    engine = _engine(toy, steps, d, "chunked")
    engine.loss(torch.randn(1, 3, steps, 1, 1, requires_grad=True), list(toy.parameters()))
    stats = engine.stats
    assert stats["max_states_held"] == 1
    assert stats["max_steps_in_graph"] == d + 1
    assert stats["steps_run"] == steps  # 1x compute
    assert stats["backward_calls"] == -(-steps // (d + 1))


def test_unsupervised_tail_is_not_decoded_and_evaluate_takes_no_grad():
    toy = ToyDecoder()
    log = []
    engine = _engine(toy, 8, 1, "sliding", supervised=[True, False, True] + [False] * 5, loss_log=log)
    z = torch.randn(1, 3, 8, 1, 1, requires_grad=True)
    engine.loss(z, list(toy.parameters()))
    assert engine.stats["steps_run"] == 3  # steps 0..2, each once
    assert [g for g, _ in log] == [0, 2]
    log.clear()
    value = engine.evaluate(z)
    assert not value.requires_grad and [need for _, need in log] == [False, False]
    assert engine.stats["backward_calls"] == 0


def test_engine_rejects_a_bad_plan():
    toy = ToyDecoder()
    ext = load_extension()
    adapter = toy_adapter(toy)
    with pytest.raises(ValueError, match="schedule"):
        ext.Engine(adapter.step, lambda g, f, n: f.sum(), [0, 1], [True], 0, "zigzag", [None], 2)
    engine = ext.Engine(adapter.step, lambda g, f, n: f.sum(), [0, 2, 3], [True, True], 0, "sliding", [None], 2)
    with pytest.raises(ValueError, match="group_bounds"):
        engine.loss(torch.randn(1, 3, 5, 1, 1, requires_grad=True), [])


def test_python_exception_in_a_callback_propagates():
    toy = ToyDecoder()
    ext = load_extension()

    def failing_step(index, z, state):
        if index == 2:
            raise KeyError("boom in step 2")
        return toy.step(index, z, state)

    engine = ext.Engine(failing_step, lambda g, f, n: f.sum(), list(range(5)), [True] * 4, 1, "sliding", [None], 2)
    with pytest.raises(KeyError, match="boom"):
        engine.loss(torch.randn(1, 3, 4, 1, 1, requires_grad=True), list(toy.parameters()))


def test_value_and_grad_loss_callback():
    """A loss may return (value, d value / d frames) instead of a graph."""
    toy = ToyDecoder()
    ext = load_extension()
    adapter = toy_adapter(toy)

    def fused(g, frames, need_grad):
        value = frames.detach().square().sum()
        return (value, 2 * frames.detach()) if need_grad else value

    z = torch.randn(1, 3, 6, 1, 1)
    grads = []
    for loss in (fused, lambda g, f, n: f.square().sum()):
        zz = z.clone().requires_grad_(True)
        engine = ext.Engine(adapter.step, loss, list(range(7)), [True] * 6, 1, "chunked", [None], 2)
        engine.loss(zz, []).backward()
        grads.append(zz.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_engine_errors_are_raised_by_the_bindings_not_torchs_translator(tmp_path):
    # The bindings turn c10 errors into Python exceptions themselves (a c10
    # error left to torch's translator crashed Python on a torch 2.11 GPU
    # machine). With TORCH_SHOW_CPP_STACKTRACES=1 torch's translator would
    # append a C++ backtrace; the bindings raise the check's message alone.
    import os
    import subprocess
    import sys

    script = r"""
import sys, torch
sys.path.insert(0, "tests")
from test_engine import ToyDecoder, toy_adapter
from chopgrad._ext import load_extension
ext = load_extension()
toy = ToyDecoder()
adapter = toy_adapter(toy)
def raised(fn):
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "nothing raised"
engine = ext.Engine(adapter.step, lambda g, f, n: f.sum(), [0, 2, 3], [True, True], 0, "sliding", [None], 2)
z = torch.randn(1, 3, 5, 1, 1, requires_grad=True)
print(raised(lambda: engine.loss(z, [])))
print(raised(lambda: engine.evaluate(z)))
print(raised(lambda: ext.Engine(adapter.step, lambda g, f, n: f.sum(), [0, 1], [True], 0, "zigzag", [None], 2)))
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, TORCH_SHOW_CPP_STACKTRACES="1"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines() == [
        "ValueError: group_bounds must run from 0 to the latent frame count 5",
        "ValueError: group_bounds must run from 0 to the latent frame count 5",
        "ValueError: schedule must be 'sliding', 'chunked' or 'sliding_recompute', got 'zigzag'",
    ], run.stdout


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("schedule", ["sliding", "chunked"])
def test_low_precision_gradients_are_summed_over_steps_in_fp32(dtype, schedule):
    """Each step adds a small term to a large running gradient. Summed in bf16/fp16 the small terms would be
    rounded away one by one; summed in fp32 the result is the fp32 total rounded once."""
    steps = 48
    weight = torch.nn.Parameter(torch.ones(4, dtype=dtype))
    latents = torch.zeros(1, 4, steps, 1, 1, dtype=dtype)
    latents[:, :, 0] = 1.0
    latents[:, :, 1:] = 2.0 ** -12

    def step(index, group, state):
        return (group * weight.view(1, 4, 1, 1, 1)), state

    adapter = chopgrad.FunctionalAdapter(step, latent_channels=4, out_channels=4, frames_out=1,
                                         parameters=[weight])
    latents.requires_grad_(True)
    loss = chopgrad.pixel_loss(adapter, latents, torch.zeros_like(latents), loss="l1", reduction="sum",
                               d_trunc=0, schedule=schedule)
    loss.backward()
    # d loss / d weight = the sum of the latents of every step (all positive): 1 + 47 * 2**-12 in exact arithmetic
    exact = 1.0 + (steps - 1) * 2.0 ** -12
    assert weight.grad.dtype == dtype and latents.grad.dtype == dtype
    torch.testing.assert_close(weight.grad, torch.full((4,), exact).to(dtype), rtol=0, atol=0)
    naive = torch.tensor(1.0, dtype=dtype)
    for _ in range(steps - 1):
        naive = naive + torch.tensor(2.0 ** -12, dtype=dtype)
    assert naive.item() != torch.tensor(exact).to(dtype).item()  # the small terms really are lost in low precision
