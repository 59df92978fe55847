"""Normalized local entropy s(w; γ) by thermodynamic integration over γ (MATH.md §2).

    s(γ) = (Φ(γ) − Φ_flat(γ)) / N = −∫_γ^∞ ∂s/∂γ' dγ'
    γ ∂s/∂γ = (β / 2N) ⟨(w' − w) · ∇L(w')⟩_γ        (Stein form of (γ/2)[1/γ − (β/N)⟨|w' − w|²⟩_γ])

with ⟨·⟩_γ under p_γ(w') ∝ exp(−β L(w') − (βγ/2)|w' − w|²), L the mean loss over the examples in use.
The slope g(t) = γ ∂s/∂γ is measured by Langevin chains (flatcli.measure._langevin) on a ladder uniform
in t = log γ, from γ_max = max(largest asked γ, 100 × the top Hessian eigenvalue) down to the smallest asked
γ, each γ warm-started from the previous one. s(t) = −∫_t^{t_max} g dt − g(t_max): piecewise-cubic quadrature
in t, plus the tail beyond γ_max where g ≈ c/γ. Each chain gives a whole curve s(γ); the reported value is
the mean over chains and its standard error std/sqrt(chains). Chain c draws its noise from a generator
seeded with draw_seed(seed, c) and the curvature estimate from one seeded with seed; chains run in passes of
fixed composition, so processes can share the passes out (shard, gather) and reassemble the one-process result.

Default step (lr parameterization δ ← δ − η∇U + sqrt(2η/β) ξ): η_γ = c/(h + γ), h the curvature estimate;
c starts at min(1, 2 N^(-1/3)) and each chain tunes its own toward 60% acceptance during burn-in
(MALA, full batch), or c is fixed at 0.02 (SGLD, minibatches: discretization bias ≈ c/2 ≈ 1%, plus the
usual minibatch-noise bias).
"""
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from flatcli.errors import FlatcliError
from flatcli.losses import check_loss
from flatcli.measure._langevin import FlatEnergy, Langevin
from flatcli.measure._perturb import draw_seed

TAIL_FACTOR = 100.0  # γ_max ≥ TAIL_FACTOR × curvature: the c/γ tail is then exact to ~0.5%
SGLD_SCALE = 0.02  # η (h + γ) for SGLD
BATCH_STREAM = -1  # draw_seed(seed, -1) orders the SGLD minibatches; chain c uses draw_seed(seed, c)
STATS = ("dot", "sq", "loss", "error", "accept", "lr")  # per chain and γ: Langevin.run's means, then η


@dataclass(frozen=True)
class LocalEntropyRow:
    gamma: float
    local_entropy: float  # s(γ), per parameter
    local_entropy_sem: float  # standard error over chains (NaN with one chain)
    distance: float  # ⟨|w' − w|²⟩_γ / N
    loss_mean: float  # ⟨L(w')⟩_γ
    error_mean: float  # ⟨ε(w')⟩_γ, NaN for regression and custom losses


@dataclass(frozen=True)
class LadderPoint:
    gamma: float
    langevin_lr: float  # η at this γ (after burn-in adaptation), mean over chains
    acceptance: float  # mean MALA acceptance probability; NaN for SGLD
    slope: float  # γ ∂s/∂γ, Stein form (the one integrated)
    slope_sem: float
    slope_direct: float  # (1/2)[1 − (βγ/N)⟨|w' − w|²⟩], for comparison


@dataclass(frozen=True)
class LocalEntropyResult:
    rows: list[LocalEntropyRow]  # the asked γ values, ascending
    ladder: list[LadderPoint]  # the internal γ ladder, ascending
    beta: float
    n_params: int
    n_examples: int  # 0 for an energy of the parameters
    curvature: float  # top |Hessian eigenvalue| estimate at w
    sampler: str  # "mala" or "sgld"
    steps: int
    burn_in: int
    chains: int
    batch_size: int | None
    acceptance: float  # mean over the ladder; NaN for SGLD
    seed: int
    chains_per_pass: int
    loss: float  # L(w), the checkpoint's own loss: ⟨L(w')⟩ below it means the chains went downhill
    error: float  # ε(w); NaN for regression and custom losses


