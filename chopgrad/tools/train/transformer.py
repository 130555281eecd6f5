"""A pretrained Wan transformer as a one-step restorer, fine-tuned with LoRA (`chopgrad train --transformer`).

The one-step rule is the flow-matching rule of the Wan scheduler (diffusers' ``FlowMatchEulerDiscreteScheduler``,
1000 training timesteps): a noisy latent at timestep ``t`` is ``x_t = (1 - s) x_0 + s noise`` with
``s = t / 1000``, and the transformer predicts the velocity ``v = noise - x_0``. The restorer treats the
condition latents as ``x_t`` at one fixed timestep and returns ``x_0 = x_t - s v``. The default timestep, 399,
is the one DOVE uses: a degraded clip already holds the coarse content, so it enters as a lightly noised latent
rather than as pure noise (t = 999).

The transformer sees latents normalised as the Wan pipelines give them, ``(z - latents_mean) / latents_std`` with
the VAE's statistics, and the restorer un-normalises its output, so it maps raw VAE latents to raw VAE latents as
the trainer's other models do. Channels beyond the transformer's ``in_channels`` (the inpainting mask, the
driving first frame) enter through a second patch embedding whose weights start at zero, added to the
pretrained one: at step 0 the restorer computes what the pretrained transformer computes on the condition
latents alone. The text condition is a fixed prompt embedding: one the user computed, or a zero embedding of the
model's ``text_dim``. One zero token gives the same cross-attention output as any number of them (every key and
value is the same), so it stands for an all-zero embedding of any length.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch
import torch.nn as nn

#: diffusers' FlowMatchEulerDiscreteScheduler, as the Wan pipelines configure it
NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_TIMESTEP = 399
#: attention projections (self- and cross-attention) and the feed-forward layers of every block
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
TRANSFORMER_CLASS = "WanTransformer3DModel"
#: what a run writes into OUT/lora: diffusers' pipeline LoRA file, and the extra input embedding beside it
LORA_FOLDER = "lora"
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
EXTRA_EMBEDDING_FILE = "extra_input_embedding.safetensors"
#: the rest of what the restorer needs at inference: the prompt embedding it was trained with, and (as metadata)
#: its timestep, its extra channels and the base transformer's folder
RESTORER_FILE = "restorer.safetensors"


def import_peft():
    """The peft module, or ValueError saying how to get it (peft imports transformers when it is imported)."""
    try:
        import peft
    except ImportError as exc:
        raise ValueError(f"--transformer trains LoRA adapters with peft, which cannot be imported ({exc}); install "
                         f"it with `pip install peft` (it brings transformers, which it imports)") from None
    return peft


def read_transformer_config(path: str) -> dict:
    """The config.json of a diffusers WanTransformer3DModel folder; ValueError naming --transformer otherwise."""
    if not isinstance(path, str) or not os.path.isdir(path):
        raise ValueError(f"--transformer: {path!r} is not a folder; give a local diffusers WanTransformer3DModel "
                         f"folder (save_pretrained layout, e.g. the transformer/ subfolder of "
                         f"Wan2.1-T2V-1.3B-Diffusers); nothing is downloaded")
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--transformer: {path!r} has no config.json; give a diffusers WanTransformer3DModel "
                         f"folder (what save_pretrained writes)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--transformer: {config_path!r} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("_class_name") != TRANSFORMER_CLASS:
        found = config.get("_class_name") if isinstance(config, dict) else None
        raise ValueError(f"--transformer: {path!r} holds a {found or 'model without _class_name'}, not a "
                         f"{TRANSFORMER_CLASS}")
    return config


def check_transformer_fits(config: dict, *, latent_channels: int, latent_size: Sequence[int], path: str) -> None:
    """ValueError naming --transformer (or --size) when the transformer cannot map this VAE's latents."""
    in_channels = config.get("in_channels", 16)
    out_channels = config.get("out_channels") or in_channels
    if in_channels != latent_channels or out_channels != latent_channels:
        raise ValueError(f"--transformer: {path!r} takes {in_channels} and returns {out_channels} latent channels, "
                         f"but the VAE's latents have {latent_channels}; the restorer needs a text-to-video "
                         f"transformer whose in_channels and out_channels equal the VAE's latent channels (the "
                         f"task's extra channels enter through their own embedding)")
    patch = tuple(config.get("patch_size", (1, 2, 2)))
    for side, p in zip(latent_size, patch[1:]):
        if side % p:
            raise ValueError(f"--size: the transformer's patch size {patch} needs latent sides that are multiples "
                             f"of {p}, and this size gives latents of {tuple(latent_size)}; use pixel sides that "
                             f"are multiples of {p} times the VAE's spatial factor")


