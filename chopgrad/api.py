"""The public API: `pixel_loss` (truncated backprop through the decoder) and `decode`."""
from __future__ import annotations

import operator
from contextlib import nullcontext
from typing import Callable, Iterable, Optional

import torch

from .adapters import DecodePlan, DecoderAdapter, wrap
from .adapters.base import layerwise_cast_trainable_parameters
from .adapters.tiling import TILE_GRADS, supports_exact_tiling, tiled
from .adapters import wan_patch
from .adapters.wan_patch import PatchReport, lean_decoder
from .decoder_steps import ReplayedRandomness, build_engine
from .differentiable_decode import DecodeFunction, DecodeRun, decode_without_graph
from .frames import FrameInput, FrameSource, optional_source
from .losses import LossSpec, resolve_loss
from .video_loss import VideoLoss

SCHEDULES = ("sliding", "chunked", "sliding_recompute")
REDUCTIONS = ("mean", "sum")


def _as_index(value, what: str) -> int:
    """An int from anything integer-like (int, numpy integer, one-element integer tensor), never a bool."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{what} must be an integer, got the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer (int, numpy integer or integer tensor), "
                        f"got {type(value).__name__} {value!r}") from None


def _check_d_trunc(d_trunc) -> int:
    """The engine's truncation distance: -1 for none."""
    if d_trunc is None:
        return -1
    d = _as_index(d_trunc, "d_trunc (a non-negative int, or None for no truncation)")
    if d < 0:
        raise ValueError(f"d_trunc must be >= 0 or None (no truncation), got {d}")
    return d


def _supervised_steps(groups: Optional[Iterable[int]], num_steps: int) -> list[bool]:
    if groups is None:
        return [True] * num_steps
    if isinstance(groups, torch.Tensor) and groups.dim() != 1:
        raise TypeError(f"groups must be a 1-D sequence of decoder step indices, got a tensor of shape "
                        f"{tuple(groups.shape)}")
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Iterable):
        raise TypeError(f"groups must be an iterable of decoder step indices or None, got {type(groups).__name__}")
    chosen = [_as_index(g, f"groups: every entry (a decoder step index in [0, {num_steps}))") for g in groups]
    if not chosen:
        raise ValueError("groups must name at least one decoder step (or be None for all)")
    for g in chosen:
        if not 0 <= g < num_steps:
            raise ValueError(f"groups: every entry must be a decoder step index in [0, {num_steps}), got {g}")
    mask = [False] * num_steps
    for g in chosen:
        mask[g] = True
    return mask


def _check_tile_size(value, what: str, stride: int, *, allow_zero: bool = False) -> tuple[int, int]:
    pair = value if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2:
        raise ValueError(f"{what} must be an int or an (h, w) pair of ints, got {value!r}")
    out = tuple(_as_index(v, f"{what} (an int or an (h, w) pair of ints, in decoded pixels)") for v in pair)
    lowest = 0 if allow_zero else stride
    for v in out:
        if v < lowest or v % stride:
            kind = "a non-negative" if allow_zero else "a positive"
            raise ValueError(f"{what} must be {kind} multiple of the decoder's spatial stride ({stride} decoded "
                             f"pixels per latent pixel), got {value!r}")
    return out


def _with_tiling(adapter: DecoderAdapter, plan: DecodePlan, latents: torch.Tensor, tile, tile_grad: str,
                 tile_halo) -> DecoderAdapter:
    """The adapter with a tiled backward, after checking the tiling arguments (before any decoding)."""
    if tile_grad not in TILE_GRADS:
        raise ValueError(f"tile_grad must be one of {TILE_GRADS}, got {tile_grad!r}")
    if tile is None:
        if tile_halo is not None:
            raise ValueError("tile_halo is given but tile is None: tile_halo is the crop widening of "
                             "tile_grad='truncated', give tile too")
        return adapter
    stride = plan.height // latents.shape[-2]
    size = _check_tile_size(tile, "tile", stride)
    name = type(adapter.model).__name__ if adapter.model is not None else type(adapter).__name__
    if tile_grad == "exact":
        if tile_halo is not None:
            raise ValueError("tile_halo only applies to tile_grad='truncated': exact tiling chooses the halos "
                             "that make the gradient exact")
        if not supports_exact_tiling(adapter):
            raise ValueError(f"tile_grad='exact' needs a decoder whose step splits into spatially local stages "
                             f"(diffusers AutoencoderKLWan, Wan 2.1 / 2.2); {name} is not one (for example, "
                             f"CogVideoX's GroupNorm takes statistics over the whole frame): use "
                             f"tile_grad='truncated' for its approximate tiled gradient, or tile=None")
        _check_decoder_can_be_split(adapter.model, name)
        halo = 0
    else:
        halo = _check_tile_size(stride if tile_halo is None else tile_halo, "tile_halo", stride, allow_zero=True)[0]
    _check_no_active_dropout(adapter.model, name)
    return tiled(adapter, size, tile_grad, stride, halo)


