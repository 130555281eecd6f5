"""chopgrad.tools.probe: the exponential fit recovers a known decay on a synthetic decoder."""
from __future__ import annotations

import math

import pytest
import torch

import chopgrad
from chopgrad.tools.probe import ProbeResult, fit_exponential, plot_probe, probe_locality, recommended_d_trunc


def linear_recurrence(a: float, channels: int = 3):
    """s_{g+1} = a * s_g + z_g, x_g = s_{g+1}: d l_i / d z_j = a^(i-j) d l_i / d x_i, so influence(d) = a^d."""

    def step(g, z, state):
        s = z if state[0] is None else a * state[0] + z
        return s, [s]

    return chopgrad.FunctionalAdapter(step, latent_channels=channels, frames_out=1, out_channels=channels,
                                      initial_state=[None])


def inputs(steps=12, channels=3, size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, channels, steps, size, size, generator=g, dtype=torch.float64)
    y = torch.randn(1, channels, steps, size, size, generator=g, dtype=torch.float64)
    return z, y


@pytest.mark.parametrize("a", [0.5, 0.3])
def test_fit_recovers_known_decay(a):
    z, y = inputs()
    result = probe_locality(linear_recurrence(a), z, y, eps=1e-3, fidelity=False)
    assert isinstance(result, ProbeResult)
    assert result.num_steps == 12 and result.distances == list(range(12))
    assert result.influence[0] == pytest.approx(1.0)
    for d, v in enumerate(result.influence):
        assert v == pytest.approx(a ** d, rel=1e-6)
    assert result.alpha == pytest.approx(-math.log(a), rel=0.02)
    assert result.C == pytest.approx(1.0, rel=0.02)
    assert result.recommended_d_trunc == math.ceil(math.log(1 / 1e-3) / -math.log(a))


def test_truncated_fidelity_improves_with_d_trunc():
    z, y = inputs(steps=8)
    result = probe_locality(linear_recurrence(0.5), z, y, max_distance=4, d_truncs=range(5))
    assert result.distances == [0, 1, 2, 3, 4]
    assert result.d_truncs == [0, 1, 2, 3, 4]
    for name in ("latent_rel_error", "param_rel_error"):
        errs = getattr(result, name)
        assert all(e1 < e0 for e0, e1 in zip(errs, errs[1:])), (name, errs)
    assert result.latent_cosine[-1] > 0.999 and result.param_cosine[-1] > 0.99
    # the exact gradient is reached once d_trunc covers every step
    full = probe_locality(linear_recurrence(0.5), z, y, max_distance=2, d_truncs=[7])
    assert full.latent_rel_error[0] < 1e-10 and full.param_rel_error[0] < 1e-10
    assert "recommended d_trunc" in result.table()


def test_fit_and_recommendation_helpers():
    ds = list(range(8))
    C, alpha = fit_exponential(ds, [2.0 * math.exp(-0.7 * d) for d in ds])
    assert C == pytest.approx(2.0) and alpha == pytest.approx(0.7)
    assert recommended_d_trunc(2.0, 0.7, 1e-3) == math.ceil(math.log(2000) / 0.7)
    assert recommended_d_trunc(1.0, 0.0, 1e-3) is None  # no decay: no finite recommendation
    assert recommended_d_trunc(1e-6, 1.0, 1e-3) == 0
    with pytest.raises(ValueError, match="eps"):
        probe_locality(linear_recurrence(0.5), *inputs(steps=3), eps=0)


def test_probe_plot_and_parameters_restored(tmp_path):
    weight = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def step(g, z, state):
        s = z if state[0] is None else weight * state[0] + z
        return s, [s]

    adapter = chopgrad.FunctionalAdapter(step, latent_channels=3, frames_out=1, initial_state=[None],
                                         parameters=[weight])
    result = probe_locality(adapter, *inputs(steps=6), d_truncs=range(3))
    assert weight.requires_grad and weight.grad is None
    assert result.alpha == pytest.approx(math.log(2), rel=0.02)
    path = plot_probe(result, str(tmp_path / "probe.png"))
    assert (tmp_path / "probe.png").stat().st_size > 1000 and path.endswith("probe.png")


@pytest.mark.parametrize("steps, max_distance", [(4, 0), (1, None)])
def test_nothing_measured_beyond_distance_zero_is_no_fit(steps, max_distance):
    """max_distance 0 or one decoder step: no recommendation (not d_trunc 0), and the JSON form is valid JSON."""
    import json

    result = probe_locality(linear_recurrence(0.5), *inputs(steps=steps), max_distance=max_distance, fidelity=False)
    assert result.distances == [0] and not result.measured
    assert result.recommended_d_trunc is None and math.isnan(result.alpha) and math.isnan(result.C)
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["alpha"] is None and data["C"] is None and data["recommended_d_trunc"] is None
    table = result.table()
    assert "nothing measured beyond distance 0" in table and "recommended d_trunc for eps = 0.001: n/a" in table
    assert "nan" not in table and "= inf" not in table


def test_no_influence_beyond_distance_zero_recommends_zero():
    """A decoder whose steps do not reach back (influence 0 at d >= 1): d_trunc 0 is right, alpha is inf in the
    text and null in JSON."""
    import json

    result = probe_locality(linear_recurrence(0.0), *inputs(steps=4), fidelity=False)
    assert result.influence == [1.0, 0.0, 0.0, 0.0] and result.measured
    assert result.alpha == math.inf and result.recommended_d_trunc == 0
    assert json.loads(json.dumps(result.to_dict(), allow_nan=False))["alpha"] is None
    table = result.table()
    assert "alpha = inf" in table and "| 1 | 0.000e+00 | 0.000e+00 |" in table and "nan" not in table