def load_prompt_embeds(path: Optional[str], text_dim: int) -> torch.Tensor:
    """(1, L, text_dim) float32: the one tensor of a safetensors file, or one zero token without a file."""
    if path is None:
        return torch.zeros(1, 1, text_dim)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"--prompt-embeds: {path!r} cannot be read as safetensors ({exc})") from None
    if len(tensors) != 1:
        raise ValueError(f"--prompt-embeds: {path!r} must hold exactly one tensor (the text encoder's output), "
                         f"found {len(tensors)}: {sorted(tensors)[:5]}")
    (embeds,) = tensors.values()
    if embeds.dim() == 2:
        embeds = embeds.unsqueeze(0)
    if embeds.dim() != 3 or embeds.shape[0] != 1 or embeds.shape[2] != text_dim or not embeds.is_floating_point():
        raise ValueError(f"--prompt-embeds: expected a float tensor (L, {text_dim}) or (1, L, {text_dim}) (the "
                         f"transformer's text_dim is {text_dim}), got {embeds.dtype} {tuple(embeds.shape)}")
    if not torch.isfinite(embeds).all():
        raise ValueError(f"--prompt-embeds: {path!r} holds non-finite values")
    return embeds.float()


def check_transformer_inputs(path: str, prompt_embeds: Optional[str],
                             lora_targets: Optional[Sequence[str]] = None) -> dict:
    """Everything --transformer needs that can be checked before any model loads: the folder's config (returned),
    peft, the --prompt-embeds file against the transformer's text_dim and, given, the --lora-targets against the
    modules the config builds (on the meta device: no weights). ValueError naming the option."""
    config = read_transformer_config(path)
    import_peft()
    load_prompt_embeds(prompt_embeds, config.get("text_dim", 4096))
    if lora_targets is not None:
        from diffusers import WanTransformer3DModel

        with torch.device("meta"):
            skeleton = WanTransformer3DModel.from_config(config)
        check_lora_targets(dict(skeleton.named_modules()), lora_targets)
    return config


def latent_statistics(vae, channels: int) -> tuple[Sequence[float], Sequence[float]]:
    """(latents_mean, latents_std) of `vae`'s config, what the Wan pipelines normalise latents with; zeros and
    ones for a VAE whose config has none (its latents are used as they are)."""
    mean = getattr(vae.config, "latents_mean", None) or [0.0] * channels
    std = getattr(vae.config, "latents_std", None) or [1.0] * channels
    return mean, std


class WidenedPatchEmbedding(nn.Module):
    """The pretrained patch embedding on the first ``in_channels`` input channels, plus a zero-initialised one
    (same kernel and stride, no bias) on the channels after them."""

    def __init__(self, pretrained: nn.Conv3d, extra_channels: int):
        super().__init__()
        self.pretrained = pretrained
        self.extra = nn.Conv3d(extra_channels, pretrained.out_channels, kernel_size=pretrained.kernel_size,
                               stride=pretrained.stride, bias=False, device=pretrained.weight.device)
        nn.init.zeros_(self.extra.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = self.pretrained.in_channels
        return self.pretrained(x[:, :split]) + self.extra(x[:, split:])


class OneStepWanRestorer(nn.Module):
    """Condition latents ``(B, z_dim + extra, T, h, w)`` -> restored latents ``(B, z_dim, T, h, w)`` in one
    transformer call (see the module docstring for the rule).

    ``transformer``: a diffusers WanTransformer3DModel with its LoRA adapter added (or any module with its
    forward signature). Only the LoRA weights and the extra embedding are meant to be trained.
    """

    def __init__(self, transformer: nn.Module, *, extra_channels: int, timestep: int,
                 prompt_embeds: torch.Tensor, latents_mean: Sequence[float], latents_std: Sequence[float]):
        super().__init__()
        if not 0 < timestep < NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"timestep must be in 1 .. {NUM_TRAIN_TIMESTEPS - 1}, got {timestep!r}")
        self.transformer = transformer
        self.z_dim = transformer.config.in_channels
        self.extra_channels = extra_channels
        self.timestep = int(timestep)
        embedding = transformer.patch_embedding
        if isinstance(embedding, WidenedPatchEmbedding):  # widened already, as load_extra_embedding does
            if embedding.extra.in_channels != extra_channels:
                raise ValueError(f"extra_channels is {extra_channels}, but the transformer's widened patch "
                                 f"embedding takes {embedding.extra.in_channels} extra channels")
        elif extra_channels:
            transformer.patch_embedding = WidenedPatchEmbedding(embedding, extra_channels)
        for name, values in (("latents_mean", latents_mean), ("latents_std", latents_std)):
            if len(values) != self.z_dim:
                raise ValueError(f"{name}: the VAE's config lists {len(values)} values for its {self.z_dim} latent "
                                 f"channels; the transformer sees latents normalised with one per channel")
        shape = (1, self.z_dim, 1, 1, 1)
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)
        self.register_buffer("latents_mean", torch.tensor(latents_mean, dtype=torch.float32).view(shape),
                             persistent=False)
        self.register_buffer("latents_std", torch.tensor(latents_std, dtype=torch.float32).view(shape),
                             persistent=False)

    @property
    def sigma(self) -> float:
        return self.timestep / NUM_TRAIN_TIMESTEPS

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        expected = self.z_dim + self.extra_channels
        if inputs.dim() != 5 or inputs.shape[1] != expected:
            raise ValueError(f"inputs must be (B, {expected}, T, h, w) (z_dim {self.z_dim} + {self.extra_channels} "
                             f"extra channels), got {tuple(inputs.shape)}")
        batch = inputs.shape[0]
        noisy = (inputs[:, :self.z_dim].float() - self.latents_mean) / self.latents_std
        hidden = torch.cat([noisy, inputs[:, self.z_dim:].float()], dim=1)
        timestep = torch.full((batch,), self.timestep, device=inputs.device, dtype=torch.long)
        text = self.prompt_embeds.expand(batch, -1, -1)
        velocity = self.transformer(hidden, timestep, text, return_dict=False)[0]
        clean = noisy - self.sigma * velocity.float()
        return clean * self.latents_std + self.latents_mean


