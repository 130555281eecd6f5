"""chopgrad: truncated backpropagation through causal-cache video VAE decoders (ChopGrad).

    loss = chopgrad.pixel_loss(vae, latents, target, loss="mse", d_trunc=1)
    loss.backward()

See README.md and docs/design.md for the gradient contract.
"""
from .adapters import (
    CogVideoXAdapter,
    DecodePlan,
    DecoderAdapter,
    EasyAnimateAdapter,
    FunctionalAdapter,
    HunyuanVideoAdapter,
    HunyuanVideo15Adapter,
    MochiAdapter,
    WanAdapter,
    WindowedAdapter,
    wrap,
)
from .api import decode, patch_report, pixel_loss
from .adapters.wan_patch import PatchReport, PatchWarning, patch, unpatch
from .losses import per_frame
from ._version import __version__

#: Names of the locality probe, which belongs to the command-line tools (chopgrad.tools.probe).
_PROBE_NAMES = ("ProbeResult", "probe_locality")


def __getattr__(name):
    # Existing code reaches the probe through the package; importing it on first
    # access keeps `import chopgrad` from importing the tools.
    if name in _PROBE_NAMES:
        from .tools import probe

        return getattr(probe, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CogVideoXAdapter", "DecodePlan", "DecoderAdapter", "EasyAnimateAdapter", "FunctionalAdapter", "HunyuanVideoAdapter",
    "HunyuanVideo15Adapter",
    "MochiAdapter", "WanAdapter", "WindowedAdapter",
    "PatchReport", "PatchWarning", "ProbeResult", "decode", "patch", "patch_report", "per_frame",
    "pixel_loss", "probe_locality", "unpatch",
    "wrap",
]
