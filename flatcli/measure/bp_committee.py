"""Local entropy of a committee machine by belief propagation (MATH.md §7; seed: the shallow networks).

The weights W of a committee machine (``flatcli.models.committee``) are tilted towards the checkpoint w̃,

    P_γ(W) ∝ Π_ik ρ(w_ik) e^{γ w̃_ik w_ik} Π_μ Θ(y_μ σ̂(W, x_μ)),

ρ the ±1 counting measure (binary) or a Gaussian (continuous: each sign unit is scale-free, so the count is
a fraction of the product of the K unit spheres). Relaxed BP (AMP, ``_amp_committee``) finds the fixed point at
each coupling γ, warm-started from the previous one; its Bethe free entropy Φ(γ) gives, by the Legendre
transform, the local entropy S per weight at the overlap the fixed point reaches:

- binary: S = Φ/n − γ R, R = w̃·ŵ/n: the log-count of zero-error weights per weight, ln 2 with no constraint;
- continuous: S = Φ/n + (1/K) Σ_k [Q_k/2 − γ R_k − ½ ln(2πe Q_k)]: the log-fraction of the spheres at the
  cosines ρ_k (0 with no constraint); the overlap is the mean of the ρ_k.

distance = (1 − overlap)/2 (binary: the fraction of flipped weights). Asked ``distances`` are reached by
bisection on γ. The patterns are the examples given (the checkpoint's training set), their labels
class 1 → +1, class 0 → −1; the inputs are rescaled to a unit mean square (the sign network is blind to a
positive scale of x). The count is of weights with zero training error, so a checkpoint that misclassifies
any example is refused, with its training error in the message. Everything is float64 and deterministic:
there is no random draw, and the seed is only recorded. The model is never modified.
"""
import math
from dataclasses import asdict, dataclass, field, replace

import torch

from flatcli.checks import check_float, check_positive_int, check_seed
from flatcli.errors import FlatcliError
from flatcli.measure import _amp_committee as amp
from flatcli.measure._guard import check_finite_parameters
from flatcli.models.committee import Committee

# overlaps from about 0.1 to 0.99: continuous ρ = γ/√(1 + γ²), binary R = tanh γ with no patterns (more with them)
DEFAULT_COUPLINGS = {"spherical": (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0),
                     "binary": (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 1.5, 2.0)}
GAMMA_CEILING = 1e6  # bisection gives up beyond this coupling


@dataclass(frozen=True)
class BPSettings:
    """Couplings γ to visit (γ < 0 pushes away from w̃), or distances in (0, 0.5] to reach by bisection (not
    both; neither: ``DEFAULT_COUPLINGS`` of the prior, filled in by ``measure``); and the AMP controls."""
    couplings: tuple[float, ...] | None = None
    distances: tuple[float, ...] | None = None
    damping: float = 0.5      # new = damping · old + (1 − damping) · update
    tolerance: float = 1e-7   # converged when max |Δŵ| over one iteration is below this
    max_iters: int = 2000
    bisection_tol: float = 1e-4  # |overlap − target| at which a bisection stops
    seed: int = 0

    def __post_init__(self):
        if self.couplings is not None and self.distances is not None:
            raise FlatcliError("both couplings= and distances= given", "give one of them")
        if self.couplings is not None:
            object.__setattr__(self, "couplings", values("couplings", self.couplings, -1e30, False, 1e30))  # any real γ
        elif self.distances is not None:
            object.__setattr__(self, "distances", values("distances", self.distances, 0.0, True, 0.5))
        check_float("damping", self.damping, strict=False, high=0.99)
        check_float("tolerance", self.tolerance)
        check_float("bisection_tol", self.bisection_tol)
        check_positive_int("max_iters", self.max_iters)
        check_seed("seed", self.seed)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def values(name: str, seq, low: float, strict: bool, high: float) -> tuple[float, ...]:
    """At least one number, each checked; sorted and without repeats."""
    try:
        items = [float(v) for v in seq]
    except (TypeError, ValueError):
        raise FlatcliError(f"{name}={seq!r} are not numbers", f"give {name} as numbers, e.g. 0.1,1,10") from None
    if not items:
        raise FlatcliError(f"{name}=[] is empty", f"give at least one value for {name}")
    return tuple(sorted({check_float(name, v, low=low, strict=strict, high=high) for v in items}))


