"""The benchmark's baselines are themselves checked against the models' own decode."""
import pytest
import torch
import torch.nn.functional as F

from chopgrad.tools.bench.methods import checkpointed_loss, full_backprop_loss
from tiny_models import MODELS

LATENT_SHAPES = {"wan21": (1, 4, 3, 4, 5), "wan22": (1, 4, 3, 3, 2), "cogvideox": (1, 4, 5, 3, 5)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_checkpointed_step_equals_full_backprop(name):
    """Per-step checkpointing with the state as explicit input/output recomputes exactly:
    same loss and same latent and parameter gradients as autograd through vae.decode."""
    vae = MODELS[name]()
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(LATENT_SHAPES[name], generator=g)
    with torch.no_grad():
        target = torch.rand(vae.decode(latents).sample.shape, generator=g) * 2 - 1

    def run(loss_of):
        vae.zero_grad(set_to_none=True)
        z = latents.clone().requires_grad_(True)
        value = loss_of(vae, z, target)
        value.backward()
        grads = {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}
        return float(value.detach()), z.grad.clone(), grads

    ref_value, ref_gz, ref_gp = run(lambda v, z, t: F.mse_loss(v.decode(z).sample, t))
    value, gz, gp = run(checkpointed_loss)
    assert value == pytest.approx(ref_value, rel=1e-5)
    torch.testing.assert_close(gz, ref_gz, rtol=1e-5, atol=1e-7)
    assert set(gp) == set(ref_gp)
    for n in ref_gp:
        torch.testing.assert_close(gp[n], ref_gp[n], rtol=1e-4, atol=1e-6, msg=n)
    assert full_backprop_loss(vae, latents, target).item() == pytest.approx(ref_value, rel=1e-6)


def test_worker_warms_up_on_a_prefix_then_measures_and_times_full_steps(tmp_path, monkeypatch, capsys):
    """The worker's first step runs on the first 3 latent frames against the model's own decode
    (one-time costs paid before the peak is reset); then the memory step, then the timed repeats."""
    import json

    import chopgrad.tools.bench.methods as methods
    from chopgrad.tools.bench import worker
    from chopgrad.tools.bench.workloads import load_model, make_inputs

    vae = load_model("tiny-wan21")
    latents, target = make_inputs(vae, 17, 32, 32)
    torch.save({"latents": latents, "target": target}, tmp_path / "inputs.pt")
    calls = []

    def recording_loss(vae, z, target):
        calls.append((z.shape[2], target.clone()))
        return full_backprop_loss(vae, z, target)

    monkeypatch.setattr(methods, "loss_fn", lambda *args, **kwargs: recording_loss)
    config = {"model": "tiny-wan21", "inputs": str(tmp_path / "inputs.pt"), "method": "full", "repeats": 3}
    assert worker.main([json.dumps(config)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    with torch.no_grad():
        own_decode = vae.decode(latents[:, :, :3]).sample
    torch.testing.assert_close(calls[0][1], own_decode)
    assert [t for t, _ in calls] == [3] + [latents.shape[2]] * 4  # prefix, memory step, 3 timed steps
    assert len(out["times_s"]) == 3 and out["time_s"] == sorted(out["times_s"])[1]
    assert out["memory_step_s"] > 0 and out["timed_with_usual_allocator"] is True


def test_timing_runs_all_methods_in_one_process_interleaved_in_rotating_order(tmp_path, monkeypatch, capsys):
    """Each method first runs its 3-latent-frame warm-up, then the settle rounds, then the timed rounds,
    one step of each method per round, the order rotating by one per round; a lean baseline's steps run on
    the patched model and leave it unpatched afterwards."""
    import json

    import chopgrad.tools.bench.methods as methods
    from chopgrad.adapters.wan_patch import patch_report
    from chopgrad.tools.bench import timing
    from chopgrad.tools.bench.workloads import load_model, make_inputs

    vae = load_model("tiny-wan21")
    latents, target = make_inputs(vae, 9, 16, 16)
    torch.save({"latents": latents, "target": target}, tmp_path / "inputs.pt")
    calls = []

    def recording(name):
        def loss(vae, z, target):
            calls.append((name, z.shape[2], bool(patch_report(vae).patched)))
            return full_backprop_loss(vae, z, target)
        return loss

    monkeypatch.setattr(methods, "loss_fn", lambda method, d, schedule, lean, **tiling: recording(f"{method}/{lean}"))
    config = {"model": "tiny-wan21", "inputs": str(tmp_path / "inputs.pt"), "rounds": 3, "settle_rounds": 1,
              "methods": [["full", None, "sliding", False], ["full", None, "sliding", True],
                          ["pixel_loss", 1, "chunked", None]]}
    assert timing.main([json.dumps(config)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    a, b, c = "full/False", "full/True", "pixel_loss/True"
    full_t = latents.shape[2]
    assert [(n, t) for n, t, _ in calls] == [(a, 3), (b, 3), (c, 3)] + [(n, full_t) for n in (
        a, b, c,  # settle round
        a, b, c, b, c, a, c, a, b)]  # timed rounds, rotated
    assert all(patched == (n == b) for n, _, patched in calls)
    assert out["status"] == "ok" and out["methods"][2] == ["pixel_loss", 1, "chunked", None]
    for result in out["results"]:
        assert len(result["times_s"]) == 3 and result["time_s"] == sorted(result["times_s"])[1]
        assert result["frames_per_s"] == pytest.approx(target.shape[2] / result["time_s"])
