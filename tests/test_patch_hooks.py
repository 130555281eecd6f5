"""chopgrad.patch on hooked models: diffusers' layerwise casting and group offloading,
accelerate hooks and PyTorch module hooks, registered before or after patching."""

from __future__ import annotations

import collections
import copy
import functools
import warnings

import pytest
import torch

from diffusers.models.autoencoders import autoencoder_kl_wan as wan
from tiny_models import tiny_wan21, tiny_wan22

from chopgrad.adapters.wan_patch import (PatchReport, PatchWarning, is_patched, patch, patch_report,
                                         patched_modules, unpatch)
from chopgrad.decoder_steps import saved_leaves_as_at_forward

CPU = torch.device("cpu")
ORDERS = ["patch_then_hook", "hook_then_patch"]


def _perturbed(make):
    vae = make()
    with torch.no_grad():  # non-trivial gammas/biases so a wrong path shows
        gen = torch.Generator().manual_seed(0)
        for p in vae.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return vae


@pytest.fixture(scope="module")
def base_vae():
    return _perturbed(tiny_wan21)


@pytest.fixture(scope="module")
def base_vae22():
    return _perturbed(tiny_wan22)


def latents(frames=3):
    return torch.randn(1, 4, frames, 4, 5, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------
# configurations: each hooks a model in place and returns the list its user hooks record calls into
# ---------------------------------------------------------------------------


def layerwise_casting(vae, path):
    vae.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    return []


def group_offload(offload_type, to_disk):
    def configure(vae, path):
        kwargs = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
        if to_disk:
            kwargs["offload_to_disk_path"] = str(path)
        vae.enable_group_offload(CPU, offload_device=CPU, offload_type=offload_type, **kwargs)
        return []

    return configure


def _signature(args):
    return tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)


def conv_pre_hooks(vae, path):
    """Forward pre-hooks on convs the patched decoder, a patched block and diffusers' resample call."""
    calls = []
    for name in ("conv_in", "mid_block.resnets.0.conv1", "up_blocks.0.upsamplers.0.time_conv"):
        vae.decoder.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: calls.append((name, _signature(args))))
    return calls


def norm_and_conv_forward_hooks(vae, path):
    """Forward hooks that change outputs (only a real module call honours them) and a pre-hook on a SiLU."""
    calls = []

    def scale_output(module, args, output, name):
        calls.append((name, _signature(args)))
        return output * 1.25

    for name in ("up_blocks.1.resnets.0.norm2", "conv_out"):
        vae.decoder.get_submodule(name).register_forward_hook(functools.partial(scale_output, name=name))
    vae.decoder.mid_block.resnets[1].nonlinearity.register_forward_pre_hook(
        lambda module, args: calls.append(("mid_block.resnets.1.nonlinearity", _signature(args))))
    return calls


CONFIGS = {
    "layerwise_casting": layerwise_casting,
    "leaf_offload_memory": group_offload("leaf_level", to_disk=False),
    "leaf_offload_disk": group_offload("leaf_level", to_disk=True),
    "block_offload_memory": group_offload("block_level", to_disk=False),
    "block_offload_disk": group_offload("block_level", to_disk=True),
    "conv_pre_hooks": conv_pre_hooks,
    "norm_and_conv_forward_hooks": norm_and_conv_forward_hooks,
}
# plain autograd through diffusers' own decode works here (layerwise casting restores bf16 weights and disk
# offloading empties them after each forward, before backward reads them)
PLAIN_AUTOGRAD = {"leaf_offload_memory", "block_offload_memory", "conv_pre_hooks", "norm_and_conv_forward_hooks"}


def hooked_and_patched(vae, order, add_hooks):
    """Patches ``vae`` and adds hooks with ``add_hooks(vae) -> calls``, in ``order``; returns the calls."""
    if order == "patch_then_hook":
        patch(vae)
        return add_hooks(vae)
    calls = add_hooks(vae)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PatchWarning)  # hooked convs are reported as kept out of the fused ops
        patch(vae)
    return calls


