"""diffusers' video VAEs without an adapter: `chopgrad.wrap` raises a TypeError that says why, and the property
each reason states holds on a tiny random config."""
from __future__ import annotations

import pytest
import torch

import chopgrad


def _on_meta(class_name: str, **config):
    """The class with diffusers' default config (or `config`), without memory: only its type and config matter."""
    import diffusers

    cls = getattr(diffusers, class_name)  # imports its module outside the meta device: module-level tensors stay real
    with torch.device("meta"):
        return cls(**config)


@pytest.mark.parametrize("class_name, config, reason", [
    ("AutoencoderKLLTXVideo", {}, "its decoder's temporal convolutions pad symmetrically (decoder_causal=False"),
    ("AutoencoderKLLTX2Video", {"decoder_causal": False},
     "its decoder's temporal convolutions pad symmetrically (decoder_causal=False"),
    ("AutoencoderKLLTX2Video", {},
     "this instance has decoder_causal=True, which the released configurations do not use"),
    ("AutoencoderKLAllegro", {}, "chopgrad.adapters.windowed.WindowedAdapter could serve it"),
    ("AutoencoderKLMiniMaxH3", {}, "non-causal ViT"),
    ("AutoencoderKLCosmos", {}, "its decoder is causal"),
    ("AutoencoderKLKVAEVideo", {}, "steps through segments"),
    ("AutoencoderVidTok", {}, "interpolate trilinearly"),
    ("AutoencoderKLTemporalDecoder", {}, "temporal convolutions padded on both sides"),
])
def test_wrap_names_the_reason(class_name, config, reason):
    vae = _on_meta(class_name, **config)
    with pytest.raises(TypeError) as exc:
        chopgrad.wrap(vae)
    assert f"{class_name} is not supported: " in str(exc.value) and reason in str(exc.value), str(exc.value)


def test_pixel_loss_raises_the_reason_before_any_work():
    vae = _on_meta("AutoencoderKLLTXVideo")
    latents, target = torch.zeros(1, 128, 3, 2, 2), torch.zeros(1, 3, 17, 64, 64)
    with pytest.raises(TypeError, match="pad symmetrically"):
        chopgrad.pixel_loss(vae, latents, target)
    with pytest.raises(TypeError, match="pad symmetrically"):
        chopgrad.decode(vae, latents)


def test_a_subclass_gets_the_reason_of_its_diffusers_class():
    from diffusers import AutoencoderKLLTXVideo

    class MyLTX(AutoencoderKLLTXVideo):
        pass

    with torch.device("meta"):
        vae = MyLTX()
    with pytest.raises(TypeError, match="MyLTX is not supported: its decoder's temporal convolutions pad"):
        chopgrad.wrap(vae)


def test_other_classes_get_the_list_of_supported_ones():
    with pytest.raises(TypeError) as exc:
        chopgrad.wrap(_on_meta("AutoencoderKL"))
    message = str(exc.value)
    assert "unsupported model class AutoencoderKL;" in message
    assert "AutoencoderKLHunyuanVideo15 (HunyuanVideo 1.5)" in message and "FunctionalAdapter" in message


def _frames_changed_by_last_latent(vae, latents, decode):
    """Decodes `latents` and again with the last latent frame changed; returns (frames of the decode of all
    but the last latent frame, whether each of those frames changed)."""
    changed = latents.clone()
    changed[:, :, -1] += 1.0
    with torch.no_grad():
        prefix_frames = decode(latents[:, :, :-1]).shape[2]
        a, b = decode(latents)[:, :, :prefix_frames], decode(changed)[:, :, :prefix_frames]
    return prefix_frames, (a - b).abs().flatten(3).amax(dim=(0, 1, 3)) > 1e-12


def test_ltx_decoder_looks_ahead():
    """decoder_causal=False: the last latent frame changes frames that belong to earlier latent frames."""
    from diffusers import AutoencoderKLLTXVideo

    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                decoder_layers_per_block=(1, 1, 1, 1, 1), patch_size=1).double().eval()
    latents = torch.randn(1, 8, 4, 2, 2, dtype=torch.float64)
    prefix_frames, changed = _frames_changed_by_last_latent(vae, latents, lambda z: vae.decode(z).sample)
    assert changed.any() and prefix_frames > 1


def test_cosmos_decoder_is_causal():
    """What makes the causal-conv chunker applicable: no frame of the first latent frames depends on a later one."""
    from diffusers import AutoencoderKLCosmos

    torch.manual_seed(0)
    vae = AutoencoderKLCosmos(latent_channels=4, encoder_block_out_channels=(8, 8, 8, 8),
                              decode_block_out_channels=(8, 8, 8, 8), attention_resolutions=(8,), resolution=64,
                              num_layers=1).double().eval()
    latents = torch.randn(1, 4, 4, 2, 2, dtype=torch.float64)
    prefix_frames, changed = _frames_changed_by_last_latent(vae, latents, lambda z: vae.decode(z).sample)
    assert prefix_frames == 17 and not changed.any()


def test_svd_temporal_decoder_looks_ahead():
    from diffusers import AutoencoderKLTemporalDecoder

    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder(block_out_channels=(32,), latent_channels=4).double().eval()

    def decode(z):  # per-frame latents (B * F, C, h, w) and the frame count
        return vae.decode(z[0].transpose(0, 1), num_frames=z.shape[2]).sample.transpose(0, 1).unsqueeze(0)

    latents = torch.randn(1, 4, 6, 4, 4, dtype=torch.float64)
    prefix_frames, changed = _frames_changed_by_last_latent(vae, latents, decode)
    assert prefix_frames == 5 and changed[-1]
