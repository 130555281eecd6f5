"""Spatial tiling of a decoder step's backward.

Exact mode is checked against untiled `pixel_loss` (itself checked against the model's own decode
elsewhere); truncated mode against an independent oracle that decodes each tile's crop with the model's own
`decode` and backpropagates the full-frame loss gradient of the tile's interior through it (explicit detach).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import chopgrad
import chopgrad.adapters.tiling as tiling
from tiny_models import tiny_cogvideox, tiny_wan21, tiny_wan22

# odd latent sizes: with tiles of 2 x 3 latent pixels (the TILE of each case) every stage has 2 x 2 tiles,
# the last of them partial
CASES = {"wan21": (tiny_wan21, (1, 4, 3, 3, 5), 8), "wan22": (tiny_wan22, (1, 4, 3, 3, 5), 16)}


def _tile(stride):
    return (2 * stride, 3 * stride)


def _case(name, seed=0):
    make, shape, stride = CASES[name]
    vae = make()
    vae.requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(shape, generator=g)
    with torch.no_grad():
        target = torch.rand(vae.decode(latents).sample.shape, generator=g) * 2 - 1
    return vae, latents, target, stride


def _run(vae, latents, target, **kwargs):
    vae.zero_grad(set_to_none=True)
    z = latents.clone().requires_grad_(True)
    value = chopgrad.pixel_loss(vae, z, target, **kwargs)
    value.backward()
    return value.detach(), z.grad, {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _assert_same(got, ref, tol):
    value, gz, gp = got
    ref_value, ref_gz, ref_gp = ref
    assert float(value) == pytest.approx(float(ref_value), rel=1e-6)
    assert _rel(gz, ref_gz) <= tol
    assert set(gp) == set(ref_gp)
    worst = max(gp, key=lambda n: _rel(gp[n], ref_gp[n]) if ref_gp[n].norm() > 0 else 0.0)
    assert ref_gp[worst].norm() == 0 or _rel(gp[worst], ref_gp[worst]) <= tol, worst


@pytest.fixture
def finest_tiles(monkeypatch):
    """Every stage tiled at the requested size (no minimum interior), so low-resolution stages are tiled too."""
    monkeypatch.setattr(tiling, "MIN_CORE_HALOS", 0)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("schedule", ["sliding", "chunked"])
@pytest.mark.parametrize("d_trunc", [0, 1, 2])
def test_exact_tiles_give_the_untiled_gradient(name, schedule, d_trunc, finest_tiles):
    vae, latents, target, stride = _case(name)
    ref = _run(vae, latents, target, d_trunc=d_trunc, schedule=schedule)
    got = _run(vae, latents, target, d_trunc=d_trunc, schedule=schedule, tile=_tile(stride))
    _assert_same(got, ref, 1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_exact_tiles_at_default_minimum_interior_unfused_and_untruncated(name):
    vae, latents, target, stride = _case(name, seed=1)
    for kwargs in ({"lean": False}, {"d_trunc": None}):
        ref = _run(vae, latents, target, **kwargs)
        _assert_same(_run(vae, latents, target, tile=_tile(stride), **kwargs), ref, 1e-5)


def test_a_tile_larger_than_the_frame_is_one_tile():
    vae, latents, target, _ = _case("wan21")
    ref = _run(vae, latents, target)
    _assert_same(_run(vae, latents, target, tile=1024), ref, 1e-5)


def test_exact_tiles_with_masks_ssim_and_a_callable_loss(finest_tiles):
    vae, latents, target, stride = _case("wan21", seed=2)
    mask = torch.rand(target.shape[0], 1, *target.shape[2:], generator=torch.Generator().manual_seed(3))
    for kwargs in ({"mask": mask, "loss": "l1"}, {"loss": {"mse": 1.0, "ssim": 0.5}},
                   {"loss": lambda p, t: F.smooth_l1_loss(p, t, reduction="sum"), "reduction": "sum"}):
        ref = _run(vae, latents, target, d_trunc=0, **kwargs)
        _assert_same(_run(vae, latents, target, d_trunc=0, tile=_tile(stride), **kwargs), ref, 1e-5)


def test_tiling_leaves_values_and_no_grad_evaluation_unchanged():
    vae, latents, target, stride = _case("wan22")
    with torch.no_grad():
        ref = chopgrad.pixel_loss(vae, latents, target)
        got = chopgrad.pixel_loss(vae, latents, target, tile=stride)
        trunc = chopgrad.pixel_loss(vae, latents, target, tile=stride, tile_grad="truncated")
    assert float(got) == float(ref) == float(trunc)


# ----------------------------------------------------------------------------- truncated mode

def _truncated_oracle(vae, latents, target, tile: int, halo: int, stride: int):
    """One latent frame (one decoder step, no state): the full-frame MSE gradient of each tile's interior,
    backpropagated through the model's own decode of the tile's crop only."""
    z = latents.clone().requires_grad_(True)
    with torch.no_grad():
        frames = vae.decode(z).sample
    cotangent = 2 * (frames - target) / target.numel()
    cotangent = cotangent * ((frames > -1) & (frames < 1))  # the model's clamp
    surrogate = 0.0
    core, h = tile // stride, halo // stride
    for rows in tiling.spans(z.shape[-2], core, h):
        for cols in tiling.spans(z.shape[-1], core, h):
            raw = vae.decoder(vae.post_quant_conv(z[..., rows.crop, cols.crop]), feat_cache=None, first_chunk=True)
            if vae.config.patch_size:
                from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

                raw = unpatchify(raw, patch_size=vae.config.patch_size)
            inner = raw[..., rows.core_in_crop(stride), cols.core_in_crop(stride)]
            cot = cotangent[..., tiling.scaled(rows.core, stride), tiling.scaled(cols.core, stride)]
            surrogate = surrogate + (inner * cot.detach()).sum()
    surrogate.backward()
    return z.grad


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("halo_strides", [0, 1])
def test_truncated_tiles_equal_the_crop_oracle(name, halo_strides):
    vae, latents, target, stride = _case(name, seed=4)
    latents = latents[:, :, :1]
    with torch.no_grad():
        target = target[:, :, :1]
    vae.requires_grad_(False)
    value, gz, _ = _run(vae, latents, target, tile=stride * 2, tile_grad="truncated", tile_halo=halo_strides * stride,
                        d_trunc=None)
    with torch.no_grad():
        ref_value = F.mse_loss(vae.decode(latents).sample, target)
    assert float(value) == pytest.approx(float(ref_value), rel=1e-6)
    oracle = _truncated_oracle(vae, latents, target, stride * 2, halo_strides * stride, stride)
    assert _rel(gz, oracle) <= 1e-5
    exact = _run(vae, latents, target, d_trunc=None)[1]
    assert _rel(gz, exact) > 1e-3  # a halo smaller than the receptive field truncates


@pytest.mark.parametrize("make,shape", [(tiny_wan21, (1, 4, 3, 5, 7)), (tiny_cogvideox, (1, 4, 3, 4, 6))],
                         ids=["wan21", "cogvideox"])
@pytest.mark.parametrize("schedule", ["sliding", "chunked"])
def test_truncated_tiles_with_a_halo_covering_the_frame_are_exact(make, shape, schedule):
    """Every crop is then the whole frame, so each tile's interior gets its exact gradient, state included."""
    vae = make()
    vae.requires_grad_(True)
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(shape, generator=g)
    with torch.no_grad():
        target = torch.rand(vae.decode(latents).sample.shape, generator=g) * 2 - 1
    stride = target.shape[-1] // shape[-1]
    ref = _run(vae, latents, target, schedule=schedule)
    got = _run(vae, latents, target, schedule=schedule, tile=_tile(stride), tile_grad="truncated",
               tile_halo=64 * stride)
    _assert_same(got, ref, 1e-5)


