"""`chopgrad train --transformer`: a tiny random WanTransformer3DModel saved to a folder, trained with LoRA."""
import hashlib
import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("peft", reason="--transformer needs peft")

from diffusers import WanTransformer3DModel  # noqa: E402

from chopgrad.tools.bench.workloads import load_model  # noqa: E402
from chopgrad.tools.cli import main  # noqa: E402
from chopgrad.tools.train.config import TrainConfig  # noqa: E402
from chopgrad.tools.train.trainer import Run, train  # noqa: E402
from chopgrad.tools.train.transformer import (  # noqa: E402
    EXTRA_EMBEDDING_FILE, LORA_WEIGHTS_FILE, RESTORER_FILE, OneStepWanRestorer, WidenedPatchEmbedding,
    load_extra_embedding, load_prompt_embeds, load_trained_restorer)

TEXT_DIM = 12


def save_tiny_transformer(folder, channels=4, seed=0):
    torch.manual_seed(seed)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=4,
                                  in_channels=channels, out_channels=channels, text_dim=TEXT_DIM, freq_dim=8,
                                  ffn_dim=16, num_layers=2, rope_max_seq_len=32)
    model.save_pretrained(folder)
    return str(folder)


def folder_digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny transformer's folder: 4 latent channels, as tiny-wan21's VAE."""
    return save_tiny_transformer(tmp_path_factory.mktemp("transformer") / "base")


def config(base, out, **changes) -> TrainConfig:
    settings = dict(task="inpaint", model="tiny-wan21", transformer=base, frames=9, size=(16, 16), steps=4,
                    eval_every=2, eval_clips=1, samples=1, threads=1, progress=False, out=str(out), lora_rank=2,
                    lr=1e-2)
    settings.update(changes)
    return TrainConfig(**settings)


def reference_outputs(run: Run, inputs: torch.Tensor) -> torch.Tensor:
    run.model.eval()
    with torch.no_grad():
        return run.model(inputs)


def test_a_run_trains_the_adapter_and_the_extra_embedding_and_leaves_the_base_alone(base, tmp_path):
    from pathlib import Path

    before = folder_digest(Path(base))
    run = Run(config(base, tmp_path / "run"))
    transformer = run.model.transformer
    frozen = {n: p.detach().clone() for n, p in transformer.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in transformer.named_parameters() if p.requires_grad}
    assert frozen and trained
    assert all("lora_" in n or n == "patch_embedding.extra.weight" for n in trained)
    assert all(float(p.abs().max()) == 0 for n, p in trained.items() if "lora_B" in n or "extra" in n)
    record = run.train()
    assert [row["step"] for row in record["steps"]] == [1, 2, 3, 4]
    after = dict(transformer.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in frozen.items())
    changed = [n for n, p in trained.items() if not torch.equal(after[n], p)]
    assert "patch_embedding.extra.weight" in changed and any("lora_B" in n for n in changed)
    assert folder_digest(Path(base)) == before  # the base folder is read only
    lora = tmp_path / "run" / "lora"
    assert sorted(p.name for p in lora.iterdir()) == sorted([LORA_WEIGHTS_FILE, EXTRA_EMBEDDING_FILE, RESTORER_FILE])
    keys = load_file(str(lora / LORA_WEIGHTS_FILE)).keys()
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    # checkpoints keep what the run trains, not the pretrained base
    saved = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    assert set(saved) == {"model.transformer." + n for n in trained}


def test_the_saved_adapter_loads_into_a_fresh_transformer_with_the_trained_outputs(base, tmp_path):
    run = Run(config(base, tmp_path / "run", steps=3, eval_every=3))
    run.train()
    inputs = torch.randn(2, 5, 3, 2, 2)
    want = reference_outputs(run, inputs)
    lora = str(tmp_path / "run" / "lora")

    fresh = WanTransformer3DModel.from_pretrained(base)
    fresh.load_lora_adapter(lora, use_safetensors=True)
    load_extra_embedding(fresh, lora)
    assert isinstance(fresh.patch_embedding, WidenedPatchEmbedding)
    vae = load_model("tiny-wan21")
    restorer = OneStepWanRestorer(fresh, extra_channels=1, timestep=run.config.timestep,
                                  prompt_embeds=load_prompt_embeds(None, TEXT_DIM),
                                  latents_mean=vae.config.latents_mean, latents_std=vae.config.latents_std).eval()
    with torch.no_grad():
        got = restorer(inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert float((want - inputs[:, :4]).abs().max()) > 1e-3  # the trained restorer is not the identity

    # the convenience loader: the base, timestep, extra channels and prompt embedding the run recorded
    with torch.no_grad():
        torch.testing.assert_close(load_trained_restorer(lora, vae)(inputs), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="has no restorer.safetensors"):
        load_trained_restorer(base, vae)

    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipeline = WanPipeline(tokenizer=None, text_encoder=None, vae=vae,
                           transformer=WanTransformer3DModel.from_pretrained(base),
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipeline.load_lora_weights(lora)
    load_extra_embedding(pipeline.transformer, lora)
    restorer.transformer = pipeline.transformer
    with torch.no_grad():
        torch.testing.assert_close(restorer(inputs), want, rtol=1e-5, atol=1e-6)


def test_step_zero_is_the_pretrained_transformer_by_the_flow_matching_rule(base, tmp_path):
    run = Run(config(base, tmp_path / "run", task="driving", prompt_embeds=None))
    inputs = torch.randn(1, 8, 3, 2, 2)  # 4 condition + 4 first-frame latent channels
    got = reference_outputs(run, inputs)
    plain = WanTransformer3DModel.from_pretrained(base).eval()
    mean = torch.tensor(run.vae.config.latents_mean).view(1, 4, 1, 1, 1)
    std = torch.tensor(run.vae.config.latents_std).view(1, 4, 1, 1, 1)
    noisy = (inputs[:, :4] - mean) / std
    with torch.no_grad():
        velocity = plain(noisy, torch.tensor([399]), torch.zeros(1, 7, TEXT_DIM), return_dict=False)[0]
    want = (noisy - 0.399 * velocity) * std + mean
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prompt_embeds_from_a_file_condition_the_transformer(base, tmp_path):
    embeds = torch.randn(5, TEXT_DIM)
    save_file({"prompt_embeds": embeds}, str(tmp_path / "prompt.safetensors"))
    run = Run(config(base, tmp_path / "run", prompt_embeds=str(tmp_path / "prompt.safetensors"), steps=2,
                     eval_every=2))
    torch.testing.assert_close(run.model.prompt_embeds, embeds[None])
    inputs = torch.randn(1, 5, 2, 2, 2)
    zero = Run(config(base, tmp_path / "zero"))
    assert not torch.allclose(reference_outputs(run, inputs), reference_outputs(zero, inputs))
    run.train()
    # the prompt embedding travels with the adapter: the loaded restorer is conditioned on it
    restored = load_trained_restorer(str(tmp_path / "run" / "lora"), run.vae)
    torch.testing.assert_close(restored.prompt_embeds, embeds[None])
    with torch.no_grad():
        torch.testing.assert_close(restored(inputs), reference_outputs(run, inputs), rtol=1e-5, atol=1e-6)


def test_resume_is_exact(base, tmp_path, monkeypatch):
    from test_train_run import train_interrupted_after_two_steps

    uninterrupted = train(config(base, tmp_path / "a"))
    train_interrupted_after_two_steps(config(base, tmp_path / "b"), monkeypatch)
    resumed = train(config(base, tmp_path / "b", resume=True))
    for name in ("checkpoint/model.safetensors", f"lora/{LORA_WEIGHTS_FILE}", f"lora/{EXTRA_EMBEDDING_FILE}"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert [r["loss"] for r in resumed["steps"]] == [r["loss"] for r in uninterrupted["steps"]]
    assert resumed["evals"] == uninterrupted["evals"]


def test_bf16_keeps_the_frozen_base_in_bf16_and_trains_in_fp32(base, tmp_path):
    run = Run(config(base, tmp_path / "run", dtype="bf16", steps=2, eval_every=2, task="vsr"))
    dtypes = {p.dtype for p in run.model.parameters() if not p.requires_grad}
    assert dtypes == {torch.bfloat16}
    assert {p.dtype for p in run.model.parameters() if p.requires_grad} == {torch.float32}
    record = run.train()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in record["steps"])


def _fails(tmp_path, capsys, argv, message):
    """One clean `error:` line naming the problem, exit status 2, and no output folder."""
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "tiny-wan21", "--frames", "9", "--size", "16", "--threads", "1", "--no-progress",
              "--out", str(out), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "error: " in lines[-1] and message in lines[-1], err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["--task", "vsr", "--transformer", "/no/such/folder"], "--transformer: '/no/such/folder' is not a folder"),
    (["--task", "vsr", "--lora-rank", "0"], "argument --lora-rank"),
    (["--task", "vsr", "--timestep", "1000"], "argument --timestep: expected an integer in 1 .. 999"),
    (["--task", "vsr", "--lora-rank", "4"], "lora_rank: these configure the --transformer restorer"),
])
def test_bad_transformer_arguments_fail_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    import chopgrad.tools.cli as cli

    def no_model_may_load(name):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load_model", no_model_may_load)
    _fails(tmp_path, capsys, argv, message)


def test_a_folder_without_a_wan_transformer_fails(tmp_path, capsys):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    _fails(tmp_path, capsys, ["--task", "vsr", "--transformer", str(tmp_path / "other")],
           "holds a UNet2DModel, not a WanTransformer3DModel")
    (tmp_path / "empty").mkdir()
    _fails(tmp_path, capsys, ["--task", "vsr", "--transformer", str(tmp_path / "empty")], "has no config.json")


def test_a_transformer_whose_channels_do_not_fit_the_vae_fails_before_training(tmp_path, capsys, monkeypatch):
    wide = save_tiny_transformer(tmp_path / "wide", channels=16)
    monkeypatch.setattr(Run, "step", lambda self, batch: pytest.fail("a step ran"))
    _fails(tmp_path, capsys, ["--task", "vsr", "--transformer", wide],
           "takes 16 and returns 16 latent channels, but the VAE's latents have 4")


def test_a_size_the_patches_do_not_tile_fails_before_training(base, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Run, "step", lambda self, batch: pytest.fail("a step ran"))
    _fails(tmp_path, capsys, ["--task", "vsr", "--transformer", base, "--size", "24"],
           "--size: the transformer's patch size (1, 2, 2) needs latent sides that are multiples of 2")


def test_bad_prompt_embeds_and_lora_targets_fail(base, tmp_path, capsys, monkeypatch):
    save_file({"a": torch.zeros(3, TEXT_DIM + 1)}, str(tmp_path / "wrong.safetensors"))
    _fails(tmp_path, capsys, ["--task", "vsr", "--transformer", base, "--prompt-embeds",
                              str(tmp_path / "wrong.safetensors")], f"expected a float tensor (L, {TEXT_DIM})")
    monkeypatch.setattr(Run, "step", lambda self, batch: pytest.fail("a step ran"))
    _fails(tmp_path, capsys, ["--task", "vsr", "--transformer", base, "--lora-targets", "to_qq"],
           "--lora-targets: no module of the transformer is named 'to_qq'")
    _fails(tmp_path, capsys, ["--task", "vsr", "--transformer", base, "--lora-targets", "to_q", "attn1"],
           "--lora-targets: LoRA adapts Linear, Conv and Embedding layers, and 'attn1' (WanAttention) is not one")


def test_missing_peft_is_one_error_line(base, tmp_path, capsys, monkeypatch):
    import chopgrad.tools.cli as cli

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    monkeypatch.setattr(cli, "_load_model", lambda name: pytest.fail("the model was loaded"))
    _fails(tmp_path, capsys, ["--task", "vsr", "--transformer", base], "pip install peft")


def test_generator_and_transformer_are_exclusive(base, tmp_path, capsys):
    _fails(tmp_path, capsys, ["--task", "vsr", "--transformer", base, "--generator", "train_factories:dropout"],
           "--transformer and --generator each name the model to train")


def test_two_rank_gloo_step_equals_one_process_on_the_union_of_the_clips(base, tmp_path):
    from test_train_run import test_two_rank_gloo_step_equals_one_process_on_the_union_of_the_clips as check

    check(tmp_path, {"transformer": base, "lora_rank": 2})


def test_the_widened_patch_embedding_equals_one_wider_convolution():
    """Values and gradients against a single Conv3d over all channels whose weight is the two weights side by side."""
    torch.manual_seed(3)
    pretrained = torch.nn.Conv3d(4, 6, kernel_size=(1, 2, 2), stride=(1, 2, 2))
    widened = WidenedPatchEmbedding(pretrained, 3)
    assert float(widened.extra.weight.detach().abs().max()) == 0
    with torch.no_grad():
        widened.extra.weight.normal_()
    wide = torch.nn.Conv3d(7, 6, kernel_size=(1, 2, 2), stride=(1, 2, 2))
    with torch.no_grad():
        wide.weight.copy_(torch.cat([pretrained.weight, widened.extra.weight], dim=1))
        wide.bias.copy_(pretrained.bias)
    x = torch.randn(2, 7, 3, 4, 6, requires_grad=True)
    got = widened(x)
    want = wide(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    cotangent = torch.randn_like(want)
    got_x, got_w, got_extra, got_b = torch.autograd.grad(got, [x, pretrained.weight, widened.extra.weight,
                                                               pretrained.bias], cotangent)
    want_x, want_w, want_b = torch.autograd.grad(want, [x, wide.weight, wide.bias], cotangent)
    torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([got_w, got_extra], dim=1), want_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_b, want_b, rtol=1e-5, atol=1e-6)


def test_the_restorer_gradient_equals_the_rule_written_out(base, tmp_path):
    """The LoRA and extra-embedding gradients of a pixel loss through the restorer equal those of the one-step rule
    written out by hand on the transformer (normalise, predict the velocity, x0 = x_t - s v, un-normalise)."""
    run = Run(config(base, tmp_path / "run", task="inpaint"))
    restorer = run.model
    trainable = [p for p in restorer.parameters() if p.requires_grad]
    with torch.no_grad():  # away from the zero start, so every trainable weight has a gradient
        for p in trainable:
            p.add_(0.1 * torch.randn_like(p))
    # three distinct tokens, so the cross-attention keys matter (one token gets all the attention whatever its key)
    restorer.prompt_embeds = torch.randn(1, 3, TEXT_DIM)
    inputs = torch.randn(1, 5, 3, 2, 2)
    target = torch.rand(1, 3, 9, 16, 16) * 2 - 1

    import chopgrad

    got = torch.autograd.grad(chopgrad.pixel_loss(run.vae, restorer(inputs), target, d_trunc=None), trainable)
    mean = torch.tensor(run.vae.config.latents_mean).view(1, 4, 1, 1, 1)
    std = torch.tensor(run.vae.config.latents_std).view(1, 4, 1, 1, 1)
    noisy = (inputs[:, :4] - mean) / std
    velocity = restorer.transformer(torch.cat([noisy, inputs[:, 4:]], dim=1), torch.tensor([399]),
                                    restorer.prompt_embeds, return_dict=False)[0]
    latents = (noisy - 0.399 * velocity) * std + mean
    video = run.vae.decode(latents).sample.clamp(-1, 1)
    want = torch.autograd.grad(torch.nn.functional.mse_loss(video, target), trainable)
    assert all(float(g.abs().max()) > 0 for g in want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


def test_lora_targets_are_checked_before_the_transformer_loads(base, tmp_path, capsys, monkeypatch):
    from diffusers import WanTransformer3DModel

    def no_load(*args, **kwargs):
        raise AssertionError("the transformer was loaded")

    monkeypatch.setattr(WanTransformer3DModel, "from_pretrained", no_load)
    _fails(tmp_path, capsys, ["--task", "vsr", "--transformer", base, "--lora-targets", "to_qq"],
           "--lora-targets: no module of the transformer is named 'to_qq'")
    _fails(tmp_path, capsys, ["--task", "vsr", "--transformer", base, "--lora-targets", "attn1"],
           "'attn1' (WanAttention) is not one")