@dataclass(frozen=True)
class BPPoint:
    """One fixed point. ``overlap_sum`` = Σ_ik w̃_ik ŵ_ik (= dΦ/dγ there); ``free_entropy`` = Φ/n."""
    coupling: float
    overlap: float
    distance: float
    local_entropy: float
    free_entropy: float
    overlap_sum: float
    iterations: int
    converged: bool


@dataclass
class BPResult:
    settings: BPSettings
    points: list[BPPoint]   # in increasing coupling (decreasing distance)
    examples: int
    inputs: int             # N
    hidden: int             # K
    binary: bool
    reference: torch.Tensor = field(repr=False)  # (N, K) the w̃ used (continuous: columns scaled to |w̃_k|² = N)

    def records(self) -> list[dict]:
        prior = "binary" if self.binary else "spherical"
        return [{**asdict(p), "hidden": self.hidden, "inputs": self.inputs, "examples": self.examples,
                 "prior": prior, "damping": self.settings.damping, "tolerance": self.settings.tolerance}
                for p in self.points]


def measure(model: Committee, data, settings: BPSettings, callback=None) -> BPResult:
    """BP local entropy of committee machine ``model`` around its own weights, on ``data`` = (x, y labels 0/1)."""
    problem = make_problem(model, data)
    if settings.couplings is None and settings.distances is None:
        settings = replace(settings, couplings=DEFAULT_COUPLINGS["binary" if problem.binary else "spherical"])
    asked = settings.couplings if settings.couplings is not None else settings.distances
    total = len(asked)
    if settings.couplings is not None:
        points = sweep_couplings(problem, settings, callback, total)
    else:
        points = reach_distances(problem, settings, callback, total)
    points.sort(key=lambda p: p.coupling)
    n, k = problem.ref.shape
    return BPResult(settings, points, len(problem.y), n, k, problem.binary, problem.ref)


def make_problem(model, data) -> amp.Problem:
    """Patterns, labels ±1 and reference from a committee machine and its examples (checked)."""
    if not isinstance(model, Committee):
        raise FlatcliError(f"BP local entropy needs a committee machine, got a {type(model).__name__}",
                           "train one with --model committee:K (or committee:K:binary)")
    check_finite_parameters(model)
    x, labels = data
    x = x.detach().flatten(1).to(torch.float64).cpu()                     # (P, N)
    if labels.ndim != 1 or labels.is_floating_point() or not bool(((labels == 0) | (labels == 1)).all()):
        raise FlatcliError("BP local entropy needs labels 0/1 of a binary task",
                           "measure a model trained with --classes A,B")
    y = labels.cpu().to(torch.float64) * 2 - 1                            # (P,) ±1
    ref = model.signed_weight().detach().to(torch.float64).cpu().T.clone()  # (N, K)
    if bool((ref.abs().sum(0) == 0).any()) or (model.binary and bool((ref == 0).any())):
        raise FlatcliError("a hidden unit of the checkpoint has zero weights", BROKEN)
    mistakes = int((torch.sign(torch.sign(x @ ref).sum(1)) != y).sum())
    if mistakes:
        raise FlatcliError(f"the checkpoint misclassifies {mistakes} of its {len(y)} examples (training error "
                           f"{mistakes / len(y):.2%}): there are no zero-error weights around it to count",
                           "measure a checkpoint trained to zero training error (more epochs, a larger K), "
                           "or an easier pair of --classes")
    n = x.shape[1]
    if not model.binary:
        ref = ref * (math.sqrt(n) / ref.norm(dim=0))
    scale = x.pow(2).mean().sqrt().clamp_min(1e-300)
    return amp.Problem(x / (scale * math.sqrt(n)), y, ref, model.binary)


BROKEN = "the checkpoint is broken: measure another one or retrain"


def solve(problem: amp.Problem, state, gamma: float, settings: BPSettings):
    """The fixed point at ``gamma`` from ``state`` (None: the tilted prior): (BPPoint, state)."""
    state = state if state is not None else amp.initial_state(problem, gamma)
    state, iters, converged = amp.iterate(problem, state, gamma, settings.damping, settings.tolerance,
                                          settings.max_iters)
    phi, marginals = amp.free_entropy(problem, state, gamma)
    return point(problem, gamma, phi, marginals, iters, converged), state


