"""Relaxed belief propagation (AMP) for a committee machine tilted towards a reference (MATH.md §7): pure tensors.

Names as in MATH.md: F = X/√N (P, N), F2 = F∘F; state ŵ, v (N, K) and g (P, K); per pattern and hidden unit
the Gaussian cavity field has mean ω and variance V; per weight the field h = B + γ w̃ with precision A.
Everything is float64 and deterministic (no random draws), so equal inputs give equal bits.
"""
import math
from dataclasses import dataclass

import torch
from torch import Tensor

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class Problem:
    """The patterns, their labels ±1, the reference and the prior: everything that stays fixed along γ."""
    F: Tensor      # (P, N) patterns / √N
    y: Tensor      # (P,) labels ±1
    ref: Tensor    # (N, K) the reference w̃ (continuous: each column scaled to |w̃_k|² = N)
    binary: bool

    def __post_init__(self):
        self.F2 = self.F * self.F  # (P, N), computed once for the whole sweep


@dataclass
class State:
    """One point of the iteration: the weight marginals (means ŵ, variances v) and the output messages g."""
    w: Tensor      # (N, K) ŵ
    v: Tensor      # (N, K)
    g: Tensor      # (P, K)


def initial_state(problem: Problem, gamma: float) -> State:
    """The prior tilted by γ w̃ alone (no patterns yet): where the first point of a sweep starts."""
    zeros = torch.zeros(problem.F.shape[0], problem.ref.shape[1], dtype=problem.F.dtype)
    w, v = prior_moments(problem.binary, gamma * problem.ref, torch.zeros_like(problem.ref))
    return State(w, v, zeros)


def prior_moments(binary: bool, h: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of ρ(w) e^{h w − A w²/2}: ±1 weights (tanh h, 1 − tanh²), or the Gaussian ρ, λ = 1."""
    if binary:
        w = torch.tanh(h)
        return w, 1 - w * w
    return h / (1 + A), 1 / (1 + A)


def majority_given_unit(p: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """A±_k: probability that the majority of K units equals y when unit k is ±1 and unit l is +1 with
    probability p_l (independently); p (P, K), y (P,). A dynamic program over the other units' count of +1."""
    P, K = p.shape
    a_plus, a_minus = torch.empty_like(p), torch.empty_like(p)
    for k in range(K):
        count = torch.zeros(P, K, dtype=p.dtype)  # count[:, c] = Prob(c of the other units are +1)
        count[:, 0] = 1
        for l in range(K):
            if l != k:
                pl = p[:, l:l + 1]
                count = count * (1 - pl) + torch.nn.functional.pad(count[:, :-1], (1, 0)) * pl
        # with unit k at +1 the vote is positive when c ≥ (K−1)/2 others are +1; at −1 when c ≥ (K+1)/2
        up_plus, up_minus = count[:, (K - 1) // 2:].sum(1), count[:, (K + 1) // 2:].sum(1)
        positive = y > 0
        a_plus[:, k] = torch.where(positive, up_plus, 1 - up_plus)
        a_minus[:, k] = torch.where(positive, up_minus, 1 - up_minus)
    return a_plus.clamp(0, 1), a_minus.clamp(0, 1)


def output_node(omega: Tensor, V: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(g, ∂g, ln Z) per pattern and unit for the majority output, in the log domain where Z is tiny.

    Z = Φ(x) A⁺ + Φ(−x) A⁻ with x = ω/√V; g = ∂ ln Z/∂ω = φ(x)(A⁺ − A⁻)/(√V Z); ∂g = −∂g/∂ω = g (g + ω/V).
    """
    sd = V.sqrt()
    x = omega / sd
    a_plus, a_minus = majority_given_unit(torch.special.ndtr(x), y)
    log_z = torch.logaddexp(torch.special.log_ndtr(x) + a_plus.log(), torch.special.log_ndtr(-x) + a_minus.log())
    diff = a_plus - a_minus
    g = torch.sign(diff) * torch.exp(-0.5 * x * x - LOG_SQRT_2PI + diff.abs().log() - log_z) / sd
    return g, g * (g + omega / V), log_z


def sweep(problem: Problem, state: State, gamma: float):
    """One AMP iteration from ``state``: (new ŵ, new v, g, and the fields used, for the free entropy)."""
    F, F2 = problem.F, problem.F2
    V = F2 @ state.v                                   # (P, K)
    omega = F @ state.w - V * state.g                  # (P, K), Onsager term with the previous g
    g, dg, log_z = output_node(omega, V, problem.y)
    A = F2.T @ dg                                      # (N, K)
    B = F.T @ g + A * state.w                          # (N, K)
    h = B + gamma * problem.ref
    w, v = prior_moments(problem.binary, h, A)
    return w, v, g, (V, log_z, A, B, h)


def iterate(problem: Problem, state: State, gamma: float, damping: float, tol: float, max_iters: int):
    """Damped AMP to a fixed point: (state, iterations, converged). Converged: max |Δŵ| < tol in one step."""
    for it in range(1, max_iters + 1):
        w, v, g, _ = sweep(problem, state, gamma)
        if not (torch.isfinite(w).all() and torch.isfinite(v).all()):
            return state, it, False
        w = damping * state.w + (1 - damping) * w
        v = damping * state.v + (1 - damping) * v
        change = (w - state.w).abs().max().item()
        state = State(w, v, g)
        if change < tol:
            return state, it, True
    return state, max_iters, False


def free_entropy(problem: Problem, state: State, gamma: float) -> tuple[float, State]:
    """The Bethe free entropy Φ(γ) at a fixed point, and the state after one more (undamped) sweep from it.

    Φ = Σ_μ [ln Z_μ + ½ Σ_k V g²] + Σ_ik [ln Z_in(A, h) − B ŵ + ½ A (ŵ² + v)], with ln Z_μ taken once per
    pattern (it is the same for every k), and the moments ŵ, v those of the fields A, h. Z_in(A, h) = ∫ρ(w)
    e^{hw − Aw²/2}: √(2π/(1 + A)) e^{h²/(2(1 + A))} (Gaussian ρ, λ = 1) or 2 cosh(h) e^{−A/2} (±1 weights; the
    e^{−A/2}, from w² = 1, cancels the ½A(ŵ² + v) = ½A term, which MATH.md §7's "2 cosh h" leaves in).
    """
    w, v, g, (V, log_z, A, B, h) = sweep(problem, state, gamma)
    outputs = log_z[:, 0].sum() + 0.5 * (V * g * g).sum()
    if problem.binary:
        log_z_in = h.abs() + torch.log1p(torch.exp(-2 * h.abs())) - A / 2   # ln Σ_{w=±1} e^{hw − Aw²/2}
    else:
        log_z_in = LOG_SQRT_2PI - 0.5 * torch.log(1 + A) + h * h / (2 * (1 + A))
    inputs = (log_z_in - B * w + 0.5 * A * (w * w + v)).sum()
    return float(outputs + inputs), State(w, v, g)