def _check_decoder_can_be_split(model, name: str) -> None:
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        return
    if decoder._forward_hooks or decoder._forward_pre_hooks or getattr(decoder, "_diffusers_hook", None) is not None \
            or getattr(decoder, "_hf_hook", None) is not None:
        raise ValueError(f"tile_grad='exact' runs the parts of {name}'s decoder one by one, so hooks on the decoder "
                         f"module itself would not run: move them to its submodules, or use tile=None")


def _check_no_active_dropout(model, name: str) -> None:
    if model is None:
        return
    active = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.training and m.p > 0]
    if active:
        raise ValueError(f"tile: tiling recomputes decoder parts in backward, and {name} has active dropout "
                         f"({active[0]!r}, p > 0 in train mode) that would draw other random numbers there: "
                         f"call vae.eval() (or set the dropout to 0), or use tile=None")


def _check_gradient_options(d_trunc, schedule: str, clamp: bool, lean: bool) -> int:
    """The engine's truncation distance, after checking the options `pixel_loss` and `decode` share."""
    d = _check_d_trunc(d_trunc)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not isinstance(clamp, bool):
        raise TypeError(f"clamp must be a bool, got {clamp!r}")
    if not isinstance(lean, bool):
        raise TypeError(f"lean must be a bool, got {lean!r}")
    return d


def _check_trainable_not_cast(adapter: DecoderAdapter) -> None:
    cast_trainable = layerwise_cast_trainable_parameters(adapter.model)
    if cast_trainable:
        raise ValueError(f"vae_or_decoder: {len(cast_trainable)} parameters that require grad (e.g. "
                         f"{cast_trainable[0]!r}) are stored with diffusers' layerwise casting, which defines no "
                         f"gradient for a low-precision stored weight: freeze them (requires_grad_(False)) to train "
                         f"through a frozen cast decoder, or disable layerwise casting to fine-tune it")


def _prepare(vae_or_decoder, latents) -> tuple[DecoderAdapter, DecodePlan]:
    adapter = wrap(vae_or_decoder)
    if isinstance(latents, torch.Tensor):
        expected = adapter.compute_device()
        if expected is not None and latents.device != expected:
            raise ValueError(f"latents are on device {latents.device}, but the decoder computes on {expected}: "
                             f"move them with latents.to({str(expected)!r})")
        dtypes = adapter.compute_dtypes()
        if (dtypes and latents.is_floating_point() and latents.dtype not in dtypes
                and not torch.is_autocast_enabled(latents.device.type)):
            names = " / ".join(sorted(str(d) for d in dtypes))
            raise TypeError(f"latents have dtype {latents.dtype}, but the decoder computes in {names}: cast them "
                            f"with latents.to({names.split(' / ')[0]}), or run under torch.autocast")
    return adapter, adapter.plan(latents)


