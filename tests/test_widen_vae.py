"""scripts/widen_vae.py: a wider Wan VAE that starts out computing what the trained one did."""
from __future__ import annotations

import json
import os

import pytest
import torch

from script_loader import load_script
from test_default_model import PSNR_CLIP0
from tiny_models import tiny_wan21


def _trained_like(seed: int = 0):
    """A tiny Wan 2.1 VAE whose gains and biases are not at their init values
    (a fresh model's all-ones gains and zero biases would hide mapping errors)."""
    vae = tiny_wan21(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith(".gamma"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return vae


def _widened(vae, base_dim: int, noise: float, z_dim: int | None = None):
    from diffusers import AutoencoderKLWan

    widen = load_script("widen_vae")
    config = dict(vae.config, base_dim=base_dim, z_dim=z_dim or vae.config.z_dim)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    wide = AutoencoderKLWan(**config).eval()
    shapes = {k: v.shape for k, v in wide.state_dict().items()}
    wide.load_state_dict(widen.widen_state_dict(vae.state_dict(), shapes, noise=noise, seed=3), strict=True)
    return wide


def _video(frames=9, size=16):
    return torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(7)) * 2 - 1


@pytest.mark.parametrize("base_dim", [12, 16])
def test_zero_noise_widening_computes_the_same_function(base_dim):
    # With silent new channels the only changes are the compensated RMS-norm
    # and attention scales; a misplaced q/k/v or time_conv block would show here.
    vae = _trained_like()
    wide = _widened(vae, base_dim, noise=0.0)
    assert wide.decoder.conv_in.weight.shape[0] == vae.decoder.conv_in.weight.shape[0] * base_dim // 8
    x = _video()
    with torch.no_grad():
        z, z_wide = vae.encode(x).latent_dist.mode(), wide.encode(x).latent_dist.mode()
        torch.testing.assert_close(z_wide, z, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(wide.decode(z).sample, vae.decode(z).sample, rtol=1e-4, atol=1e-5)
    # and the same gradient to the pixels, through encoder and decoder
    grads = []
    for model in (vae, wide):
        x_in = x.clone().requires_grad_(True)
        rec = model.decode(model.encode(x_in).latent_dist.mode()).sample
        ((rec - x) ** 2).mean().backward()
        grads.append(x_in.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("base_dim", [8, 12])
def test_more_latent_channels_keep_the_old_ones_and_the_decoder_ignores_the_new(base_dim):
    vae = _trained_like()
    wide = _widened(vae, base_dim, noise=0.0 if base_dim > 8 else 0.1, z_dim=7)
    x = _video()
    with torch.no_grad():
        z, z_wide = vae.encode(x).latent_dist, wide.encode(x).latent_dist
        assert z_wide.mean.shape[1] == 7
        torch.testing.assert_close(z_wide.mean[:, :4], z.mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(z_wide.logvar[:, :4], z.logvar, rtol=1e-4, atol=1e-5)
        if base_dim == 8:  # noise > 0: the new channels carry something from the start
            assert z_wide.mean[:, 4:].abs().max() > 0
        # whatever is in the new channels, the widened decoder does not read them yet
        ref = vae.decode(z.mean).sample
        anything_new = torch.cat([z.mean, torch.randn_like(z_wide.mean[:, 4:])], 1)
        torch.testing.assert_close(wide.decode(anything_new).sample, ref, rtol=1e-4, atol=1e-5)


def test_noisy_widening_stays_close_and_every_new_weight_learns():
    vae = _trained_like()
    wide = _widened(vae, 12, noise=0.1)
    x = _video()
    with torch.no_grad():
        ref = vae.decode(vae.encode(x).latent_dist.mode()).sample
    out = wide.decode(wide.encode(x).latent_dist.mode()).sample
    assert (out - ref).norm() / ref.norm() < 0.02
    ((out - x) ** 2).mean().backward()
    dead = [n for n, p in wide.named_parameters() if p.grad is None or not p.grad.any()]
    assert not dead, dead
    # the columns of the output conv that read the new channels start at zero but receive a gradient
    old_cols = vae.decoder.conv_out.weight.shape[1]
    assert not wide.decoder.conv_out.weight[:, old_cols:].any()
    assert wide.decoder.conv_out.weight.grad[:, old_cols:].abs().sum() > 0


def test_widen_writes_a_loadable_model_folder(tmp_path):
    from safetensors.torch import save_file

    widen = load_script("widen_vae")
    vae = _trained_like()
    src = tmp_path / "src"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(src / "default_vae.safetensors"))
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    (src / "default_vae_config.json").write_text(json.dumps(config))
    assert widen.main([str(src), str(tmp_path / "dst"), "--base-dim", "12", "--z-dim", "6", "--noise", "0"]) == 0
    from diffusers import AutoencoderKLWan
    from safetensors.torch import load_file

    new_config = json.loads((tmp_path / "dst" / "default_vae_config.json").read_text())
    assert new_config["base_dim"] == 12 and new_config["z_dim"] == 6
    assert new_config["latents_mean"] == list(config["latents_mean"]) + [0.0, 0.0]
    assert new_config["latents_std"] == list(config["latents_std"]) + [1.0, 1.0]
    wide = AutoencoderKLWan(**new_config)
    wide.load_state_dict(load_file(str(tmp_path / "dst" / "default_vae.safetensors")), strict=True)


def test_widen_rejects_a_narrower_base_dim_and_mismatched_models(tmp_path):
    widen = load_script("widen_vae")
    vae = _trained_like()
    sd = vae.state_dict()
    shapes = {k: v.shape for k, v in sd.items()}
    with pytest.raises(ValueError, match="parameter names differ"):
        widen.widen_state_dict(sd, {k: s for k, s in shapes.items() if "quant_conv" not in k})
    bad = dict(shapes, **{"decoder.conv_in.weight": torch.Size([24, 4, 3, 5, 3])})
    with pytest.raises(ValueError, match="only channel dimensions may grow"):
        widen.widen_state_dict(sd, bad)
    with pytest.raises(ValueError, match="z-dim must be at least"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "default_vae.safetensors"))
        config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
        (tmp_path / "default_vae_config.json").write_text(json.dumps(config))
        widen.widen(str(tmp_path), str(tmp_path / "out"), z_dim=2)
    with pytest.raises(ValueError, match="base-dim must be at least"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "default_vae.safetensors"))
        config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
        (tmp_path / "default_vae_config.json").write_text(json.dumps(config))
        widen.widen(str(tmp_path), str(tmp_path / "out"), base_dim=4)


def test_training_continues_from_a_widened_default_model(tmp_path):
    # the path benchmarks/gpu_session.sh takes with TRAIN_BASE_DIM: widen, then --init-from + --base-dim
    from chopgrad.models import DEFAULT_VAE_CONFIG_PATH

    widen = load_script("widen_vae")
    widen.main([os.path.dirname(DEFAULT_VAE_CONFIG_PATH), str(tmp_path / "wide"), "--base-dim", "20"])
    train = load_script("train_default_vae")
    train.main(["--init-from", str(tmp_path / "wide"), "--base-dim", "20", "--steps", "1", "--batch", "1",
                "--frames", "9", "--crop", "32", "--phase1-frac", "1.0", "--warmup", "1", "--lr", "1e-5",
                "--eval-clips", "1", "--threads", "1", "--out", str(tmp_path / "trained")])
    log = json.loads((tmp_path / "trained" / "default_vae_training.json").read_text())
    assert log["config"]["base_dim"] == 20
    assert abs(log["psnr_17x64_mean"] - PSNR_CLIP0) < 0.3  # held-out clip 0: the narrow model's PSNR, kept