def point(problem: amp.Problem, gamma: float, phi: float, s: amp.State, iters: int, converged: bool) -> BPPoint:
    """Overlap and local entropy (the Legendre transform of Φ) at one fixed point (see the module docstring)."""
    ref, (n, k) = problem.ref, problem.ref.shape
    overlap_sum = float((ref * s.w).sum())
    if problem.binary:
        overlap = overlap_sum / (n * k)
        entropy = phi / (n * k) - gamma * overlap
    else:
        Q = (s.w * s.w + s.v).sum(0) / n                                  # (K,)
        R = (ref * s.w).sum(0) / n                                        # (K,) (|w̃_k|²/N = 1)
        overlap = float((R / Q.sqrt()).mean())
        entropy = phi / (n * k) + float((Q / 2 - gamma * R - 0.5 * torch.log(2 * math.pi * math.e * Q)).mean())
    return BPPoint(gamma, overlap, (1 - overlap) / 2, entropy, phi / (n * k), overlap_sum, iters, converged)


def sweep_couplings(problem, settings: BPSettings, callback, total: int) -> list[BPPoint]:
    """Every asked γ in ``order``, each warm-started from the fixed point of the one before."""
    points, state = [], None
    for gamma in order(problem, settings.couplings):
        p, state = solve(problem, state, gamma, settings)
        points.append(p)
        if callback is not None:
            callback(1, total)
    return points


def order(problem, couplings):
    """Binary: from the smallest γ up (a sweep started next to w̃ can stay stuck in the state ŵ ≈ w̃, which
    at small sizes is a spurious fixed point); continuous: from the largest γ down (fastest convergence)."""
    return sorted(couplings, reverse=not problem.binary)


def reach_distances(problem, settings: BPSettings, callback, total: int) -> list[BPPoint]:
    """For each distance (nearest first) the γ whose overlap is 1 − 2d, by bisection (γ < 0 beyond the distance
    that no pull, γ = 0, already reaches)."""
    points, state = [], None
    for d in sorted(settings.distances):
        p, state = bisect(problem, state, 1 - 2 * d, settings)
        points.append(p)
        if callback is not None:
            callback(1, total)
    return points


def bisect(problem, state, target: float, settings: BPSettings):
    """The fixed point whose overlap is within ``bisection_tol`` of ``target``: (BPPoint, state).

    The overlap grows with γ (dR/dγ is a variance), so a bracket [lo, hi] is widened by doubling from [0, 1]
    (or [−1, 0]) until it holds the target, then halved.
    """
    zero, zero_state = solve(problem, state, 0.0, settings)
    step = 1.0 if zero.overlap < target else -1.0
    lo, best, best_state = 0.0, zero, zero_state
    while (best.overlap < target) == (step > 0) and abs(best.overlap - target) >= settings.bisection_tol:
        if abs(step) > GAMMA_CEILING:
            raise FlatcliError(f"distances: overlap {target:g} not reached with |coupling| below {GAMMA_CEILING:g}",
                               "ask for another distance")
        lo = best.coupling
        best, best_state = solve(problem, best_state, step, settings)
        step *= 2
    lo, hi = sorted((lo, best.coupling))
    for _ in range(60):
        if abs(best.overlap - target) < settings.bisection_tol:
            break
        mid = (lo + hi) / 2
        best, best_state = solve(problem, best_state, mid, settings)
        lo, hi = (mid, hi) if best.overlap < target else (lo, mid)
    return best, best_state


def bp_local_entropy(model, data, couplings=None, distances=None, *, damping: float = 0.5,
                     tolerance: float = 1e-7, max_iters: int = 2000, seed: int = 0, callback=None) -> BPResult:
    """Notebook form: ``bp_local_entropy(model, (x, y), couplings=[0.1, 1, 10]).records()``."""
    settings = BPSettings(None if couplings is None else tuple(couplings),
                          None if distances is None else tuple(distances), damping, tolerance, max_iters, seed=seed)
    return measure(model, data, settings, callback=callback)
