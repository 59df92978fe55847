"""The Hessian spectrum of the mean loss L at w (MATH.md §6): extreme eigenvalues, trace, spectral density.

Everything rests on Hessian-vector products H v (``_lanczos.hvp_function``, one pass over the data each):

- eigenvalues: the ``top_k`` largest and the ``bottom_k`` most negative by one Lanczos run with full
  reorthogonalization (``_lanczos.lanczos``), stopped when every wanted Ritz pair has residual
  ‖H y − θ y‖ ≤ tol·|θ|: each θ is then within tol relative of an eigenvalue of H. The residual of each
  returned pair is then recomputed with one more HVP and reported (``residuals``), so the bound holds
  whatever happened in the recurrence. Cost ≤ max_iters + top_k + bottom_k HVPs.
- trace, Hutch++ (Meyer, Musco, Musco & Woodruff 2021), m = ``probes`` HVPs: k = m // 3 Rademacher vectors
  S, Q = orth(H S); tr H = tr(Qᵀ H Q) + tr(P H P), P = I − QQᵀ, the second term by Hutchinson on the
  l = m − 2k Rademacher vectors g: z = (Pg)ᵀ H (Pg). Standard error: std(z) / √l. It is honest: for every Q,
  E[z | Q] = tr(PHP) = tr H − tr(QᵀHQ), so the estimate given Q is unbiased with variance Var(z | Q) / l,
  which std(z)² / l estimates without bias; there is no variance left from the choice of Q (E[estimate | Q]
  = tr H exactly). ``trace_method="hutchinson"``: the plain mean of vᵀ H v over m Rademacher v,
  sem = std / √m (Hutchinson 1990). Hutch++ has much lower variance when a few eigenvalues dominate ‖H‖_F.
- density, stochastic Lanczos quadrature (Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019):
  ``density_probes`` Rademacher start vectors (Ubaru, Chen & Saad 2017; lower variance than Gaussian ones), ``density_steps`` Lanczos steps each, nodes θ_j and weights τ_j
  of each run's Gauss quadrature; φ(t) = mean over probes of Σ_j τ_j N(t; θ_j, σ²), σ = ``density_width`` ×
  (spectral range), on ``density_points`` evenly spaced t from θ_min − 6σ to θ_max + 6σ. Each run's
  weights sum to 1, and the grid is fine (spacing < σ/4) and wide enough that the trapezoid rule gives
  ∫φ = 1 to about 1e-6 with no renormalization; ∫ t φ(t) dt estimates tr H / N. Cost: probes × steps HVPs.

Random numbers: Lanczos's start vector, the trace probes and the density probes come from generators seeded
with draw_seed(seed, 0), draw_seed(seed, 1), draw_seed(seed, 2). BatchNorm runs in eval mode (the stored
statistics; H is the Hessian of the network as evaluated). The model's parameters are never written (the
products run on detached copies), its buffers and train/eval modes are restored exactly.

Under a team (``flatcli.parallel``, torchrun) every process runs the same iterations and the same probes,
and the data chunks of each product are shared out and summed (float64) over processes; the results equal
one process's to about 1e-9 relative (the float64 sum order of float32 chunk products), unless a Lanczos
stopping test sits within that of its threshold.
"""
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from flatcli.checks import check_choice, check_float, check_positive_int, check_seed
from flatcli.choices import check_loss
from flatcli.errors import FlatcliError
from flatcli.measure._guard import check_finite_parameters, check_finite_value
from flatcli.measure._lanczos import hvp_function, lanczos, lanczos_quadrature
from flatcli.measure._perturb import ModelState, draw_seed
from flatcli.measure._sweep import DataSource, draw_sums

TRACE_METHODS = ("hutch++", "hutchinson")
BASIS_BYTES = 2 ** 30  # a Lanczos basis above this in float64 is kept in float32