def build(base, config, path, order=None):
    """A copy of ``base`` configured by ``config``; patched in ``order`` (unpatched when ``order`` is None)."""
    vae = copy.deepcopy(base)
    if order is None:
        return vae, CONFIGS[config](vae, path)
    return vae, hooked_and_patched(vae, order, lambda v: CONFIGS[config](v, path))


def count_diffusers_hook_calls(vae) -> collections.Counter:
    """Counts (module, hook, positional args, keyword names) of every diffusers hook's pre_forward."""
    counts: collections.Counter = collections.Counter()
    for name, module in vae.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for hook_name, ref in zip(registry._hook_order, registry._fn_refs):
            def counted(module, *args, _inner=ref.pre_forward, _key=(name, hook_name), **kwargs):
                counts[(*_key, _signature(args), tuple(sorted(kwargs)))] += 1
                return _inner(module, *args, **kwargs)

            ref.pre_forward = counted
    return counts


def decode(vae, z, with_grad):
    if not with_grad:
        with torch.no_grad():
            return vae.decode(z).sample, None
    z = z.clone().requires_grad_()
    out = vae.decode(z).sample
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (grad,) = torch.autograd.grad((out * weights).sum(), [z])
    return out.detach(), grad


def assert_close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def assert_grad_close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(want.abs().max().item(), 1.0))


def assert_decodes_like(vae, z, want, want_grad):
    got, grad = decode(vae, z, with_grad=True)
    assert_close(got, want)
    assert_grad_close(grad, want_grad)


def rounded_copy(base, cast_model):
    """``base`` with the weights ``cast_model``'s layerwise casting stores in bf16 rounded to bf16 and back."""
    ref = copy.deepcopy(base)
    cast = {name for name, m in cast_model.named_modules()
            if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.get_hook("layerwise_casting")}
    assert cast
    with torch.no_grad():
        for name, m in ref.named_modules():
            if name in cast:
                for p in m.parameters():
                    p.copy_(p.to(torch.bfloat16).float())
    return ref


# ---------------------------------------------------------------------------
# values, gradients and hook calls equal those of the same configured, unpatched model
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_hooked_patched_decode_equals_unpatched(base_vae, config, order, tmp_path):
    z = latents()
    with_grad = config in PLAIN_AUTOGRAD
    ref, ref_calls = build(base_vae, config, tmp_path / "ref")
    ref_hook_counts = count_diffusers_hook_calls(ref)
    want, want_grad = decode(ref, z, with_grad)

    vae, calls = build(base_vae, config, tmp_path / "patched", order)
    assert set(patched_modules(vae)) == set(_candidate_names(vae))  # hooked containers too, inside their hooks
    hook_counts = count_diffusers_hook_calls(vae)
    got, grad = decode(vae, z, with_grad)

    assert torch.isfinite(got).all()
    assert_close(got, want)
    assert hook_counts == ref_hook_counts  # every diffusers hook ran, as often and with the same arguments
    assert calls == ref_calls  # every user hook ran, in the same order and with the same arguments
    if config.endswith("hooks"):
        assert calls
    if with_grad:
        assert_grad_close(grad, want_grad)
    if config == "layerwise_casting":
        # what layerwise casting computes: an fp32 model with bf16-rounded conv weights
        assert ref_hook_counts
        rounded, _ = decode(rounded_copy(base_vae, vae), z, with_grad=False)
        assert_close(got, rounded)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("config", ["layerwise_casting", "leaf_offload_disk", "block_offload_disk"])
def test_gradients_through_swapped_weights_with_a_pack_hook(base_vae, config, order, tmp_path):
    """With a saved-tensor hook that keeps leaves as at forward time, the fused ops' gradients are right too.

    Layerwise casting and disk offloading swap a weight's ``.data`` after each
    module's forward; the fused autograd Functions must save their weights
    through ``save_for_backward`` so such a hook sees them.
    """
    z = latents()
    oracle = rounded_copy(base_vae, build(base_vae, config, tmp_path / "probe")[0]) \
        if config == "layerwise_casting" else copy.deepcopy(base_vae)
    want, want_grad = decode(oracle, z, with_grad=True)
    vae, _ = build(base_vae, config, tmp_path / "patched", order)
    assert set(patched_modules(vae)) == set(_candidate_names(vae))
    with saved_leaves_as_at_forward():  # what pixel_loss wraps each decoder step in
        got, grad = decode(vae, z, with_grad=True)
    assert torch.isfinite(grad).all()
    assert_close(got, want)
    assert_grad_close(grad, want_grad)