# ----------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("kwargs,message", [
    ({"tile": 12}, "tile must be a positive multiple of the decoder's spatial stride (8"),
    ({"tile": 0}, "tile must be a positive multiple"),
    ({"tile": (8, 8, 8)}, "tile must be an int or an (h, w) pair"),
    ({"tile": True}, "must be an integer, got the bool"),
    ({"tile": 8.0}, "tile (an int or an (h, w) pair of ints, in decoded pixels) must be an integer"),
    ({"tile": 8, "tile_grad": "approx"}, "tile_grad must be one of ('exact', 'truncated')"),
    ({"tile_halo": 8}, "tile_halo is given but tile is None"),
    ({"tile": 8, "tile_halo": 8}, "tile_halo only applies to tile_grad='truncated'"),
    ({"tile": 8, "tile_grad": "truncated", "tile_halo": 4}, "tile_halo must be a non-negative multiple"),
])
def test_bad_tiling_arguments_are_named_before_any_work(kwargs, message):
    vae, latents, target, _ = _case("wan21")
    z = latents.clone().requires_grad_(True)
    with pytest.raises((ValueError, TypeError)) as info:
        chopgrad.pixel_loss(vae, z, target, **kwargs)
    assert message in str(info.value)
    assert z.grad is None


def test_exact_tiles_are_refused_where_they_would_not_be_exact():
    vae = tiny_cogvideox()
    latents = torch.randn(1, 4, 3, 4, 6)
    with torch.no_grad():
        target = vae.decode(latents).sample
    with pytest.raises(ValueError, match="AutoencoderKLCogVideoX is not one .*GroupNorm.*tile_grad='truncated'"):
        chopgrad.pixel_loss(vae, latents, target, tile=8)

    wan, latents, target, _ = _case("wan21")
    wan.train()
    wan.decoder.up_blocks[0].resnets[0].dropout.p = 0.1
    with pytest.raises(ValueError, match="active dropout .*up_blocks.0.resnets.0.dropout"):
        chopgrad.pixel_loss(wan, latents, target, tile=8, tile_grad="truncated")
    wan.eval()
    handle = wan.decoder.register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match="hooks on the decoder module itself"):
        chopgrad.pixel_loss(wan, latents, target, tile=8)
    handle.remove()
    assert torch.isfinite(chopgrad.pixel_loss(wan, latents, target, tile=8))  # still usable


def test_spans_cover_the_axis_once_with_clipped_halos():
    out = tiling.spans(10, 4, 3)
    assert [(s.core.start, s.core.stop, s.crop.start, s.crop.stop) for s in out] == [
        (0, 4, 0, 7), (4, 8, 1, 10), (8, 10, 5, 10)]
    assert out[1].core_in_crop(2) == slice(6, 14)
