"""`chopgrad bench`, `probe` and `train` on HunyuanVideo, HunyuanVideo 1.5, Mochi and EasyAnimate: the built-in
model names, local folders of these classes, and the frame counts and sizes each model decodes."""
from __future__ import annotations

import json
import math

import pytest
import torch

import chopgrad
from chopgrad.tools.bench.workloads import (FULL_RANDOM_MODELS, TINY_MODELS, check_model_source, latent_shape,
                                            load_model)
from chopgrad.tools.cli import main

ADAPTERS = {
    "AutoencoderKLWan": chopgrad.WanAdapter,
    "AutoencoderKLHunyuanVideo": chopgrad.HunyuanVideoAdapter,
    "AutoencoderKLHunyuanVideo15": chopgrad.HunyuanVideo15Adapter,
    "AutoencoderKLMochi": chopgrad.MochiAdapter,
    "AutoencoderKLMagvit": chopgrad.EasyAnimateAdapter,
}
#: the latents of 49 x 480 x 832 for each released architecture: latent channels, 1 + 4k or 1 + 6k frames, space /8
#: or /16
FULL_LATENTS_49x480x832 = {
    "wan21-random": (1, 16, 13, 60, 104),
    "hunyuanvideo-random": (1, 16, 13, 60, 104),
    "hunyuanvideo15-random": (1, 32, 13, 30, 52),
    "mochi-random": (1, 12, 9, 60, 104),
    "easyanimate-random": (1, 16, 13, 60, 104),
}
NEW_TINY = ["tiny-hunyuanvideo", "tiny-hunyuanvideo15", "tiny-mochi", "tiny-easyanimate"]


def test_every_full_architecture_has_a_name():
    assert set(FULL_LATENTS_49x480x832) == set(FULL_RANDOM_MODELS)
    assert set(NEW_TINY) | {"tiny-wan21"} == set(TINY_MODELS)


@pytest.mark.parametrize("name", sorted(FULL_RANDOM_MODELS))
def test_full_architecture_names_resolve_to_their_adapters(name):
    """Built on the meta device: the full architectures are for the GPU, and this allocates nothing."""
    vae = load_model(name, device="meta", dtype=torch.bfloat16)
    class_name = FULL_RANDOM_MODELS[name]
    assert type(vae).__name__ == class_name
    assert isinstance(chopgrad.wrap(vae), ADAPTERS[class_name])
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in vae.parameters())
    # diffusers' default config of the class, the released VAE's architecture
    with torch.device("meta"):
        default = type(vae)()
    assert dict(vae.config) == dict(default.config)
    assert latent_shape(vae, 49, 480, 832) == FULL_LATENTS_49x480x832[name]


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_tiny_names_resolve_to_their_adapters(name):
    vae = load_model(name)
    class_name = TINY_MODELS[name][0]
    assert type(vae).__name__ == class_name and isinstance(chopgrad.wrap(vae), ADAPTERS[class_name])
    assert sum(p.numel() for p in vae.parameters()) < 10**6
    assert not vae.training


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize("argv, message", [
    (["probe", "--model", "tiny-mochi", "--frames", "9", "--size", "8"],
     "--frames: this AutoencoderKLMochi cannot decode 9 frames; nearest valid counts: 7 and 13 (valid: 1 + 6k;"),
    (["bench", "--model", "tiny-hunyuanvideo", "--frames", "9", "10", "--sizes", "16"],
     "--frames: this AutoencoderKLHunyuanVideo cannot decode 10 frames; nearest valid counts: 9 and 13 (valid: "
     "1 + 4k;"),
    (["probe", "--model", "tiny-easyanimate", "--frames", "8", "--size", "16"],
     "cannot decode 8 frames; nearest valid counts: 5 and 9"),
    (["probe", "--model", "tiny-hunyuanvideo15", "--frames", "9", "--size", "18"],
     "--size: size 18 is not a positive multiple of the model's spatial factor 4; nearest valid: 16 and 20"),
    (["train", "--task", "vsr", "--model", "tiny-mochi", "--frames", "9", "--size", "16"],
     "cannot decode 9 frames; nearest valid counts: 7 and 13 (valid: 1 + 6k;"),
])
def test_frame_counts_and_sizes_follow_the_model(argv, message, tmp_path, capsys, no_work):
    line = _usage_error(capsys, [*argv, "--out", str(tmp_path / "out")])
    assert message in line, line
    assert not (tmp_path / "out").exists()