def add_lora(transformer: nn.Module, *, rank: int, alpha: float, targets: Sequence[str]) -> None:
    """Freezes `transformer` and adds a trainable LoRA adapter (peft) on the modules named by `targets`.

    ValueError when no module matches a target name (a typo would otherwise train nothing there).
    """
    import_peft()
    from peft import LoraConfig

    check_lora_targets(dict(transformer.named_modules()), targets)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                       init_lora_weights=True))


def check_lora_targets(modules: dict, targets: Sequence[str]) -> None:
    """ValueError naming --lora-targets when a target matches no module of `modules` ({name: module}), or a module
    that LoRA cannot adapt."""
    matched = {t: [m for n, m in modules.items() if n == t or n.endswith("." + t)] for t in targets}
    missing = [t for t, found in matched.items() if not found]
    if missing:
        raise ValueError(f"--lora-targets: no module of the transformer is named {', '.join(map(repr, missing))}; "
                         f"the defaults are {' '.join(DEFAULT_LORA_TARGETS)}")
    # peft adapts layers (Linear, Conv, Embedding), not the blocks that hold them; its own error prints the block
    not_layers = [f"{t!r} ({type(found[0]).__name__})" for t, found in matched.items()
                  if not all(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)) for m in found)]
    if not_layers:
        raise ValueError(f"--lora-targets: LoRA adapts Linear, Conv and Embedding layers, and "
                         f"{', '.join(not_layers)} is not one; name the layers inside it (e.g. to_q to_k to_v "
                         f"to_out.0 of an attention block)")


def load_restorer(path: str, *, latent_channels: int, extra_channels: int, timestep: int,
                  prompt_embeds: Optional[str], lora_rank: int, lora_alpha: float, lora_targets: Sequence[str],
                  latents_mean: Sequence[float], latents_std: Sequence[float], base_dtype: torch.dtype,
                  gradient_checkpointing: bool) -> OneStepWanRestorer:
    """The transformer in `path` (read-only) with a fresh LoRA adapter, as a OneStepWanRestorer.

    The frozen base weights are kept in `base_dtype`; the LoRA weights and the extra embedding in float32.
    """
    from diffusers import WanTransformer3DModel

    config = read_transformer_config(path)
    embeds = load_prompt_embeds(prompt_embeds, config.get("text_dim", 4096))
    transformer = WanTransformer3DModel.from_pretrained(path, torch_dtype=torch.float32, local_files_only=True)
    if transformer.config.in_channels != latent_channels:  # config.json and the loaded model disagree
        raise ValueError(f"--transformer: {path!r} loaded with in_channels {transformer.config.in_channels}, the "
                         f"VAE's latents have {latent_channels}")
    add_lora(transformer, rank=lora_rank, alpha=lora_alpha, targets=lora_targets)
    for p in transformer.parameters():
        p.data = p.data.to(torch.float32 if p.requires_grad else base_dtype)
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return OneStepWanRestorer(transformer, extra_channels=extra_channels, timestep=timestep, prompt_embeds=embeds,
                              latents_mean=latents_mean, latents_std=latents_std)


def lora_state_dict(restorer: OneStepWanRestorer) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers' transformer layout (``blocks.0.attn1.to_q.lora_A.weight``, ...)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().contiguous() for k, v in get_peft_model_state_dict(restorer.transformer).items()}


