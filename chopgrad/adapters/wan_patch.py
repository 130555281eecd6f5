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
* every padded ``WanCausalConv3d`` of the decoder: ``cat + F.pad`` becomes
  :func:`causal_pad` inside the conv's own forward.

Each swap is a forward bound to the module, so the signatures stay those of
diffusers: ``vae.decode(z)`` and ``vae.decoder(x, feat_cache=..., feat_idx=[0],
first_chunk=...)`` work as before and produce the same values and gradients
(up to dtype rounding: the fused ops compute the norm in fp32 throughout).
The cache protocol is unchanged (slots reassigned each call, post-SiLU
frames, diffusers' shapes).

Hooks.  diffusers' layerwise casting and group offloading, accelerate's
hooks and plain PyTorch module hooks all act on a module's *call*: they cast
or load its weights around its forward, or observe its arguments.  So:

* A patched forward is installed where the module's own class forward sits
  in its hook chain (the instance ``forward`` when there is no chain, the
  innermost ``HookFunctionReference`` of a diffusers ``HookRegistry``,
  accelerate's ``_old_forward``).  Hooks registered later wrap it like they
  would wrap the class forward, so patching and hooking work in either order.
* Inside a patched block, a child module (norm, SiLU, dropout, conv) is
  fused into a neighbour's op only while nothing can observe its call; a
  child that carries hooks of any kind is called as a module with diffusers'
  own arguments (``conv(x, cache)``, ``norm(x)``), so its hooks run and it
  reads its weights inside them.  This is decided on every call, so hooks
  added after patching are honoured.

:func:`patch_report` lists what is patched (and which fused path each part
takes right now) and what is left out, with reasons; :func:`patch` warns
when it leaves something out.  ``unpatch`` puts the displaced forwards back
where they were (hook chains included), so the model is exactly as before.
Patching twice is a no-op.
"""

from __future__ import annotations

import contextlib
import functools
import types
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as _torch_module

from ..kernels import causal_pad, conv3d, rms_norm_silu, rms_norm_silu_pad, rms_norm_silu_pad_conv3d

_MARK = "_chopgrad_patch"
_RECOMPUTE = "_chopgrad_recompute"
_NO_FORWARD = "<class forward>"
CACHE_T = 2

_DECODER = "<decoder>"


class PatchWarning(UserWarning):
    """:func:`patch` left decoder modules out of the fused ops (details in :func:`patch_report`)."""


@dataclass(frozen=True)
class PatchReport:
    """What :func:`patch` changed on a decoder and what it left alone.

    ``patched``: ``(module name, fused path)`` for every module running a
    chopgrad forward, the path as it would run now given the hooks present.
    ``skipped``: ``(module name, reason)`` for every candidate module not
    patched and every child module kept out of a fused op because it has
    hooks.  Names are relative to the decoder (``"<decoder>"`` for itself),
    like :func:`patched_modules`.
    """

    patched: tuple[tuple[str, str], ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        lines = [f"chopgrad patch: {len(self.patched)} modules patched, {len(self.skipped)} skipped"]
        lines += [f"  patched {name}: {path}" for name, path in self.patched]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def _wan_classes():
    try:
        from diffusers.models.autoencoders import autoencoder_kl_wan as wan
    except Exception as exc:  # pragma: no cover - depends on the install
        raise ImportError(f"chopgrad.patch needs diffusers with AutoencoderKLWan: {exc}") from exc
    return wan


# ---------------------------------------------------------------------------
# hooks: what can observe a module's call
# ---------------------------------------------------------------------------


def _is_patched_forward(module: nn.Module, fn: Any) -> bool:
    return getattr(fn, "__self__", None) is module and getattr(fn, "__func__", None) in _PATCHED_FORWARDS


def _is_class_forward(module: nn.Module, fn: Any) -> bool:
    return getattr(fn, "__self__", None) is module and getattr(fn, "__func__", None) is type(module).forward


def _any_global_module_hooks() -> bool:
    return bool(_torch_module._global_forward_pre_hooks or _torch_module._global_forward_hooks
                or _torch_module._global_backward_pre_hooks or _torch_module._global_backward_hooks)


def _has_foreign_forward(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return forward is not None and not (_is_patched_forward(module, forward) or _is_class_forward(module, forward))


def _has_hooks(module: nn.Module) -> bool:
    """True when calling ``module`` runs anything besides its (class or chopgrad) forward.

    Called on every patched forward call, so only dictionary lookups.
    """
    d = module.__dict__
    if d["_forward_pre_hooks"] or d["_forward_hooks"] or d["_backward_pre_hooks"] or d["_backward_hooks"]:
        return True
    if _any_global_module_hooks():
        return True
    registry = d.get("_diffusers_hook")
    if registry is not None and registry.hooks:
        return True
    return d.get("_hf_hook") is not None or _has_foreign_forward(module)


def _describe_hooks(module: nn.Module) -> str:
    """The hooks on ``module`` in words (empty when it has none)."""
    d = module.__dict__
    found = []
    registry = d.get("_diffusers_hook")
    if registry is not None and registry.hooks:
        found.append(f"diffusers hooks {list(registry._hook_order)}")
    if d.get("_hf_hook") is not None:
        found.append(f"an accelerate {type(d['_hf_hook']).__name__}")
    if not found and _has_foreign_forward(module):
        found.append("an instance forward wrapper")
    for attr, what in (("_forward_pre_hooks", "forward pre-hooks"), ("_forward_hooks", "forward hooks"),
                       ("_backward_pre_hooks", "backward pre-hooks"), ("_backward_hooks", "backward hooks")):
        if d[attr]:
            found.append(f"{len(d[attr])} {what}")
    if _any_global_module_hooks():
        found.append("global module hooks (torch.nn.modules.module.register_module_*_hook)")
    return ", ".join(found)


# ---------------------------------------------------------------------------
# forward slots: where a hook chain keeps the module's own forward
# ---------------------------------------------------------------------------


class _Slot(NamedTuple):
    """One place that holds a forward of a module: ``holder[key]`` (a ``__dict__``)."""

    holder: dict
    key: str
    where: str  # in words, for the report

    def get(self) -> Any:
        return self.holder.get(self.key, _NO_FORWARD)

    def set(self, fn: Any) -> None:
        if fn is _NO_FORWARD:
            self.holder.pop(self.key, None)
        else:
            self.holder[self.key] = fn


def _forward_slots(module: nn.Module) -> list[_Slot]:
    """The instance ``forward``, then the slots of accelerate's and diffusers' hook chains, outermost first."""
    d = module.__dict__
    slots = [_Slot(d, "forward", "")]
    if "_old_forward" in d:
        slots.append(_Slot(d, "_old_forward", f"inside its accelerate {type(d.get('_hf_hook')).__name__}"))
    registry = d.get("_diffusers_hook")
    if registry is not None:
        where = f"inside its diffusers hooks {list(registry._hook_order)}"
        for ref in reversed(registry._fn_refs):
            slots.append(_Slot(ref.__dict__, "forward", where))
            slots.append(_Slot(ref.__dict__, "original_forward", where))
    return slots


def _own_forward_slot(module: nn.Module) -> _Slot | None:
    """The slot holding the module's class forward (or chopgrad's), i.e. the innermost call of its hooks.

    ``None`` when the forward is wrapped by something that is neither a
    diffusers nor an accelerate hook: chopgrad cannot see through it.
    """
    slots = _forward_slots(module)
    if slots[0].get() is _NO_FORWARD:  # nothing on the instance: the class forward runs
        return slots[0]
    for slot in slots:
        fn = slot.get()
        if _is_class_forward(module, fn) or _is_patched_forward(module, fn):
            return slot
    return None


def _install(module: nn.Module, fn, recompute: bool) -> None:
    if _MARK not in module.__dict__:
        slot = _own_forward_slot(module)
        object.__setattr__(module, _MARK, slot.get())
        slot.set(types.MethodType(fn, module))
    if fn is not _causal_conv_forward:
        object.__setattr__(module, _RECOMPUTE, bool(recompute))


def _restore(module: nn.Module, slots: list[_Slot]) -> None:
    """Put the forward displaced by :func:`_install` back into every slot that now holds chopgrad's."""
    displaced = module.__dict__.pop(_MARK)
    module.__dict__.pop(_RECOMPUTE, None)
    ours = [slot.get() for slot in slots]
    # a hook chain built on top of the patched forward gets the class forward it would have wrapped
    # without chopgrad
    class_forward = displaced if displaced is not _NO_FORWARD else types.MethodType(type(module).forward, module)
    for slot in slots:
        is_instance_forward = slot.holder is module.__dict__ and slot.key == "forward"
        slot.set(displaced if is_instance_forward else class_forward)
    # hook wrappers copied the patched forward's name, docstring and __wrapped__ (functools.update_wrapper)
    for slot in _forward_slots(module):
        wrapper = slot.get()
        if any(getattr(wrapper, "__wrapped__", None) is fn for fn in ours):
            functools.update_wrapper(wrapper, class_forward)


# ---------------------------------------------------------------------------
# structure checks (why a module cannot take a fused forward)
# ---------------------------------------------------------------------------


def _conv_problem(wan, conv: nn.Module, needs_time_pad: bool = False) -> str | None:
    if type(conv) is not wan.WanCausalConv3d:
        return f"is a {type(conv).__name__}, not a diffusers WanCausalConv3d"
    if conv.padding_mode != "zeros":
        return f"uses padding_mode={conv.padding_mode!r} (the fused pad writes zeros)"
    if tuple(conv.padding) != (0, 0, 0):
        return f"has built-in padding {tuple(conv.padding)} besides its causal padding"
    p = conv._padding
    if p[0] != p[1] or p[2] != p[3] or p[5] != 0:
        return f"has causal padding {tuple(p)} that is not symmetric in H/W and front-only in time"
    if needs_time_pad and p[4] == 0:
        return "has no temporal padding (nothing for the fused cache pad to do)"
    return None


def _norm_problem(wan, norm: nn.Module) -> str | None:
    if type(norm) is not wan.WanRMS_norm:
        return f"is a {type(norm).__name__}, not a diffusers WanRMS_norm"
    if not norm.channel_first:
        return "normalizes the last dim (channel_first=False)"
    return None


def _children_problem(wan, block: nn.Module, pairs) -> str | None:
    if not isinstance(getattr(block, "nonlinearity", None), nn.SiLU):
        return f"its nonlinearity is {type(getattr(block, 'nonlinearity', None)).__name__}, not SiLU"
    for norm_name, conv_name in pairs:
        problem = _norm_problem(wan, getattr(block, norm_name))
        if problem:
            return f"{norm_name} {problem}"
        problem = _conv_problem(wan, getattr(block, conv_name), needs_time_pad=True)
        if problem:
            return f"{conv_name} {problem}"
    return None


def _resblock_problem(wan, block: nn.Module) -> str | None:
    if not isinstance(block.dropout, nn.Dropout):
        return f"its dropout is a {type(block.dropout).__name__}, not nn.Dropout"
    return _children_problem(wan, block, (("norm1", "conv1"), ("norm2", "conv2")))


def _decoder_problem(wan, decoder: nn.Module) -> str | None:
    if type(decoder).forward is not wan.WanDecoder3d.forward:
        return f"{type(decoder).__name__} overrides WanDecoder3d.forward"
    if not all(hasattr(decoder, a) for a in ("mid_block", "up_blocks")):
        return "has no mid_block/up_blocks"
    problem = _conv_problem(wan, decoder.conv_in)
    if problem:
        return f"conv_in {problem}"
    return _children_problem(wan, decoder, (("norm_out", "conv_out"),))


_CHAIN_PROBLEM = ("its forward is wrapped by something that is neither a diffusers nor an accelerate hook, so a "
                  "patched forward could not run inside it; it runs diffusers' own forward")


def _candidates(wan, decoder: nn.Module):
    """``(name, module, patched forward)`` for every decoder module chopgrad has a fused forward for."""
    for name, m in decoder.named_modules():
        if m is decoder:
            yield name, m, _decoder_forward
        elif type(m) is wan.WanResidualBlock:
            yield name, m, _resblock_forward
        elif type(m) is wan.WanCausalConv3d and any(m._padding):
            yield name, m, _causal_conv_forward


def _problem(wan, module: nn.Module, fn) -> str | None:
    if fn is _decoder_forward:
        problem = _decoder_problem(wan, module)
    elif fn is _resblock_forward:
        problem = _resblock_problem(wan, module)
    else:
        problem = _conv_problem(wan, module)
    if problem is None and _own_forward_slot(module) is None:
        problem = _CHAIN_PROBLEM
    return problem


# ---------------------------------------------------------------------------
# fused building blocks (called from the patched forwards)
# ---------------------------------------------------------------------------


def _conv(conv: nn.Module, x_pad: torch.Tensor) -> torch.Tensor:
    return conv3d(x_pad, conv.weight, conv.bias, conv.stride, conv.dilation, conv.groups)


def _read_cache(feat_cache, feat_idx):
    return None if feat_cache is None else feat_cache[feat_idx[0]]


def _write_cache(feat_cache, feat_idx, new_cache) -> None:
    if feat_cache is not None:
        feat_cache[feat_idx[0]] = new_cache
        feat_idx[0] += 1


def _next_cache(x: torch.Tensor, cache: torch.Tensor | None) -> torch.Tensor:
    """diffusers' next cache of a causal conv: the input's last two frames, or for a one-frame input the
    cache's last frame followed by it."""
    new_cache = x[:, :, -CACHE_T:].clone()
    if new_cache.shape[2] < CACHE_T and cache is not None:
        new_cache = torch.cat([cache[:, :, -1:].to(new_cache.device), new_cache], dim=2)
    return new_cache


def _pad_geometry(conv: nn.Module, emit: bool) -> dict:
    return dict(time_pad=conv._padding[4], pad_h=conv._padding[2], pad_w=conv._padding[0], cache_t=CACHE_T,
                emit_cache=emit)


def _conv_step(conv: nn.Module, x: torch.Tensor, feat_cache, feat_idx, *, fused: bool) -> torch.Tensor:
    """diffusers' ``conv(x, cache)`` step with its cache bookkeeping.

    ``fused``: nothing observes the conv, so the padded input and the next
    cache come from one :func:`causal_pad`; otherwise the conv is called as
    a module with diffusers' arguments.
    """
    if feat_cache is None:
        return conv(x)
    cache = _read_cache(feat_cache, feat_idx)
    if fused:
        x_pad, new_cache = causal_pad(x, None if cache is None else cache.to(x.device), **_pad_geometry(conv, True))
        out = _conv(conv, x_pad)
    else:
        new_cache = _next_cache(x, cache)
        out = conv(x, cache)
    _write_cache(feat_cache, feat_idx, new_cache)
    return out


class _HalfBlockPlan(NamedTuple):
    """Which parts of ``conv(dropout(silu(norm(x))))`` run fused, given the hooks present right now."""

    norm_fused: bool  # rms_norm_silu instead of calling norm and SiLU
    dropout_called: bool  # dropout is active or observed: call it
    conv_fused: bool  # causal_pad + conv3d instead of calling the conv
    whole: bool  # the whole chain in one fused op

    @staticmethod
    def of(norm, act, conv, dropout) -> "_HalfBlockPlan":
        norm_fused = not (_has_hooks(norm) or _has_hooks(act))
        conv_fused = not _has_hooks(conv)
        dropout_called = dropout is not None and (_has_hooks(dropout) or (dropout.training and dropout.p > 0))
        return _HalfBlockPlan(norm_fused, dropout_called, conv_fused, norm_fused and conv_fused and not dropout_called)


def _norm_act_conv(norm, act, conv, x, feat_cache, feat_idx, dropout=None, recompute=True):
    """``conv(cache-pad(dropout(silu(norm(x)))))`` with diffusers' cache bookkeeping.

    ``recompute`` (``patch(..., recompute_conv_input=True)``) selects
    :func:`rms_norm_silu_pad_conv3d`, which does not keep the padded conv
    input for backward.
    """
    plan = _HalfBlockPlan.of(norm, act, conv, dropout)
    if not plan.whole:
        y = rms_norm_silu(x, norm.gamma, norm.bias, scale=norm.scale) if plan.norm_fused else act(norm(x))
        if plan.dropout_called:
            y = dropout(y)
        return _conv_step(conv, y, feat_cache, feat_idx, fused=plan.conv_fused)
    cache = _read_cache(feat_cache, feat_idx)
    if cache is not None:
        cache = cache.to(x.device)
    emit = feat_cache is not None
    if recompute:
        res = rms_norm_silu_pad_conv3d(x, norm.gamma, norm.bias, cache, conv.weight, conv.bias, stride=conv.stride,
                                       dilation=conv.dilation, groups=conv.groups, scale=norm.scale,
                                       **_pad_geometry(conv, emit))
        out, new_cache = res if emit else (res, None)
    else:
        res = rms_norm_silu_pad(x, norm.gamma, norm.bias, cache, scale=norm.scale, **_pad_geometry(conv, emit))
        x_pad, new_cache = res if emit else (res, None)
        out = _conv(conv, x_pad)
    _write_cache(feat_cache, feat_idx, new_cache)
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
    recompute = self.__dict__.get(_RECOMPUTE, True)
    h = self.conv_shortcut(x)
    x = _norm_act_conv(self.norm1, self.nonlinearity, self.conv1, x, feat_cache, feat_idx, recompute=recompute)
    x = _norm_act_conv(self.norm2, self.nonlinearity, self.conv2, x, feat_cache, feat_idx, dropout=self.dropout,
                       recompute=recompute)
    return x + h


def _decoder_forward(self, x, feat_cache=None, feat_idx=[0], first_chunk=False):  # noqa: B006
    """Patched ``WanDecoder3d.forward`` (diffusers' order of cache slots, fused head)."""
    x = _conv_step(self.conv_in, x, feat_cache, feat_idx, fused=not _has_hooks(self.conv_in))
    x = self.mid_block(x, feat_cache=feat_cache, feat_idx=feat_idx)
    for up_block in self.up_blocks:
        x = up_block(x, feat_cache=feat_cache, feat_idx=feat_idx, first_chunk=first_chunk)
    return _norm_act_conv(self.norm_out, self.nonlinearity, self.conv_out, x, feat_cache, feat_idx,
                          recompute=self.__dict__.get(_RECOMPUTE, True))


_PATCHED_FORWARDS = frozenset((_causal_conv_forward, _resblock_forward, _decoder_forward))

# (norm, conv, dropout) attribute names of the fused half-blocks of each patched container
_HALF_BLOCKS = {
    _resblock_forward: (("norm1", "conv1", None), ("norm2", "conv2", "dropout")),
    _decoder_forward: (("norm_out", "conv_out", None),),
}


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def _describe_half(module, norm_name, conv_name, dropout_name, recompute) -> str:
    dropout = getattr(module, dropout_name) if dropout_name else None
    plan = _HalfBlockPlan.of(getattr(module, norm_name), module.nonlinearity, getattr(module, conv_name), dropout)
    if plan.whole:
        op = "rms_norm_silu_pad_conv3d" if recompute else "rms_norm_silu_pad + conv3d"
        return f"{norm_name}+SiLU+pad+{conv_name}: {op}"
    parts = [f"{norm_name}+SiLU: rms_norm_silu" if plan.norm_fused else f"{norm_name}, SiLU: called as modules"]
    if plan.dropout_called:
        parts.append(f"{dropout_name}: called as a module")
    parts.append(f"{conv_name}: causal_pad + conv3d" if plan.conv_fused else f"{conv_name}: called as a module")
    return ", ".join(parts)


def _describe_patched(module: nn.Module, fn) -> str:
    recompute = module.__dict__.get(_RECOMPUTE, True)
    if fn is _causal_conv_forward:
        path = "causal_pad + conv3d"
    else:
        halves = [_describe_half(module, *names, recompute) for names in _HALF_BLOCKS[fn]]
        if fn is _decoder_forward:
            conv_in = "causal_pad + conv3d" if not _has_hooks(module.conv_in) else "called as a module"
            halves.insert(0, f"conv_in: {conv_in}")
        path = "; ".join(halves)
    where = next((slot.where for slot in _forward_slots(module) if _is_patched_forward(module, slot.get())), "")
    return f"{path} ({where})" if where else path


def _observed_children(module: nn.Module, fn) -> list[tuple[str, nn.Module]]:
    names: list[str] = []
    for norm_name, conv_name, dropout_name in _HALF_BLOCKS.get(fn, ()):
        names += [norm_name, "nonlinearity", conv_name] + ([dropout_name] if dropout_name else [])
    if fn is _decoder_forward:
        names.insert(0, "conv_in")
    return [(n, getattr(module, n)) for n in dict.fromkeys(names)]


def _report(wan, decoder: nn.Module) -> PatchReport:
    patched, skipped = [], []
    for name, module, fn in _candidates(wan, decoder):
        label = name or _DECODER
        if _MARK not in module.__dict__:
            skipped.append((label, _problem(wan, module, fn) or "not patched (chopgrad.patch not applied)"))
            continue
        patched.append((label, _describe_patched(module, fn)))
        for child_name, child in _observed_children(module, fn):
            hooks = _describe_hooks(child)
            if hooks:
                child_label = f"{name}.{child_name}" if name else child_name
                skipped.append((child_label, f"has {hooks}: kept out of the fused ops of {label} and called as a "
                                             "module, so its hooks run"))
    return PatchReport(tuple(patched), tuple(skipped))


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def is_wan_model(model) -> bool:
    """True for a diffusers ``AutoencoderKLWan`` or its ``WanDecoder3d``: what :func:`patch` accepts."""
    wan = _wan_classes()
    return isinstance(model, wan.WanDecoder3d) or isinstance(getattr(model, "decoder", None), wan.WanDecoder3d)


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


def patch(model: nn.Module, *, recompute_conv_input: bool = True) -> nn.Module:
    """Swap the decoder hot paths of ``model`` (an ``AutoencoderKLWan`` or its decoder) for fused ops.

    ``recompute_conv_input=True`` (default) also folds the convolution that
    follows each norm + SiLU into the autograd Function
    (:func:`rms_norm_silu_pad_conv3d`), so the padded conv input is rebuilt in
    backward instead of being kept: the leanest variant.  ``False`` keeps the
    conv as a plain ``conv3d`` after :func:`rms_norm_silu_pad` (the conv saves
    its input).  Works on CPU (PyTorch reference math, lean autograd) and CUDA
    (Triton).

    Works with hooks (diffusers' layerwise casting and group offloading,
    accelerate, PyTorch module hooks) registered before or after: modules
    with hooks are called as modules, never fused past (see the module
    docstring).  Warns (:class:`PatchWarning`) when a module is left out;
    :func:`patch_report` gives the details.  Returns ``model``.  Patching
    again is harmless (it only updates ``recompute_conv_input``); undo with
    :func:`unpatch`.
    """
    wan = _wan_classes()
    decoder = _find_decoder(wan, model)
    for _, module, fn in _candidates(wan, decoder):
        if _MARK in module.__dict__ or _problem(wan, module, fn) is None:
            _install(module, fn, recompute_conv_input)
    report = _report(wan, decoder)
    if report.skipped or not report.patched:
        shown = "; ".join(f"{name}: {reason}" for name, reason in report.skipped[:4])
        more = f" (and {len(report.skipped) - 4} more)" if len(report.skipped) > 4 else ""
        head = (f"chopgrad.patch left {len(report.skipped)} decoder modules out of the fused ops"
                if report.skipped else "chopgrad.patch found nothing to patch")
        warnings.warn(f"{head}: {shown}{more}. chopgrad.patch_report(model) lists them all.",
                      PatchWarning, stacklevel=2)
    return model


def patch_report(model: nn.Module) -> PatchReport:
    """What :func:`patch` changed on ``model``'s decoder and what it left out, as things stand now."""
    wan = _wan_classes()
    return _report(wan, _find_decoder(wan, model))


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` exactly (instance attributes and hook chains restored). Returns ``model``.

    Raises ``RuntimeError`` (changing nothing) when a patched forward was
    wrapped afterwards by something other than a diffusers or accelerate
    hook: that wrapper would keep calling it.
    """
    wan = _wan_classes()
    decoder = _find_decoder(wan, model)
    restorations, lost = [], []
    for name, m in decoder.named_modules():
        if _MARK not in m.__dict__:
            m.__dict__.pop(_RECOMPUTE, None)
            continue
        slots = [slot for slot in _forward_slots(m) if _is_patched_forward(m, slot.get())]
        (restorations if slots else lost).append((name or _DECODER, m, slots))
    if lost:
        names = ", ".join(name for name, _, _ in lost)
        raise RuntimeError(
            f"chopgrad.unpatch cannot restore decoder modules {names}: their patched forward was wrapped or replaced "
            "after chopgrad.patch by something other than a diffusers or accelerate hook. Remove that wrapper "
            "(restore the forward chopgrad installed) and call unpatch again; nothing was changed."
        )
    for _, m, slots in restorations:
        _restore(m, slots)
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
    return [name or _DECODER for name, m in decoder.named_modules() if _MARK in m.__dict__]


@contextlib.contextmanager
def lean_decoder(model: Any):
    """Within the block, ``model``'s Wan decoder runs on the fused ops; afterwards it is exactly as before.

    Yields whether the fused ops are in use. A model that is not a Wan VAE (or decoder) is left alone, and so
    is one the user patched already (their patch, and its ``recompute_conv_input``, stay). Modules that cannot
    be fused are left out silently (``patch`` warns about them; ``patch_report`` lists them). The patch is
    undone on leaving the block, also when the block raises.
    """
    if not isinstance(model, nn.Module):
        yield False
        return
    wan = _wan_classes()
    try:
        decoder = _find_decoder(wan, model)
    except TypeError:
        yield False
        return
    if any(_MARK in m.__dict__ for m in decoder.modules()):
        yield True
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PatchWarning)
        patch(model)
    try:
        yield bool(_report(wan, decoder).patched)
    finally:
        unpatch(model)