def test_bench_on_hunyuanvideo15(tmp_path, capsys):
    """9 frames are 3 decoder steps: d_trunc=2 is the exact gradient, d_trunc=1 a truncated one."""
    out = tmp_path / "out"
    assert main(["bench", "--model", "tiny-hunyuanvideo15", "--frames", "9", "--sizes", "16", "--repeats", "1",
                 "--threads", "1", "--no-progress", "--no-plots", "--baselines", "full", "--schedules", "sliding",
                 "--d-trunc", "1", "2", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["full backprop", "chopgrad sliding d=1", "chopgrad sliding d=2"]
    assert all(r["status"] == "ok" and r["peak_bytes"] > 0 and r["time_s"] > 0 for r in rows), rows
    assert all(r["loss"] == pytest.approx(rows[0]["loss"], rel=1e-5) and not r["detail"] for r in rows), rows
    assert rows[2]["rel_error"] < 1e-4 and rows[2]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert rows[1]["rel_error"] > 1e-3


def test_probe_on_hunyuanvideo_windows(tmp_path, capsys):
    """37 frames are 3 windows: the loss of a window reaches latent frames two steps back, so d_trunc=2 is exact
    and d_trunc=1 is not."""
    assert main(["probe", "--model", "tiny-hunyuanvideo", "--frames", "37", "--size", "16", "--max-d-trunc", "2",
                 "--threads", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "probe.json").read_text())
    assert data["num_steps"] == 3 and data["d_truncs"] == [0, 1, 2]
    assert data["latent_rel_error"][2] < 1e-5 and data["param_rel_error"][2] < 1e-5
    assert data["latent_rel_error"][1] > 1e-2
    assert "recommended d_trunc" in capsys.readouterr().out


def test_train_on_hunyuanvideo15(tmp_path, capsys):
    """Two steps on a batch of two (diffusers' HunyuanVideo 1.5 needs slicing for that, see load_model)."""
    assert main(["train", "--task", "vsr", "--model", "tiny-hunyuanvideo15", "--frames", "9", "--size", "16",
                 "--batch", "2", "--steps", "2", "--eval-every", "2", "--eval-clips", "1", "--width", "8",
                 "--blocks", "1", "--threads", "1", "--no-progress", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert [row["step"] for row in record["steps"]] == [1, 2]
    assert all(math.isfinite(row["loss"]) for row in record["steps"])
    assert record["summary"]["steps_done"] == 2
    assert (tmp_path / "checkpoint" / "model.safetensors").exists()


@pytest.mark.parametrize("name", NEW_TINY)
def test_local_folder_loads_the_class_its_config_names(name, tmp_path):
    original = load_model(name)
    original.save_pretrained(str(tmp_path))
    check_model_source(str(tmp_path))
    loaded = load_model(str(tmp_path))
    assert type(loaded) is type(original)
    assert isinstance(chopgrad.wrap(loaded), ADAPTERS[type(original).__name__])
    reference = original.state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in loaded.state_dict().items())


def test_probe_on_a_mochi_folder(tmp_path, capsys):
    """A folder's weights count as trained: its latents are the encoded clip (Mochi's encoder)."""
    load_model("tiny-mochi").save_pretrained(str(tmp_path / "vae"))
    assert main(["probe", "--model", str(tmp_path / "vae"), "--frames", "13", "--size", "8", "--max-d-trunc", "0",
                 "--threads", "1", "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "probe.json").read_text())["num_steps"] == 3


def test_folder_of_an_unsupported_vae_names_the_reason(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLLTXVideo",
                                                      "decoder_causal": False}))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"not read")
    with pytest.raises(ValueError) as exc:
        check_model_source(str(tmp_path))
    message = str(exc.value)
    assert "is for class AutoencoderKLLTXVideo (`_class_name`), which chopgrad has no adapter for" in message
    assert "temporal convolutions pad symmetrically" in message
    assert "supported: AutoencoderKLWan, AutoencoderKLCogVideoX, AutoencoderKLHunyuanVideo" in message
