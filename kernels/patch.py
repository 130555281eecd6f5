"""``patch(model)`` / ``unpatch(model)``: fused decoder ops on one diffusers ``AutoencoderKLWan``.

What is swapped (on the *instance* only: the diffusers classes are never
touched, no module is replaced, parameters and ``state_dict`` are unchanged):

* every ``WanResidualBlock`` of the decoder: ``norm -> SiLU -> cache -> cat ->
  pad -> conv`` (twice per block) becomes :func:`rms_norm_silu_pad_conv3d`
  (saved state per half-block: the half-block input, a per-position
  statistic and the 2-frame cache, instead of four activation-sized tensors
  including the padded conv input), or with ``recompute_conv_input=False``
  :func:`rms_norm_silu_pad` + ``conv3d`` (the conv keeps its padded input);
  with active dropout the second half falls back to
  :func:`rms_norm_silu` + dropout + :func:`causal_pad` + ``conv3d``;
* the decoder's forward: the head ``norm_out -> SiLU -> conv_out`` is fused the
  same way; ``conv_in`` goes through :func:`causal_pad`;
* every other padded ``WanCausalConv3d`` of the decoder (the ``time_conv`` of
  the temporal upsamplers): ``cat + F.pad`` becomes :func:`causal_pad`.

Each swap is an instance attribute ``forward`` bound to the module, so the
signatures stay those of diffusers: ``vae.decode(z)`` and
``vae.decoder(x, feat_cache=..., feat_idx=[0], first_chunk=...)`` work as
before and produce the same values and gradients (up to dtype rounding: the
fused ops compute the norm in fp32 throughout).  The cache protocol is
unchanged (slots reassigned each call, post-SiLU frames, diffusers' shapes).

``unpatch`` removes the instance attributes again (restoring a ``forward``
that was set on the instance before patching, if any), so the model is
exactly as before.  Patching twice is a no-op.  Modules whose structure is
not the expected one (a wrapped/hooked conv, a non-SiLU activation, a
non-zero padding mode ...) are left unpatched.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .causal_pad import causal_pad
from .rms_norm_silu import rms_norm_silu, rms_norm_silu_pad, rms_norm_silu_pad_conv3d

_MARK = "_chopgrad_patch"
_RECOMPUTE = "_chopgrad_recompute"
_NO_FORWARD = "<class forward>"
CACHE_T = 2


def _wan_classes():
    try:
        from diffusers.models.autoencoders import autoencoder_kl_wan as wan
    except Exception as exc:  # pragma: no cover - depends on the install
        raise ImportError(f"chopgrad.patch needs diffusers with AutoencoderKLWan: {exc}") from exc
    return wan


# ---------------------------------------------------------------------------
# eligibility checks
# ---------------------------------------------------------------------------


def _plain(module: nn.Module) -> bool:
    """No instance-level forward (e.g. an accelerate hook; our own patch is fine) and no forward hooks."""
    own_forward = "forward" not in module.__dict__ or _MARK in module.__dict__
    return (own_forward and not module._forward_hooks and not module._forward_pre_hooks
            and not getattr(module, "_forward_hooks_with_kwargs", None))


def _conv_ok(wan, conv: nn.Module) -> bool:
    return (type(conv) is wan.WanCausalConv3d and _plain(conv) and conv.padding_mode == "zeros"
            and tuple(conv.padding) == (0, 0, 0) and conv._padding[0] == conv._padding[1]
            and conv._padding[2] == conv._padding[3] and conv._padding[5] == 0)


def _norm_ok(wan, norm: nn.Module) -> bool:
    return type(norm) is wan.WanRMS_norm and norm.channel_first and _plain(norm)


def _norm_conv_ok(wan, norm, conv) -> bool:
    return _norm_ok(wan, norm) and _conv_ok(wan, conv) and conv._padding[4] > 0


# ---------------------------------------------------------------------------
# fused building blocks (called from the patched forwards)
# ---------------------------------------------------------------------------


def _conv(conv: nn.Module, x_pad: torch.Tensor) -> torch.Tensor:
    return F.conv3d(x_pad, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


def _norm_silu_conv(norm, conv, x, feat_cache, feat_idx, dropout=None, recompute=True):
    """``conv(cache-pad(dropout(silu(norm(x)))))`` with diffusers' cache bookkeeping.

    ``recompute`` (``patch(..., recompute_conv_input=True)``) selects
    :func:`rms_norm_silu_pad_conv3d`, which does not keep the padded conv
    input for backward.
    """
    cache = None
    idx = None
    if feat_cache is not None:
        idx = feat_idx[0]
        cache = feat_cache[idx]
        if cache is not None:
            cache = cache.to(x.device)
    tp, ph, pw = conv._padding[4], conv._padding[2], conv._padding[0]
    emit = feat_cache is not None
    if dropout is not None and dropout.training and dropout.p > 0:
        y = dropout(rms_norm_silu(x, norm.gamma, norm.bias, scale=norm.scale))
        res = causal_pad(y, cache, time_pad=tp, pad_h=ph, pad_w=pw, cache_t=CACHE_T, emit_cache=emit)
    elif recompute:
        res = rms_norm_silu_pad_conv3d(x, norm.gamma, norm.bias, cache, conv.weight, conv.bias, time_pad=tp,
                                       pad_h=ph, pad_w=pw, stride=conv.stride, dilation=conv.dilation,
                                       groups=conv.groups, cache_t=CACHE_T, scale=norm.scale, emit_cache=emit)
        out, new_cache = res if emit else (res, None)
        if emit:
            feat_cache[idx] = new_cache
            feat_idx[0] += 1
        return out
    else:
        res = rms_norm_silu_pad(x, norm.gamma, norm.bias, cache, time_pad=tp, pad_h=ph, pad_w=pw,
                                cache_t=CACHE_T, scale=norm.scale, emit_cache=emit)
    x_pad, new_cache = res if emit else (res, None)
    out = _conv(conv, x_pad)
    if emit:
        feat_cache[idx] = new_cache
        feat_idx[0] += 1
    return out


def _pad_conv(conv, x, feat_cache, feat_idx):
    """``conv(x, cache)`` with diffusers' cache bookkeeping, through :func:`causal_pad`."""
    if feat_cache is None:
        return conv(x)
    idx = feat_idx[0]
    cache = feat_cache[idx]
    if cache is not None:
        cache = cache.to(x.device)
    x_pad, new_cache = causal_pad(x, cache, time_pad=conv._padding[4], pad_h=conv._padding[2],
                                  pad_w=conv._padding[0], cache_t=CACHE_T, emit_cache=True)
    out = _conv(conv, x_pad)
    feat_cache[idx] = new_cache
    feat_idx[0] += 1
    return out


