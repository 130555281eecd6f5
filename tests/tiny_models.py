"""Tiny configs of the real diffusers VAE classes (random weights, fp32) and
independent oracles that drive the models' own decoders directly."""
from __future__ import annotations

import torch


def tiny_wan21(seed: int = 0):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def tiny_wan22(seed: int = 0):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                            temperal_downsample=[False, True, True], is_residual=True, patch_size=2,
                            in_channels=12, out_channels=12, scale_factor_spatial=16).eval()


def tiny_cogvideox(seed: int = 0):
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(seed)
    return AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 8, 16), latent_channels=4,
        layers_per_block=1, norm_num_groups=4, temporal_compression_ratio=4).eval()


def tiny_mochi(seed: int = 0):
    """Mochi's temporal layout (time x6 as 1, 2, 3) with space x2 only (in the first up block), at width 32:
    the least its GroupNorm's 32 groups allow."""
    from diffusers import AutoencoderKLMochi

    torch.manual_seed(seed)
    return AutoencoderKLMochi(encoder_block_out_channels=(32,) * 4, decoder_block_out_channels=(32,) * 4,
                              latent_channels=4, layers_per_block=(1,) * 5, spatial_expansions=(1, 1, 2),
                              add_attention_block=(False,) * 5).eval()


def tiny_easyanimate(seed: int = 0, spatial_group_norm: bool = True):
    """EasyAnimate's layout (a spatial up block, then temporal ones: 4x time, 8x space) at width 8-16.

    `spatial_group_norm=False` switches the temporal upsampling from nearest to trilinear.
    """
    from diffusers import AutoencoderKLMagvit

    torch.manual_seed(seed)
    return AutoencoderKLMagvit(in_channels=3, latent_channels=4, out_channels=3, block_out_channels=(8, 8, 8, 16),
                               layers_per_block=1, norm_num_groups=4,
                               spatial_group_norm=spatial_group_norm).eval()


def tiny_hunyuan_video(seed: int = 0):
    """HunyuanVideo's layout (time x4 in the first two up blocks, space x4 here) at width 8-16, with its
    mid-block attention; framewise decoding is on, as in diffusers' default."""
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(seed)
    return AutoencoderKLHunyuanVideo(
        latent_channels=4, block_out_channels=(8, 8, 16), layers_per_block=1, norm_num_groups=4,
        spatial_compression_ratio=4, down_block_types=("HunyuanVideoDownBlock3D",) * 3,
        up_block_types=("HunyuanVideoUpBlock3D",) * 3).eval()


def tiny_hunyuan_video15(seed: int = 0):
    """HunyuanVideo 1.5's layout (two up blocks with x2 time and space, then one without; the causal
    mid-block attention) at width 8-16, space x4."""
    from diffusers import AutoencoderKLHunyuanVideo15

    torch.manual_seed(seed)
    return AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
                                       spatial_compression_ratio=4, temporal_compression_ratio=4).eval()


MODELS = {"wan21": tiny_wan21, "wan22": tiny_wan22, "cogvideox": tiny_cogvideox}


def wan21_case(latent_frames: int, seed: int):
    """(tiny Wan 2.1 VAE, latents (1, 4, latent_frames, 4, 5), its own decoded video, a random target in [-1, 1])."""
    vae = tiny_wan21()
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, latent_frames, 4, 5, generator=g)
    with torch.no_grad():
        video = vae.decode(latents).sample
    target = torch.rand(video.shape, generator=g) * 2 - 1
    return vae, latents, video, target