def test_wan22_decoder_with_layerwise_casting_and_block_offload(base_vae22, tmp_path):
    z = latents(frames=2)
    for config in ("layerwise_casting", "block_offload_disk"):
        for order in ORDERS:
            ref, _ = build(base_vae22, config, tmp_path / f"{config}-{order}-ref")
            want, _ = decode(ref, z, with_grad=False)
            vae, _ = build(base_vae22, config, tmp_path / f"{config}-{order}", order)
            got, _ = decode(vae, z, with_grad=False)
            assert torch.isfinite(got).all()
            assert_close(got, want)


def test_global_module_hooks_see_every_call_diffusers_makes(base_vae):
    z = latents(frames=2)
    ref = copy.deepcopy(base_vae)
    want_out, _ = decode(ref, z, with_grad=False)
    patched_first = patch(copy.deepcopy(base_vae))
    calls = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: calls.append((type(module).__name__, _signature(args))))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PatchWarning)
            patched_second = patch(copy.deepcopy(base_vae))
        decode(ref, z, with_grad=False)
        want = list(calls)
        for vae in (patched_first, patched_second):
            calls.clear()
            out, _ = decode(vae, z, with_grad=False)
            assert calls == want
            assert_close(out, want_out)
    finally:
        handle.remove()
    # without the global hook the fused path is back
    assert "rms_norm_silu_pad_conv3d" in dict(patch_report(patched_second).patched)["mid_block.resnets.0"]


# ---------------------------------------------------------------------------
# accelerate hooks (the chain keeps the inner forward in module._old_forward)
# ---------------------------------------------------------------------------


def test_accelerate_hooks_in_either_order(base_vae):
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class Recorder(ModelHook):
        def __init__(self, calls, name):
            self.calls, self.name = calls, name

        def pre_forward(self, module, *args, **kwargs):
            self.calls.append((self.name, _signature(args), tuple(sorted(kwargs))))
            return args, kwargs

    hooked = ("", "mid_block.resnets.0", "up_blocks.0.resnets.1.conv2")

    def add_hooks(vae):
        calls = []
        for name in hooked:
            add_hook_to_module(vae.decoder.get_submodule(name), Recorder(calls, name))
        return calls

    z = latents()
    ref = copy.deepcopy(base_vae)
    ref_calls = add_hooks(ref)
    want, want_grad = decode(ref, z, with_grad=True)
    want_calls = list(ref_calls)
    for order in ORDERS:
        vae = copy.deepcopy(base_vae)
        calls = hooked_and_patched(vae, order, add_hooks)
        assert {"<decoder>", "mid_block.resnets.0", "up_blocks.0.resnets.1.conv2"} <= set(patched_modules(vae))
        assert_decodes_like(vae, z, want, want_grad)
        assert calls == want_calls
        unpatch(vae)
        for name in hooked:
            module = vae.decoder.get_submodule(name)
            assert module._old_forward.__func__ is type(module).forward and module._old_forward.__self__ is module
            assert module.forward.__wrapped__ == module._old_forward
            assert module.forward.__name__ == "forward"
            remove_hook_from_module(module)
        assert torch.equal(decode(vae, z, with_grad=False)[0], decode(ref, z, with_grad=False)[0])

    # hooks removed while patched: the patched forward stays, unpatch still cleans up
    vae = patch(copy.deepcopy(base_vae))
    add_hooks(vae)
    for name in hooked:
        remove_hook_from_module(vae.decoder.get_submodule(name))
    assert_close(decode(vae, z, with_grad=False)[0], want)
    unpatch(vae)
    assert not any("_chopgrad_patch" in m.__dict__ for m in vae.modules())


