"""Adaptive sharpness, worst-case and average-case (Kwon et al. 2021; Andriushchenko et al. 2023; MATH.md §6).

With c = |w| (adaptive) or c = 1, and L_S the mean loss over a batch S of m examples:

    worst-case    S_max(ρ) = E_S[ max_{‖δ ⊘ c‖_p ≤ ρ} L_S(w + δ) − L_S(w) ]      p = 2 or ∞
    average-case  S_avg(ρ) = E_S E_δ[ L_S(w + δ) − L_S(w) ],   δ ~ N(0, ρ² diag(c²))

Worst case: in the coordinates u = δ ⊘ c the constraint is a plain ball ‖u‖_p ≤ ρ, so the projection is exact
(a rescale for p = 2, a clamp for p = ∞), and the gradient is ∇_u = c ⊙ ∇_δ. The maximum is searched by
Auto-PGD (Croce & Hein 2020): a random start (on the sphere for l2, uniform in the cube for linf), first step size 2ρ,
momentum 0.75, and at the checkpoints w_j = ⌈p_j N⌉ (p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} −
0.03, 0.06)) the step is halved and the search restarts from the best point when fewer than 75% of the steps
since the last checkpoint raised the objective, or when neither the step nor the best value changed. The best
value over ``restarts`` random starts (and δ = 0) is kept per batch; batches are consecutive slices of m
examples (a remainder of fewer than m examples is left out), and the sem is over batches.

Average case: w + δ = w ⊙ (1 + ρ z) (adaptive) or w + ρ z, z ~ N(0, I): exactly the weight noise of local
energy (MATH.md §1) at σ = ρ, so it is computed by ``local_energy.measure`` with the same draws (``_perturb``):
S_avg equals local energy's δL at σ = ρ, bit for bit, with the same seed, examples and batch size. With the
same draws on every batch, the mean over equal batches of the batch means is the mean over their union, so
S_avg does not depend on m beyond the examples it leaves out.

Under a team (``flatcli.parallel``) the worst-case units (batch, restart) are shared k ≡ rank (mod world);
each unit's random start comes from (seed, batch, restart) alone, so the result equals the one-process one.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from flatcli import parallel
from flatcli.checks import check_choice, check_float, check_positive_int, check_seed
from flatcli.choices import check_loss
from flatcli.errors import FlatcliError
from flatcli.losses import per_example_loss
from flatcli.measure import _perturb
from flatcli.measure.local_energy import EnergySettings, measure as energy_measure
from flatcli.measure._guard import check_finite_parameters, check_finite_value
from flatcli.measure._sweep import batch_list

KINDS = ("worst", "average", "both")
NORMS = ("l2", "linf")
BN_POLICIES = ("eval", "recompute")
MOMENTUM = 0.75  # weight of the new projected step z in x ← P(x + α(z − x) + (1 − α)(x − x_prev))
SUCCESS_RATIO = 0.75  # halve the step when fewer than this fraction of steps since a checkpoint improved


@dataclass(frozen=True)
class SharpnessSettings:
    """Every option of a sharpness measurement, validated once when made. m=None: one batch of all examples."""
    rhos: tuple[float, ...]
    kind: str = "worst"
    norm: str = "l2"
    adaptive: bool = True
    m: int | None = None
    steps: int = 20
    restarts: int = 1
    samples: int = 50
    bn: str = "eval"
    bn_batches: int = 4
    loss: str = "cross-entropy"
    batch_size: int = 1000
    seed: int = 0

    def __post_init__(self):
        rhos = (self.rhos,) if isinstance(self.rhos, (int, float)) else tuple(self.rhos)
        if not rhos:
            raise FlatcliError("rho=[] holds no radius", "give at least one, e.g. rho=0.1")
        object.__setattr__(self, "rhos", tuple(check_float("rho", r, strict=False) for r in rhos))
        check_choice("kind", self.kind, KINDS)
        check_choice("norm", self.norm, NORMS)
        check_choice("bn", self.bn, BN_POLICIES)
        if not isinstance(self.adaptive, bool):
            raise FlatcliError(f"adaptive={self.adaptive!r} is not True or False", "use adaptive=True")
        counts = ("steps", "restarts", "samples", "bn_batches", "batch_size") + (("m",) if self.m is not None else ())
        for name in counts:
            check_positive_int(name, getattr(self, name))
        check_loss(self.loss)
        check_seed("seed", self.seed)

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("worst", "average") if self.kind == "both" else (self.kind,)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class SharpnessPoint:
    """One (kind, ρ). sem: over batches (worst case; NaN for one batch) or over draws (average case)."""
    kind: str
    norm: str | None  # None for the average case (Gaussian δ)
    adaptive: bool
    rho: float
    m: int
    sharpness: float
    sem: float


@dataclass(frozen=True)
class SharpnessResult:
    points: list[SharpnessPoint]
    loss: float  # L(w) over the examples used (the reference of every point)
    examples: int  # examples used: batches × m
    batches: int
    worst: torch.Tensor | None  # (R, B) float64: worst-case value of each batch at each ρ
    energy: object | None  # the LocalEnergy behind the average case
    settings: SharpnessSettings

    def __iter__(self):
        return iter(self.points)

    def records(self) -> list[dict]:
        s = self.settings
        return [{**asdict(p), "steps": s.steps, "restarts": s.restarts, "samples": s.samples,
                 "batches": self.batches, "examples": self.examples, "bn": s.bn, "loss_function": s.loss,
                 "seed": s.seed} for p in self.points]


def sharpness(model: nn.Module, data, rho=0.1, *, kind: str = "worst", norm: str = "l2", adaptive: bool = True,
              m: int | None = None, steps: int = 20, restarts: int = 1, samples: int = 50, bn: str = "eval",
              bn_batches: int = 4, loss: str = "cross-entropy", batch_size: int = 1000, seed: int = 0,
              bn_data=None, callback=None) -> SharpnessResult:
    """Adaptive sharpness of ``model`` on ``data`` (an (x, y) pair) at each radius in ``rho`` (a number or list).

    kind: "worst" (Auto-PGD, ``steps`` iterations from each of ``restarts`` random starts per batch),
    "average" (``samples`` Gaussian draws, shared with local energy) or "both". m: examples per batch
    (m-sharpness; None: all). bn="recompute": BatchNorm statistics re-estimated on ``bn_batches`` batches of
    ``bn_data`` (default: ``data``) for every perturbed net and for the reference. callback(increment, total).
    The model's parameters, buffers, train/eval modes and requires_grad flags are restored on return.
    """
    settings = SharpnessSettings(rho, kind, norm, adaptive, m, steps, restarts, samples, bn, bn_batches, loss,
                                 batch_size, seed)
    return measure(model, data, settings, bn_data=bn_data, callback=callback)


def measure(model: nn.Module, data, settings: SharpnessSettings, *, bn_data=None, callback=None) -> SharpnessResult:
    """``sharpness`` with its options already validated in ``settings``."""
    s = settings
    params = list(model.parameters())
    if not params:
        raise FlatcliError("the model has no parameters to perturb", "pass a model with weights")
    check_finite_parameters(model)
    x, y = _tensors(data, params[0].device)
    m = min(s.m or len(x), len(x))
    if m == 0:
        raise FlatcliError("the data hold no examples", "check the data set and max_examples")
    batches = len(x) // m
    x, y = x[:batches * m], y[:batches * m]
    team = parallel.current()
    units = list(team.mine(batches * s.restarts)) if "worst" in s.kinds else []
    draws = len(team.mine(s.samples)) * sum(r > 0 for r in s.rhos) if "average" in s.kinds else 0
    total = len(units) * s.steps * sum(r > 0 for r in s.rhos) + draws
    tick = (lambda k, _t: callback(k, total)) if callback is not None else None
    worst = energy = None
    if "worst" in s.kinds:
        worst = _worst_case(model, x, y, m, s, units, bn_data, tick)  # (R, B)
    if "average" in s.kinds:
        noise = "multiplicative" if s.adaptive else "additive"
        energy = energy_measure(model, (x, y), EnergySettings(
            s.rhos, s.samples, noise, s.bn, s.bn_batches, s.loss, s.batch_size, s.seed), bn_data=bn_data, callback=tick)
    return _summarize(s, worst, energy, m, batches, _reference_loss(model, x, y, s, bn_data))


def _tensors(data, device):
    """(x, y) on the device: a tensor pair as it is, an iterable of batches concatenated."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
    else:
        pairs = list(data)
        x, y = torch.cat([b[0] for b in pairs]), torch.cat([b[1] for b in pairs])
    if len(x) != len(y):
        raise FlatcliError(f"{len(x)} inputs but {len(y)} targets", "pass x and y of the same length")
    return x.to(device), y.to(device)


