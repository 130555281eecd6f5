"""chopgrad: truncated backpropagation through causal-cache video VAE decoders (ChopGrad).

    loss = chopgrad.pixel_loss(vae, latents, target, loss="mse", d_trunc=1)
    loss.backward()

See README.md and docs/design.md for the gradient contract.
"""
from .adapters import (
    CogVideoXAdapter,
    DecodePlan,
    DecoderAdapter,
    FunctionalAdapter,
    WanAdapter,
    detach_state,
    wrap,
)
from .api import decode, pixel_loss
from .kernels import patch, unpatch
from .losses import per_frame
from .probe import ProbeResult, probe_locality

__version__ = "0.1.0"

__all__ = [
    "CogVideoXAdapter", "DecodePlan", "DecoderAdapter", "FunctionalAdapter", "WanAdapter",
    "ProbeResult", "decode", "detach_state", "patch", "per_frame", "pixel_loss", "probe_locality", "unpatch",
    "wrap",
]
