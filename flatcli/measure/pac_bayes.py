"""PAC-Bayes flatness (Jiang et al. 2020, "Fantastic generalization measures", §C; MATH.md §6).

    σ* = max{ σ : E_u[ε(w + u)] − ε(w) ≤ target },     flatness = 1 / σ*²

with u ~ N(0, σ² I) (``plain``) or u_i ~ N(0, σ² w_i² + ε₀²) (``magnitude-aware``, the default): a STANDARD
DEVIATION s_i = sqrt(σ² w_i² + ε₀²) per weight, u_i = s_i z_i. Every parameter is perturbed (weights, biases,
BatchNorm affine parameters), buffers are not; BatchNorm runs on its stored statistics (``bn="eval"``) or
re-estimates them for every perturbed net and for the reference (``bn="recompute"``).

σ* is found by bisection on [0, max_sigma]. Every probe σ uses the SAME draws z_1..z_M (common random numbers,
draw k from ``_perturb.draw_seed(seed, k)`` as in local energy), so the estimated deviation is one fixed function
of σ and the bisection brackets one of its crossings of ``target``. The first probe is max_sigma (if it meets the
target, σ* = max_sigma and ``at_max`` says so); with magnitude-aware noise σ = 0 is probed too (the ε₀ noise
alone may already exceed the target: σ* = 0, flatness inf). Then the bracket [lo, hi] (lo meets the target, hi
does not) is halved until hi − lo ≤ tolerance · hi, or ``max_probes`` probes. Reported: σ* = lo, the largest
probed σ known to meet the target, with hi next to it.

Under a team (``flatcli.parallel``) each process perturbs with the draws k ≡ rank (mod world) and the per-draw
errors are gathered in draw order at every probe, so every process takes the same bisection steps and the
result equals the one-process result bit for bit.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from flatcli import parallel
from flatcli.checks import check_choice, check_float, check_positive_int, check_seed
from flatcli.choices import check_loss
from flatcli.errors import FlatcliError
from flatcli.measure import _perturb
from flatcli.measure._guard import check_finite_value
from flatcli.measure._sweep import draw_sums, perturbation_setup

NOISES = ("magnitude-aware", "plain")
BN_POLICIES = ("eval", "recompute")


@dataclass(frozen=True)
class PacBayesSettings:
    """Every option of a PAC-Bayes flatness measurement, validated once when made."""
    target: float = 0.1  # allowed rise of the 0-1 error (a fraction)
    noise: str = "magnitude-aware"
    epsilon: float = 1e-3  # ε₀: the standard deviation of the noise on a zero weight (magnitude-aware)
    max_sigma: float = 5.0
    samples: int = 20  # draws per probe (the same draws at every probe)
    tolerance: float = 0.01  # stop when hi − lo ≤ tolerance · hi
    max_probes: int = 40
    bn: str = "eval"
    bn_batches: int = 4
    loss: str = "cross-entropy"
    batch_size: int = 1000
    seed: int = 0

    def __post_init__(self):
        check_float("target", self.target, high=1.0)
        check_choice("noise", self.noise, NOISES)
        check_float("epsilon", self.epsilon, strict=False)
        check_float("max_sigma", self.max_sigma)
        check_float("tolerance", self.tolerance, high=1.0)
        for name in ("samples", "max_probes", "bn_batches", "batch_size"):
            check_positive_int(name, getattr(self, name))
        check_choice("bn", self.bn, BN_POLICIES)
        check_loss(self.loss)
        check_seed("seed", self.seed)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PacBayesResult:
    sigma: float  # σ*: the largest probed σ whose deviation met the target
    sigma_high: float  # the smallest probed σ above it whose deviation did not (max_sigma if none)
    flatness: float  # 1 / σ*² (inf when σ* = 0)
    deviation: float  # E_u[ε(w + u)] − ε(w) at σ*, over the draws
    probes: int  # evaluations of the deviation (each over all draws)
    at_max: bool  # σ* = max_sigma: the target was never exceeded, raise max_sigma
    error: float  # ε(w), the reference
    examples: int
    trace: list  # (σ, deviation) of every probe, in the order probed
    settings: PacBayesSettings

    def records(self) -> list[dict]:
        s = self.settings
        return [{"noise": s.noise, "target": s.target, "sigma": self.sigma, "flatness": self.flatness,
                 "sigma_high": self.sigma_high, "deviation": self.deviation, "probes": self.probes,
                 "at_max": self.at_max, "error": self.error, "epsilon": s.epsilon if s.noise == "magnitude-aware"
                 else None, "max_sigma": s.max_sigma, "samples": s.samples, "tolerance": s.tolerance,
                 "bn": s.bn, "examples": self.examples, "seed": s.seed}]


def pac_bayes_sigma(model: nn.Module, data, *, target: float = 0.1, noise: str = "magnitude-aware",
                    epsilon: float = 1e-3, max_sigma: float = 5.0, samples: int = 20, tolerance: float = 0.01,
                    max_probes: int = 40, bn: str = "eval", bn_batches: int = 4, loss: str = "cross-entropy",
                    batch_size: int = 1000, seed: int = 0, bn_data=None, callback=None) -> PacBayesResult:
    """σ* and the PAC-Bayes flatness 1/σ*² of ``model`` on ``data`` (an (x, y) pair or iterable of batches
    with class labels). callback(increment, total): after each perturbed pass over the data; total is an
    estimate (the number of probes is known only at the end). The model comes back exactly as it was."""
    settings = PacBayesSettings(target, noise, epsilon, max_sigma, samples, tolerance, max_probes, bn, bn_batches,
                                loss, batch_size, seed)
    return measure(model, data, settings, bn_data=bn_data, callback=callback)


@torch.inference_mode()
def measure(model: nn.Module, data, settings: PacBayesSettings, *, bn_data=None, callback=None) -> PacBayesResult:
    """``pac_bayes_sigma`` with its options already validated in ``settings``."""
    s = settings
    device, source, state, pert, bns, bn_x = perturbation_setup(model, data, s.batch_size, s.bn, s.bn_batches, bn_data)
    team = parallel.current()
    draws = list(team.mine(s.samples))
    total = len(draws) * (3 + math.ceil(math.log2(1 / s.tolerance)) + 2)  # a typical bisection
    forward = lambda x: model(x).unsqueeze(0)  # (1, B, C)
    try:
        model.eval()
        if bns:
            _perturb.recompute_bn_stats(model, bns, bn_x)
        base, n = draw_sums(forward, source, s.loss, device)  # (1, 2): loss sum, error sum
        if n == 0:
            raise FlatcliError("the data hold no examples", "check the data set and max_examples")
        check_finite_value("loss", float(base[0, 0]) / n)
        error = float(base[0, 1]) / n
        if math.isnan(error):
            raise FlatcliError("PAC-Bayes flatness needs the 0-1 error, and the targets are not class labels",
                               "measure a classifier (integer labels)")
        z = [_perturb.draw_noise(pert.w0, s.seed, k) for k in draws]

        ticks = [0]

        def deviation(sigma: float) -> float:
            errors = []
            for zk in z:
                pert.set(_scaled(zk, pert.w0, sigma, s), 1.0)
                if bns:
                    _perturb.recompute_bn_stats(model, bns, bn_x)
                errors.append(draw_sums(forward, source, s.loss, device)[0][0, 1].double().cpu())
                if callback is not None:
                    ticks[0] += 1
                    callback(1, total)
            every = team.gather_units(errors, s.samples)
            return float(torch.stack(every).sum()) / (n * s.samples) - error

        result = _bisect(deviation, s)
        if callback is not None and ticks[0] < total:  # fewer probes than estimated: the bar ends full
            callback(total - ticks[0], total)
    finally:
        pert.restore()
        state.restore()
    sigma, hi, flatness, dev, probes, at_max, trace = result
    return PacBayesResult(sigma, hi, flatness, dev, probes, at_max, error, n, trace, s)


def _scaled(z: list[torch.Tensor], w0: list[torch.Tensor], sigma: float, s: PacBayesSettings) -> list[torch.Tensor]:
    """u = std ⊙ z with std = σ (plain) or sqrt(σ² w² + ε₀²) (magnitude-aware): a standard deviation."""
    if s.noise == "plain":
        return [sigma * t for t in z]
    return [torch.sqrt(sigma**2 * w.square() + s.epsilon**2) * t for t, w in zip(z, w0)]


def _bisect(deviation, s: PacBayesSettings):
    """(σ*, hi, flatness, deviation at σ*, probes, at_max, trace) by bisection on [0, max_sigma]."""
    trace = []

    def probe(sigma):
        d = deviation(sigma)
        trace.append((sigma, d))
        return d

    top = probe(s.max_sigma)
    if top <= s.target:
        return s.max_sigma, s.max_sigma, 1 / s.max_sigma**2, top, len(trace), True, trace
    lo, lo_dev = 0.0, 0.0  # plain noise at σ = 0 is no noise: deviation 0 exactly
    if s.noise == "magnitude-aware" and s.epsilon > 0:
        lo_dev = probe(0.0)
        if lo_dev > s.target:  # the ε₀ noise alone exceeds the target
            return 0.0, 0.0, math.inf, lo_dev, len(trace), False, trace
    hi = s.max_sigma
    while hi - lo > s.tolerance * hi and len(trace) < s.max_probes:
        mid = (lo + hi) / 2
        d = probe(mid)
        if d <= s.target:
            lo, lo_dev = mid, d
        else:
            hi = mid
    return lo, hi, (1 / lo**2 if lo > 0 else math.inf), lo_dev, len(trace), False, trace