@dataclass(frozen=True)
class HessianSettings:
    """Every option of a Hessian measurement, validated once when made."""
    top_k: int = 1
    bottom_k: int = 0
    trace: bool = True
    density: bool = False
    probes: int = 99
    trace_method: str = "hutch++"
    tol: float = 1e-3
    max_iters: int = 100
    density_probes: int = 4
    density_steps: int = 80
    density_points: int = 500
    density_width: float = 0.01
    loss: str = "cross-entropy"
    batch_size: int = 1000
    seed: int = 0

    def __post_init__(self):
        for name in ("top_k", "bottom_k"):
            check_positive_int(name, getattr(self, name), least=0)
        for name in ("max_iters", "density_probes", "density_steps", "batch_size"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("density_points", self.density_points, least=2)
        check_choice("trace_method", self.trace_method, TRACE_METHODS)
        check_positive_int("probes", self.probes, least=3 if self.trace_method == "hutch++" else 2)
        check_float("tol", self.tol, high=1.0)
        check_float("density_width", self.density_width, high=1.0)
        least = math.ceil(4 / self.density_width) + 49  # grid spacing (range + 12σ) / (P − 1) ≤ σ / 4
        if self.density_points < least:
            raise FlatcliError(f"density_points={self.density_points} is too few for density_width="
                               f"{self.density_width:g}: the grid would be coarser than the broadening",
                               f"give density_points at least {least}")
        check_loss(self.loss)
        check_seed("seed", self.seed)
        for name in ("trace", "density"):
            if not isinstance(getattr(self, name), bool):
                raise FlatcliError(f"{name}={getattr(self, name)!r} is not True or False", f"give {name}=True")
        if self.top_k + self.bottom_k == 0 and not self.trace and not self.density:
            raise FlatcliError("top_k=0, bottom_k=0, trace=False, density=False: nothing to measure",
                               "ask for top_k=1 or trace=True")
        if self.top_k + self.bottom_k > self.max_iters:
            raise FlatcliError(f"max_iters={self.max_iters} is less than top_k + bottom_k = "
                               f"{self.top_k + self.bottom_k}", "give max_iters at least top_k + bottom_k")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class HessianResult:
    """Eigenvalues (largest first; bottom: most negative first), their residual bounds, trace ± sem, density."""
    eigenvalues: list[float]
    bottom_eigenvalues: list[float]
    residuals: list[float]  # ‖H y − θ y‖ of each eigenvalue, top then bottom: θ is within it of an eigenvalue
    iterations: int  # Lanczos steps (HVPs) for the eigenvalues
    converged: bool  # every wanted eigenvalue met tol within max_iters
    trace: float | None
    trace_sem: float | None
    density_grid: list[float] = field(default_factory=list)
    density: list[float] = field(default_factory=list)
    loss: float = math.nan  # L(w), the mean loss the Hessian is of
    parameters: int = 0  # N, the Hessian's size
    examples: int = 0
    hvps: int = 0  # Hessian-vector products made in all
    method: str = ""  # how they were made: "func" (forward-over-reverse) or "double-backward"
    settings: HessianSettings = field(default_factory=HessianSettings)

    def records(self) -> list[dict]:
        """Tidy rows: quantity, index, value, sem, at (the density's grid point), then the settings."""
        s = self.settings
        tail = {"residual": None, "converged": None, "trace_method": s.trace_method, "probes": s.probes,
                "tol": s.tol, "loss_function": s.loss, "examples": self.examples, "parameters": self.parameters,
                "seed": s.seed}
        res = iter(self.residuals)
        rows = [{"quantity": q, "index": i + 1, "value": v, "sem": None, "at": None,
                 **tail, "residual": next(res), "converged": self.converged}
                for q, values in (("eigenvalue", self.eigenvalues), ("bottom_eigenvalue", self.bottom_eigenvalues))
                for i, v in enumerate(values)]
        if self.trace is not None:
            rows.append({"quantity": "trace", "index": 0, "value": self.trace, "sem": self.trace_sem, "at": None,
                         **tail})
        rows += [{"quantity": "density", "index": i, "value": d, "sem": None, "at": t, **tail}
                 for i, (t, d) in enumerate(zip(self.density_grid, self.density))]
        return rows


def hessian_spectrum(model: nn.Module, data, top_k: int = 1, bottom_k: int = 0, trace: bool = True,
                     density: bool = False, probes: int = 99, seed: int = 0, loss: str = "cross-entropy",
                     tol: float = 1e-3, max_iters: int = 100, batch_size: int = 1000,
                     trace_method: str = "hutch++", callback=None, **density_options) -> HessianResult:
    """The Hessian spectrum of the mean ``loss`` of ``model`` over ``data`` (module docstring).

    data: an (x, y) tensor pair or an iterable of (x, y) batches, cut into chunks of ``batch_size``.
    density_options: density_probes, density_steps, density_points, density_width (HessianSettings).
    callback(increment, total) after each Hessian-vector product. Cost in HVPs: at most max_iters (when
    top_k or bottom_k), probes (trace), density_probes × density_steps (density); each HVP costs about
    two passes over the data (four with double backward).
    """
    settings = HessianSettings(top_k, bottom_k, trace, density, probes, trace_method, tol, max_iters,
                               loss=loss, batch_size=batch_size, seed=seed, **density_options)
    return measure(model, data, settings, callback)


def measure(model: nn.Module, data, settings: HessianSettings, callback=None) -> HessianResult:
    """``hessian_spectrum`` with its options already validated in ``settings``."""
    s = settings
    params = list(model.parameters())
    if not params:
        raise FlatcliError("the model has no parameters", "pass a model with weights")
    check_finite_parameters(model)
    device = params[0].device
    state = ModelState(model)
    try:
        model.eval()
        source = DataSource(data, s.batch_size, device)
        with torch.no_grad():
            sums, n = draw_sums(lambda x: model(x).unsqueeze(0), source, s.loss, device)
        if n == 0:
            raise FlatcliError("the data hold no examples", "check the data set and max_examples")
        loss = float(sums[0, 0]) / n
        check_finite_value("loss", loss)
        hvp, dim = hvp_function(model, list(source), s.loss, s.batch_size)
        counter = _Counter(hvp, _planned(s, dim), callback)
        eig = _eigenvalues(counter, dim, s, device)
        tr = _trace(counter, dim, s, device) if s.trace else (None, None)
        grid, dens = _density(counter, dim, s, device) if s.density else ([], [])
        counter.finish()
    finally:
        state.restore()
    return HessianResult(*eig, *tr, grid, dens, loss=loss, parameters=dim, examples=n, hvps=counter.count,
                         method=hvp.method, settings=s)


def _planned(s: HessianSettings, dim: int) -> int:
    eig = min(s.max_iters, dim) + min(s.top_k, dim) + min(s.bottom_k, dim)  # the Ritz pairs' residual checks
    return eig + (s.probes if s.trace else 0) + (s.density_probes * min(s.density_steps, dim) if s.density else 0)


class _Counter:
    """The HVP, counted and reported to the callback; ``finish`` reports what early stops left undone."""

    def __init__(self, hvp, total: int, callback):
        self.hvp, self.total, self.callback, self.count = hvp, total, callback, 0

    def __call__(self, v):
        out = self.hvp(v)
        self.count += 1
        if self.callback is not None:
            self.callback(1, self.total)
        return out

    def finish(self):
        if self.callback is not None and self.count < self.total:
            self.callback(self.total - self.count, self.total)


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(draw_seed(seed, stream))  # on the CPU: the same draws on any device


def _eigenvalues(hvp, dim, s: HessianSettings, device):
    top, bottom = min(s.top_k, dim), min(s.bottom_k, dim)
    if top + bottom == 0:
        return [], [], [], 0, True
    dtype = torch.float64 if 8 * dim * min(s.max_iters, dim) <= BASIS_BYTES else torch.float32
    which = "both" if top and bottom else "LA" if top else "SA"
    k = (top, bottom) if which == "both" else top or bottom
    values, vectors, iters, converged = lanczos(hvp, dim, k, which, s.tol, s.max_iters, _generator(s.seed, 0),
                                                dtype, device=device)
    # the true residual of each Ritz pair (one more HVP each): θ is within it of an eigenvalue of H
    residuals = [float((hvp(y).to(y.dtype) - t * y).norm()) for t, y in zip(values.tolist(), vectors.T)]
    values = values.tolist()
    return values[:top], values[top:], residuals, iters, converged


def _rademacher(g: torch.Generator, shape) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=g).double().mul_(2).sub_(1)