def parse_gammas(text: str) -> list[float]:
    """"1,10,100" -> [1, 10, 100]; "start:stop:num" -> num values geometrically spaced, ends included."""
    fix = 'write a comma list like "1,10,100" or "start:stop:num" like "0.1:100:7", all values > 0'
    try:
        parts = text.split(":")
        vals = [float(v) for v in (parts[:2] if len(parts) == 3 else text.split(","))]
        num = int(parts[2]) if len(parts) == 3 else len(vals)
    except ValueError:
        raise FlatcliError(f"cannot parse γ values {text!r}", fix) from None
    if len(parts) not in (1, 3) or num < 1 or not all(math.isfinite(v) and v > 0 for v in vals):
        raise FlatcliError(f"bad γ values {text!r}: they must be finite and positive", fix)
    if len(parts) == 3:
        a, b = vals
        vals = [a] if num == 1 else [a * (b / a) ** (i / (num - 1)) for i in range(num - 1)] + [b]
    return vals


def gamma_ladder(gammas: Sequence[float], gamma_max: float, points_per_decade: int) -> np.ndarray:
    """Ascending γ values: a grid uniform in log γ from gamma_max down past min(gammas), plus gammas."""
    dt, top = math.log(10) / points_per_decade, math.log(gamma_max)
    asked = np.log(np.unique(gammas))
    grid = top - dt * np.arange(int(math.ceil((top - asked[0]) / dt)) + 1)
    grid = grid[grid > asked[0]]
    grid = grid[np.abs(grid[:, None] - asked[None, :]).min(1) > 0.3 * dt]  # no near-duplicate nodes
    return np.exp(np.unique(np.concatenate([grid, asked])))


def integration_matrix(t: np.ndarray) -> np.ndarray:
    """M with (M g)_i = ∫_{t_i}^{t_max} g dt + g(t_max): each interval integrates the cubic through its
    four nearest nodes (fewer if the ladder is shorter); the last term is the tail ∫ c e^{-t} dt."""
    m = len(t)
    per_interval = np.zeros((m, m))
    for k in range(m - 1):
        j0 = min(max(k - 1, 0), max(m - 4, 0))
        nodes = np.arange(j0, min(j0 + 4, m))
        u, du = t[nodes] - t[k], t[k + 1] - t[k]
        powers = np.arange(len(nodes))
        moments = du ** (powers + 1) / (powers + 1)  # ∫_0^du u^p du
        per_interval[k, nodes] = np.linalg.solve(u[None, :] ** powers[:, None], moments)
    M = np.cumsum(per_interval[::-1], axis=0)[::-1].copy()
    M[:, -1] += 1.0
    return M


