"""`chopgrad train --video-loss`: a whole-clip loss on the decoded clip, its weight, and what it refuses."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import train_factories
from chopgrad.tools.cli import build_parser, main
from chopgrad.tools.train.compare import method_configs
from chopgrad.tools.train.config import TrainConfig
from chopgrad.tools.train.data import step_loader
from chopgrad.tools.train.step import model_inputs
from chopgrad.tools.train.trainer import Run, train
from test_train_run import TINY, tiny_config

CRITIC = "train_factories:make_critic"
TEMPORAL = "train_factories:frame_difference"


def _first_batch(run: Run):
    return run._on_device(next(iter(step_loader(run.train_pairs, 0, 1, run.config.batch))))


# ---------------------------------------------------------------- runs


@pytest.mark.parametrize("method", ["chopgrad", "full"])
def test_cli_run_adds_the_video_loss_to_every_step(tmp_path, capsys, method):
    assert main(["train", "--task", "vsr", *TINY, "--steps", "2", "--eval-every", "2", "--method", method,
                 "--video-loss", CRITIC, "--video-loss-weight", "0.5", "--out", str(tmp_path)]) == 0
    assert "held-out PSNR" in capsys.readouterr().out
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["config"]["video_loss"] == CRITIC and record["config"]["video_loss_weight"] == 0.5
    for row in record["steps"]:
        assert math.isfinite(row["video"]) and row["video"] > 0
        # the reported loss is the sum of its weighted parts (latent weight 1, pixel weight 1, mse alone)
        assert row["loss"] == pytest.approx(row["latent_mse"] + row["pixel"] + 0.5 * row["video"], rel=1e-5)
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "video" in header
    saved = json.loads((tmp_path / "checkpoint" / "trainer.json").read_text())["extra"]["config"]
    assert saved["video_loss"] == CRITIC and saved["video_loss_weight"] == 0.5


@pytest.mark.parametrize("method", ["chopgrad", "full"])
def test_first_step_loss_and_gradient_equal_an_independent_computation(tmp_path, method):
    """With d_trunc=None chopgrad's gradient is exact, so both methods must match plain autograd through the
    model's own decode: latent MSE + pixel MSE + W * critic(vae.decode(latents).sample)."""
    weight = 0.7
    run = Run(tiny_config(tmp_path / "with", method=method, d_trunc=None, grad_clip=0.0, video_loss=CRITIC,
                          video_loss_weight=weight))
    batch = _first_batch(run)
    critic = run.video_critic.fn
    assert isinstance(critic, train_factories.ConvCritic) and not critic.training
    assert not any(p.requires_grad for p in critic.parameters())
    critic_before = {k: v.clone() for k, v in critic.state_dict().items()}

    # the independent computation, on a copy of the model before the step changes it
    model = copy.deepcopy(run.model)
    inputs, target_latents = model_inputs(run.task, run.vae, batch)
    latents = model(inputs)
    video = run.vae.decode(latents).sample
    expected_critic = train_factories.ConvCritic()
    expected_critic.load_state_dict(critic_before)
    video_term = expected_critic(video)
    latent_term = F.mse_loss(latents, target_latents)
    pixel_term = F.mse_loss(video, batch.target)
    expected = latent_term + pixel_term + weight * video_term
    expected.backward()

    row = run.step(batch)
    assert row["video"] == pytest.approx(float(video_term.detach()), rel=1e-4)
    assert row["loss"] == pytest.approx(float(expected.detach()), rel=1e-4)
    for (name, p), q in zip(run.model.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-3, atol=1e-7, msg=name)
    assert all(torch.equal(v, critic_before[k]) for k, v in critic.state_dict().items())  # frozen, not trained

    # the same step without the term: same model (the critic's construction draws nothing from torch's global
    # generator), a loss lower by exactly W * critic, and another gradient
    plain = Run(tiny_config(tmp_path / "without", method=method, d_trunc=None, grad_clip=0.0))
    assert all(torch.equal(p, q) for p, q in zip(plain.model.parameters(), model.parameters()))
    plain_row = plain.step(_first_batch(plain))
    assert row["loss"] - plain_row["loss"] == pytest.approx(weight * row["video"], rel=1e-4)
    assert "video" not in plain_row
    out_grad = dict(run.model.named_parameters())["conv_out.weight"].grad
    plain_grad = dict(plain.model.named_parameters())["conv_out.weight"].grad
    assert not torch.allclose(out_grad, plain_grad, rtol=1e-3, atol=0)