def _trace(hvp, dim, s: HessianSettings, device):
    """(estimate, sem): Hutch++ or Hutchinson with Rademacher probes, float64."""
    g = _generator(s.seed, 1)
    apply = lambda v: hvp(v.to(device)).double()  # (N,) on the device
    if s.trace_method == "hutchinson":
        z = torch.stack([apply(v) @ v.to(device) for v in _rademacher(g, (s.probes, dim))])
        return float(z.mean()), float(z.std()) / math.sqrt(len(z))
    k = min(s.probes // 3, dim)
    l = s.probes - 2 * k
    S = _rademacher(g, (k, dim)).to(device)  # (k, N)
    Q, _ = torch.linalg.qr(torch.stack([apply(v) for v in S], 1))  # (N, k): an orthonormal basis of H S
    top = sum(float(q @ apply(q)) for q in Q.T)  # tr(Qᵀ H Q)
    G = _rademacher(g, (l, dim)).to(device)  # (l, N)
    P = G - (G @ Q) @ Q.T  # (l, N): the probes with the sketched directions removed
    z = torch.stack([p @ apply(p) for p in P])  # (l,) Hutchinson samples of tr(P H P)
    return top + float(z.mean()), float(z.std()) / math.sqrt(l)


def _density(hvp, dim, s: HessianSettings, device):
    """(grid, φ on the grid): stochastic Lanczos quadrature with Gaussian broadening."""
    g = _generator(s.seed, 2)
    nodes, weights = [], []
    for _ in range(s.density_probes):
        v = _rademacher(g, (dim,))
        theta, tau = lanczos_quadrature(lambda u: hvp(u.to(device)).cpu(), v, s.density_steps)
        nodes.append(theta)
        weights.append(tau)
    theta, tau = torch.cat(nodes), torch.cat(weights) / s.density_probes  # (J,), Σ τ = 1
    lo, hi = float(theta.min()), float(theta.max())
    sigma = s.density_width * max(hi - lo, 1e-3 * max(abs(lo), abs(hi)), 1e-12)
    grid = torch.linspace(lo - 6 * sigma, hi + 6 * sigma, s.density_points, dtype=torch.float64)  # (P,)
    gauss = torch.exp(-0.5 * ((grid[:, None] - theta[None, :]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return grid.tolist(), (gauss @ tau).tolist()  # (P,)