# ---------------------------------------------------------------------------
# patched forwards (bound to instances)
# ---------------------------------------------------------------------------


def _causal_conv_forward(self, x, cache_x=None):
    """Patched ``WanCausalConv3d.forward``: :func:`causal_pad` then ``conv3d`` (same signature)."""
    tp = self._padding[4]
    cache = cache_x.to(x.device) if (cache_x is not None and tp > 0) else None
    x_pad = causal_pad(x, cache, time_pad=tp, pad_h=self._padding[2], pad_w=self._padding[0], emit_cache=False)
    return _conv(self, x_pad)


def _resblock_forward(self, x, feat_cache=None, feat_idx=[0]):  # noqa: B006 - diffusers' signature
    """Patched ``WanResidualBlock.forward`` (same signature and cache protocol)."""
    rc = self.__dict__.get(_RECOMPUTE, True)
    h = self.conv_shortcut(x)
    x = _norm_silu_conv(self.norm1, self.conv1, x, feat_cache, feat_idx, recompute=rc)
    x = _norm_silu_conv(self.norm2, self.conv2, x, feat_cache, feat_idx, dropout=self.dropout, recompute=rc)
    return x + h


def _decoder_forward(self, x, feat_cache=None, feat_idx=[0], first_chunk=False):  # noqa: B006
    """Patched ``WanDecoder3d.forward`` (diffusers' order of cache slots, fused head)."""
    x = _pad_conv(self.conv_in, x, feat_cache, feat_idx)
    x = self.mid_block(x, feat_cache=feat_cache, feat_idx=feat_idx)
    for up_block in self.up_blocks:
        x = up_block(x, feat_cache=feat_cache, feat_idx=feat_idx, first_chunk=first_chunk)
    return _norm_silu_conv(self.norm_out, self.conv_out, x, feat_cache, feat_idx,
                           recompute=self.__dict__.get(_RECOMPUTE, True))


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def _find_decoder(wan, model: nn.Module) -> nn.Module:
    if isinstance(model, wan.WanDecoder3d):
        return model
    dec = getattr(model, "decoder", None)
    if isinstance(dec, wan.WanDecoder3d):
        return dec
    raise TypeError(
        "chopgrad.patch expects a diffusers AutoencoderKLWan (or its WanDecoder3d), got "
        f"{type(model).__module__}.{type(model).__name__}"
    )