def save_lora(restorer: OneStepWanRestorer, folder: str, base: Optional[str] = None) -> str:
    """Writes the adapter as diffusers' Wan pipelines save LoRA weights (keys under ``transformer.``), the extra
    input embedding beside it when there is one, and RESTORER_FILE (`base`: the base transformer's folder, which
    `load_trained_restorer` loads by default); replaces `folder` as a whole. Returns `folder`."""
    import shutil

    from diffusers.loaders import WanLoraLoaderMixin
    from safetensors.torch import save_file

    folder = os.path.normpath(folder)
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    adapter_config = restorer.transformer.peft_config["default"]
    metadata = {"r": adapter_config.r, "lora_alpha": adapter_config.lora_alpha,
                "target_modules": sorted(adapter_config.target_modules), "init_lora_weights": True}
    WanLoraLoaderMixin.save_lora_weights(partial, transformer_lora_layers=lora_state_dict(restorer),
                                         transformer_lora_adapter_metadata=metadata, weight_name=LORA_WEIGHTS_FILE)
    embedding = restorer.transformer.patch_embedding
    if isinstance(embedding, WidenedPatchEmbedding):
        save_file({"weight": embedding.extra.weight.detach().float().contiguous()},
                  os.path.join(partial, EXTRA_EMBEDDING_FILE),
                  metadata={"in_channels_offset": str(embedding.pretrained.in_channels),
                            "extra_channels": str(embedding.extra.in_channels)})
    save_file({"prompt_embeds": restorer.prompt_embeds.detach().float().cpu().contiguous()},
              os.path.join(partial, RESTORER_FILE),
              metadata={"timestep": str(restorer.timestep), "extra_channels": str(restorer.extra_channels),
                        "base": os.path.abspath(base) if base else ""})
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.rename(partial, folder)
    return folder


def load_extra_embedding(transformer: nn.Module, folder: str) -> nn.Module:
    """Widens `transformer`'s patch embedding with the extra input embedding saved in `folder` (a no-op when the
    run had no extra channels). Returns `transformer`."""
    from safetensors.torch import load_file

    path = os.path.join(folder, EXTRA_EMBEDDING_FILE)
    if not os.path.isfile(path):
        return transformer
    weight = load_file(path)["weight"]
    widened = WidenedPatchEmbedding(transformer.patch_embedding, weight.shape[1])
    with torch.no_grad():
        widened.extra.weight.copy_(weight.to(widened.extra.weight))
    transformer.patch_embedding = widened
    return transformer


def load_trained_restorer(folder: str, vae, *, base: Optional[str] = None) -> OneStepWanRestorer:
    """The restorer a `chopgrad train --transformer` run saved in `folder` (its OUT/lora), in eval mode.

    `vae`: the run's VAE (its latent statistics); `base`: the base transformer's folder (default: the one the run
    trained, recorded in RESTORER_FILE). The adapter loads through diffusers' ``load_lora_adapter``.
    """
    from diffusers import WanTransformer3DModel
    from safetensors import safe_open

    path = os.path.join(folder, RESTORER_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"folder: {folder!r} has no {RESTORER_FILE}; give the lora/ folder of a chopgrad train "
                         f"--transformer run")
    with safe_open(path, "pt") as f:
        metadata = f.metadata() or {}
        prompt_embeds = f.get_tensor("prompt_embeds")
    base = base or metadata.get("base")
    if not base:
        raise ValueError(f"base: {path!r} records no base transformer folder; pass base=")
    read_transformer_config(base)
    transformer = WanTransformer3DModel.from_pretrained(base, local_files_only=True)
    transformer.load_lora_adapter(folder, use_safetensors=True)
    load_extra_embedding(transformer, folder)
    mean, std = latent_statistics(vae, transformer.config.in_channels)
    return OneStepWanRestorer(transformer, extra_channels=int(metadata["extra_channels"]),
                              timestep=int(metadata["timestep"]), prompt_embeds=prompt_embeds,
                              latents_mean=mean, latents_std=std).eval()


__all__ = ["DEFAULT_LORA_TARGETS", "DEFAULT_TIMESTEP", "EXTRA_EMBEDDING_FILE", "LORA_FOLDER", "LORA_WEIGHTS_FILE",
           "NUM_TRAIN_TIMESTEPS", "OneStepWanRestorer", "RESTORER_FILE", "WidenedPatchEmbedding", "add_lora",
           "check_transformer_fits", "check_transformer_inputs", "import_peft", "latent_statistics", "load_extra_embedding", "load_prompt_embeds", "load_restorer",
           "load_trained_restorer", "lora_state_dict", "read_transformer_config", "save_lora"]