def test_truncated_decode_gives_the_video_term_its_truncated_gradient(tmp_path):
    """The chopgrad method decodes with the run's d_trunc: the temporal loss alone (no latent, no pixel term)
    gives d_trunc=0 and the exact gradient different gradients, and the same loss value."""
    rows, grads = {}, {}
    for d in (0, None):
        run = Run(tiny_config(tmp_path / str(d), d_trunc=d, latent_weight=0.0, pixel_weight=0.0, grad_clip=0.0,
                              video_loss=TEMPORAL, video_loss_weight=2.0))
        rows[d] = run.step(_first_batch(run))
        grads[d] = dict(run.model.named_parameters())["conv_out.weight"].grad
    assert rows[0]["loss"] == pytest.approx(rows[None]["loss"], rel=1e-6)
    assert rows[0]["loss"] == pytest.approx(2.0 * rows[0]["video"], rel=1e-6) and "pixel" not in rows[0]
    assert grads[None].abs().sum() > 0 and not torch.allclose(grads[0], grads[None], rtol=1e-3, atol=0)


def test_the_critic_is_the_same_for_a_seed_and_leaves_the_global_random_state_alone():
    from chopgrad.tools.train.step import make_video_critic

    state = torch.get_rng_state()
    a, b = make_video_critic(CRITIC, seed=3), make_video_critic(CRITIC, seed=3)
    other = make_video_critic(CRITIC, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    weights = lambda critic: torch.cat([p.flatten() for p in critic.fn.parameters()])
    assert torch.equal(weights(a), weights(b)) and not torch.equal(weights(a), weights(other))


def test_train_decoder_gets_a_gradient_from_the_video_loss_alone(tmp_path):
    run = Run(tiny_config(tmp_path, pixel_weight=0.0, train_decoder=True, video_loss=TEMPORAL))
    run.step(_first_batch(run))
    decoder_grads = [p.grad for p in run.vae.decoder.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in decoder_grads)


# ---------------------------------------------------------------- what is refused, before any work

@pytest.mark.parametrize("argv,message", [
    (["--video-loss", "train_factories"], "--video-loss: expected 'module:function', got 'train_factories'"),
    (["--video-loss", "no_such_module_xyz:make"], "--video-loss: cannot import module 'no_such_module_xyz'"),
    (["--video-loss", "train_factories:missing"], "--video-loss: module 'train_factories' has no callable 'missing'"),
    (["--video-loss", "train_factories:not_a_critic"],
     "--video-loss train_factories:not_a_critic: function() must return a callable on (B, 3, F, H, W) clips, "
     "got int"),
    (["--video-loss", "train_factories:critic_needing_weights"],
     "--video-loss train_factories:critic_needing_weights: calling it as function() failed"),
    (["--video-loss", CRITIC, "--video-loss-weight", "inf"],
     "argument --video-loss-weight: expected a finite number > 0, got inf"),
    (["--video-loss", CRITIC, "--video-loss-weight", "nan"],
     "argument --video-loss-weight: expected a finite number > 0, got nan"),
    (["--video-loss", CRITIC, "--video-loss-weight", "heavy"],
     "argument --video-loss-weight: expected a finite number > 0, got 'heavy'"),
    (["--video-loss", CRITIC, "--video-loss-weight", "0"],
     "argument --video-loss-weight: 0 leaves the video loss out of the training loss; drop --video-loss"),
    (["--video-loss", CRITIC, "--video-loss-weight=-1"], "argument --video-loss-weight: expected a number > 0, got -1.0"),
    (["--video-loss-weight", "2"], "--video-loss-weight 2 is given without --video-loss"),
    (["--video-loss", CRITIC, "--method", "latent"],
     "--video-loss: --method latent trains on the latent loss alone and decodes no video"),
])
def test_bad_video_loss_arguments_fail_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    import chopgrad.tools.cli as cli

    def no_model_may_load(name):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load_model", no_model_may_load)
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--task", "vsr", *argv, "--model", "tiny-wan21", "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert sum(line.startswith("error: ") for line in err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("factory,message", [
    ("per_frame_scores", "the callable must return a scalar tensor (reduce over the clips, e.g. with .mean()), "
                         "got Tensor of shape (9,)"),
    ("detached_critic", "the callable returned a value with no graph (requires_grad=False)"),
    ("float_critic", "the callable must return a scalar tensor (reduce over the clips, e.g. with .mean()), got "
                     "float"),
], ids=["per_frame_scores", "detached_critic", "float_critic"])
@pytest.mark.parametrize("method", ["chopgrad", "full"])
def test_a_callable_with_a_value_that_is_no_scalar_or_has_no_graph_is_refused_at_its_first_call(
        tmp_path, factory, message, method):
    run = Run(tiny_config(tmp_path, method=method, video_loss=f"train_factories:{factory}"))
    with pytest.raises(ValueError) as info:
        run.step(_first_batch(run))
    assert str(info.value).startswith(f"--video-loss train_factories:{factory}: {message}")


def test_a_callable_with_no_graph_is_one_error_line_from_the_command(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--task", "vsr", *TINY, "--steps", "1", "--eval-every", "1", "--video-loss",
              "train_factories:detached_critic", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --video-loss train_factories:detached_critic: the callable returned a value "
                              "with no graph")


def test_train_config_checks_the_video_loss():
    with pytest.raises(ValueError, match=r"video_loss_weight \(2\) is set but video_loss is not"):
        TrainConfig(task="vsr", video_loss_weight=2)
    with pytest.raises(ValueError, match="video_loss_weight: expected a finite number > 0, got inf"):
        TrainConfig(task="vsr", video_loss=CRITIC, video_loss_weight=float("inf"))
    with pytest.raises(ValueError, match="video_loss_weight: 0 leaves the video loss out"):
        TrainConfig(task="vsr", video_loss=CRITIC, video_loss_weight=0.0)
    with pytest.raises(ValueError, match="--method latent trains on the latent loss alone"):
        TrainConfig(task="vsr", video_loss=CRITIC, method="latent")
    # the video loss is a term of its own: a loss of it alone trains, and so does the decoder through it
    TrainConfig(task="vsr", video_loss=CRITIC, latent_weight=0.0, pixel_weight=0.0, train_decoder=True)
    with pytest.raises(ValueError, match="the loss has no term"):
        TrainConfig(task="vsr", latent_weight=0.0, pixel_weight=0.0)


def test_resume_with_another_video_loss_is_refused(tmp_path, capsys):
    common = ["train", "--task", "vsr", *TINY, "--steps", "1", "--eval-every", "1", "--out", str(tmp_path)]
    assert main([*common, "--video-loss", CRITIC]) == 0
    capsys.readouterr()
    for changed, named in ((["--video-loss", CRITIC, "--video-loss-weight", "2"], "video_loss_weight: 1.0 -> 2.0"),
                           (["--video-loss", TEMPORAL], f"video_loss: {CRITIC!r} -> {TEMPORAL!r}"),
                           ([], f"video_loss: {CRITIC!r} -> None")):
        with pytest.raises(SystemExit) as exit_info:
            main([*common, *changed, "--resume"])
        assert exit_info.value.code == 2
        assert f"other settings ({named})" in capsys.readouterr().err


def test_compare_adds_the_video_loss_to_every_method_but_the_latent_only_one():
    runs = {name: config for name, _, config in method_configs(
        TrainConfig(task="vsr", video_loss=CRITIC, video_loss_weight=0.3))}
    assert runs["latent"].video_loss is None and runs["latent"].method == "latent"
    for name in ("full", "sliding_d0", "sliding_d1", "chunked_d1"):
        assert (runs[name].video_loss, runs[name].video_loss_weight) == (CRITIC, 0.3), name


def test_help_describes_the_options():
    text = build_parser().commands["train"].format_help()
    assert "--video-loss MODULE:FUNCTION" in text and "--video-loss-weight W" in text
    assert "(B, 3, F, H, W)" in text