class _Objective:
    """f(u) = L_S(w0 + c ⊙ u) − L_S(w0) and ∇_u f = c ⊙ ∇L_S, for flat u of N numbers."""

    def __init__(self, model, pert, c, x, y, s: SharpnessSettings, bns, bn_x):
        self.model, self.pert, self.c, self.x, self.y, self.s, self.bns, self.bn_x = model, pert, c, x, y, s, bns, bn_x
        self.sizes = [p.numel() for p in pert.params]
        self.base = self.loss(torch.zeros_like(c), grad=False)[0]

    def set(self, u):
        with torch.no_grad():
            for p, w0, d in zip(self.pert.params, self.pert.w0, (self.c * u).split(self.sizes)):
                p.copy_(w0 + d.view_as(p).to(p.dtype))
            if self.bns:
                _perturb.recompute_bn_stats(self.model, self.bns, self.bn_x)

    def loss(self, u, grad=True):
        """(L_S(w0 + c ⊙ u) as a float, its gradient in u or None); chunks of batch_size, gradients summed."""
        self.set(u)
        total, grads = 0.0, None
        with torch.set_grad_enabled(grad):
            for i in range(0, len(self.x), self.s.batch_size):
                out = self.model(self.x[i:i + self.s.batch_size])
                part = per_example_loss(out, self.y[i:i + self.s.batch_size], self.s.loss).sum() / len(self.x)
                total += float(part.detach())
                if grad:
                    g = torch.autograd.grad(part, self.pert.params, allow_unused=True)
                    flat = torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1).to(self.c.dtype)
                                      for gi, p in zip(g, self.pert.params)])
                    grads = flat if grads is None else grads + flat
        return total, (self.c * grads if grad else None)

    def __call__(self, u):
        value, g = self.loss(u)
        return value - self.base, g