def pixel_loss(
    vae_or_decoder,
    latents: torch.Tensor,
    target: FrameInput,
    *,
    loss: LossSpec = "mse",
    d_trunc: Optional[int] = 1,
    schedule: str = "sliding",
    mask: Optional[FrameInput] = None,
    reduction: str = "mean",
    groups: Optional[Iterable[int]] = None,
    clamp: bool = True,
    lean: bool = True,
    tile=None,
    tile_grad: str = "exact",
    tile_halo=None,
) -> torch.Tensor:
    """Pixel-space loss of the decoded video with a truncated gradient through the decoder cache.

    Returns a 0-dim tensor (float32; float64 for a float64 decoder) equal to
    `loss(vae.decode(latents).sample, target)` (over the supervised frames). Its backward delivers the gradient of
    docs/design.md section 2 to `latents` (so to whatever produced them) and to
    every decoder parameter with requires_grad: the loss of decoder step g
    reaches steps g-d_trunc .. g only. `d_trunc=None` gives the exact gradient.

    Args:
        vae_or_decoder: a diffusers VAE of a family `chopgrad.wrap` knows (Wan 2.1 / 2.2, CogVideoX,
            HunyuanVideo, HunyuanVideo 1.5, Mochi, EasyAnimate; the whole VAE, not its decoder alone), or an
            adapter (`chopgrad.FunctionalAdapter` for any other causal decoder).
        latents: (B, z_dim, T, h, w) latents.
        target: the (B, C, F, H, W) target video on any device, or a callable
            `frame_slice -> (B, C, f, H, W) tensor` (streaming).
        loss: "mse", "l1", "charbonnier", "huber", "ssim" (1 - SSIM), a callable
            (pred, target) -> scalar applied per decoder step to (B, C, f, H, W)
            frames, or a dict {name_or_callable: weight}. Named losses run
            through chopgrad.kernels' fused value-and-grad ops.
        d_trunc: truncation distance in decoder steps (>= 0), or None for none.
        schedule: "sliding" (exact truncated gradient; each step runs forward
            once and the loss of step g is backpropagated through steps
            g-d_trunc .. g one step at a time), "sliding_recompute" (the same
            gradient by re-running those steps: (d_trunc+1)x compute, a little
            less memory with lean=False at d_trunc >= 2) or "chunked" (1x
            compute, truncation distance 0..d_trunc).
        mask: optional (B, 1 or C, F, H, W) weights (tensor or callable like
            target), finite and >= 0. The weights scale the elementwise
            terms (mse, l1, charbonnier, huber; "mean" divides by the mask
            sum). For a callable term the mask only selects pixels: the
            callable sees the prediction where mask != 0 and the target where
            mask == 0 (those pixels carry no gradient), whatever the weight
            values, so uniform weights of 2 leave a callable's value as it is
            without a mask. An all-zero mask supervises no pixel: the
            elementwise terms are 0 with zero gradient (not 0/0), and
            callables see the target in place of the prediction. A callable
            mask is called twice per supervised step when "mean" divides an
            elementwise term by its sum: once to sum it before decoding,
            once beside the step's frames (it must return the same values).
        reduction: "mean" (over supervised elements, or the mask sum) or "sum".
        groups: decoder step indices to supervise (None: all), integers or an
            integer array/tensor. Decoding stops after the last supervised
            step; unsupervised steps only advance the state.
        clamp: apply the model's own output clamp (and its zero gradient where saturated).
        lean: run a Wan decoder on chopgrad's fused ops for this call (about
            half the saved activations of a decoder step; see chopgrad.patch),
            leaving the model exactly as it was afterwards, also after an
            error. A model patched by the user keeps its patch. False runs the
            model's own modules. Other models are not affected.
        tile: bound a decoder step's backward memory by a spatial tile: the
            tile size in decoded pixels, an int or (h, w), a multiple of the
            decoder's spatial stride (a tile larger than the frame is one
            tile). None (default) does not tile. The loss value is unchanged.
        tile_grad: "exact" (Wan 2.1 / 2.2: the spatially local stages are
            recomputed tile by tile with halos covering their receptive
            field, so the gradient equals the untiled one) or "truncated"
            (any model: each tile backpropagates through its own crop of the
            latents and state, widened by tile_halo; an approximation).
        tile_halo: the crop widening of tile_grad="truncated", in decoded
            pixels, a multiple of the spatial stride (default: one stride).

    Gradients reach the latents and decoder parameters only: a target or mask
    that requires grad is an error, and so is a callable loss whose value has
    no graph. Double backward (`create_graph=True`) is not supported and
    raises. A decoder in train mode gets the same random numbers on every
    re-run of a step (dropout), so values equal its own decode under the same
    seed. Decoders with diffusers' layerwise casting (frozen weights) or
    group offloading work: each step keeps the compute-dtype, onloaded
    weights it used until its backward.
    """
    d = _check_gradient_options(d_trunc, schedule, clamp, lean)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    terms = resolve_loss(loss)
    adapter, plan = _prepare(vae_or_decoder, latents)
    adapter = _with_tiling(adapter, plan, latents, tile, tile_grad, tile_halo)
    # A distance reaching before step 0 truncates nothing; clipping keeps it in the engine's int64.
    d = min(d, plan.num_steps)
    supervised = _supervised_steps(groups, plan.num_steps)
    wants_grad = torch.is_grad_enabled()
    if wants_grad:
        _check_trainable_not_cast(adapter)
    target_source = FrameSource(target, "target", plan.video_shape, constant=wants_grad)
    mask_source = optional_source(mask, "mask", plan.video_shape, allow_single_channel=True, constant=wants_grad,
                                  weights=True)
    video_loss = VideoLoss(adapter, plan, terms, target_source, mask_source, reduction, clamp, supervised)
    # Only the recomputed sliding schedule runs a step more than once.
    replay = ReplayedRandomness(latents.device, d + 1) if schedule == "sliding_recompute" and d >= 0 else None
    engine = build_engine(adapter, plan, video_loss, supervised, d, schedule, replay)
    # The gradient is computed inside the engine's forward, so the fused ops are needed only during this call.
    with lean_decoder(adapter.model) if lean else nullcontext():
        if wants_grad:
            return engine.loss(latents, adapter.parameters())
        return engine.evaluate(latents)