def test_diffusers_hook_with_its_own_forward_in_either_order(base_vae):
    """A diffusers hook with ``new_forward`` keeps the inner forward in ``original_forward``."""
    from diffusers.hooks import HookRegistry, ModelHook

    class Recorder(ModelHook):
        def __init__(self, calls, name):
            super().__init__()
            self.calls, self.name = calls, name

        def new_forward(self, module, *args, **kwargs):
            self.calls.append((self.name, _signature(args), tuple(sorted(kwargs))))
            return self.fn_ref.original_forward(*args, **kwargs)

    hooked = ("mid_block.resnets.1", "up_blocks.2.resnets.0")

    def add_hooks(vae):
        calls = []
        for name in hooked:
            HookRegistry.check_if_exists_or_initialize(vae.decoder.get_submodule(name)).register_hook(
                Recorder(calls, name), "recorder")
        return calls

    z = latents(frames=2)
    ref = copy.deepcopy(base_vae)
    ref_calls = add_hooks(ref)
    want, want_grad = decode(ref, z, with_grad=True)
    for order in ORDERS:
        vae = copy.deepcopy(base_vae)
        calls = hooked_and_patched(vae, order, add_hooks)
        assert set(hooked) <= set(patched_modules(vae))
        assert_decodes_like(vae, z, want, want_grad)
        assert calls == ref_calls
        unpatch(vae)
        for name in hooked:
            module = vae.decoder.get_submodule(name)
            inner = module._diffusers_hook._fn_refs[0].original_forward
            assert inner.__func__ is type(module).forward and inner.__self__ is module
            module._diffusers_hook.remove_hook("recorder")
            assert "forward" not in module.__dict__ or module.forward.__func__ is type(module).forward


# ---------------------------------------------------------------------------
# report and warnings
# ---------------------------------------------------------------------------


def _candidate_names(vae):
    names = []
    for name, m in vae.decoder.named_modules():
        if m is vae.decoder:
            names.append("<decoder>")
        elif type(m) is wan.WanResidualBlock or (type(m) is wan.WanCausalConv3d and any(m._padding)):
            names.append(name)
    return names


def test_report_names_hooked_modules_with_reasons_and_patch_warns(base_vae, tmp_path):
    vae, _ = build(base_vae, "layerwise_casting", tmp_path)
    with pytest.warns(PatchWarning, match=r"left \d+ decoder modules out of the fused ops.*layerwise_casting"):
        patch(vae)
    report = patch_report(vae)
    assert isinstance(report, PatchReport)
    patched, skipped = dict(report.patched), dict(report.skipped)
    assert set(patched) == set(_candidate_names(vae))  # hooked blocks and convs are patched inside their hooks
    assert "mid_block.resnets.0.conv1" in skipped
    assert "layerwise_casting" in skipped["mid_block.resnets.0.conv1"]
    assert "called as a module" in skipped["mid_block.resnets.0.conv1"]
    assert "conv1: called as a module" in patched["mid_block.resnets.0"]
    assert "layerwise_casting" in patched["mid_block.resnets.0.conv1"]  # where its patched forward sits
    assert "mid_block.resnets.0.conv1" in str(report)


def test_report_follows_hooks_added_and_removed_after_patching(base_vae):
    vae = copy.deepcopy(base_vae)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PatchWarning)  # nothing to report on a plain model
        patch(vae)
    assert not patch_report(vae).skipped
    z = latents(frames=2)
    want, _ = decode(vae, z, with_grad=False)
    conv = vae.decoder.up_blocks[1].resnets[0].conv1
    calls = []
    handle = conv.register_forward_pre_hook(lambda module, args: calls.append(len(args)))
    report = patch_report(vae)
    assert "forward pre-hooks" in dict(report.skipped)["up_blocks.1.resnets.0.conv1"]
    assert_close(decode(vae, z, with_grad=False)[0], want)
    assert calls == [2, 2]  # once per decoder step, with diffusers' (x, cache) arguments
    handle.remove()
    assert not patch_report(vae).skipped
    assert "rms_norm_silu_pad_conv3d" in dict(patch_report(vae).patched)["up_blocks.1.resnets.0"]