def _check(gammas, beta, steps, burn_in, chains, langevin_lr, batch_size, points_per_decade, loss, data,
           chains_per_pass, shard):
    g = [float(v) for v in gammas]
    if not g or not all(math.isfinite(v) and v > 0 for v in g):
        raise FlatcliError(f"γ values must be finite and positive, got {list(gammas)}", "pass values > 0")
    if not 0 <= shard[0] < shard[1]:
        raise FlatcliError(f"shard {tuple(shard)} is not (rank, world) with 0 ≤ rank < world", "pass e.g. (0, 2)")
    for name, v, lo in (("steps", steps, 1), ("chains", chains, 1), ("points per decade", points_per_decade, 1),
                        ("chains per pass", chains_per_pass, 1)):
        if int(v) != v or v < lo:
            raise FlatcliError(f"{name} must be an integer ≥ {lo}, got {v}", f"pass {name} ≥ {lo}")
    if int(burn_in) != burn_in or not 0 <= burn_in < steps:
        raise FlatcliError(f"burn-in must be in [0, steps), got {burn_in} with {steps} steps",
                           "use fewer burn-in steps or more steps")
    for name, v in (("beta", beta), ("langevin lr", langevin_lr), ("batch size", batch_size)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise FlatcliError(f"{name} must be finite and positive, got {v}", f"pass {name} > 0 or leave it unset")
    if data is None and not callable(loss):
        raise FlatcliError("no data given", "pass (inputs, targets), or a callable energy(params) as the loss")
    if data is None and beta is None:
        raise FlatcliError("beta has no default for an energy of the parameters", "pass beta explicitly")
    if not callable(loss):
        check_loss(loss)
    return sorted(set(g))


def local_entropy(model: torch.nn.Module, data, gammas: Sequence[float], *, beta: float | None = None,
                  steps: int = 120, burn_in: int = 30, chains: int = 4, langevin_lr: float | None = None,
                  batch_size: int | None = None, loss: str | Callable = "cross-entropy",
                  points_per_decade: int = 3, seed: int = 0,
                  callback: Callable[[int, int], None] | None = None, chains_per_pass: int = 4,
                  shard: tuple[int, int] = (0, 1), gather: Callable | None = None) -> LocalEntropyResult:
    """Normalized local entropy s(γ) of the model's current weights w at each γ in gammas.

    data: (inputs, targets) tensors, or None with ``loss`` a callable energy(params: dict) -> scalar.
    loss: "cross-entropy", "mse", a callable loss(outputs, targets) -> mean scalar, or the energy above.
    beta: inverse temperature (default: the number of examples). steps/burn_in: Langevin steps per ladder γ,
    total and discarded. batch_size None or ≥ n: full-batch MALA (exact); smaller: SGLD on minibatches.
    langevin_lr: a fixed η at every γ instead of the adapted c/(h + γ). The model runs in eval mode
    (BatchNorm uses its stored statistics); its parameters and buffers are never changed.
    The defaults (120 steps with 30 burn-in, 4 chains, 3 ladder points per decade) take about a minute
    for a 20k-parameter MLP on 4000 examples on 2 CPU cores: one forward-backward pass per chain and step.
    callback(done, total): after each Langevin step of a pass, total = (ladder length) × steps × passes.

    chains_per_pass: the chains run in passes of this many (the last may hold fewer), each pass one
    vectorized (vmap) evaluation per step; chain c is in pass c // chains_per_pass. Chain c draws its
    randomness from its own generator, seeded from (seed, c), and tunes its own step, and a pass computes
    exactly the same way wherever it runs: the result depends on seed, chains and chains_per_pass, not on
    how the passes are shared out.
    shard=(rank, world), gather: share the passes among processes. This process runs the passes
    p ≡ rank (mod world); ``gather(tensor)`` must return every process's tensor in rank order (e.g. an
    all-gather); it is called twice, for the curvature (rank 0's is used everywhere, so every process builds
    the same γ ladder) and for the per-chain statistics. The result equals the one-process result bit for bit.
    """
    gammas = _check(gammas, beta, steps, burn_in, chains, langevin_lr, batch_size, points_per_decade, loss, data,
                    chains_per_pass, shard)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        energy = FlatEnergy(model, data, loss)
        beta = float(energy.n if beta is None else beta)
        return _measure(energy, gammas, beta, steps, burn_in, chains, chains_per_pass, langevin_lr, batch_size,
                        points_per_decade, seed, callback, shard, gather)
    finally:
        for m, mode in modes:
            m.training = mode


def _measure(energy, gammas, beta, steps, burn_in, chains, per_pass, langevin_lr, batch_size, ppd, seed,
             callback, shard, gather):
    N, device = energy.w.numel(), energy.w.device
    passes = [list(range(c, min(c + per_pass, chains))) for c in range(0, chains, per_pass)]
    h = energy.curvature(torch.Generator(device=device).manual_seed(seed))  # the same draws in every process
    if gather is not None:  # rank 0's estimate everywhere: one ladder for all
        h = float(gather(torch.tensor([h], dtype=torch.float64))[0][0])
    ladder = gamma_ladder(gammas, max(gammas[-1], TAIL_FACTOR * h), ppd)
    at_w = [float(v[0]) for v in energy(torch.zeros(1, N, device=device))[:2]]  # L(w), ε(w)
    mine = passes[shard[0]::shard[1]]
    total, done = len(ladder) * steps * len(mine), [0]

    def tick():
        done[0] += 1
        if callback:
            callback(done[0], total)

    def sampler(chains):  # every pass walks the same minibatch sequence (SGLD)
        gens = [torch.Generator(device=device).manual_seed(draw_seed(seed, c)) for c in chains]
        return Langevin(energy, beta, gens, batch_size, torch.Generator(device=device).manual_seed(
            draw_seed(seed, BATCH_STREAM)))

    runs = [_run_ladder(sampler(chains), ladder, h, steps, burn_in, langevin_lr, tick) for chains in mine]
    per_chain = torch.cat(runs) if runs else torch.zeros(0, len(ladder), len(STATS), dtype=torch.float64)
    if gather is not None:
        per_chain = _reassemble(gather(per_chain), passes)
    return _summarize(per_chain.numpy(), gammas, ladder, beta, N, energy, h, Langevin.is_mala(energy, batch_size),
                      steps, burn_in, chains, batch_size, seed, per_pass, at_w)


def _reassemble(parts: list[torch.Tensor], passes: list[list[int]]) -> torch.Tensor:
    """Every chain in chain order from ``world`` processes' results (process r: its passes r, r + world, ...)."""
    world, taken, out = len(parts), [0] * len(parts), []
    for p, chains in enumerate(passes):
        r = p % world
        out.append(parts[r][taken[r]:taken[r] + len(chains)])
        taken[r] += len(chains)
    return torch.cat(out)


def _summarize(per_chain, gammas, ladder, beta, N, energy, h, mala, steps, burn_in, chains, batch_size, seed,
               chains_per_pass, at_w):
    """(chains, ladder, stats) per-chain means -> the rows at the asked γ, the ladder, the whole result."""
    _check_finite(per_chain, ladder)
    col = dict(zip(STATS, np.moveaxis(per_chain, 2, 0)))  # name -> (chains, ladder)
    slope = beta / (2 * N) * col["dot"]  # γ ∂s/∂γ, Stein form
    curves = -slope @ integration_matrix(np.log(ladder)).T  # (chains, ladder): one s(γ) curve per chain
    sem = lambda a: a.std(0, ddof=1) / math.sqrt(chains) if chains > 1 else np.full(a.shape[1], np.nan)
    s, s_sem, slope_sem = curves.mean(0), sem(curves), sem(slope)
    sq, loss_mean, err_mean, lrs = (col[k].mean(0) for k in ("sq", "loss", "error", "lr"))
    acc = col["accept"].mean(0) if mala else np.full(len(ladder), np.nan)
    idx = [int(np.argmin(np.abs(np.log(ladder) - math.log(g)))) for g in gammas]  # asked γ are on the ladder
    rows = [LocalEntropyRow(g, float(s[i]), float(s_sem[i]), float(sq[i] / N), float(loss_mean[i]),
                            float(err_mean[i])) for g, i in zip(gammas, idx)]
    points = [LadderPoint(float(g), float(lr), float(a), float(m), float(e), float(0.5 * (1 - beta * g * q / N)))
              for g, lr, a, m, e, q in zip(ladder, lrs, acc, slope.mean(0), slope_sem, sq)]
    return LocalEntropyResult(rows, points, beta, N, 0 if energy.x is None else energy.n, h,
                              "mala" if mala else "sgld", steps, burn_in, chains, batch_size,
                              float(acc.mean()), seed, chains_per_pass, *at_w)


def _check_finite(per_chain, ladder):
    """A chain that blew up (SGLD with too large a step) is reported after the gather, so every process
    raises the same error instead of one raising while the others wait."""
    bad = ~np.isfinite(per_chain[:, :, :2]).all(axis=(0, 2))  # (ladder,): dot and sq
    if bad.any():
        i = int(np.nonzero(bad)[0].max())  # the chains run from the largest γ down
        lr = per_chain[:, i, STATS.index("lr")].mean()
        raise FlatcliError(f"the Langevin chain diverged at γ = {ladder[i]:g} with lr {lr:g}",
                           "lower the Langevin lr, or leave it unset to choose it from the curvature")


def _run_ladder(sampler, ladder, h, steps, burn_in, langevin_lr, tick) -> torch.Tensor:
    """Chains from the largest γ down, each γ warm-started from the previous one.
    Returns the per-chain means of STATS, (chains, ladder, len(STATS)) float64 on the CPU, in ascending γ;
    NaN from the γ where a chain diverged on."""
    C, N, beta = len(sampler.gens), sampler.energy.w.numel(), sampler.beta
    device = sampler.energy.w.device
    c0 = min(1.0, 2 * N ** (-1 / 3)) if sampler.mala else SGLD_SCALE
    scale = torch.full((C,), c0, dtype=torch.float64, device=device)  # c = η (h + γ), per chain
    # start near equilibrium at γ_max ≫ h: p_γmax ≈ N(0, I/(β γ_max))
    delta = sampler.randn() / math.sqrt(beta * ladder[-1])
    out = torch.full((C, len(ladder), len(STATS)), math.nan, dtype=torch.float64)
    prev = None
    for j in reversed(range(len(ladder))):
        gamma = float(ladder[j])
        if prev:  # flat directions (h ≪ γ) get their exact variance 1/(βγ) at once; stiff ones relax fast
            delta = delta * math.sqrt(prev / gamma)
        lr = torch.full_like(scale, langevin_lr) if langevin_lr else scale / (h + gamma)
        delta, lr, st = sampler.run(delta, gamma, lr, steps, burn_in,
                                    adapt=sampler.mala and langevin_lr is None, tick=tick)
        out[:, j] = torch.stack([*(st[k] for k in STATS[:-1]), lr], 1).cpu()
        if not torch.isfinite(delta).all():  # stop here; marked for _check_finite
            out[:, j, :2] = math.nan
            break
        scale, prev = lr * (h + gamma), gamma
    return out