def decode(
    vae_or_decoder,
    latents: torch.Tensor,
    *,
    d_trunc: Optional[int] = 1,
    schedule: str = "sliding",
    clamp: bool = True,
    callback: Optional[Callable[[slice, torch.Tensor], None]] = None,
    lean: bool = True,
    tile=None,
    tile_grad: str = "exact",
    tile_halo=None,
) -> Optional[torch.Tensor]:
    """Decodes `latents` step by step; equals the model's own decode, and carries the truncated gradient.

    Returns the (B, C, F, H, W) video `vae.decode(latents).sample`. Memory holds
    one step's activations and one state besides the video.

    When gradients are wanted (grad mode on, and `latents` or a decoder
    parameter requires grad), the video is part of the autograd graph:
    `loss_fn(video).backward()` delivers, for any loss on the whole video, the
    truncated gradient of docs/design.md section 2 to `latents` and to every
    decoder parameter with requires_grad: the cotangent of decoder step g's
    frames flows back through steps g-d_trunc .. g only ("sliding", also
    "sliding_recompute"), or to the start of its chunk ("chunked").
    `d_trunc=None` gives the exact gradient. Forward keeps no step
    activations; backward decodes once more (as `pixel_loss` does), so its
    peak memory grows with the frame count only by the video and its
    gradient. For a loss that is a sum of per-step terms (MSE, SSIM, LPIPS
    per frame), `pixel_loss` is cheaper: it needs no video-sized tensors and
    one decode less.

    Args:
        vae_or_decoder: a diffusers VAE of a family `chopgrad.wrap` knows (Wan 2.1 / 2.2, CogVideoX,
            HunyuanVideo, HunyuanVideo 1.5, Mochi, EasyAnimate; the whole VAE, not its decoder alone), or an
            adapter (`chopgrad.FunctionalAdapter` for any other causal decoder).
        latents: (B, z_dim, T, h, w) latents.
        d_trunc, schedule, lean, tile, tile_grad, tile_halo: as in `pixel_loss`;
            they shape the gradient and the backward's memory, never the video.
        clamp: apply the model's own output clamp (and its gradient).
        callback: `callback(frame_slice, frames)` receives each step's frames
            as they are made and nothing is returned (streaming). It carries
            no gradient, so it is refused while gradients are wanted.

    Under torch.no_grad(), or when nothing requires grad, no graph is built.
    Double backward (`create_graph=True`) is not supported and raises. A
    decoder in train mode draws the same random numbers (dropout) in backward
    as in forward.
    """
    d = _check_gradient_options(d_trunc, schedule, clamp, lean)
    if tile_grad not in TILE_GRADS:
        raise ValueError(f"tile_grad must be one of {TILE_GRADS}, got {tile_grad!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (frame_slice, frames) -> None, got {type(callback).__name__}")
    adapter, plan = _prepare(vae_or_decoder, latents)
    trainable = [p for p in adapter.parameters() if p.requires_grad]
    if not (torch.is_grad_enabled() and (latents.requires_grad or trainable)):
        return decode_without_graph(adapter, plan, latents, clamp=clamp, lean=lean, callback=callback)
    if callback is not None:
        why = ("the latents require grad" if latents.requires_grad else
               f"{len(trainable)} decoder parameters require grad (diffusers' default; "
               f"vae.requires_grad_(False) freezes them)")
        raise ValueError(f"callback streams frames out without a graph, so it cannot carry a gradient, and a "
                         f"gradient is wanted: {why}. Call decode without callback to get a differentiable video, "
                         f"or under torch.no_grad() to stream")
    _check_trainable_not_cast(adapter)
    backward_adapter = _with_tiling(adapter, plan, latents, tile, tile_grad, tile_halo)
    d = min(d, plan.num_steps)
    run = DecodeRun(adapter, backward_adapter, plan, d, schedule, clamp, lean, trainable, latents.device)
    return DecodeFunction.apply(run, latents, *trainable)


def patch_report(model) -> PatchReport:
    """What `lean=True` runs on chopgrad's fused ops in `model`'s decoder, and what it leaves out and why.

    `model`: a VAE `wrap` accepts, a Wan decoder, or an adapter. For a Wan VAE (or decoder) it is the report of
    `chopgrad.patch` as things stand now (empty outside a `lean=True` call unless the model was patched). For
    any other decoder nothing is fused, and the one skipped entry (`"<decoder>"`) says why.
    """
    if not isinstance(model, DecoderAdapter) and wan_patch.is_wan_model(model):
        return wan_patch.patch_report(model)
    adapter = wrap(model)
    if adapter.fused_ops_unavailable is None:
        return wan_patch.patch_report(adapter.model)
    return PatchReport(skipped=(("<decoder>", f"lean=True does nothing: {adapter.fused_ops_unavailable}"),))