def test_unrecognised_forward_wrapper_is_reported_and_nothing_is_silent(base_vae):
    vae = copy.deepcopy(base_vae)
    block = vae.decoder.up_blocks[0].resnets[0]
    original = block.forward
    block.forward = lambda *args, **kwargs: original(*args, **kwargs)
    with pytest.warns(PatchWarning, match="up_blocks.0.resnets.0: its forward is wrapped"):
        patch(vae)
    report = patch_report(vae)
    assert "neither a diffusers nor an accelerate hook" in dict(report.skipped)["up_blocks.0.resnets.0"]
    accounted = {name for name, _ in report.patched} | {name for name, _ in report.skipped}
    assert set(_candidate_names(vae)) <= accounted


# ---------------------------------------------------------------------------
# unpatch: hook chains and forwards exactly as before
# ---------------------------------------------------------------------------


def _describe(fn, vae):
    """A model-independent picture of one forward slot: what it calls, its name and what it wraps."""
    if fn is None:
        return None
    names = {id(m): n for n, m in vae.named_modules()}
    if hasattr(fn, "__func__"):
        return ("method", fn.__func__, names.get(id(fn.__self__)))
    inner = getattr(fn, "__wrapped__", None)
    return (type(fn).__name__, getattr(fn, "__name__", None), getattr(fn, "__doc__", None),
            _describe(inner, vae) if inner is not None else None)


def forward_chains(vae, as_objects=False):
    """Per module: the instance forward, accelerate's _old_forward and every diffusers chain slot."""
    picture = (lambda fn: fn) if as_objects else (lambda fn: _describe(fn, vae))
    chains = {}
    for name, m in vae.named_modules():
        d = m.__dict__
        slots = [picture(d.get("forward")), picture(d.get("_old_forward"))]
        registry = d.get("_diffusers_hook")
        if registry is not None:
            slots += [(hook, picture(ref.forward), picture(ref.original_forward))
                      for hook, ref in zip(registry._hook_order, registry._fn_refs)]
        chains[name] = slots
    return chains


def _same_objects(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_objects(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_objects(x, y) for x, y in zip(a, b))
    return a is b or (a == b if isinstance(a, str) else False)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("config", ["layerwise_casting", "leaf_offload_disk", "block_offload_memory",
                                    "block_offload_disk", "conv_pre_hooks"])
def test_unpatch_restores_hook_chains_exactly(base_vae, config, order, tmp_path):
    z = latents(frames=2)
    never_patched, _ = build(base_vae, config, tmp_path / "ref")
    want, _ = decode(never_patched, z, with_grad=False)

    vae = copy.deepcopy(base_vae)
    if order == "hook_then_patch":
        CONFIGS[config](vae, tmp_path / "patched")
        before = forward_chains(vae, as_objects=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PatchWarning)
            patch(vae)
        assert set(patched_modules(vae)) == set(_candidate_names(vae))
        unpatch(vae)
        assert _same_objects(forward_chains(vae, as_objects=True), before)
    else:
        patch(vae)
        CONFIGS[config](vae, tmp_path / "patched")
        unpatch(vae)
    assert not is_patched(vae)
    assert not any(k.startswith("_chopgrad") for m in vae.modules() for k in m.__dict__)
    # as if chopgrad had never been there: the same chains as the never-patched model, the same bits out
    assert forward_chains(vae) == forward_chains(never_patched)
    assert torch.equal(decode(vae, z, with_grad=False)[0], want)


def test_unpatch_refuses_to_leave_a_wrapped_patched_forward_behind(base_vae):
    vae = patch(copy.deepcopy(base_vae))
    block = vae.decoder.mid_block.resnets[1]
    patched_forward = block.forward
    block.forward = lambda *args, **kwargs: patched_forward(*args, **kwargs)
    names_before = patched_modules(vae)
    with pytest.raises(RuntimeError, match=r"mid_block\.resnets\.1.*Remove that wrapper"):
        unpatch(vae)
    assert patched_modules(vae) == names_before  # nothing was changed
    block.forward = patched_forward
    unpatch(vae)
    assert not is_patched(vae)
