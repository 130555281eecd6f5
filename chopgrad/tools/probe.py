"""`chopgrad probe`: the temporal locality that truncated backprop relies on.

    from chopgrad.tools.probe import probe_locality
    result = probe_locality(vae, latents, target, eps=1e-3)
    print(result.alpha, result.recommended_d_trunc)

influence(d) is the mean over decoder steps i >= d of
||d l_i / d z_{i-d}|| / ||d l_i / d z_i||: how strongly the loss of group i
reaches back to the latent group d steps earlier through the cache, computed
exactly (one backward pass of each step's loss through the full graph from
step 0). A fit `influence(d) ~ C * exp(-alpha * d)` (least squares on log
influence, d >= 1) gives the recommended `d_trunc = ceil(log(C / eps) / alpha)`:
the smallest distance whose predicted influence is below `eps`. With nothing
measured beyond d = 0 (one decoder step, or `max_distance=0`) there is nothing
to fit: C and alpha are NaN and there is no recommendation. Also reported:
cosine similarity and relative error, against the exact gradient, of the
truncated latent gradient and of the parameter gradient of a small upstream
module (a 1x1x1 Conv3d that produces the decoded latents) for each d_trunc.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch

from chopgrad.adapters import wrap
from chopgrad.api import pixel_loss

from .metrics import gradient_fidelity, squared_errors_per_step


@dataclass
class ProbeResult:
    distances: list          # d = 0..max_distance
    influence: list          # normalised influence per distance (influence[0] == 1)
    C: float                 # fit influence(d) ~ C * exp(-alpha * d); NaN when nothing beyond d = 0 was measured
    alpha: float             # inf when the influence beyond d = 0 is exactly 0
    eps: float
    recommended_d_trunc: Optional[int]  # None when the influence does not decay (alpha <= 0) or was not measured
    d_truncs: list = field(default_factory=list)
    latent_cosine: list = field(default_factory=list)
    latent_rel_error: list = field(default_factory=list)
    param_cosine: list = field(default_factory=list)
    param_rel_error: list = field(default_factory=list)
    num_steps: int = 0

    @property
    def measured(self) -> bool:
        """Whether anything beyond distance 0 was measured, so that the fit means something."""
        return any(d >= 1 and math.isfinite(v) for d, v in zip(self.distances, self.influence))

    def to_dict(self) -> dict:
        """The fields, with a non-finite number (alpha = inf, a NaN) as None: JSON has no Infinity or NaN."""
        return _finite_or_none(asdict(self))

    def table(self) -> str:
        if not self.measured:
            fit = "n/a (nothing measured beyond distance 0: one decoder step, or max_distance 0)"
            recommended = "n/a"
        else:
            fit = f"C = {_number(self.C, '.4g')}, alpha = {_number(self.alpha, '.4g')}"
            recommended = self.recommended_d_trunc if self.recommended_d_trunc is not None else "n/a (no decay)"
        lines = [f"influence(d) ~ C * exp(-alpha * d): {fit}; recommended d_trunc for eps = {self.eps:g}: "
                 f"{recommended}", "", "| distance d | influence | fit |", "|---:|---:|---:|"]
        for d, v in zip(self.distances, self.influence):
            lines.append(f"| {d} | {_number(v, '.3e')} | {_number(self.fit(d), '.3e')} |")
        if self.d_truncs:
            lines += ["", "| d_trunc | latent grad cosine | latent grad rel. error | upstream param grad cosine | "
                      "upstream param grad rel. error |", "|---:|---:|---:|---:|---:|"]
            for row in zip(self.d_truncs, self.latent_cosine, self.latent_rel_error, self.param_cosine,
                           self.param_rel_error):
                lines.append("| {} | {:.6f} | {:.3e} | {:.6f} | {:.3e} |".format(*row))
        return "\n".join(lines)

    def fit(self, d: int) -> float:
        """The fitted influence at distance d (NaN where there is no fit; 0 beyond d = 0 for alpha = inf)."""
        if math.isinf(self.alpha) and self.alpha > 0:
            return self.C if d == 0 else 0.0
        return self.C * math.exp(-self.alpha * d)


def _number(value: float, spec: str) -> str:
    return format(value, spec) if math.isfinite(value) else ("inf" if value == math.inf else "n/a")


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def fit_exponential(distances: Sequence[int], influence: Sequence[float], *, min_distance: int = 1):
    """Least-squares fit of log(influence) = log C - alpha * d over d >= min_distance; returns (C, alpha).

    (1, inf) when every influence measured at d >= min_distance is 0 (nothing reaches back); (NaN, NaN) when
    none was measured there (one decoder step, or max_distance 0): no fit, rather than a made-up decay.
    """
    if not any(d >= min_distance and math.isfinite(v) for d, v in zip(distances, influence)):
        return float("nan"), float("nan")
    pts = [(d, math.log(v)) for d, v in zip(distances, influence) if d >= min_distance and v > 0 and math.isfinite(v)]
    if len(pts) < 2:  # too few points: fall back to every positive one
        pts = [(d, math.log(v)) for d, v in zip(distances, influence) if v > 0 and math.isfinite(v)]
    if len(pts) < 2:
        return 1.0, float("inf")
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    slope = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    return math.exp(my - slope * mx), -slope


def recommended_d_trunc(C: float, alpha: float, eps: float) -> Optional[int]:
    """ceil(log(C / eps) / alpha), at least 0; None when alpha <= 0 (no decay) or NaN (no fit)."""
    if not alpha > 0:
        return None
    if math.isinf(alpha):
        return 0
    return max(0, math.ceil(math.log(C / eps) / alpha))


def _mse_terms(adapter, latents, target, clamp=True):
    """Per-step losses l_g through the exact graph (state never detached), normalised like MSE of the video."""
    plan = adapter.plan(latents)

    def run_step(g, z, state):
        frames, state = adapter.step(g, z, state)
        return (adapter.clamp(frames) if clamp else frames), state

    numel = target.numel()
    errors = squared_errors_per_step(plan, latents, target, run_step, adapter.initial_state())
    return plan, [error / numel for error in errors]


def influence_by_distance(adapter, latents, target, max_distance: Optional[int] = None, clamp: bool = True):
    """Normalised influence per distance d = 0..max_distance (see module docstring)."""
    z = latents.detach().clone().requires_grad_(True)
    plan, losses = _mse_terms(adapter, z, target, clamp)
    G = plan.num_steps
    max_distance = G - 1 if max_distance is None else min(max_distance, G - 1)
    sums = [0.0] * (max_distance + 1)
    counts = [0] * (max_distance + 1)
    b = plan.group_bounds
    for i in range(G):
        (grad,) = torch.autograd.grad(losses[i], z, retain_graph=i < G - 1, allow_unused=True)
        if grad is None:
            continue
        own = float(grad[:, :, b[i]:b[i + 1]].double().norm())
        if own == 0:
            continue
        for d in range(0, min(i, max_distance) + 1):
            j = i - d
            sums[d] += float(grad[:, :, b[j]:b[j + 1]].double().norm()) / own
            counts[d] += 1
    del losses
    return list(range(max_distance + 1)), [s / c if c else float("nan") for s, c in zip(sums, counts)], G


def truncation_fidelity(adapter, latents, target, d_truncs=range(5), schedule: str = "sliding", seed: int = 0):
    """Cosine / relative error of the truncated gradients vs the exact one, per d_trunc.

    The latents are produced by an upstream 1x1x1 Conv3d (near identity); both
    the latent gradient and that module's parameter gradient are compared.
    """
    c = latents.shape[1]
    gen = torch.Generator().manual_seed(seed)
    up = torch.nn.Conv3d(c, c, 1).to(device=latents.device, dtype=latents.dtype)
    with torch.no_grad():
        w = torch.eye(c) + 0.1 * torch.randn(c, c, generator=gen) / math.sqrt(c)
        up.weight.copy_(w.view(c, c, 1, 1, 1).to(up.weight))
        up.bias.zero_()
    params = list(up.parameters())
    x = latents.detach()

    def grads(d):
        z = up(x)
        loss = pixel_loss(adapter, z, target, loss="mse", d_trunc=d, schedule=schedule)
        gz, *gp = torch.autograd.grad(loss, [z, *params])
        return gz, torch.cat([g.flatten() for g in gp])

    ref_z, ref_p = grads(None)
    out = {"d_truncs": [], "latent_cosine": [], "latent_rel_error": [], "param_cosine": [], "param_rel_error": []}
    for d in d_truncs:
        gz, gp = grads(int(d))
        lc, lr = gradient_fidelity(gz, ref_z)
        pc, pr = gradient_fidelity(gp, ref_p)
        for k, v in zip(out, (int(d), lc, lr, pc, pr)):
            out[k].append(v)
    return out


def probe_locality(vae_or_adapter, latents: torch.Tensor, target: torch.Tensor, *, max_distance: Optional[int] = None,
                   eps: float = 1e-3, d_truncs: Sequence[int] = range(5), fidelity: bool = True,
                   clamp: bool = True) -> ProbeResult:
    """Measures influence vs distance, fits C*exp(-alpha*d), and the truncated-gradient fidelity per d_trunc.

    Decoder parameters are frozen during the probe (their requires_grad flags are restored after).
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    adapter = wrap(vae_or_adapter)
    params = adapter.parameters()
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        distances, influence, G = influence_by_distance(adapter, latents, target, max_distance, clamp)
        C, alpha = fit_exponential(distances, influence)
        fid = truncation_fidelity(adapter, latents, target, d_truncs) if fidelity else {}
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return ProbeResult(distances=distances, influence=influence, C=C, alpha=alpha, eps=eps,
                       recommended_d_trunc=recommended_d_trunc(C, alpha, eps), num_steps=G, **fid)


def plot_probe(result: ProbeResult, path: str) -> str:
    """Influence vs distance (log scale) with the fit, and fidelity vs d_trunc, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 2 if result.d_truncs else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4), squeeze=False)
    ax = axes[0][0]
    ds = result.distances
    ax.semilogy(ds, [max(v, 1e-30) for v in result.influence], "o", label="measured")
    if math.isfinite(result.alpha) and math.isfinite(result.C):
        ax.semilogy(ds, [result.C * math.exp(-result.alpha * d) for d in ds], "-",
                    label=f"fit C={result.C:.3g}, alpha={result.alpha:.3g}")
    ax.axhline(result.eps, color="gray", ls="--", lw=0.8, label=f"eps={result.eps:g}")
    ax.set_xlabel("distance |i - j| (decoder steps)")
    ax.set_ylabel("normalised influence")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if result.d_truncs:
        ax = axes[0][1]
        ax.semilogy(result.d_truncs, [max(v, 1e-16) for v in result.latent_rel_error], "o-", label="latent grad")
        ax.semilogy(result.d_truncs, [max(v, 1e-16) for v in result.param_rel_error], "s-",
                    label="upstream param grad")
        ax.set_xlabel("d_trunc")
        ax.set_ylabel("relative error vs exact gradient")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