class NativeDecoder:
    """Runs a model's own decoder step by step the way its `_decode` does, with
    the model's own mutable cache objects (no chopgrad code involved)."""

    def __init__(self, vae):
        from diffusers import AutoencoderKLWan

        self.vae = vae
        self.is_wan = isinstance(vae, AutoencoderKLWan)

    def groups(self, num_latent_frames: int) -> list[tuple[int, int]]:
        t = num_latent_frames
        if self.is_wan:
            return [(i, i + 1) for i in range(t)]
        n = self.vae.num_latent_frames_batch_size
        rem = t % n
        bounds = [0] + [min(n * (i + 1) + rem, t) for i in range(max(t // n, 1))]
        return list(zip(bounds[:-1], bounds[1:]))

    def fresh_cache(self):
        return [None] * self.vae._cached_conv_counts["decoder"] if self.is_wan else None

    def step(self, g: int, z_group: torch.Tensor, cache):
        """Returns (clamped-as-the-model-does frames, next cache)."""
        if self.is_wan:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = self.vae.decoder(self.vae.post_quant_conv(z_group), feat_cache=cache, feat_idx=[0],
                                   first_chunk=(g == 0))
            if self.vae.config.patch_size is not None:
                out = unpatchify(out, patch_size=self.vae.config.patch_size)
            return out.clamp(-1.0, 1.0), cache
        z = self.vae.post_quant_conv(z_group) if self.vae.post_quant_conv is not None else z_group
        return self.vae.decoder(z, conv_cache=cache)

    @staticmethod
    def detach_cache(cache):
        if cache is None:
            return None
        if isinstance(cache, list):
            return [c.detach() if isinstance(c, torch.Tensor) else c for c in cache]
        return {k: NativeDecoder.detach_cache(v) if isinstance(v, dict) else
                (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in cache.items()}


def truncated_oracle(vae, latents, target, *, d_trunc, schedule, supervised=None, loss_fn=None):
    """The truncated gradient of docs/design.md section 2, one backward per supervised step.

    For each supervised step g the state is recomputed from scratch without
    grad up to the truncation point (g - D for "sliding", the chunk start for
    "chunked"), detached, and the steps from there to g are run with grad;
    only l_g is backpropagated. Returns (loss value, grad latents, {name: grad}).
    """
    native = NativeDecoder(vae)
    groups = native.groups(latents.shape[2])
    frame_counts = []
    with torch.no_grad():
        cache = native.fresh_cache()
        for g, (a, b) in enumerate(groups):
            frames, cache = native.step(g, latents[:, :, a:b], cache)
            frame_counts.append(frames.shape[2])
    offsets = [sum(frame_counts[:g]) for g in range(len(groups) + 1)]
    supervised = list(range(len(groups))) if supervised is None else sorted(supervised)
    loss_fn = loss_fn or (lambda p, t: (p - t).square().sum())
    b, c, _, h, w = target.shape
    denom = b * c * h * w * sum(frame_counts[g] for g in supervised)
    params = [p for p in vae.parameters() if p.requires_grad]
    names = [n for n, p in vae.named_parameters() if p.requires_grad]
    grad_z = torch.zeros_like(latents)
    grad_p = [torch.zeros_like(p) for p in params]
    total = 0.0
    for g in supervised:
        if d_trunc is None:
            start = 0
        elif schedule == "sliding":
            start = max(0, g - d_trunc)
        else:
            start = (g // (d_trunc + 1)) * (d_trunc + 1)
        cache = native.fresh_cache()
        with torch.no_grad():
            for k in range(start):
                _, cache = native.step(k, latents[:, :, groups[k][0]:groups[k][1]], cache)
        cache = native.detach_cache(cache)
        z = latents.detach().clone().requires_grad_(True)
        for k in range(start, g + 1):
            frames, cache = native.step(k, z[:, :, groups[k][0]:groups[k][1]], cache)
        l_g = loss_fn(frames, target[:, :, offsets[g]:offsets[g + 1]]) / denom
        grads = torch.autograd.grad(l_g, [z] + params, allow_unused=True)
        grad_z += grads[0]
        for acc, gr in zip(grad_p, grads[1:]):
            if gr is not None:
                acc += gr
        total += float(l_g.detach())
    return total, grad_z, dict(zip(names, grad_p))