def _set(module: nn.Module, fn, recompute: bool) -> None:
    if _MARK not in module.__dict__:
        prev = module.__dict__.get("forward", _NO_FORWARD)
        object.__setattr__(module, _MARK, prev)
        object.__setattr__(module, "forward", types.MethodType(fn, module))
    if fn is not _causal_conv_forward:
        object.__setattr__(module, _RECOMPUTE, bool(recompute))


def _plan(wan, decoder: nn.Module) -> list[tuple[nn.Module, Any]]:
    """(module, patched forward) pairs for a decoder; skips modules of unexpected structure."""
    plan: list[tuple[nn.Module, Any]] = []
    handled_convs: set[int] = set()
    for m in decoder.modules():
        if (type(m) is wan.WanResidualBlock and _plain(m) and isinstance(m.nonlinearity, nn.SiLU)
                and isinstance(m.dropout, nn.Dropout)):
            if _norm_conv_ok(wan, m.norm1, m.conv1) and _norm_conv_ok(wan, m.norm2, m.conv2):
                plan.append((m, _resblock_forward))
                handled_convs.update((id(m.conv1), id(m.conv2)))
    if (_plain(decoder) and isinstance(getattr(decoder, "nonlinearity", None), nn.SiLU)
            and _conv_ok(wan, decoder.conv_in) and _norm_conv_ok(wan, decoder.norm_out, decoder.conv_out)
            and all(hasattr(decoder, a) for a in ("mid_block", "up_blocks"))):
        plan.append((decoder, _decoder_forward))
        handled_convs.update((id(decoder.conv_in), id(decoder.conv_out)))
    for m in decoder.modules():
        if id(m) in handled_convs:
            continue
        if type(m) is wan.WanCausalConv3d and _conv_ok(wan, m) and any(m._padding):
            plan.append((m, _causal_conv_forward))
    return plan


def patch(model: nn.Module, *, recompute_conv_input: bool = True) -> nn.Module:
    """Swap the decoder hot paths of ``model`` (an ``AutoencoderKLWan`` or its decoder) for fused ops.

    ``recompute_conv_input=True`` (default) also folds the convolution that
    follows each norm + SiLU into the autograd Function
    (:func:`rms_norm_silu_pad_conv3d`), so the padded conv input is rebuilt in
    backward instead of being kept: the leanest variant.  ``False`` keeps the
    conv as a plain ``conv3d`` after :func:`rms_norm_silu_pad` (the conv saves
    its input).  Works on CPU (PyTorch reference math, lean autograd) and CUDA
    (Triton).  Returns ``model``.  Patching again is harmless (it only updates
    ``recompute_conv_input``); undo with :func:`unpatch`.
    """
    wan = _wan_classes()
    decoder = _find_decoder(wan, model)
    for module, fn in _plan(wan, decoder):
        _set(module, fn, recompute_conv_input)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` exactly (instance attributes removed or restored). Returns ``model``."""
    wan = _wan_classes()
    decoder = _find_decoder(wan, model)
    for m in decoder.modules():
        m.__dict__.pop(_RECOMPUTE, None)
        if _MARK in m.__dict__:
            prev = m.__dict__.pop(_MARK)
            if prev is _NO_FORWARD:
                m.__dict__.pop("forward", None)
            else:
                object.__setattr__(m, "forward", prev)
    return model


def is_patched(model: nn.Module) -> bool:
    """True when any module of ``model``'s decoder carries a chopgrad patch."""
    wan = _wan_classes()
    decoder = _find_decoder(wan, model)
    return any(_MARK in m.__dict__ for m in decoder.modules())


def patched_modules(model: nn.Module) -> list[str]:
    """Qualified names (relative to the decoder) of the patched modules, for diagnostics."""
    wan = _wan_classes()
    decoder = _find_decoder(wan, model)
    return [name or "<decoder>" for name, m in decoder.named_modules() if _MARK in m.__dict__]