def _worst_case(model, x, y, m, s: SharpnessSettings, units, bn_data, tick) -> torch.Tensor:
    """Auto-PGD on each of this process's units (batch, restart); the per-batch maxima, (R, B) float64."""
    state, pert = _perturb.ModelState(model), _perturb.Perturbation(model)
    grads = [(p, p.requires_grad) for p in pert.params]
    bns = _perturb.batchnorms(model) if s.bn == "recompute" else []
    bn_x = batch_list((x, y) if bn_data is None else bn_data, s.batch_size, x.device, s.bn_batches) if bns else []
    w0 = torch.cat([w.reshape(-1) for w in pert.w0])  # (N,)
    c = w0.abs() if s.adaptive else torch.ones_like(w0)
    mine = []
    try:
        model.eval()
        for p in pert.params:
            p.requires_grad_(True)
        for k in units:
            b, r = divmod(k, s.restarts)
            f = _Objective(model, pert, c, x[b * m:(b + 1) * m], y[b * m:(b + 1) * m], s, bns, bn_x)
            check_finite_value("loss", f.base)
            start = _start(len(w0), s.norm, _perturb.draw_seed(_perturb.draw_seed(s.seed, b), r), w0)
            values = []
            for rho in s.rhos:
                values.append(_apgd(f, start * rho, rho, s.norm, s.steps, tick) if rho > 0 else 0.0)
            mine.append(torch.tensor(values, dtype=torch.float64))
    finally:
        with torch.no_grad():
            pert.restore()
        state.restore()
        for p, flag in grads:
            p.requires_grad_(flag)
    every = parallel.current().gather_units(mine, (len(x) // m) * s.restarts)
    per_unit = torch.stack(every).view(len(x) // m, s.restarts, len(s.rhos))  # (B, restarts, R)
    return per_unit.amax(1).clamp_min(0).T.contiguous()  # δ = 0 is feasible: the max is at least 0


def _start(n: int, norm: str, seed: int, like: torch.Tensor) -> torch.Tensor:
    """A random start for ρ = 1: on the unit sphere (l2) or uniform in the cube [−1, 1]^N (linf)."""
    g = torch.Generator(device=like.device).manual_seed(seed)
    if norm == "l2":
        z = torch.randn(n, generator=g, device=like.device, dtype=like.dtype)
        return z / z.norm()
    return 2 * torch.rand(n, generator=g, device=like.device, dtype=like.dtype) - 1


def checkpoints(steps: int) -> list[int]:
    """Auto-PGD's checkpoints w_j = ⌈p_j N⌉, with p_0 = 0, p_1 = 0.22 and
    p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)."""
    p, out = [0.0, 0.22], []
    while True:
        w = math.ceil(round(p[-1] * steps, 9))  # round: 0.22 · 100 is 22.000000000000004
        if w > steps:
            return out
        if w > 0 and w not in out:
            out.append(w)
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))


def _project(u, rho, norm):
    if norm == "l2":
        size = float(u.norm())
        return u * (rho / size) if size > rho else u
    return u.clamp(-rho, rho)


def _direction(g, norm):
    if norm == "l2":
        size = float(g.norm())
        return g / size if size > 0 else g
    return g.sign()


def _apgd(f, u, rho: float, norm: str, steps: int, tick) -> float:
    """max of f over ‖u‖_p ≤ ρ by Auto-PGD from ``u``: the best value found (the start counts)."""
    cps, eta = set(checkpoints(steps)), 2 * rho
    u = _project(u, rho, norm)
    value, g = f(u)
    best, best_u, best_g = value, u, g
    prev, improved, since, eta_at_cp, best_at_cp = u, 0, 0, eta, best
    for k in range(1, steps + 1):
        z = _project(u + eta * _direction(g, norm), rho, norm)
        new = z if k == 1 else _project(u + MOMENTUM * (z - u) + (1 - MOMENTUM) * (u - prev), rho, norm)
        new_value, new_g = f(new)
        improved += new_value > value
        prev, u, value, g = u, new, new_value, new_g
        if value > best:
            best, best_u, best_g = value, u, g
        if tick is not None:
            tick(1, None)
        if k in cps:
            stalled = improved < SUCCESS_RATIO * (k - since) or (eta == eta_at_cp and best == best_at_cp)
            improved, since, eta_at_cp, best_at_cp = 0, k, eta, best
            if stalled:  # halve the step and go back to the best point found
                eta, u, value, g = eta / 2, best_u, best, best_g
    return best


@torch.no_grad()
def _reference_loss(model, x, y, s, bn_data) -> float:
    """L(w) over the examples used, as the reports' reference (stored or recomputed BN statistics, as asked)."""
    state = _perturb.ModelState(model)
    try:
        model.eval()
        bns = _perturb.batchnorms(model) if s.bn == "recompute" else []
        if bns:
            _perturb.recompute_bn_stats(model, bns, batch_list((x, y) if bn_data is None else bn_data,
                                                               s.batch_size, x.device, s.bn_batches))
        total = sum(float(per_example_loss(model(x[i:i + s.batch_size]), y[i:i + s.batch_size], s.loss).double().sum())
                    for i in range(0, len(x), s.batch_size))
    finally:
        state.restore()
    return total / len(x)


def _summarize(s, worst, energy, m, batches, loss) -> SharpnessResult:
    points = []
    for kind in s.kinds:
        for j, rho in enumerate(s.rhos):
            if kind == "worst":
                v = worst[j]
                sem = float(v.std(correction=1)) / math.sqrt(len(v)) if len(v) > 1 else math.nan
                points.append(SharpnessPoint("worst", s.norm, s.adaptive, rho, m, float(v.mean()),
                                             0.0 if rho == 0 else sem))
            else:
                p = energy.points[j]
                points.append(SharpnessPoint("average", None, s.adaptive, rho, m, p.delta_loss, p.loss_sem))
    return SharpnessResult(points, loss, batches * m, batches, worst, energy, s)

